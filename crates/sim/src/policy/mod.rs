//! The autoscalers. Each sees only a [`ClusterView`]: the pod list as the API
//! reports it and the metrics its real counterpart would read, as late as they
//! would arrive. The pure decision functions are public so the golden tests can
//! replay the upstream test tables against them.

pub mod hpa;
pub mod keda;
pub mod kpa;
pub mod lattice;
pub mod ray;

use std::fmt;
use std::str::FromStr;

use crate::signals::ClusterView;

/// The autoscaler to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Kubernetes HPA on a per-pod custom metric via the Prometheus Adapter.
    Hpa,
    /// KEDA with a Prometheus trigger (scale to zero, then its generated HPA).
    Keda,
    /// Knative's KPA.
    Kpa,
    /// Ray Serve's default policy.
    Ray,
    /// Lattice's predictive queue-model policy.
    Lattice,
}

/// Called once per simulated second, after pod transitions and before the
/// second's requests; returns a new `spec.replicas` when it changes it.
pub(crate) trait Autoscaler {
    fn tick(&mut self, view: &ClusterView) -> Option<u32>;
}

// === PolicyKind ===

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Hpa,
        PolicyKind::Keda,
        PolicyKind::Kpa,
        PolicyKind::Ray,
        PolicyKind::Lattice,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Hpa => "hpa",
            PolicyKind::Keda => "keda",
            PolicyKind::Kpa => "kpa",
            PolicyKind::Ray => "ray",
            PolicyKind::Lattice => "lattice",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name `lattice simulate` does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = PolicyKind::ALL.iter().map(|p| p.name()).collect();
        write!(f, "unknown policy `{}`; expected one of {}", self.0, names.join(", "))
    }
}

impl std::error::Error for UnknownPolicy {}

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        parse_policy(name)
    }
}

/// Parses a policy name as the CLI takes it (case-insensitive).
pub fn parse_policy(name: &str) -> Result<PolicyKind, UnknownPolicy> {
    let wanted = name.trim().to_ascii_lowercase();
    PolicyKind::ALL
        .into_iter()
        .find(|p| p.name() == wanted)
        .ok_or_else(|| UnknownPolicy(name.to_string()))
}
