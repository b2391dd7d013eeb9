//! The Kubernetes HorizontalPodAutoscaler (`autoscaling/v2`), ported from
//! `kubernetes/kubernetes:pkg/controller/podautoscaler`:
//!
//! - the replica calculator (`replica_calculator.go`): `groupPods`, the missing and
//!   unready pod rebalancing, tolerance, integer milli-value arithmetic;
//! - the reconcile step (`horizontal.go`): min/max bypass, stabilization windows
//!   (`stabilizeRecommendationWithBehaviors`), scaling policies with scale events
//!   (`convertDesiredReplicasWithBehaviorRate`), the initial recommendation.
//!
//! The simulated HPA scales on one Pods metric with an AverageValue target, the
//! way `deploy/k8s/base/hpa.yaml` does: each ready pod's in-flight requests plus
//! its share of the queue (`inference_concurrent_requests` +
//! `ai_inference_pending_requests`), read through the Prometheus Adapter.

use crate::cluster::PodState;
use crate::policy::Autoscaler;
use crate::signals::ClusterView;

/// The HPA knobs. Defaults are the controller's and the API's defaults.
#[derive(Clone, Debug)]
pub struct HpaConfig {
    /// `--horizontal-pod-autoscaler-sync-period`. Default 15 s.
    pub sync_period_s: u64,
    /// `--horizontal-pod-autoscaler-tolerance`. Default 0.1.
    pub tolerance: f64,
    pub behavior: Behavior,
}

/// `spec.behavior`.
#[derive(Clone, Debug, PartialEq)]
pub struct Behavior {
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
}

/// `spec.behavior.scaleUp` or `scaleDown`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalingRules {
    pub stabilization_window_s: u64,
    pub select: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectPolicy {
    /// The policy allowing the largest change (the default).
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// At most `value` pods, or `value` percent, per `period_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalingPolicy {
    Pods { value: u32, period_s: u64 },
    Percent { value: u32, period_s: u64 },
}

/// Pod phase as `groupPods` distinguishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Failed,
}

/// One pod as the replica calculator sees it: its state from the API and its
/// sample from the metrics API, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSample {
    pub phase: PodPhase,
    pub ready: bool,
    /// Has a `deletionTimestamp`.
    pub deleting: bool,
    /// Metric value in milli-units (`resource.Quantity.MilliValue()`).
    pub value: Option<i64>,
    /// Resource request in milli-units; only resource metrics use it.
    pub request: i64,
}

/// Why the calculator gives no proposal; the HPA then leaves the scale alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalcError {
    /// "did not receive metrics for any ready pods"
    NoMetrics,
}

/// Recommendation and scale-event history: the state `horizontal.go` keeps per HPA.
#[derive(Clone, Debug, Default)]
pub struct Normalizer {
    recommendations: Vec<(u64, u32)>,
    up_events: Vec<(u64, u32)>,
    down_events: Vec<(u64, u32)>,
}

/// One HPA object and its controller state.
#[derive(Clone, Debug)]
pub struct HpaController {
    config: HpaConfig,
    min: u32,
    max: u32,
    normalizer: Normalizer,
    started: bool,
}

/// The HPA of the simulation: a Pods metric with an AverageValue target.
pub(crate) struct HpaPolicy {
    controller: HpaController,
    target_milli: i64,
}

// === Defaults ===

impl Default for HpaConfig {
    fn default() -> Self {
        HpaConfig {
            sync_period_s: 15,
            tolerance: 0.1,
            behavior: Behavior::default(),
        }
    }
}

impl Default for Behavior {
    /// The API defaults (`GenerateHPAScaleUpRules`, `GenerateHPAScaleDownRules`):
    /// up by max(4 pods, 100 %) per 15 s at once; down by up to 100 % per 15 s
    /// after a 300 s stabilization window.
    fn default() -> Self {
        Behavior {
            scale_up: ScalingRules {
                stabilization_window_s: 0,
                select: SelectPolicy::Max,
                policies: vec![
                    ScalingPolicy::Pods { value: 4, period_s: 15 },
                    ScalingPolicy::Percent {
                        value: 100,
                        period_s: 15,
                    },
                ],
            },
            scale_down: ScalingRules {
                stabilization_window_s: 300,
                select: SelectPolicy::Max,
                policies: vec![ScalingPolicy::Percent {
                    value: 100,
                    period_s: 15,
                }],
            },
        }
    }
}

// === Replica calculator ===

/// `GetMetricReplicas` / `calcPlainMetricReplicas`: a Pods metric with an
/// AverageValue target (milli-units). Readiness is not checked for such metrics;
/// pending pods count as unready and missing samples are rebalanced.
pub fn pods_metric_replicas(
    current: u32,
    target_milli: i64,
    tolerance: f64,
    pods: &[PodSample],
) -> Result<u32, CalcError> {
    calc(current, tolerance, pods, Kind::Plain { target_milli })
}

/// `GetResourceReplicas` for CPU with a Utilization target (percent): unready pods
/// are ignored and, on a scale-up, counted as idle. The readiness rules are those
/// after the CPU initialization period: an unready pod that never became ready is
/// ignored.
pub fn resource_replicas(
    current: u32,
    target_percent: i64,
    tolerance: f64,
    pods: &[PodSample],
) -> Result<u32, CalcError> {
    calc(current, tolerance, pods, Kind::Cpu { target_percent })
}

/// `GetExternalPerPodMetricReplicas` (and the Object equivalent): an External
/// metric with an AverageValue target, KEDA's default. The sum of the series is
/// compared with `target × status.replicas`; outside the tolerance the answer is
/// `ceil(total / target)` whatever the current size.
pub fn external_average_value_replicas(
    status_replicas: u32,
    total_milli: i64,
    target_milli: i64,
    tolerance: f64,
) -> u32 {
    let ratio = total_milli as f64 / (target_milli as f64 * f64::from(status_replicas));
    if (1.0 - ratio).abs() > tolerance {
        (total_milli as f64 / target_milli as f64).ceil() as u32
    } else {
        status_replicas
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Plain { target_milli: i64 },
    Cpu { target_percent: i64 },
}

fn calc(current: u32, tolerance: f64, pods: &[PodSample], kind: Kind) -> Result<u32, CalcError> {
    // groupPods: deleted and failed pods are dropped, pending ones are unready,
    // pods without a sample are missing, and for CPU an unready pod is unready.
    let mut ready_count = 0usize;
    let mut metrics: Vec<(i64, i64)> = Vec::new();
    let mut unready: Vec<&PodSample> = Vec::new();
    let mut missing: Vec<&PodSample> = Vec::new();
    for pod in pods {
        if pod.deleting || pod.phase == PodPhase::Failed {
            continue;
        }
        if pod.phase == PodPhase::Pending {
            unready.push(pod);
            continue;
        }
        let Some(value) = pod.value else {
            missing.push(pod);
            continue;
        };
        if matches!(kind, Kind::Cpu { .. }) && !pod.ready {
            unready.push(pod);
            continue;
        }
        ready_count += 1;
        metrics.push((value, pod.request));
    }
    if metrics.is_empty() {
        return Err(CalcError::NoMetrics);
    }
    let usage_ratio = ratio(&metrics, kind);
    let scale_up_with_unready = !unready.is_empty() && usage_ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (1.0 - usage_ratio).abs() <= tolerance {
            return Ok(current);
        }
        return Ok((usage_ratio * ready_count as f64).ceil() as u32);
    }
    if !missing.is_empty() {
        match kind {
            // On a scale-down a missing pod is assumed at the target; otherwise idle.
            Kind::Plain { target_milli } => {
                let fill = if usage_ratio < 1.0 { target_milli } else { 0 };
                metrics.extend(missing.iter().map(|_| (fill, 1)));
            }
            // On a scale-down a missing pod is assumed to use 100 % of its request,
            // on a scale-up 0 %; at exactly the target it is left out.
            Kind::Cpu { .. } if usage_ratio < 1.0 => metrics.extend(missing.iter().map(|p| (p.request, p.request))),
            Kind::Cpu { .. } if usage_ratio > 1.0 => metrics.extend(missing.iter().map(|p| (0, p.request))),
            Kind::Cpu { .. } => {}
        }
    }
    if scale_up_with_unready {
        metrics.extend(unready.iter().map(|p| (0, p.request)));
    }
    let new_ratio = ratio(&metrics, kind);
    let flipped = (usage_ratio < 1.0 && new_ratio > 1.0) || (usage_ratio > 1.0 && new_ratio < 1.0);
    if (1.0 - new_ratio).abs() <= tolerance || flipped {
        return Ok(current);
    }
    let new_replicas = (new_ratio * metrics.len() as f64).ceil() as u32;
    if matches!(kind, Kind::Cpu { .. })
        && ((new_ratio < 1.0 && new_replicas > current) || (new_ratio > 1.0 && new_replicas < current))
    {
        return Ok(current);
    }
    Ok(new_replicas)
}

/// `GetMetricUtilizationRatio` / `GetResourceUtilizationRatio`, with their integer
/// divisions (the current value is truncated before the ratio is taken).
fn ratio(metrics: &[(i64, i64)], kind: Kind) -> f64 {
    match kind {
        Kind::Plain { target_milli } => {
            let average = metrics.iter().map(|m| m.0).sum::<i64>() / metrics.len() as i64;
            average as f64 / target_milli as f64
        }
        Kind::Cpu { target_percent } => {
            let usage: i64 = metrics.iter().map(|m| m.0).sum();
            let requests: i64 = metrics.iter().map(|m| m.1).sum();
            ((usage * 100) / requests) as f64 / target_percent as f64
        }
    }
}

// === Normalizer ===

impl Normalizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores an unstabilized recommendation (the controller does this on every
    /// reconcile, and once with the current size when it first sees the HPA).
    pub fn record_recommendation(&mut self, at: u64, replicas: u32) {
        self.recommendations.push((at, replicas));
    }

    /// `storeScaleEvent`: remembers a change for the rate-limiting policies.
    pub fn record_scale_event(&mut self, at: u64, from: u32, to: u32) {
        if to > from {
            self.up_events.push((at, to - from));
        } else if to < from {
            self.down_events.push((at, from - to));
        }
    }

    /// `normalizeDesiredReplicasWithBehaviors`: stabilization, then rate limits and
    /// the min/max bounds.
    pub fn normalize(&mut self, now: u64, current: u32, proposal: u32, min: u32, max: u32, behavior: &Behavior) -> u32 {
        let stabilized = self.stabilize(
            now,
            current,
            proposal,
            behavior.scale_up.stabilization_window_s,
            behavior.scale_down.stabilization_window_s,
        );
        self.limit_rate(now, current, stabilized, min, max, behavior)
    }

    /// `stabilizeRecommendationWithBehaviors`: the result stays between the lowest
    /// recommendation of the scale-up window and the highest of the scale-down
    /// window (both including this one), starting from `current`. Stores the raw
    /// proposal.
    pub fn stabilize(&mut self, now: u64, current: u32, proposal: u32, up_window_s: u64, down_window_s: u64) -> u32 {
        // A recommendation counts if it is strictly newer than the cutoff.
        let newer = |at: u64, window: u64| at + window > now;
        let mut up = proposal;
        let mut down = proposal;
        for &(at, r) in &self.recommendations {
            if newer(at, up_window_s) {
                up = up.min(r);
            }
            if newer(at, down_window_s) {
                down = down.max(r);
            }
        }
        let stabilized = current.max(up).min(down);
        self.recommendations
            .retain(|&(at, _)| newer(at, up_window_s) || newer(at, down_window_s));
        self.recommendations.push((now, proposal));
        stabilized
    }

    /// `convertDesiredReplicasWithBehaviorRate`: caps the change by the scaling
    /// policies given the scale events of their periods, then by max (up) or min
    /// (down).
    pub fn limit_rate(&self, now: u64, current: u32, desired: u32, min: u32, max: u32, behavior: &Behavior) -> u32 {
        if desired > current {
            let limit = self
                .scale_up_limit(now, current, &behavior.scale_up)
                .max(i64::from(current));
            let allowed = i64::from(max).min(limit) as u32;
            desired.min(allowed)
        } else if desired < current {
            let limit = self
                .scale_down_limit(now, current, &behavior.scale_down)
                .min(i64::from(current));
            let allowed = i64::from(min).max(limit) as u32;
            desired.max(allowed)
        } else {
            desired
        }
    }

    /// `calculateScaleUpLimitWithScalingRules`.
    fn scale_up_limit(&self, now: u64, current: u32, rules: &ScalingRules) -> i64 {
        if rules.select == SelectPolicy::Disabled {
            return i64::from(current);
        }
        let proposals = rules.policies.iter().map(|policy| {
            let start = self.period_start(now, current, policy);
            match *policy {
                ScalingPolicy::Pods { value, .. } => start + i64::from(value),
                // Rounded up so that a small percentage still adds a pod.
                ScalingPolicy::Percent { value, .. } => (start as f64 * (1.0 + f64::from(value) / 100.0)).ceil() as i64,
            }
        });
        match rules.select {
            SelectPolicy::Min => proposals.min(),
            _ => proposals.max(),
        }
        .unwrap_or(i64::from(current))
    }

    /// `calculateScaleDownLimitWithBehaviors`; the percentage is truncated, as the
    /// Go `int32()` conversion does.
    fn scale_down_limit(&self, now: u64, current: u32, rules: &ScalingRules) -> i64 {
        if rules.select == SelectPolicy::Disabled {
            return i64::from(current);
        }
        let proposals = rules.policies.iter().map(|policy| {
            let start = self.period_start(now, current, policy);
            match *policy {
                ScalingPolicy::Pods { value, .. } => start - i64::from(value),
                ScalingPolicy::Percent { value, .. } => (start as f64 * (1.0 - f64::from(value) / 100.0)) as i64,
            }
        });
        // The largest change is the lowest limit.
        match rules.select {
            SelectPolicy::Min => proposals.max(),
            _ => proposals.min(),
        }
        .unwrap_or(i64::from(current))
    }

    /// Replicas at the start of the policy's period: current minus the pods added
    /// plus the pods removed within it (`getReplicasChangePerPeriod`, both ways).
    fn period_start(&self, now: u64, current: u32, policy: &ScalingPolicy) -> i64 {
        let (ScalingPolicy::Pods { period_s, .. } | ScalingPolicy::Percent { period_s, .. }) = *policy;
        let within = |events: &[(u64, u32)]| -> i64 {
            events
                .iter()
                .filter(|&&(at, _)| at + period_s > now)
                .map(|&(_, n)| i64::from(n))
                .sum()
        };
        i64::from(current) - within(&self.up_events) + within(&self.down_events)
    }
}

// === HpaController ===

impl HpaController {
    pub fn new(config: HpaConfig, min: u32, max: u32) -> Self {
        HpaController {
            config,
            min,
            max,
            normalizer: Normalizer::new(),
            started: false,
        }
    }

    pub fn config(&self) -> &HpaConfig {
        &self.config
    }

    /// One `reconcileAutoscaler` pass. `spec_replicas` is the scale subresource;
    /// `proposal` computes the metric's answer (only when the bounds do not decide).
    /// Returns the new `spec.replicas`.
    pub fn reconcile(
        &mut self,
        now: u64,
        spec_replicas: u32,
        proposal: impl FnOnce() -> Result<u32, CalcError>,
    ) -> u32 {
        if !self.started {
            // recordInitialRecommendation: right after start the scale-down window
            // holds the current size.
            self.normalizer.record_recommendation(now, spec_replicas);
            self.started = true;
        }
        if spec_replicas == 0 && self.min != 0 {
            // ScalingDisabled: something else (KEDA) scaled the target to zero.
            return spec_replicas;
        }
        let desired = if spec_replicas > self.max {
            self.max
        } else if spec_replicas < self.min {
            self.min
        } else {
            match proposal() {
                Ok(p) => self
                    .normalizer
                    .normalize(now, spec_replicas, p, self.min, self.max, &self.config.behavior),
                Err(CalcError::NoMetrics) => return spec_replicas,
            }
        };
        if desired != spec_replicas {
            self.normalizer.record_scale_event(now, spec_replicas, desired);
        }
        desired
    }
}

// === HpaPolicy ===

impl HpaPolicy {
    pub(crate) fn new(config: HpaConfig, min: u32, max: u32, target_per_pod: f64) -> Self {
        HpaPolicy {
            // minReplicas 0 needs the alpha HPAScaleToZero gate and an Object or
            // External metric; a Pods-metric HPA stays at one pod or more.
            controller: HpaController::new(config, min.max(1), max),
            target_milli: to_milli(target_per_pod),
        }
    }
}

impl Autoscaler for HpaPolicy {
    fn tick(&mut self, view: &ClusterView) -> Option<u32> {
        if view.now % self.controller.config().sync_period_s != 0 {
            return None;
        }
        let samples = pod_samples(view);
        let tolerance = self.controller.config().tolerance;
        let target = self.target_milli;
        let desired = self.controller.reconcile(view.now, view.desired, || {
            pods_metric_replicas(view.desired, target, tolerance, &samples)
        });
        (desired != view.desired).then_some(desired)
    }
}

/// The pod list joined with the newest visible scrape. A pod's value is its
/// in-flight requests plus an even share of the gateway queue (the pending
/// requests a per-pod queue would hold).
fn pod_samples(view: &ClusterView) -> Vec<PodSample> {
    let scrape = view.metrics.prometheus(view.now);
    let share = scrape.map_or(0.0, |s| f64::from(s.queue) / s.pods.len().max(1) as f64);
    view.pods
        .iter()
        .map(|pod| PodSample {
            phase: if pod.state == PodState::Starting {
                PodPhase::Pending
            } else {
                PodPhase::Running
            },
            ready: pod.state == PodState::Ready,
            deleting: pod.state == PodState::Terminating,
            value: scrape
                .and_then(|s| s.pods.iter().find(|&&(id, _)| id == pod.id))
                .map(|&(_, in_flight)| to_milli(f64::from(in_flight) + share)),
            request: 1000,
        })
        .collect()
}

pub(crate) fn to_milli(value: f64) -> i64 {
    (value * 1000.0).round() as i64
}
