//! The one place where error kinds become HTTP statuses and gRPC codes.
//!
//! Architecture Invariant: every error a client can see goes through [`ApiError`], and
//! [`ErrorKind::codes`] is an exhaustive match: adding a kind does not compile until
//! it has exactly one HTTP status and one gRPC code.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use lattice_inference::InferError;
use tonic::Code;

use crate::shm::ShmError;

/// Longest error message sent to a client, in bytes.
pub const MAX_MESSAGE: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    Infer(InferError),
    /// JSON, binary header or protobuf contents that do not parse.
    Malformed(String),
    /// A body above the configured limit.
    PayloadTooLarge {
        limit: usize,
    },
    /// The server is not ready (starting or draining).
    NotReady,
    /// The tenant's token bucket is empty.
    RateLimited {
        tenant: String,
        retry_after: Duration,
    },
    /// A missing or wrong credential.
    Unauthenticated(String),
    /// A valid credential that does not cover the request: no or another tenant in
    /// `X-Tenant-ID`, or a scope the operation needs is missing.
    Forbidden(String),
    /// The tenant has as many requests in flight as it may.
    TenantBusy {
        tenant: String,
        limit: u32,
    },
    /// The REST task gateway has a session for as many tenants as it keeps, and none
    /// is idle yet.
    TaskSessionsFull {
        limit: usize,
        retry_after: Duration,
    },
    /// The answer would be larger than `--max-response-bytes`.
    ResponseTooLarge {
        size: usize,
        limit: usize,
    },
    /// An agent task that failed, with the gRPC code its result (or the task gateway)
    /// gave it.
    Task {
        code: Code,
        message: String,
    },
    /// A shared-memory region call, or an input or output that names a region.
    Shm(ShmError),
}

/// Closed set of error kinds, each with one HTTP status and one gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    NotFound,
    InvalidInput,
    BatchTooLarge,
    Malformed,
    PayloadTooLarge,
    Overloaded,
    DeadlineExceeded,
    Cancelled,
    Unavailable,
    LoadFailed,
    Unauthenticated,
    PermissionDenied,
    ResponseTooLarge,
    /// A feature this server does not offer (CUDA shared memory without a GPU, shared
    /// memory switched off).
    Unsupported,
    /// A name that is already taken (a shared-memory region).
    AlreadyExists,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 16] = [
        ErrorKind::NotFound,
        ErrorKind::InvalidInput,
        ErrorKind::BatchTooLarge,
        ErrorKind::Malformed,
        ErrorKind::PayloadTooLarge,
        ErrorKind::Overloaded,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Cancelled,
        ErrorKind::Unavailable,
        ErrorKind::LoadFailed,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::ResponseTooLarge,
        ErrorKind::Unsupported,
        ErrorKind::AlreadyExists,
        ErrorKind::Internal,
    ];

    /// The table.
    pub fn codes(self) -> (StatusCode, Code) {
        match self {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, Code::NotFound),
            ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            ErrorKind::BatchTooLarge => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            ErrorKind::Malformed => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            // tonic's own message-size check answers OUT_OF_RANGE; the HTTP side agrees
            // with it so one kind keeps one code on both protocols.
            ErrorKind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::OutOfRange),
            ErrorKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, Code::ResourceExhausted),
            ErrorKind::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded),
            // 499 is nginx's "client closed request"; the client is gone, so it is for logs.
            ErrorKind::Cancelled => (
                StatusCode::from_u16(499).expect("499 is a valid status code"),
                Code::Cancelled,
            ),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            ErrorKind::LoadFailed => (StatusCode::BAD_REQUEST, Code::FailedPrecondition),
            ErrorKind::Unauthenticated => (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, Code::PermissionDenied),
            // The request is what must change (fewer outputs, a smaller batch), so a
            // 4xx. Checked before encoding; RESOURCE_EXHAUSTED is what gRPC itself
            // uses for a message larger than the receiver's maximum.
            ErrorKind::ResponseTooLarge => (StatusCode::BAD_REQUEST, Code::ResourceExhausted),
            // Triton's UNSUPPORTED: 501 / UNIMPLEMENTED.
            ErrorKind::Unsupported => (StatusCode::NOT_IMPLEMENTED, Code::Unimplemented),
            // Triton's ALREADY_EXISTS: 400 on HTTP, its own code on gRPC.
            ErrorKind::AlreadyExists => (StatusCode::BAD_REQUEST, Code::AlreadyExists),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
        }
    }
}

impl ErrorKind {
    /// A stable snake_case name, for error shapes that carry a code string
    /// (OpenAI's `error.code`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::BatchTooLarge => "batch_too_large",
            ErrorKind::Malformed => "malformed_request",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::LoadFailed => "load_failed",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::ResponseTooLarge => "response_too_large",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Internal => "internal_error",
        }
    }

    /// The kind of a failure that arrives as a gRPC code (an agent task's result):
    /// the inverse of the table where it has one, the nearest kind otherwise.
    pub fn of_grpc(code: Code) -> ErrorKind {
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => ErrorKind::InvalidInput,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::Unimplemented => ErrorKind::Unsupported,
            Code::NotFound => ErrorKind::NotFound,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::ResourceExhausted => ErrorKind::Overloaded,
            Code::Unavailable | Code::Aborted => ErrorKind::Unavailable,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => ErrorKind::Internal,
        }
    }
}

impl ApiError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Infer(e) => match e {
                InferError::ModelNotFound(_) | InferError::VersionNotFound { .. } => ErrorKind::NotFound,
                InferError::ModelNotReady(_) => ErrorKind::Unavailable,
                InferError::InvalidInput(_) | InferError::InvalidVersion(_) => ErrorKind::InvalidInput,
                InferError::BatchTooLarge { .. } => ErrorKind::BatchTooLarge,
                InferError::Overloaded { .. } | InferError::SequencesFull { .. } => ErrorKind::Overloaded,
                InferError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
                InferError::Cancelled => ErrorKind::Cancelled,
                InferError::LoadFailed { .. } => ErrorKind::LoadFailed,
                InferError::Backend(_) => ErrorKind::Internal,
            },
            ApiError::Malformed(_) => ErrorKind::Malformed,
            ApiError::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            ApiError::NotReady => ErrorKind::Unavailable,
            ApiError::RateLimited { .. } => ErrorKind::Overloaded,
            ApiError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            ApiError::Forbidden(_) => ErrorKind::PermissionDenied,
            ApiError::TenantBusy { .. } => ErrorKind::Overloaded,
            ApiError::TaskSessionsFull { .. } => ErrorKind::Overloaded,
            ApiError::ResponseTooLarge { .. } => ErrorKind::ResponseTooLarge,
            ApiError::Task { code, .. } => ErrorKind::of_grpc(*code),
            ApiError::Shm(e) => match e {
                ShmError::Disabled | ShmError::CudaUnsupported => ErrorKind::Unsupported,
                ShmError::Invalid(_) | ShmError::Truncated { .. } => ErrorKind::InvalidInput,
                ShmError::Duplicate(_) => ErrorKind::AlreadyExists,
                ShmError::TooManyRegions { .. } | ShmError::TooManyBytes { .. } => ErrorKind::Overloaded,
                ShmError::UnknownRegion(_)
                | ShmError::UnknownStatus(_)
                | ShmError::UnknownCudaRegion(_)
                | ShmError::NotCuda(_) => ErrorKind::NotFound,
                ShmError::InputsTooLarge { .. } => ErrorKind::PayloadTooLarge,
                ShmError::Io { .. } => ErrorKind::Internal,
            },
        }
    }

    /// What the client is told; at most [`MAX_MESSAGE`] bytes, so nothing a request
    /// names can inflate an error body or a `grpc-message` header.
    pub fn message(&self) -> String {
        let mut m = self.full_message();
        if m.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
            m.push_str("...");
        }
        m
    }

    fn full_message(&self) -> String {
        match self {
            ApiError::Infer(e) => e.to_string(),
            ApiError::Malformed(m) => m.clone(),
            ApiError::PayloadTooLarge { limit } => format!("request body exceeds the limit of {limit} bytes"),
            ApiError::NotReady => "server is not ready".to_string(),
            ApiError::RateLimited { tenant, retry_after } => format!(
                "tenant '{tenant}' is over its request rate; retry after {} ms",
                retry_after.as_millis()
            ),
            ApiError::Unauthenticated(m) | ApiError::Forbidden(m) | ApiError::Task { message: m, .. } => m.clone(),
            ApiError::TenantBusy { tenant, limit } => format!(
                "tenant '{tenant}' already has {limit} requests in flight (its concurrency limit); retry when one finishes"
            ),
            ApiError::TaskSessionsFull { limit, retry_after } => format!(
                "{limit} tenants already have task sessions on this replica; retry after {} s",
                retry_after.as_secs().max(1)
            ),
            ApiError::Shm(e) => e.to_string(),
            ApiError::ResponseTooLarge { size, limit } => format!(
                "the response would be {size} bytes, above the server's limit of {limit} (--max-response-bytes); request fewer outputs or a smaller batch"
            ),
        }
    }

    /// When a retry can succeed: the HTTP `Retry-After` (rounded up to whole
    /// seconds, so a client that waits that long is not refused again for the same
    /// reason) and the gRPC `google.rpc.RetryInfo` (exact).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Infer(InferError::Overloaded { retry_after, .. })
            | ApiError::Infer(InferError::SequencesFull { retry_after, .. })
            | ApiError::RateLimited { retry_after, .. }
            | ApiError::TaskSessionsFull { retry_after, .. } => Some(*retry_after),
            // Nothing says when a request of the tenant finishes; a second is the
            // usual length of one.
            ApiError::TenantBusy { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        ApiError::Infer(e)
    }
}

impl From<ShmError> for ApiError {
    fn from(e: ShmError) -> Self {
        ApiError::Shm(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.kind().codes();
        if status.is_server_error() {
            tracing::error!(error = %self.message(), "request failed");
        }
        let mut resp = (status, Json(serde_json::json!({ "error": self.message() }))).into_response();
        if let Some(after) = self.retry_after() {
            let secs = retry_after_secs(after).to_string();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&secs).expect("digits are a valid header value"),
            );
        }
        resp
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(after: Duration) -> u64 {
    let secs = after.as_secs();
    let secs = if after.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    };
    secs.max(1)
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};
        let (_, code) = e.kind().codes();
        match e.retry_after() {
            // `google.rpc.RetryInfo` in the status details, as gRPC clients read it.
            Some(after) => {
                tonic::Status::with_error_details(code, e.message(), ErrorDetails::with_retry_info(Some(after)))
            }
            None => tonic::Status::new(code, e.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_distinct_http_error_status() {
        for k in ErrorKind::ALL {
            let (http, grpc) = k.codes();
            assert!(http.is_client_error() || http.is_server_error(), "{k:?}");
            assert_ne!(grpc, Code::Ok, "{k:?}");
        }
    }

    #[test]
    fn overload_carries_retry_after() {
        let e = ApiError::Infer(InferError::Overloaded {
            model: "m".into(),
            limit: 1,
            retry_after: Duration::from_secs(2),
        });
        let r = e.clone().into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), Code::ResourceExhausted);
        use tonic_types::StatusExt;
        let info = status.get_details_retry_info().expect("RetryInfo in the details");
        assert_eq!(info.retry_delay, Some(Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
