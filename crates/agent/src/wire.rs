//! Small helpers over the generated `lattice.agent.v1` types: clocks, ids, statuses
//! and the classification of frames into sequenced and unsequenced.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lattice_proto::{
    agent::{agent_message, agent_response, AgentResponse, Envelope},
    google::rpc::Status,
};
use tonic::Code;

/// Protocol version spoken by this build; `Hello.protocol_version` must match.
pub const PROTOCOL_VERSION: u32 = 1;

/// Microseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Time left until an absolute deadline (`deadline_us`, 0 = none).
pub fn remaining(deadline_us: i64) -> Option<Duration> {
    (deadline_us > 0).then(|| Duration::from_micros(u64::try_from(deadline_us - now_us()).unwrap_or(0)))
}

/// Session, task and orchestrator ids: UUIDv7, sortable by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A frame's msg_id: unique without a syscall per frame (UUID generation reads
/// the OS RNG each time, which showed up in profiles): a random per-process
/// prefix and a counter.
pub fn new_msg_id() -> String {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    };
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    format!("{prefix:016x}-{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn status(code: Code, message: impl Into<String>) -> Status {
    Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    }
}

pub fn ok_status() -> Status {
    status(Code::Ok, "")
}

pub fn code_of(s: &Option<Status>) -> Code {
    s.as_ref().map_or(Code::Ok, |s| Code::from_i32(s.code))
}

/// An envelope for a new frame; `seq_no` and `ack_seq` are filled by the session.
pub fn envelope(correlation_id: &str) -> Envelope {
    Envelope {
        msg_id: new_msg_id(),
        sent_at_us: now_us(),
        correlation_id: correlation_id.to_string(),
        ..Envelope::default()
    }
}

/// Reliable frames carry a seq_no, sit in the outbox until acked, and are deduped.
/// The rest are control frames: losing one is harmless.
pub fn is_reliable_request(body: &agent_message::Body) -> bool {
    use agent_message::Body;
    !matches!(
        body,
        Body::Heartbeat(_) | Body::Ack(_) | Body::Credit(_) | Body::Goodbye(_) | Body::Error(_) | Body::Hello(_)
    )
}

pub fn is_reliable_response(body: &agent_response::Body) -> bool {
    use agent_response::Body;
    !matches!(
        body,
        Body::Heartbeat(_)
            // Progress is advisory: the result that follows is what must arrive.
            | Body::Progress(_)
            | Body::Ack(_)
            | Body::Credit(_)
            | Body::Goodbye(_)
            | Body::Error(_)
            | Body::Welcome(_)
            | Body::Drain(_)
    )
}

pub fn response(env: Envelope, body: agent_response::Body) -> AgentResponse {
    AgentResponse {
        env: Some(env),
        body: Some(body),
    }
}

/// Name of a frame's body, for logs and metric labels.
pub fn request_kind(body: &agent_message::Body) -> &'static str {
    use agent_message::Body;
    match body {
        Body::Hello(_) => "hello",
        Body::Offer(_) => "offer",
        Body::Progress(_) => "progress",
        Body::Result(_) => "result",
        Body::Cancel(_) => "cancel",
        Body::Heartbeat(_) => "heartbeat",
        Body::Credit(_) => "credit",
        Body::MemoryOp(_) => "memory_op",
        Body::ToolCall(_) => "tool_call",
        Body::Ack(_) => "ack",
        Body::Goodbye(_) => "goodbye",
        Body::Error(_) => "error",
    }
}

pub fn response_kind(body: &agent_response::Body) -> &'static str {
    use agent_response::Body;
    match body {
        Body::Welcome(_) => "welcome",
        Body::Assign(_) => "assign",
        Body::Progress(_) => "progress",
        Body::Result(_) => "result",
        Body::Cancel(_) => "cancel",
        Body::Heartbeat(_) => "heartbeat",
        Body::Credit(_) => "credit",
        Body::Memory(_) => "memory",
        Body::ToolResult(_) => "tool_result",
        Body::Ack(_) => "ack",
        Body::Drain(_) => "drain",
        Body::Goodbye(_) => "goodbye",
        Body::Error(_) => "error",
    }
}

/// The lower-case name of a gRPC code, as metric label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
