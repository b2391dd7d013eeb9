//! Observability for Lattice: the metrics registry and its encoding ([`metrics`]),
//! scrape-time helpers for the crates' collectors ([`encode`]), AI-quality
//! statistics ([`quality`]), process and GPU figures ([`process`], [`gpu`]) and the
//! tracing and log set-up ([`telemetry`]).
//!
//! It knows no domain: the inference, agent, edge and scaling metric sets are
//! declared and registered by the crates that record them.
//!
//! Architecture Invariant: every metric name is declared once, in the metric set of
//! the crate that records it ([`metric_set!`]); this crate declares only the process
//! and GPU figures.

pub mod encode;
pub mod gpu;
pub mod metrics;
pub mod process;
pub mod quality;
pub mod telemetry;

pub use metrics::{MetricSet, Metrics, OutcomeLabels, Registrar};
