//! The metric pipeline: what each autoscaler can know, and how late.
//!
//! Policies never read the cluster directly. They get a [`ClusterView`]: the pod
//! list as the Kubernetes API reports it now, plus delayed, sampled metrics:
//!
//! - **Prometheus** (HPA via the Prometheus Adapter, KEDA's Prometheus scaler):
//!   every `scrape_interval_s` it reads the gauges of the *ready* pods (a pod
//!   exports nothing while warming up or draining, so it shows up as missing) and
//!   the gateway's queue depth; a reader sees a scrape `adapter_delay_s` later.
//! - **Knative's collector**: one-second buckets of revision-wide concurrency
//!   (in flight plus queued at the activator), available as each second ends.
//! - **Ray Serve**: replicas and handles push ongoing requests (running plus
//!   queued) every `metrics_interval_s`; the controller averages the pushed
//!   samples over the look-back period.
//! - **The gateway's own counters** (Lattice): arrivals (admitted or rejected) and
//!   queue depth per second, `gateway_delay_s` late.

use crate::cluster::{PodInfo, PodState};
use crate::config::MetricsConfig;

/// One Prometheus scrape.
#[derive(Clone, Debug)]
pub(crate) struct Scrape {
    pub at: u64,
    /// (pod id, in-flight requests) for each pod that was ready at `at`.
    pub pods: Vec<(usize, u32)>,
    /// Gateway queue depth at `at`.
    pub queue: u32,
}

/// Per-second signals recorded when the second ends.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SecondSignals {
    /// Arrivals, rejected ones included: the gateway saw them.
    pub offered: u32,
    pub queue_end: u32,
    /// Time-averaged in-flight plus queued requests.
    pub concurrency: f64,
}

pub(crate) struct MetricsPipeline {
    config: MetricsConfig,
    scrapes: Vec<Scrape>,
    seconds: Vec<SecondSignals>,
}

/// What a policy sees at one decision point.
pub(crate) struct ClusterView<'a> {
    pub now: u64,
    /// The Deployment's `spec.replicas`.
    pub desired: u32,
    pub pods: &'a [PodInfo],
    pub metrics: &'a MetricsPipeline,
}

// === MetricsPipeline ===

impl MetricsPipeline {
    pub(crate) fn new(config: &MetricsConfig) -> Self {
        MetricsPipeline {
            config: config.clone(),
            scrapes: Vec::new(),
            seconds: Vec::new(),
        }
    }

    pub(crate) fn scrape_due(&self, now: u64) -> bool {
        now % self.config.scrape_interval_s == 0
    }

    pub(crate) fn push_scrape(&mut self, scrape: Scrape) {
        // Only scrapes younger than the adapter delay plus one interval can still be
        // the latest visible one.
        let keep = (self.config.adapter_delay_s / self.config.scrape_interval_s + 2) as usize;
        if self.scrapes.len() >= keep {
            self.scrapes.remove(0);
        }
        self.scrapes.push(scrape);
    }

    pub(crate) fn record_second(&mut self, signals: SecondSignals) {
        self.seconds.push(signals);
    }

    /// The newest scrape a Prometheus reader has at `now`.
    pub(crate) fn prometheus(&self, now: u64) -> Option<&Scrape> {
        self.scrapes
            .iter()
            .rev()
            .find(|s| s.at + self.config.adapter_delay_s <= now)
    }

    /// Mean of the one-second concurrency buckets in [now − window, now); `None`
    /// before the first second has ended (Knative's "no data").
    pub(crate) fn concurrency_average(&self, now: u64, window_s: u64) -> Option<f64> {
        self.average(now.saturating_sub(window_s), now)
    }

    /// Mean concurrency over the recorded seconds in [from, to).
    pub(crate) fn average(&self, from: u64, to: u64) -> Option<f64> {
        let to = (to as usize).min(self.seconds.len());
        let from = (from as usize).min(to);
        let window = &self.seconds[from..to];
        (!window.is_empty()).then(|| window.iter().map(|s| s.concurrency).sum::<f64>() / window.len() as f64)
    }

    /// The gateway's per-second counters visible at `now`: seconds s ≤ now − delay.
    pub(crate) fn gateway(&self, now: u64) -> &[SecondSignals] {
        let visible = (now + 1).saturating_sub(self.config.gateway_delay_s) as usize;
        &self.seconds[..visible.min(self.seconds.len())]
    }
}

// === ClusterView ===

impl ClusterView<'_> {
    pub(crate) fn count(&self, state: PodState) -> u32 {
        self.pods.iter().filter(|p| p.state == state).count() as u32
    }

    /// Pods not being deleted: the Deployment's `status.replicas`.
    pub(crate) fn status_replicas(&self) -> u32 {
        self.pods.iter().filter(|p| p.state != PodState::Terminating).count() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> MetricsPipeline {
        MetricsPipeline::new(&MetricsConfig {
            scrape_interval_s: 15,
            adapter_delay_s: 5,
            gateway_delay_s: 2,
        })
    }

    #[test]
    fn a_scrape_is_visible_only_after_the_adapter_delay() {
        let mut m = pipeline();
        m.push_scrape(Scrape {
            at: 0,
            pods: vec![],
            queue: 1,
        });
        m.push_scrape(Scrape {
            at: 15,
            pods: vec![],
            queue: 2,
        });
        assert_eq!(m.prometheus(4).map(|s| s.queue), None);
        assert_eq!(m.prometheus(19).map(|s| s.queue), Some(1));
        assert_eq!(m.prometheus(20).map(|s| s.queue), Some(2));
    }

    #[test]
    fn gateway_counters_lag_by_the_gateway_delay() {
        let mut m = pipeline();
        for s in 0..10 {
            m.record_second(SecondSignals {
                offered: s,
                ..SecondSignals::default()
            });
        }
        // At t = 10 the seconds 0..=8 are visible (second 8 ended at t = 9).
        assert_eq!(m.gateway(10).len(), 9);
        assert_eq!(m.gateway(1).len(), 0);
    }

    #[test]
    fn averages_cover_the_requested_window_only() {
        let mut m = pipeline();
        for c in [1.0, 2.0, 3.0, 4.0] {
            m.record_second(SecondSignals {
                concurrency: c,
                ..SecondSignals::default()
            });
        }
        assert_eq!(m.concurrency_average(4, 2), Some(3.5));
        assert_eq!(m.concurrency_average(4, 60), Some(2.5));
        assert_eq!(m.concurrency_average(0, 60), None);
    }
}
