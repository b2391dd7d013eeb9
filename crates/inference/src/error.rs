//! Errors of the inference core. Each variant is something a caller can act on; the
//! edge (`lattice-server`) maps every variant to one HTTP status and one gRPC code.

use std::time::Duration;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum InferError {
    #[error("model '{0}' is not found")]
    ModelNotFound(String),
    #[error("model '{name}' version {version} is not found")]
    VersionNotFound { name: String, version: String },
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
    #[error("request deadline exceeded before compute")]
    DeadlineExceeded,
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("failed to load model '{name}': {reason}")]
    LoadFailed { name: String, reason: String },
    /// The engine failed on input that passed validation.
    #[error("inference failed: {0}")]
    Backend(String),
}

impl InferError {
    /// The metrics' closed set of outcomes.
    pub fn error_type(&self) -> lattice_observability::ErrorType {
        use lattice_observability::ErrorType;
        match self {
            InferError::ModelNotFound(_)
            | InferError::VersionNotFound { .. }
            | InferError::ModelNotReady(_)
            | InferError::LoadFailed { .. } => ErrorType::Unavailable,
            InferError::InvalidInput(_) | InferError::BatchTooLarge { .. } => ErrorType::InputSchemaViolation,
            InferError::Overloaded { .. } => ErrorType::Overloaded,
            InferError::DeadlineExceeded => ErrorType::ModelTimeout,
            InferError::Cancelled => ErrorType::Cancelled,
            InferError::Backend(_) => ErrorType::Internal,
        }
    }
}
