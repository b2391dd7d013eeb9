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

use crate::config::SimConfig;
use crate::metrics::ClusterView;

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

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        parse_policy(name)
    }
}

/// Parses a policy name as the CLI takes it (case-insensitive).
pub fn parse_policy(name: &str) -> Result<PolicyKind, String> {
    let wanted = name.trim().to_ascii_lowercase();
    PolicyKind::ALL.into_iter().find(|p| p.name() == wanted).ok_or_else(|| {
        let names: Vec<&str> = PolicyKind::ALL.iter().map(|p| p.name()).collect();
        format!("unknown policy `{name}`; expected one of {}", names.join(", "))
    })
}

/// Builds the policy with the configuration's settings, for a fleet that starts
/// with `initial` ready pods.
pub(crate) fn build(kind: PolicyKind, config: &SimConfig, initial: u32) -> Box<dyn Autoscaler> {
    let per_pod_target = config.target_utilization * f64::from(config.concurrency);
    match kind {
        PolicyKind::Hpa => Box::new(hpa::HpaPolicy::new(
            config.hpa.clone(),
            config.min_replicas,
            config.max_replicas,
            per_pod_target,
        )),
        PolicyKind::Keda => Box::new(keda::KedaPolicy::new(
            config.keda.clone(),
            config.hpa.clone(),
            per_pod_target,
            config.max_replicas,
        )),
        PolicyKind::Kpa => Box::new(kpa::KpaPolicy::new(
            config.kpa.clone(),
            f64::from(config.concurrency),
            config.target_utilization,
            config.max_replicas,
            initial,
        )),
        PolicyKind::Ray => Box::new(ray::RayPolicy::new(
            config.ray.clone(),
            config.min_replicas,
            config.max_replicas,
        )),
        PolicyKind::Lattice => Box::new(lattice::LatticePolicy::new(
            config.lattice.clone(),
            lattice_scaling::Fleet {
                pod_capacity: config.pod_capacity(),
                target_utilization: config.target_utilization,
                lead_time_s: config.lead_time_s(),
                min: config.min_replicas,
                max: config.max_replicas,
            },
        )),
    }
}
