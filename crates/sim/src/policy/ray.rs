//! Ray Serve's default autoscaling policy, ported from
//! `ray-project/ray:python/ray/serve/autoscaling_policy.py`
//! (`replica_queue_length_autoscaling_policy`): desired = total ongoing requests /
//! `target_ongoing_requests`, moved towards by the up/down scaling factors, and
//! applied only after the decision has held for `upscale_delay_s` or
//! `downscale_delay_s` of consecutive control-loop iterations (0.1 s each),
//! counted against the *target* replica count (ray#18925, fixed in PR #19869).
//!
//! The input is the average of running plus queued requests over
//! `look_back_period_s`, as last pushed by the replicas and handles.

use crate::cluster::PodState;
use crate::policy::Autoscaler;
use crate::signals::ClusterView;

/// `CONTROL_LOOP_INTERVAL_S` in `ray/serve/_private/constants.py`.
pub const CONTROL_LOOP_INTERVAL_S: f64 = 0.1;

/// `AutoscalingConfig` fields. Defaults are Ray's (min/max replicas come from the
/// simulation config instead of Ray's 1..=1).
#[derive(Clone, Debug)]
pub struct RayConfig {
    /// Default 2 (Ray ≥ 2.32).
    pub target_ongoing_requests: f64,
    pub upscale_delay_s: f64,
    pub downscale_delay_s: f64,
    /// Used instead of `downscale_delay_s` for 1 → 0 when set.
    pub downscale_to_zero_delay_s: Option<f64>,
    /// Gain towards the desired count; `None` falls back to `smoothing_factor`.
    pub upscaling_factor: Option<f64>,
    pub downscaling_factor: Option<f64>,
    pub smoothing_factor: f64,
    pub look_back_period_s: u64,
    /// How often replicas and handles push their metrics. Default 10 s.
    pub metrics_interval_s: u64,
}

/// The policy and its state (`policy_state["decision_counter"]`). The target
/// replica count is the caller's, as in Ray's `AutoscalingContext`.
#[derive(Clone, Debug)]
pub struct RayPolicy {
    config: RayConfig,
    min: u32,
    max: u32,
    decision_counter: i64,
}

// === RayConfig ===

impl Default for RayConfig {
    fn default() -> Self {
        RayConfig {
            target_ongoing_requests: 2.0,
            upscale_delay_s: 30.0,
            downscale_delay_s: 600.0,
            downscale_to_zero_delay_s: None,
            upscaling_factor: None,
            downscaling_factor: None,
            smoothing_factor: 1.0,
            look_back_period_s: 30,
            metrics_interval_s: 10,
        }
    }
}

impl RayConfig {
    fn up_factor(&self) -> f64 {
        self.upscaling_factor.unwrap_or(self.smoothing_factor)
    }

    fn down_factor(&self) -> f64 {
        self.downscaling_factor.unwrap_or(self.smoothing_factor)
    }
}

// === RayPolicy ===

impl RayPolicy {
    pub fn new(config: RayConfig, min: u32, max: u32) -> Self {
        RayPolicy {
            config,
            min,
            max,
            decision_counter: 0,
        }
    }

    /// One control-loop iteration: the new target given the current `target`,
    /// the running replicas and the total ongoing requests.
    pub fn decide(&mut self, target: u32, running: u32, total_requests: f64) -> u32 {
        if running == 0 {
            // Cold start: scale up from zero at once, without the delay.
            if total_requests > 0.0 {
                return target.max(self.config.up_factor().ceil() as u32);
            }
            return target;
        }
        let desired = self.desired(running, total_requests);
        let per_loop = |delay_s: f64| (delay_s / CONTROL_LOOP_INTERVAL_S) as i64;
        if desired > target {
            self.decision_counter = self.decision_counter.max(0) + 1;
            if self.decision_counter > per_loop(self.config.upscale_delay_s) {
                self.decision_counter = 0;
                return desired;
            }
        } else if desired < target {
            self.decision_counter = self.decision_counter.min(0) - 1;
            // Only 1 → 0 may reach zero, and it may have its own delay.
            let (delay_s, desired) = if target == 1 {
                (
                    self.config
                        .downscale_to_zero_delay_s
                        .unwrap_or(self.config.downscale_delay_s),
                    desired,
                )
            } else {
                (self.config.downscale_delay_s, desired.max(1))
            };
            if self.decision_counter < -per_loop(delay_s) {
                self.decision_counter = 0;
                return desired;
            }
        } else {
            self.decision_counter = 0;
        }
        target
    }

    /// `_calculate_desired_num_replicas` with `_apply_scaling_factors` and the bounds.
    fn desired(&self, running: u32, total_requests: f64) -> u32 {
        let wanted = total_requests / self.config.target_ongoing_requests;
        let scaled = apply_scaling_factors(wanted, running, self.config.up_factor(), self.config.down_factor());
        scaled.clamp(i64::from(self.min), i64::from(self.max)) as u32
    }
}

/// `_apply_scaling_factors`: move `current` towards `desired` by the factor, and
/// make sure a wanted scale-down removes at least one replica.
pub fn apply_scaling_factors(desired: f64, current: u32, up_factor: f64, down_factor: f64) -> i64 {
    let current_f = f64::from(current);
    let delta = desired - current_f;
    let factor = if delta > 0.0 { up_factor } else { down_factor };
    let mut scaled = (current_f + factor * delta).ceil() as i64;
    if (desired.ceil() as i64) < i64::from(current) && scaled == i64::from(current) {
        scaled -= 1;
    }
    scaled
}

impl Autoscaler for RayPolicy {
    fn tick(&mut self, view: &ClusterView) -> Option<u32> {
        // The controller averages what was pushed at the last metrics push.
        let pushed_at = view.now / self.config.metrics_interval_s * self.config.metrics_interval_s;
        let from = pushed_at.saturating_sub(self.config.look_back_period_s);
        let total = view.metrics.average(from, pushed_at)?;
        let running = view.count(PodState::Ready);
        // Ten control-loop iterations per simulated second, on the same inputs;
        // the deployment target is `spec.replicas`.
        let mut target = view.desired;
        for _ in 0..(1.0 / CONTROL_LOOP_INTERVAL_S).round() as usize {
            target = self.decide(target, running, total);
        }
        (target != view.desired).then_some(target)
    }
}
