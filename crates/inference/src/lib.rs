//! The inference core: model repository, ONNX backend, dynamic batching scheduler.
//!
//! # Layout
//! - [`tensor`]: datatypes and tensors in wire layout (little-endian, row-major).
//! - [`config`]: the per-model `config.toml` (Triton's field names).
//! - [`backend`]: the [`backend::Backend`] trait and its ONNX Runtime implementation.
//! - [`pipeline`]: text tokenization in front of a model, pooling behind it.
//! - [`scheduler`]: per-model bounded priority queue, batch formation, instance threads.
//! - [`repository`]: loads, reloads (atomic swap) and unloads model versions.
//! - [`quality`]: confidence, entropy and drift features for the metrics.
//!
//! Nothing here knows HTTP, gRPC or JSON: the edge converts (see `lattice-server`).

pub mod backend;
pub mod config;
pub mod config_override;
pub mod error;
pub mod pipeline;
pub mod quality;
pub mod repository;
pub mod scheduler;
pub mod stats;
pub mod tensor;

pub use error::InferError;
pub use repository::RequestParts;
pub use repository::{ModelRepository, RepositoryOptions};
pub use scheduler::{InferRequest, InferResponse};
pub use tensor::{DataType, Tensor, TensorData};
