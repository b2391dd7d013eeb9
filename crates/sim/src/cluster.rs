//! The simulated service: a gateway (token buckets, one bounded FIFO queue) in
//! front of pods with a fixed number of concurrency slots each.
//!
//! Control happens on whole seconds (pod transitions, scaling decisions); requests
//! are continuous in time. Each second's arrivals get uniform random times within
//! the second (a Poisson process given the count) and are served first come, first
//! served by the earliest free slot of any ready pod, so a request's latency is its
//! queue wait plus the service time, exactly.
//!
//! Pod life cycle: `Starting` (Pending: scheduling, image pull) → `WarmingUp`
//! (Running, not Ready: model load) → `Ready` → `Terminating` (out of the load
//! balancer, finishing its in-flight requests) → gone. Scale-down removes pods the
//! way a ReplicaSet does: not-yet-ready pods first, then the most recently ready.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::config::{SimConfig, TokenBucketConfig};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    Starting,
    WarmingUp,
    Ready,
    Terminating,
}

/// What the Kubernetes API reports about a pod, as of now (the API is not delayed;
/// only metrics are).
#[derive(Clone, Copy, Debug)]
pub struct PodInfo {
    pub id: usize,
    pub state: PodState,
}

/// What happened during one second.
#[derive(Debug, Default)]
pub(crate) struct SecondOutcome {
    /// Requests that arrived, admitted or not.
    pub offered: u32,
    pub rejected: u32,
    /// Rejected requests plus served requests slower than the SLO.
    pub violations: u32,
    /// Latencies (ms) of the requests that started service during this second.
    pub latencies_ms: Vec<f32>,
    /// Time-averaged in-flight plus queued requests over the second.
    pub concurrency: f64,
    pub queue_end: u32,
    pub in_flight_end: u32,
}

struct Pod {
    state: PodState,
    since: u64,
    /// Per slot, when its current request finishes (≤ now means idle).
    slot_free: Vec<f64>,
}

/// A slot's free time in the dispatch heap. Times are finite and non-negative.
#[derive(Clone, Copy, PartialEq)]
struct Time(f64);

struct TokenBucket {
    config: TokenBucketConfig,
    tokens: f64,
    last: f64,
}

pub(crate) struct Cluster {
    service_s: f64,
    slo_ms: f64,
    concurrency: usize,
    pod_start_s: u64,
    warmup_s: u64,
    max_queue: usize,
    /// Every pod ever created, by id; `live` indexes the ones not yet gone.
    pods: Vec<Pod>,
    live: Vec<usize>,
    /// `spec.replicas` of the Deployment.
    desired: u32,
    pod_starts: u64,
    /// Arrival times of the queued requests.
    queue: VecDeque<f64>,
    /// Idle-or-busy slots of ready pods, keyed by free time. Entries of pods that
    /// left `Ready` are dropped when they surface.
    slots: BinaryHeap<Reverse<(Time, usize, usize)>>,
    buckets: Vec<TokenBucket>,
    rng: Rng,
    /// The second being served and its running totals.
    now: u64,
    outcome: SecondOutcome,
    /// Slot-seconds of service falling into the current second (front) and the
    /// following ones; a request can straddle a second boundary.
    busy: VecDeque<f64>,
    queue_area: f64,
    queue_mark: f64,
}

// === Cluster ===

impl Cluster {
    pub(crate) fn new(config: &SimConfig, initial_replicas: u32) -> Self {
        let mut cluster = Cluster {
            service_s: config.service_time_ms / 1000.0,
            slo_ms: config.slo_ms,
            concurrency: config.concurrency as usize,
            pod_start_s: config.pod_start_s,
            warmup_s: config.warmup_s,
            max_queue: config.max_queue,
            pods: Vec::new(),
            live: Vec::new(),
            desired: initial_replicas,
            pod_starts: 0,
            queue: VecDeque::new(),
            slots: BinaryHeap::new(),
            buckets: config
                .token_buckets
                .iter()
                .map(|&b| TokenBucket {
                    config: b,
                    tokens: b.burst,
                    last: 0.0,
                })
                .collect(),
            rng: Rng::new(config.seed),
            now: 0,
            outcome: SecondOutcome::default(),
            busy: VecDeque::new(),
            queue_area: 0.0,
            queue_mark: 0.0,
        };
        for _ in 0..initial_replicas {
            let id = cluster.add_pod(PodState::Ready, 0);
            cluster.make_ready(id, 0);
        }
        cluster
    }

    pub(crate) fn desired(&self) -> u32 {
        self.desired
    }

    /// Pods created after t = 0.
    pub(crate) fn pod_starts(&self) -> u64 {
        self.pod_starts
    }

    pub(crate) fn pods(&self) -> Vec<PodInfo> {
        self.live
            .iter()
            .map(|&id| PodInfo {
                id,
                state: self.pods[id].state,
            })
            .collect()
    }

    pub(crate) fn count(&self, state: PodState) -> u32 {
        self.live.iter().filter(|&&id| self.pods[id].state == state).count() as u32
    }

    /// Pods that exist (and cost money), in any state.
    pub(crate) fn total(&self) -> u32 {
        self.live.len() as u32
    }

    pub(crate) fn queue_len(&self) -> u32 {
        self.queue.len() as u32
    }

    /// In-flight requests per ready pod at time `t`: what each pod's gauge reads.
    pub(crate) fn in_flight_by_ready_pod(&self, t: u64) -> Vec<(usize, u32)> {
        let t = t as f64;
        self.live
            .iter()
            .filter(|&&id| self.pods[id].state == PodState::Ready)
            .map(|&id| (id, self.pods[id].slot_free.iter().filter(|&&f| f > t).count() as u32))
            .collect()
    }

    /// Applies the pod transitions due at `now`: start-up, warm-up, end of drain.
    pub(crate) fn advance(&mut self, now: u64) {
        for index in 0..self.live.len() {
            let id = self.live[index];
            let pod = &self.pods[id];
            if pod.state == PodState::Starting && now >= pod.since + self.pod_start_s {
                let since = pod.since + self.pod_start_s;
                self.set_state(id, PodState::WarmingUp, since);
            }
            let pod = &self.pods[id];
            if pod.state == PodState::WarmingUp && now >= pod.since + self.warmup_s {
                self.make_ready(id, now);
            }
        }
        let pods = &self.pods;
        let t = now as f64;
        self.live
            .retain(|&id| !(pods[id].state == PodState::Terminating && pods[id].slot_free.iter().all(|&f| f <= t)));
    }

    /// Sets `spec.replicas`: creates pods, or removes the least useful ones.
    pub(crate) fn set_desired(&mut self, now: u64, desired: u32) {
        self.desired = desired;
        let mut active: Vec<usize> = self
            .live
            .iter()
            .copied()
            .filter(|&id| self.pods[id].state != PodState::Terminating)
            .collect();
        let active_count = active.len() as u32;
        if active_count < desired {
            for _ in active_count..desired {
                self.add_pod(PodState::Starting, now);
                self.pod_starts += 1;
            }
            // Zero start-up or warm-up times take effect at once.
            self.advance(now);
        } else if active_count > desired {
            // ReplicaSet deletion order: unscheduled/pending before not-ready before
            // ready, and among equals the most recent first.
            let rank = |s: PodState| match s {
                PodState::Starting => 0,
                PodState::WarmingUp => 1,
                _ => 2,
            };
            active.sort_by_key(|&id| (rank(self.pods[id].state), Reverse(self.pods[id].since), Reverse(id)));
            for &id in &active[..(active_count - desired) as usize] {
                if self.pods[id].state == PodState::Ready {
                    self.set_state(id, PodState::Terminating, now);
                } else {
                    // Nothing in flight: the pod is gone as soon as it is deleted.
                    self.live.retain(|&l| l != id);
                }
            }
        }
    }

    /// Serves the requests arriving in [now, now + 1).
    pub(crate) fn serve_second(&mut self, now: u64, arrivals: u32) -> SecondOutcome {
        self.now = now;
        self.outcome = SecondOutcome {
            offered: arrivals,
            ..SecondOutcome::default()
        };
        self.queue_area = 0.0;
        self.queue_mark = now as f64;
        let mut times: Vec<f64> = (0..arrivals).map(|_| now as f64 + self.rng.uniform()).collect();
        times.sort_by(f64::total_cmp);
        for arrival in times {
            self.drain_until(arrival);
            if !self.take_tokens(arrival) || self.queue.len() >= self.max_queue {
                self.outcome.rejected += 1;
                self.outcome.violations += 1;
                continue;
            }
            self.mark_queue(arrival);
            self.queue.push_back(arrival);
            self.drain_until(arrival);
        }
        let end = (now + 1) as f64;
        self.drain_until(end);
        self.mark_queue(end);
        self.outcome.concurrency = self.busy.pop_front().unwrap_or(0.0) + self.queue_area;
        self.outcome.queue_end = self.queue.len() as u32;
        self.outcome.in_flight_end = self
            .live
            .iter()
            .map(|&id| self.pods[id].slot_free.iter().filter(|&&f| f > end).count() as u32)
            .sum();
        std::mem::take(&mut self.outcome)
    }

    /// After the last second: serves what is still queued with the pods that are
    /// ready; requests no pod can take count as violations.
    pub(crate) fn drain_tail(&mut self) -> SecondOutcome {
        self.outcome = SecondOutcome::default();
        self.drain_until(f64::INFINITY);
        let unserved = self.queue.len() as u32;
        self.queue.clear();
        self.outcome.violations += unserved;
        std::mem::take(&mut self.outcome)
    }

    fn add_pod(&mut self, state: PodState, now: u64) -> usize {
        let id = self.pods.len();
        self.pods.push(Pod {
            state,
            since: now,
            slot_free: Vec::new(),
        });
        self.live.push(id);
        id
    }

    fn set_state(&mut self, id: usize, state: PodState, since: u64) {
        let pod = &mut self.pods[id];
        pod.state = state;
        pod.since = since;
    }

    fn make_ready(&mut self, id: usize, now: u64) {
        self.set_state(id, PodState::Ready, now);
        self.pods[id].slot_free = vec![now as f64; self.concurrency];
        for slot in 0..self.concurrency {
            self.slots.push(Reverse((Time(now as f64), id, slot)));
        }
    }

    fn take_tokens(&mut self, t: f64) -> bool {
        for b in &mut self.buckets {
            b.tokens = (b.tokens + (t - b.last) * b.config.rate_per_s).min(b.config.burst);
            b.last = t;
        }
        if self.buckets.iter().any(|b| b.tokens < 1.0) {
            return false;
        }
        for b in &mut self.buckets {
            b.tokens -= 1.0;
        }
        true
    }

    /// Starts queued requests on slots that are free by `t`, oldest request first.
    fn drain_until(&mut self, t: f64) {
        while let Some(&arrival) = self.queue.front() {
            let Some((free, id, slot)) = self.pop_free_slot(t) else {
                break;
            };
            let start = free.max(arrival);
            self.mark_queue(start);
            self.queue.pop_front();
            self.start_request(arrival, start, id, slot);
        }
    }

    fn pop_free_slot(&mut self, t: f64) -> Option<(f64, usize, usize)> {
        while let Some(&Reverse((Time(free), id, slot))) = self.slots.peek() {
            if self.pods[id].state != PodState::Ready {
                self.slots.pop();
                continue;
            }
            if free > t {
                return None;
            }
            self.slots.pop();
            return Some((free, id, slot));
        }
        None
    }

    fn start_request(&mut self, arrival: f64, start: f64, id: usize, slot: usize) {
        let finish = start + self.service_s;
        self.pods[id].slot_free[slot] = finish;
        self.slots.push(Reverse((Time(finish), id, slot)));
        let latency_ms = (finish - arrival) * 1000.0;
        self.outcome.latencies_ms.push(latency_ms as f32);
        if latency_ms > self.slo_ms {
            self.outcome.violations += 1;
        }
        // Split the busy time over the seconds it covers, for the time averages.
        let mut second = self.now as f64;
        let mut index = 0;
        while second < finish {
            let overlap = finish.min(second + 1.0) - start.max(second);
            if overlap > 0.0 {
                if self.busy.len() <= index {
                    self.busy.resize(index + 1, 0.0);
                }
                self.busy[index] += overlap;
            }
            second += 1.0;
            index += 1;
        }
    }

    /// Accumulates queue length × time up to `t`, before the length changes.
    fn mark_queue(&mut self, t: f64) {
        self.queue_area += self.queue.len() as f64 * (t - self.queue_mark);
        self.queue_mark = t;
    }
}

// === Time ===

impl Eq for Time {}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            pod_start_s: 2,
            warmup_s: 3,
            ..SimConfig::default()
        }
    }

    #[test]
    fn an_idle_pod_serves_in_exactly_the_service_time() {
        let mut c = Cluster::new(&config(), 1);
        let out = c.serve_second(0, 3);
        assert_eq!(out.latencies_ms.len(), 3);
        assert!(out.latencies_ms.iter().all(|&l| (l - 100.0).abs() < 1e-3));
        assert_eq!(out.violations, 0);
    }

    #[test]
    fn overload_queues_then_rejects_at_the_queue_bound() {
        let cfg = SimConfig {
            max_queue: 10,
            ..config()
        };
        let mut c = Cluster::new(&cfg, 1);
        // One pod completes 40 req/s; 100 arrivals leave about 50 waiting, 10 fit.
        let out = c.serve_second(0, 100);
        assert!(out.rejected > 40, "rejected {}", out.rejected);
        assert_eq!(out.queue_end, 10);
        assert!(out.latencies_ms.iter().any(|&l| l > 150.0));
    }

    #[test]
    fn pods_start_warm_up_then_serve() {
        let mut c = Cluster::new(&config(), 0);
        c.set_desired(0, 2);
        assert_eq!(c.count(PodState::Starting), 2);
        c.advance(2);
        assert_eq!(c.count(PodState::WarmingUp), 2);
        c.advance(4);
        assert_eq!(c.count(PodState::Ready), 0);
        c.advance(5);
        assert_eq!(c.count(PodState::Ready), 2);
        assert_eq!(c.pod_starts(), 2);
    }

    #[test]
    fn scale_down_removes_unready_pods_first_and_drains_ready_ones() {
        let mut c = Cluster::new(&config(), 2);
        c.set_desired(0, 3);
        c.set_desired(0, 1);
        assert_eq!(c.count(PodState::Starting), 0);
        assert_eq!(c.count(PodState::Terminating), 1);
        c.advance(1);
        assert_eq!(c.total(), 1);
    }

    #[test]
    fn token_bucket_rejects_beyond_the_burst() {
        let cfg = SimConfig {
            token_buckets: vec![TokenBucketConfig {
                rate_per_s: 0.0,
                burst: 5.0,
            }],
            ..config()
        };
        let mut c = Cluster::new(&cfg, 10);
        let out = c.serve_second(0, 8);
        assert_eq!(out.rejected, 3);
    }
}
