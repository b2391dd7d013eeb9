//! The Knative Pod Autoscaler, ported from `knative/serving`:
//! `pkg/autoscaler/scaling/autoscaler.go` (`Scale`: stable and panic windows,
//! rate limits, panic mode that never scales down, scale-down delay) and the
//! scale-to-zero rule of `pkg/reconciler/autoscaling/kpa/scaler.go`
//! (`handleScaleToZero`: hold at one pod for the grace period first).
//!
//! The metric is revision-wide concurrency (in flight plus queued at the
//! activator) in one-second buckets; stable = mean of the last 60, panic = mean
//! of the last 6.

use std::collections::VecDeque;

use crate::cluster::PodState;
use crate::policy::Autoscaler;
use crate::signals::ClusterView;

/// `config-autoscaler` keys. Defaults are Knative's.
#[derive(Clone, Debug)]
pub struct KpaConfig {
    /// `tick-interval`. Default 2 s.
    pub tick_interval_s: u64,
    /// `stable-window`. Default 60 s.
    pub stable_window_s: u64,
    /// `panic-window-percentage`. Default 10 (so 6 s).
    pub panic_window_percentage: f64,
    /// `panic-threshold-percentage`. Default 200.
    pub panic_threshold_percentage: f64,
    /// `max-scale-up-rate`. Default 1000.
    pub max_scale_up_rate: f64,
    /// `max-scale-down-rate`. Default 2.
    pub max_scale_down_rate: f64,
    /// `scale-to-zero-grace-period`. Default 30 s.
    pub scale_to_zero_grace_s: u64,
    /// `scale-down-delay`. Default 0.
    pub scale_down_delay_s: u64,
    /// `target-burst-capacity`. Default 200.
    pub target_burst_capacity: f64,
    /// `min-scale`. Default 0.
    pub min_scale: u32,
}

/// The decider's inputs (`DeciderSpec`).
#[derive(Clone, Debug, PartialEq)]
pub struct DeciderSpec {
    /// Concurrency per pod to aim for: `TotalValue × target utilization`.
    pub target_value: f64,
    /// Concurrency one pod can take (`containerConcurrency`).
    pub total_value: f64,
    pub target_burst_capacity: f64,
    /// As a ratio: 2.0 for 200 %.
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub stable_window_s: f64,
    /// False when another revision takes the traffic; then scale-down is unlimited.
    pub reachable: bool,
    pub activation_scale: i32,
    pub scale_down_delay_s: f64,
}

/// `ScaleResult`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleResult {
    pub desired: i32,
    pub excess_burst_capacity: i32,
}

/// The autoscaler state for one revision.
#[derive(Clone, Debug)]
pub struct Decider {
    spec: DeciderSpec,
    panic_time: Option<f64>,
    max_panic_pods: i32,
    delay: Option<MaxWindow>,
}

/// `max.TimeWindow`: the largest value recorded in the last `buckets` buckets.
#[derive(Clone, Debug)]
struct MaxWindow {
    granularity_s: f64,
    buckets: i64,
    entries: VecDeque<(i64, i32)>,
}

pub(crate) struct KpaPolicy {
    config: KpaConfig,
    decider: Decider,
    max_scale: u32,
    /// Since when the decider has wanted zero pods.
    zero_since: Option<u64>,
}

// === KpaConfig ===

impl Default for KpaConfig {
    fn default() -> Self {
        KpaConfig {
            tick_interval_s: 2,
            stable_window_s: 60,
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_to_zero_grace_s: 30,
            scale_down_delay_s: 0,
            target_burst_capacity: 200.0,
            min_scale: 0,
        }
    }
}

// === Decider ===

impl Decider {
    /// `newAutoscaler`: an autoscaler created while more than one pod is ready starts
    /// in panic mode holding that many pods, so a restart never scales down blindly.
    pub fn new(spec: DeciderSpec, ready_pods: u32, now: f64) -> Self {
        let delay = (spec.scale_down_delay_s > 0.0).then(|| MaxWindow::new(spec.scale_down_delay_s, 2.0));
        let panic_time = (ready_pods > 1).then_some(now);
        Decider {
            spec,
            panic_time,
            max_panic_pods: ready_pods as i32,
            delay,
        }
    }

    pub fn in_panic(&self) -> bool {
        self.panic_time.is_some()
    }

    /// `Scale`: the desired pod count from the stable and panic window averages.
    pub fn scale(&mut self, now: f64, ready_pods: u32, stable: f64, panic: f64) -> ScaleResult {
        let spec = &self.spec;
        let ready = f64::from(ready_pods.max(1));
        // At least one more pod on a scale-up even with a tiny rate, and the mirror
        // image on a scale-down.
        let max_up = (spec.max_scale_up_rate * ready).ceil();
        let max_down = if spec.reachable {
            (ready / spec.max_scale_down_rate).floor()
        } else {
            0.0
        };
        let dspc = (stable / spec.target_value).ceil();
        let dppc = (panic / spec.target_value).ceil();
        let mut desired_stable = dspc.max(max_down).min(max_up) as i32;
        let mut desired_panic = dppc.max(max_down).min(max_up) as i32;
        if spec.activation_scale > 1 {
            if dspc > 0.0 && spec.activation_scale > desired_stable {
                desired_stable = spec.activation_scale;
            }
            if dppc > 0.0 && spec.activation_scale > desired_panic {
                desired_panic = spec.activation_scale;
            }
        }
        let over_threshold = dppc / ready >= spec.panic_threshold;
        match self.panic_time {
            _ if over_threshold => self.panic_time = Some(now),
            // Stop panicking once the surge has made its way into the stable window.
            Some(since) if since + spec.stable_window_s < now => {
                self.panic_time = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }
        let mut desired = desired_stable;
        if self.panic_time.is_some() {
            desired = desired.max(desired_panic);
            // Panic mode only ever raises the count.
            self.max_panic_pods = self.max_panic_pods.max(desired);
            desired = self.max_panic_pods;
        }
        if let Some(window) = &mut self.delay {
            window.record(now, desired);
            desired = window.current();
        }
        let excess_burst_capacity = if spec.target_burst_capacity == 0.0 {
            0
        } else if spec.target_burst_capacity > 0.0 {
            (f64::from(ready_pods) * spec.total_value - spec.target_burst_capacity - panic).floor() as i32
        } else {
            -1
        };
        ScaleResult {
            desired,
            excess_burst_capacity,
        }
    }
}

// === MaxWindow ===

impl MaxWindow {
    fn new(duration_s: f64, granularity_s: f64) -> Self {
        MaxWindow {
            granularity_s,
            buckets: (duration_s / granularity_s) as i64,
            entries: VecDeque::new(),
        }
    }

    fn record(&mut self, now: f64, value: i32) {
        let index = (now / self.granularity_s).floor() as i64;
        while self.entries.front().is_some_and(|&(i, _)| i <= index - self.buckets) {
            self.entries.pop_front();
        }
        match self.entries.back_mut() {
            // Two values in the same bucket keep the larger.
            Some((i, v)) if *i == index => *v = (*v).max(value),
            _ => self.entries.push_back((index, value)),
        }
    }

    fn current(&self) -> i32 {
        self.entries.iter().map(|&(_, v)| v).max().unwrap_or(0)
    }
}

// === KpaPolicy ===

impl KpaPolicy {
    /// `container_concurrency` is the hard per-pod limit; the target is that times
    /// `target_utilization`.
    pub(crate) fn new(
        config: KpaConfig,
        container_concurrency: f64,
        target_utilization: f64,
        max_scale: u32,
        ready_pods: u32,
    ) -> Self {
        let spec = DeciderSpec {
            target_value: container_concurrency * target_utilization,
            total_value: container_concurrency,
            target_burst_capacity: config.target_burst_capacity,
            panic_threshold: config.panic_threshold_percentage / 100.0,
            max_scale_up_rate: config.max_scale_up_rate,
            max_scale_down_rate: config.max_scale_down_rate,
            stable_window_s: config.stable_window_s as f64,
            reachable: true,
            activation_scale: 1,
            scale_down_delay_s: config.scale_down_delay_s as f64,
        };
        KpaPolicy {
            decider: Decider::new(spec, ready_pods, 0.0),
            config,
            max_scale,
            zero_since: None,
        }
    }
}

impl Autoscaler for KpaPolicy {
    fn tick(&mut self, view: &ClusterView) -> Option<u32> {
        if view.now % self.config.tick_interval_s != 0 {
            return None;
        }
        let panic_window = (self.config.stable_window_s as f64 * self.config.panic_window_percentage / 100.0) as u64;
        let stable = view
            .metrics
            .concurrency_average(view.now, self.config.stable_window_s)?;
        let panic = view.metrics.concurrency_average(view.now, panic_window.max(1))?;
        let result = self
            .decider
            .scale(view.now as f64, view.count(PodState::Ready), stable, panic);
        let mut desired = (result.desired.max(0) as u32).clamp(self.config.min_scale, self.max_scale);
        if desired == 0 && view.desired > 0 {
            // The activator has to be in the path for the grace period before the
            // last pod goes; until then, hold one.
            let since = *self.zero_since.get_or_insert(view.now);
            if view.now < since + self.config.scale_to_zero_grace_s {
                desired = 1;
            }
        } else {
            self.zero_since = None;
        }
        (desired != view.desired).then_some(desired)
    }
}
