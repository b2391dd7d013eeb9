//! The inference core: model repository, engine backends (ONNX Runtime, behind a
//! factory), dynamic batching scheduler.
//!
//! # Layout
//! - [`tensor`]: datatypes and tensors in wire layout (little-endian, row-major).
//! - [`config`]: the per-model `config.toml` (Triton's field names).
//! - [`backend`]: the [`backend::Backend`] trait and its ONNX Runtime implementation.
//! - [`pipeline`]: text tokenization in front of a model, pooling behind it.
//! - [`scheduler`]: per-model bounded priority queue, batch formation, instance threads.
//! - [`repository`]: the registry: loads, reloads (atomic swap) and unloads model versions.
//! - [`loader`]: a model's files, engine instances (through a
//!   [`backend::BackendFactory`]) and config-against-engine check.
//! - [`validate`]: a request checked against its model's config.
//! - [`warmup`]: the flagged warm-up inference before a version serves.
//! - [`sequence`]: stateful sequences (implicit state carried between requests).
//! - [`quality`]: confidence, entropy and drift features for the metrics.
//! - [`model_metrics`]: the inference plane's metric set (every `ai_*` name), its
//!   per-version recorders and scrape-time collector.
//!
//! Nothing here knows HTTP, gRPC or JSON: the edge converts (see `lattice-server`).

pub mod backend;
pub mod config;
pub mod config_override;
pub mod error;
pub mod loader;
pub mod model_metrics;
pub mod pipeline;
pub mod quality;
pub mod repository;
pub mod scheduler;
pub mod sequence;
pub mod stats;
pub mod tensor;
pub mod validate;
pub mod warmup;

pub use error::InferError;
pub use model_metrics::{ErrorType, ModelLabels, ModelMetrics, ModelRecorder};
pub use repository::RequestParts;
pub use repository::{ModelRepository, RepositoryOptions};
pub use scheduler::{InferRequest, InferResponse};
pub use tensor::{DataType, Tensor, TensorData};
