//! The scaling policy Lattice ships, in one place, with no I/O: the server runs it
//! behind the KEDA external scaler and the pod-deletion-cost controller, and the
//! simulator (`lattice simulate`) imports the very same code, so what is simulated
//! is what is deployed.
//!
//! # Layout
//! - [`predictive`]: the fleet size from per-second arrivals and queue depth (trend
//!   over the lead time, Little's law, backlog drain, windowed scale-down).
//! - [`guard`]: may this replica be removed now (load below 30 % for 60 s, held
//!   120 s after a busy second), and its pod-deletion cost.
//! - [`keda`]: the metric value that KEDA turns into a replica count.
//!
//! Every constant of the policy is a field of [`predictive::PredictiveConfig`] or
//! [`guard::GuardConfig`], with the defaults documented there.

pub mod guard;
pub mod keda;
pub mod predictive;

pub use guard::{GuardConfig, ScaleInGuard};
pub use predictive::{Fleet, Predictive, PredictiveConfig, Second};

/// Every constant of the shipped policy, as `--scaling-config` (TOML) sets them.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub predictive: PredictiveConfig,
    pub guard: GuardConfig,
}
