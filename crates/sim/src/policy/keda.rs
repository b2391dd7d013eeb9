//! KEDA: a ScaledObject with one Prometheus trigger (total in-flight plus queued
//! requests), as in `deploy/k8s/base/keda.yaml`.
//!
//! Two loops, as in the real system (KEDA docs, "Activation vs scaling"):
//! - the KEDA operator polls the trigger every `pollingInterval` and owns 0 ↔ 1:
//!   a trigger is active when its value is strictly above `activationThreshold`;
//!   inactive for `cooldownPeriod` with `minReplicaCount: 0` scales to zero;
//! - the HPA that KEDA generates (`minReplicas = max(minReplicaCount, 1)`) owns
//!   1 ↔ N on the same metric as an External AverageValue target, on its own 15 s
//!   sync. While the target is at zero the HPA is disabled.

use crate::policy::hpa::{external_average_value_replicas, to_milli, CalcError, HpaConfig, HpaController};
use crate::policy::Autoscaler;
use crate::signals::{ClusterView, Scrape};

/// ScaledObject fields. Defaults are KEDA's.
#[derive(Clone, Debug)]
pub struct KedaConfig {
    /// `pollingInterval`. Default 30 s.
    pub polling_interval_s: u64,
    /// `cooldownPeriod`: idle time before 1 → 0. Default 300 s.
    pub cooldown_period_s: u64,
    /// The trigger's `activationThreshold`. Default 0.
    pub activation_threshold: f64,
    /// `minReplicaCount`. Default 0 (scale to zero).
    pub min_replica_count: u32,
}

/// The KEDA operator's activation state plus the HPA it generated.
pub struct KedaPolicy {
    config: KedaConfig,
    hpa: HpaController,
    /// Per-replica threshold of the trigger (the AverageValue target), milli-units.
    target_milli: i64,
    /// `status.lastActiveTime`.
    last_active: Option<u64>,
}

/// What the operator does at one poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Scale from zero to this many replicas.
    Activate(u32),
    /// Scale to zero.
    Deactivate,
    /// Leave the replicas to the HPA.
    Keep,
}

// === KedaConfig ===

impl Default for KedaConfig {
    fn default() -> Self {
        KedaConfig {
            polling_interval_s: 30,
            cooldown_period_s: 300,
            activation_threshold: 0.0,
            min_replica_count: 0,
        }
    }
}

// === KedaPolicy ===

impl KedaPolicy {
    /// `threshold` is the trigger's per-replica target; `max` is `maxReplicaCount`.
    pub fn new(config: KedaConfig, hpa: HpaConfig, threshold: f64, max: u32) -> Self {
        let hpa_min = config.min_replica_count.max(1);
        KedaPolicy {
            config,
            hpa: HpaController::new(hpa, hpa_min, max),
            target_milli: to_milli(threshold),
            last_active: None,
        }
    }

    /// One operator poll (`checkScalers`): `metric` is the trigger's value, `None`
    /// when the scaler failed (then nothing changes).
    pub fn poll(&mut self, now: u64, replicas: u32, metric: Option<f64>) -> Activation {
        let Some(value) = metric else { return Activation::Keep };
        let min = self.config.min_replica_count;
        // With minReplicaCount ≥ 1 the scaler always counts as active.
        let active = min >= 1 || value > self.config.activation_threshold;
        if active {
            self.last_active = Some(now);
            if replicas == 0 {
                return Activation::Activate(min.max(1));
            }
            return Activation::Keep;
        }
        let cooled = self
            .last_active
            .is_none_or(|at| now >= at + self.config.cooldown_period_s);
        if replicas > 0 && min == 0 && cooled {
            return Activation::Deactivate;
        }
        Activation::Keep
    }
}

impl Autoscaler for KedaPolicy {
    fn tick(&mut self, view: &ClusterView) -> Option<u32> {
        let scrape = view.metrics.prometheus(view.now);
        let mut desired = view.desired;
        if view.now % self.config.polling_interval_s == 0 {
            match self.poll(view.now, desired, scrape.map(total_demand)) {
                Activation::Activate(n) => desired = n,
                Activation::Deactivate => desired = 0,
                Activation::Keep => {}
            }
        }
        if view.now % self.hpa.config().sync_period_s == 0 {
            let status = view.status_replicas();
            let (target, tolerance) = (self.target_milli, self.hpa.config().tolerance);
            desired = self.hpa.reconcile(view.now, desired, || {
                let total = scrape.map(|s| to_milli(total_demand(s))).ok_or(CalcError::NoMetrics)?;
                Ok(external_average_value_replicas(status, total, target, tolerance))
            });
        }
        (desired != view.desired).then_some(desired)
    }
}

/// The trigger's query: `sum(in-flight) + queue depth`.
fn total_demand(scrape: &Scrape) -> f64 {
    f64::from(scrape.pods.iter().map(|&(_, n)| n).sum::<u32>() + scrape.queue)
}
