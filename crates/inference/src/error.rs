//! Errors of the inference core. Each variant is something a caller can act on; the
//! edge (`lattice-server`) maps every variant to one HTTP status and one gRPC code.

use std::time::Duration;

use crate::repository::echo;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum InferError {
    // Texts that clients and their tests match on are Triton's, word for word.
    #[error("Request for unknown model: '{}' is not found", echo(.0))]
    ModelNotFound(String),
    #[error("Request for unknown model: '{}' version {version} is not found", echo(name))]
    VersionNotFound { name: String, version: String },
    /// A version that is not an integer above 0.
    #[error("{}", version_text(.0))]
    InvalidVersion(String),
    #[error("model '{0}' is not ready")]
    ModelNotReady(String),
    /// Wrong input name, datatype, shape, element count or a missing input.
    #[error("{0}")]
    InvalidInput(String),
    #[error("batch size {got} exceeds the model's max_batch_size {max}")]
    BatchTooLarge { got: usize, max: usize },
    /// The model's queue is full; the caller should retry after the hint.
    #[error("model '{model}' queue is full ({limit} pending requests)")]
    Overloaded {
        model: String,
        limit: usize,
        retry_after: Duration,
    },
    /// As many sequences are live as the model allows (`max_candidate_sequences`).
    #[error("model '{}' already has {limit} live sequences (max_candidate_sequences); end one (sequence_end) or retry once one has been idle for the model's max_sequence_idle_microseconds", echo(model))]
    SequencesFull {
        model: String,
        limit: usize,
        retry_after: Duration,
    },
    #[error("request deadline exceeded before compute")]
    DeadlineExceeded,
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("failed to load '{}', {reason}", echo(name))]
    LoadFailed { name: String, reason: String },
    /// The engine failed on input that passed validation.
    #[error("inference failed: {0}")]
    Backend(String),
}

/// Triton's two texts: one for a string that is no integer, one for an integer <= 0.
fn version_text(v: &str) -> String {
    if v.trim().parse::<i64>().is_ok() {
        format!(
            "invalid model version specified '{}' , version should be an integral value > 0",
            echo(v)
        )
    } else {
        format!(
            "failed to get model version from specified version string '{}' (details: stol), version should be an integral value > 0",
            echo(v)
        )
    }
}

/// Parses a requested version: empty is none (the default version), otherwise an
/// integer above 0.
pub fn parse_requested_version(v: &str) -> Result<Option<i64>, InferError> {
    if v.is_empty() {
        return Ok(None);
    }
    match v.parse::<i64>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(InferError::InvalidVersion(v.to_string())),
    }
}

impl InferError {
    /// The metrics' closed set of outcomes.
    pub fn error_type(&self) -> crate::model_metrics::ErrorType {
        use crate::model_metrics::ErrorType;
        match self {
            InferError::ModelNotFound(_)
            | InferError::VersionNotFound { .. }
            | InferError::ModelNotReady(_)
            | InferError::LoadFailed { .. } => ErrorType::Unavailable,
            InferError::InvalidInput(_) | InferError::InvalidVersion(_) | InferError::BatchTooLarge { .. } => {
                ErrorType::InputSchemaViolation
            }
            InferError::Overloaded { .. } | InferError::SequencesFull { .. } => ErrorType::Overloaded,
            InferError::DeadlineExceeded => ErrorType::ModelTimeout,
            InferError::Cancelled => ErrorType::Cancelled,
            InferError::Backend(_) => ErrorType::Internal,
        }
    }
}
