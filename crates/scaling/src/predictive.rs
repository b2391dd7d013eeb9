//! The predictive policy: size the fleet from the queue model for the load
//! expected when new pods would be ready, not for the load seen a minute ago.
//!
//! Every second, from the gateway's own counters (arrivals including rejected
//! ones, queue depth; one second late):
//!
//! 1. Arrival rate: a fast and a slow EWMA (5 s, 30 s). Their gap measures the
//!    trend, `(fast − slow) / (τ_slow − τ_fast)`, which is exact for a linear ramp.
//!    A level shift — two consecutive seconds more than four Poisson standard
//!    deviations from the fast EWMA, on the same side — resets both EWMAs to the
//!    new level: a step is not a ramp, and waiting for the averages to catch up
//!    would both delay the reaction and fake a steep trend.
//! 2. Forecast: the rate now (fast EWMA plus its lag) plus the upward trend over
//!    the lead time (pod start + warm-up), but never further ahead than the trend
//!    has lasted: a ramp that has risen for a minute is extrapolated a minute, the
//!    first seconds of a step are not. Trends worth less than 10 % of the rate
//!    over the lead time are noise; projected growth is capped at doubling.
//! 3. Replicas: `ceil(λ̂ / (μ·ρ) + queue / (μ·drain))`, with μ = concurrency /
//!    service time per pod and ρ the target utilisation; the second term drains
//!    the backlog within `drain_horizon_s`.
//! 4. Scale up at once. Scale down only when the need has stayed below the
//!    current size: after 60 s if it stayed at least 30 % below ("deep"), else
//!    after 120 s ("shallow"); then to the largest need of that window.

use std::collections::VecDeque;

/// Trend noise below this fraction of the rate is ignored.
const TREND_DEADBAND: f64 = 0.1;

/// Distance from the fast EWMA, in Poisson standard deviations, that marks a
/// second as off the current level. Pure Poisson noise exceeds it about once in
/// 30 000 seconds, and a shift needs two such seconds in a row.
const SHIFT_SIGMAS: f64 = 4.0;

/// One second of the fleet's gateway counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Second {
    /// Requests that arrived in the second, rejected ones included.
    pub arrivals: f64,
    /// Requests queued at the end of the second.
    pub queue: f64,
}

/// What one pod can do and how far ahead the policy must look.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fleet {
    /// Requests per second one pod completes (concurrency / service time).
    pub pod_capacity: f64,
    /// Utilisation a pod is sized for (the HPA's target, e.g. 0.7).
    pub target_utilization: f64,
    /// Seconds from the decision to a pod that serves: start-up plus warm-up.
    pub lead_time_s: u64,
    pub min: u32,
    pub max: u32,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictiveConfig {
    /// Time constant of the fast rate EWMA. Default 5 s.
    pub fast_tau_s: f64,
    /// Time constant of the slow rate EWMA. Default 30 s.
    pub slow_tau_s: f64,
    /// Projected growth over the lead time, as a multiple of the current rate.
    /// Default 1 (at most doubling): a step looks like a steep trend for a few
    /// seconds, and a fleet sized for the extrapolation would be wasted.
    pub max_projected_growth: f64,
    /// Time to drain the queue backlog. Default 10 s: requests queued behind a
    /// backlog miss the SLO until it is gone, so it should go quickly.
    pub drain_horizon_s: f64,
    /// A need at least this fraction below the current size is a "deep" surplus.
    /// Default 0.3.
    pub deep_surplus: f64,
    /// How long a deep surplus must last before scaling down. Default 60 s.
    pub deep_window_s: u64,
    /// How long any surplus must last before scaling down. Default 120 s.
    pub shallow_window_s: u64,
}

/// The policy's state; fed one [`Second`] at a time, asked once per tick.
#[derive(Clone, Debug)]
pub struct Predictive {
    config: PredictiveConfig,
    /// Requests per second one pod completes.
    pod_capacity: f64,
    target_utilization: f64,
    lead_time_s: f64,
    min: u32,
    max: u32,
    /// Seconds observed so far.
    observed: usize,
    fast: f64,
    slow: f64,
    queue: f64,
    /// Consecutive seconds with a significant upward trend.
    rising_for: f64,
    /// The previous second's arrivals and its side of the level (−1, 0, +1).
    previous: (f64, i8),
    /// (time, replicas needed), newest last, for the scale-down windows.
    needs: VecDeque<(u64, u32)>,
    deep_since: Option<u64>,
    shallow_since: Option<u64>,
}

// === PredictiveConfig ===

impl Default for PredictiveConfig {
    fn default() -> Self {
        PredictiveConfig {
            fast_tau_s: 5.0,
            slow_tau_s: 30.0,
            max_projected_growth: 1.0,
            drain_horizon_s: 10.0,
            deep_surplus: 0.3,
            deep_window_s: 60,
            shallow_window_s: 120,
        }
    }
}

// === Predictive ===

impl Predictive {
    pub fn new(config: PredictiveConfig, fleet: Fleet) -> Self {
        Predictive {
            config,
            pod_capacity: fleet.pod_capacity.max(f64::MIN_POSITIVE),
            target_utilization: fleet.target_utilization.clamp(0.01, 1.0),
            lead_time_s: fleet.lead_time_s as f64,
            min: fleet.min,
            max: fleet.max.max(fleet.min),
            observed: 0,
            fast: 0.0,
            slow: 0.0,
            queue: 0.0,
            rising_for: 0.0,
            previous: (0.0, 0),
            needs: VecDeque::new(),
            deep_since: None,
            shallow_since: None,
        }
    }

    /// Seconds observed so far.
    pub fn observed(&self) -> usize {
        self.observed
    }

    /// Updates what one pod can do (the server measures its service time).
    pub fn set_pod_capacity(&mut self, pod_capacity: f64) {
        if pod_capacity.is_finite() && pod_capacity > 0.0 {
            self.pod_capacity = pod_capacity;
        }
    }

    /// Feeds one second of the fleet's gateway counters into the rate estimates.
    pub fn observe(&mut self, second: Second) {
        let Second { arrivals, queue } = second;
        let (arrivals, queue) = (finite(arrivals), finite(queue));
        let alpha = |tau: f64| 1.0 - (-1.0 / tau).exp();
        let sigma = self.fast.max(1.0).sqrt();
        let side = if arrivals > self.fast + SHIFT_SIGMAS * sigma {
            1
        } else if arrivals < self.fast - SHIFT_SIGMAS * sigma {
            -1
        } else {
            0
        };
        if self.observed == 0 {
            self.fast = arrivals;
            self.slow = arrivals;
        } else if side != 0 && side == self.previous.1 {
            self.fast = (arrivals + self.previous.0) / 2.0;
            self.slow = self.fast;
        } else {
            self.fast += alpha(self.config.fast_tau_s) * (arrivals - self.fast);
            self.slow += alpha(self.config.slow_tau_s) * (arrivals - self.slow);
        }
        self.previous = (arrivals, side);
        self.queue = queue;
        self.observed += 1;
        let (rate, trend) = self.rate_and_trend();
        let significant = trend * self.lead_time_s >= TREND_DEADBAND * rate && trend > 0.0;
        self.rising_for = if significant { self.rising_for + 1.0 } else { 0.0 };
    }

    /// The arrival rate now (the fast EWMA corrected for its lag) and its trend
    /// in requests per second per second.
    fn rate_and_trend(&self) -> (f64, f64) {
        let c = &self.config;
        let trend = (self.fast - self.slow) / (c.slow_tau_s - c.fast_tau_s);
        ((self.fast + c.fast_tau_s * trend).max(0.0), trend)
    }

    /// Arrival rate expected one lead time from now.
    fn forecast(&self) -> f64 {
        let (rate, trend) = self.rate_and_trend();
        let horizon = self.lead_time_s.min(self.rising_for);
        rate + (trend.max(0.0) * horizon).min(self.config.max_projected_growth * rate)
    }

    /// Replicas for the forecast at the target utilisation plus the backlog drain.
    pub fn need(&self) -> u32 {
        let serve = self.forecast() / (self.pod_capacity * self.target_utilization);
        let drain = self.queue / (self.pod_capacity * self.config.drain_horizon_s);
        ((serve + drain).ceil() as u32).clamp(self.min, self.max)
    }

    /// The scale-down guard: `Some(size)` once a surplus has lasted long enough.
    fn scale_down_to(&mut self, now: u64, need: u32, current: u32) -> Option<u32> {
        let deep = f64::from(need) <= (1.0 - self.config.deep_surplus) * f64::from(current);
        if deep {
            self.deep_since.get_or_insert(now);
        } else {
            self.deep_since = None;
        }
        let shallow_since = *self.shallow_since.get_or_insert(now);
        let window = if self
            .deep_since
            .is_some_and(|since| now >= since + self.config.deep_window_s)
        {
            self.config.deep_window_s
        } else if now >= shallow_since + self.config.shallow_window_s {
            self.config.shallow_window_s
        } else {
            return None;
        };
        let peak = self
            .needs
            .iter()
            .filter(|&&(at, _)| at + window > now)
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(need);
        (peak < current).then_some(peak)
    }
}

impl Predictive {
    /// The decision at second `now` for a fleet of `current` replicas: `Some(n)` to
    /// resize to `n`, `None` to stay. Call once per tick, after the seconds up to
    /// `now` were observed.
    pub fn decide(&mut self, now: u64, current: u32) -> Option<u32> {
        if self.observed == 0 {
            return None;
        }
        let need = self.need();
        self.needs.push_back((now, need));
        while self
            .needs
            .front()
            .is_some_and(|&(at, _)| at + self.config.shallow_window_s <= now)
        {
            self.needs.pop_front();
        }
        if need >= current {
            // No surplus: the surplus clocks start over.
            self.deep_since = None;
            self.shallow_since = None;
            return (need > current).then_some(need);
        }
        let decision = self.scale_down_to(now, need, current);
        if decision.is_some() {
            // The shallow window's peak has been applied. A deep surplus keeps
            // its clock: the next tick checks it against the new size.
            self.shallow_since = None;
        }
        decision
    }
}

/// Counters from a scrape or a clock can be NaN or infinite; they count as zero.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x.max(0.0)
    } else {
        0.0
    }
}
