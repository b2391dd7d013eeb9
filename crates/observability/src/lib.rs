//! Observability for Lattice: one typed metrics registry ([`metrics::Metrics`]),
//! AI-quality signals ([`quality`]), process figures ([`process`]) and the tracing
//! and log set-up ([`telemetry`]).
//!
//! Architecture Invariant: every metric name is declared once, in [`metrics`].

mod encode;
pub mod gpu;
pub mod metrics;
pub mod process;
pub mod quality;
pub mod telemetry;

pub use metrics::{ErrorType, Metrics, ModelLabels, ModelRecorder};
