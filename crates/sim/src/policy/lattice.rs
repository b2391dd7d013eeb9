//! Lattice's predictive policy in the simulator: the shipped policy
//! ([`lattice_scaling::Predictive`], the code the server's KEDA external scaler
//! runs) fed from the simulated gateway's per-second counters. Nothing of the
//! policy lives here; this module only adapts the simulator's view to it.

use lattice_scaling::{Fleet, Predictive, Second};

use crate::policy::Autoscaler;
use crate::signals::ClusterView;

/// The policy's constants, as the server takes them.
pub type LatticeConfig = lattice_scaling::PredictiveConfig;

pub(crate) struct LatticePolicy {
    policy: Predictive,
    /// Next gateway second to feed.
    next_second: usize,
}

impl LatticePolicy {
    pub(crate) fn new(config: LatticeConfig, fleet: Fleet) -> Self {
        LatticePolicy {
            policy: Predictive::new(config, fleet),
            next_second: 0,
        }
    }
}

impl Autoscaler for LatticePolicy {
    fn tick(&mut self, view: &ClusterView) -> Option<u32> {
        let seconds = view.metrics.gateway(view.now);
        if seconds.is_empty() {
            return None;
        }
        for s in &seconds[self.next_second.min(seconds.len())..] {
            self.policy.observe(Second {
                arrivals: f64::from(s.offered),
                queue: f64::from(s.queue_end),
            });
        }
        self.next_second = seconds.len();
        self.policy.decide(view.now, view.desired)
    }
}

/// Replays per-second gateway counters through the simulator's Lattice policy the
/// way a simulation drives it (at tick `t` the counters up to second `t - 1` are
/// visible, and each decision becomes the next tick's fleet size); returns the fleet
/// size after each tick. The server's scaler must give the same answers for the same
/// seconds (`crates/server/tests/scaler.rs`).
pub fn replay(config: LatticeConfig, fleet: Fleet, seconds: &[Second], initial: u32) -> Vec<u32> {
    let mut metrics = crate::signals::MetricsPipeline::new(&crate::config::MetricsConfig {
        gateway_delay_s: 1,
        ..crate::config::MetricsConfig::default()
    });
    let mut policy = LatticePolicy::new(config, fleet);
    let mut desired = initial;
    let mut out = Vec::with_capacity(seconds.len());
    for (t, s) in seconds.iter().enumerate() {
        metrics.record_second(crate::signals::SecondSignals {
            offered: s.arrivals.round() as u32,
            queue_end: s.queue.round() as u32,
            concurrency: 0.0,
        });
        let view = ClusterView {
            now: t as u64 + 1,
            desired,
            pods: &[],
            metrics: &metrics,
        };
        if let Some(n) = policy.tick(&view) {
            desired = n;
        }
        out.push(desired);
    }
    out
}
