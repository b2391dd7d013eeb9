//! The scale-in guard: may the autoscaler remove this replica now?
//!
//! Rule: the replica's load (saturation: queued + computing over capacity) stayed
//! below `low_load` (30 %) for the last `window` (60 s). Once it has not, the guard
//! holds "unsafe" for `hold` (120 s) before checking again, so a replica that just
//! absorbed a burst is not the one removed the moment the burst ebbs. The server
//! exports it as `lattice_scaling_scale_in_safe`, and the load as
//! `lattice_scaling_pod_deletion_cost`: the value copied into the pod's
//! `controller.kubernetes.io/pod-deletion-cost` annotation, so the ReplicaSet
//! removes idle replicas first.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The guard's constants.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Saturation below which a second counts as quiet. Default 0.3.
    pub low_load: f64,
    /// Quiet time needed before removal is safe. Default 60 s.
    pub window_s: u64,
    /// How long a busy second keeps the replica unsafe. Default 120 s.
    pub hold_s: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            low_load: 0.3,
            window_s: 60,
            hold_s: 120,
        }
    }
}

impl GuardConfig {
    fn window(&self) -> Duration {
        Duration::from_secs(self.window_s)
    }

    fn hold(&self) -> Duration {
        Duration::from_secs(self.hold_s)
    }
}

#[derive(Debug, Default)]
pub struct ScaleInGuard {
    config: GuardConfig,
    samples: VecDeque<(Instant, f64)>,
    first: Option<Instant>,
    hold_until: Option<Instant>,
}

impl ScaleInGuard {
    pub fn new(config: GuardConfig) -> ScaleInGuard {
        ScaleInGuard {
            config,
            ..ScaleInGuard::default()
        }
    }

    pub fn observe(&mut self, now: Instant, saturation: f64) {
        self.first.get_or_insert(now);
        if saturation >= self.config.low_load {
            self.hold_until = Some(now + self.config.hold());
        }
        self.samples.push_back((now, saturation));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.config.window())
        {
            self.samples.pop_front();
        }
    }

    pub fn safe(&self, now: Instant) -> bool {
        let observed_long_enough = self
            .first
            .is_some_and(|f| now.duration_since(f) >= self.config.window());
        let held = self.hold_until.is_some_and(|h| now < h);
        observed_long_enough && !held && self.samples.iter().all(|(_, s)| *s < self.config.low_load)
    }

    /// Mean saturation over the window, scaled to an integer cost (0 = idle).
    pub fn deletion_cost(&self) -> i64 {
        if self.samples.is_empty() {
            return 0;
        }
        let mean = self.samples.iter().map(|(_, s)| s).sum::<f64>() / self.samples.len() as f64;
        (mean * 1000.0).round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one sample per second from `from` to `to` seconds.
    fn feed(g: &mut ScaleInGuard, t0: Instant, from: u64, to: u64, s: f64) {
        for sec in from..to {
            g.observe(t0 + Duration::from_secs(sec), s);
        }
    }

    #[test]
    fn safe_only_after_sixty_quiet_seconds_and_a_burst_holds_for_two_minutes() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut g = ScaleInGuard::default();
        feed(&mut g, t0, 0, 59, 0.1);
        assert!(!g.safe(at(58)), "not observed for 60 s yet");
        feed(&mut g, t0, 59, 61, 0.1);
        assert!(g.safe(at(60)));
        // One busy second...
        g.observe(at(61), 0.8);
        assert!(!g.safe(at(61)));
        feed(&mut g, t0, 62, 180, 0.05);
        // ...holds for 120 s even though the last 60 s were quiet.
        assert!(!g.safe(at(179)));
        feed(&mut g, t0, 180, 182, 0.05);
        assert!(g.safe(at(181)));
        assert!(g.deletion_cost() < 100);
    }

    #[test]
    fn thresholds_are_configurable() {
        let t0 = Instant::now();
        let mut g = ScaleInGuard::new(GuardConfig {
            low_load: 0.5,
            window_s: 5,
            hold_s: 10,
        });
        feed(&mut g, t0, 0, 6, 0.4);
        assert!(
            g.safe(t0 + Duration::from_secs(5)),
            "0.4 is quiet under a 0.5 threshold"
        );
    }
}
