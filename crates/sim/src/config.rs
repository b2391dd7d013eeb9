//! Simulation parameters. The defaults describe a small ONNX embedding service:
//! 100 ms per request, four requests at a time per pod (40 req/s per pod), a
//! minute from "pod created" to "pod serving", and a 500 ms latency SLO.

use crate::policy::keda::KedaConfig;
use crate::policy::kpa::KpaConfig;
use crate::policy::lattice::LatticeConfig;
use crate::policy::ray::RayConfig;
use crate::policy::{self, hpa::HpaConfig, Autoscaler, PolicyKind};

/// The first value of a [`SimConfig`] a run cannot work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidConfig(pub &'static str);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidConfig {}

/// Everything a run needs besides the trace and the policy.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Time a request holds a concurrency slot, queueing excluded. Default 100 ms.
    pub service_time_ms: f64,
    /// Requests one pod serves at once. Default 4, so a pod serves 40 req/s.
    pub concurrency: u32,
    /// Scheduling, image pull and container start: the pod is `Pending`. Default 20 s.
    pub pod_start_s: u64,
    /// Model load and warm-up: the pod is `Running` but not `Ready`, and exports no
    /// per-pod metrics. Default 40 s.
    pub warmup_s: u64,
    /// A request slower than this (queue wait + service) violates the SLO; so does
    /// every rejected request. Default 500 ms.
    pub slo_ms: f64,
    /// Longest gateway queue; arrivals beyond it are rejected (429). Default 1000.
    pub max_queue: usize,
    /// Gateway token buckets; a request needs a token from each. Default: one
    /// bucket of 1000 req/s with a burst of 2000.
    pub token_buckets: Vec<TokenBucketConfig>,
    /// Replica bounds for HPA, Ray and Lattice (KEDA's and Knative's own minimum is
    /// 0, see their configs). Default 1..=50.
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Ready pods at t = 0. `None` (default) sizes the fleet for the first minute
    /// of the trace at `target_utilization`, so no policy starts cold.
    pub initial_replicas: Option<u32>,
    /// Busy fraction of the concurrency slots each policy aims for: HPA and KEDA
    /// targets are `target_utilization × concurrency` in-flight requests per pod,
    /// Knative's `container-concurrency-target-percentage` (default 70 % there too),
    /// and Lattice's planning utilisation. Default 0.7.
    pub target_utilization: f64,
    pub metrics: MetricsConfig,
    /// Seed for the arrival times within each second; the same seed gives every
    /// policy the same requests.
    pub seed: u64,
    pub hpa: HpaConfig,
    pub keda: KedaConfig,
    pub kpa: KpaConfig,
    pub ray: RayConfig,
    pub lattice: LatticeConfig,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucketConfig {
    pub rate_per_s: f64,
    pub burst: f64,
}

/// The metric pipeline between the pods and the autoscalers.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Prometheus scrapes every ready pod's gauges this often. Default 15 s.
    pub scrape_interval_s: u64,
    /// Extra age of a scrape when the Prometheus Adapter or KEDA reads it
    /// (ingestion, query, caching). Default 5 s.
    pub adapter_delay_s: u64,
    /// Lag of the gateway's own per-second counters as Lattice reads them. The
    /// gateway pushes them as each second ends (as KEDA's `external-push` scaler or
    /// Knative's activator stats would), so the default is 1 s: at time t the
    /// policy sees the seconds up to t − 1, like Knative's one-second buckets.
    pub gateway_delay_s: u64,
}

// === SimConfig ===

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            service_time_ms: 100.0,
            concurrency: 4,
            pod_start_s: 20,
            warmup_s: 40,
            slo_ms: 500.0,
            max_queue: 1000,
            token_buckets: vec![TokenBucketConfig {
                rate_per_s: 1000.0,
                burst: 2000.0,
            }],
            min_replicas: 1,
            max_replicas: 50,
            initial_replicas: None,
            target_utilization: 0.7,
            metrics: MetricsConfig::default(),
            seed: 1,
            hpa: HpaConfig::default(),
            keda: KedaConfig::default(),
            kpa: KpaConfig::default(),
            ray: RayConfig::default(),
            lattice: LatticeConfig::default(),
        }
    }
}

impl SimConfig {
    /// Requests per second one ready pod completes when busy.
    pub fn pod_capacity(&self) -> f64 {
        f64::from(self.concurrency) * 1000.0 / self.service_time_ms
    }

    /// Seconds from pod creation to serving.
    pub fn lead_time_s(&self) -> u64 {
        self.pod_start_s + self.warmup_s
    }

    /// Checks the values a run cannot work with; returns the first problem.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let checks: [(bool, &str); 7] = [
            (self.service_time_ms > 0.0, "service_time_ms must be positive"),
            (self.concurrency > 0, "concurrency must be at least 1"),
            (self.slo_ms > 0.0, "slo_ms must be positive"),
            (self.max_replicas > 0, "max_replicas must be at least 1"),
            (
                self.min_replicas <= self.max_replicas,
                "min_replicas must not exceed max_replicas",
            ),
            (
                self.target_utilization > 0.0 && self.target_utilization <= 1.0,
                "target_utilization must be in (0, 1]",
            ),
            (
                self.metrics.scrape_interval_s > 0,
                "metrics.scrape_interval_s must be at least 1",
            ),
        ];
        if let Some((_, problem)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(InvalidConfig(problem));
        }
        if self.token_buckets.iter().any(|b| b.rate_per_s < 0.0 || b.burst < 1.0) {
            return Err(InvalidConfig(
                "token buckets need a non-negative rate and a burst of at least 1",
            ));
        }
        Ok(())
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            scrape_interval_s: 15,
            adapter_delay_s: 5,
            gateway_delay_s: 1,
        }
    }
}

impl SimConfig {
    /// Builds the policy with the configuration's settings, for a fleet that starts
    /// with `initial` ready pods.
    pub(crate) fn autoscaler(&self, kind: PolicyKind, initial: u32) -> Box<dyn Autoscaler> {
        let config = self;
        let per_pod_target = config.target_utilization * f64::from(config.concurrency);
        match kind {
            PolicyKind::Hpa => Box::new(policy::hpa::HpaPolicy::new(
                config.hpa.clone(),
                config.min_replicas,
                config.max_replicas,
                per_pod_target,
            )),
            PolicyKind::Keda => Box::new(policy::keda::KedaPolicy::new(
                config.keda.clone(),
                config.hpa.clone(),
                per_pod_target,
                config.max_replicas,
            )),
            PolicyKind::Kpa => Box::new(policy::kpa::KpaPolicy::new(
                config.kpa.clone(),
                f64::from(config.concurrency),
                config.target_utilization,
                config.max_replicas,
                initial,
            )),
            PolicyKind::Ray => Box::new(policy::ray::RayPolicy::new(
                config.ray.clone(),
                config.min_replicas,
                config.max_replicas,
            )),
            PolicyKind::Lattice => Box::new(policy::lattice::LatticePolicy::new(
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
}
