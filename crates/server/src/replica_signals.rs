//! This replica's scaling signals (`lattice_scaling_*`): load against capacity,
//! recent rates and waits, and the scale-in guard's verdict with the
//! pod-deletion-cost it implies. Every name is declared here, once; the values are
//! read at scrape time, and only while the replica is ready, so a warming or draining
//! pod is missing rather than idle.

use std::{sync::Arc, time::Instant};

use lattice_observability::{
    encode::gauge,
    metrics::{MetricSet, Registrar},
};
use lattice_scaling::{GuardConfig, ScaleInGuard};
use parking_lot::Mutex;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

/// What the replica holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests being computed.
    pub in_flight: usize,
    /// Requests waiting in queues.
    pub queued: usize,
    /// Requests the instances compute at once (instances x largest dynamic batch).
    pub capacity: usize,
}

/// One scrape's inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub load: Load,
    /// Requests completed over the last second.
    pub qps: f64,
    /// p95 queue wait of recent requests, in seconds.
    pub queue_p95: Option<f64>,
    /// Mean compute time per item of recent batches, in seconds.
    pub service: Option<f64>,
}

/// Reads the replica's snapshot; `None` while it is not ready. Installed by the
/// server when it starts serving.
pub type SnapshotReader = Box<dyn Fn() -> Option<Snapshot> + Send + Sync>;

/// The guard premium: while the guard says a replica must not go, its
/// pod-deletion-cost is raised by this much, above any load-based cost.
const GUARD_PREMIUM: i64 = 100_000;

struct Shared {
    guard: Mutex<ScaleInGuard>,
    reader: Mutex<Option<SnapshotReader>>,
}

/// The replica's scaling signals. Registered once per registry through
/// `Metrics::set::<ReplicaSignals>()`.
pub struct ReplicaSignals(Arc<Shared>);

impl std::fmt::Debug for ReplicaSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSignals").finish_non_exhaustive()
    }
}

impl MetricSet for ReplicaSignals {
    fn register(r: &mut Registrar<'_>) -> Self {
        let shared = Arc::new(Shared {
            guard: Mutex::new(ScaleInGuard::default()),
            reader: Mutex::new(None),
        });
        r.collector(Box::new(SignalCollector(shared.clone())));
        ReplicaSignals(shared)
    }
}

impl ReplicaSignals {
    /// Replaces the scale-in guard's constants (and its history).
    pub fn set_guard_config(&self, config: GuardConfig) {
        *self.0.guard.lock() = ScaleInGuard::new(config);
    }

    /// One sample of the replica's saturation for the scale-in guard (the server
    /// takes one per second while ready).
    pub fn observe_saturation(&self, saturation: f64) {
        self.0.guard.lock().observe(Instant::now(), saturation);
    }

    /// The pod-deletion-cost this replica should carry: its recent load, plus a
    /// large premium while the scale-in guard says it must not go.
    pub fn pod_deletion_cost(&self) -> i64 {
        let guard = self.0.guard.lock();
        let premium = if guard.safe(Instant::now()) { 0 } else { GUARD_PREMIUM };
        guard.deletion_cost() + premium
    }

    /// Sets where the signals are read from at scrape time.
    pub fn read_from(&self, reader: SnapshotReader) {
        *self.0.reader.lock() = Some(reader);
    }
}

struct SignalCollector(Arc<Shared>);

impl std::fmt::Debug for SignalCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalCollector").finish_non_exhaustive()
    }
}

impl Collector for SignalCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.0.reader.lock().as_ref().and_then(|f| f()) else {
            return Ok(());
        };
        let (safe, cost) = {
            let guard = self.0.guard.lock();
            (guard.safe(Instant::now()), guard.deletion_cost())
        };
        let load = s.load;
        let capacity = load.capacity.max(1) as f64;
        gauge(
            &mut enc,
            "lattice_scaling_in_flight",
            "Requests being computed on this replica",
            Some(load.in_flight as f64),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_queue_depth",
            "Requests waiting in this replica's queues",
            Some(load.queued as f64),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_capacity",
            "Requests this replica computes at once",
            Some(capacity),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_saturation",
            "(queued + in flight) / capacity: above 1 the replica is queueing",
            Some((load.queued + load.in_flight) as f64 / capacity),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_qps",
            "Requests completed on this replica over the last second",
            Some(s.qps),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_queue_p95_seconds",
            "p95 queue wait of this replica's recent requests",
            s.queue_p95,
        )?;
        // Little's law: the concurrency the arrivals need is rate x service time; divided by
        // this replica's capacity it is the replicas' worth of work arriving here, so an
        // AverageValue target of 1 asks for just enough replicas.
        gauge(
            &mut enc,
            "lattice_scaling_demand_replicas",
            "Replicas' worth of work arriving at this replica (qps x service time / capacity)",
            s.service.map(|t| s.qps * t / capacity),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_scale_in_safe",
            "1 when this replica's load stayed below 30% for 60 s (and no burst in the last 120 s): safe to remove",
            Some(if safe { 1.0 } else { 0.0 }),
        )?;
        gauge(
            &mut enc,
            "lattice_scaling_pod_deletion_cost",
            "Mean saturation over the last 60 s x 1000: the pod-deletion-cost a controller should annotate (idle replicas go first)",
            Some(cost as f64),
        )
    }
}

#[cfg(test)]
mod tests {
    use lattice_observability::Metrics;

    use super::*;

    #[test]
    fn signals_exist_only_while_a_reader_says_ready() {
        let m = Metrics::new();
        let s = m.set::<ReplicaSignals>();
        assert!(!m.encode().contains("lattice_scaling_"));
        s.read_from(Box::new(|| {
            Some(Snapshot {
                load: Load {
                    in_flight: 1,
                    queued: 3,
                    capacity: 2,
                },
                qps: 4.0,
                queue_p95: Some(0.5),
                service: Some(0.25),
            })
        }));
        let text = m.encode();
        assert!(text.contains("lattice_scaling_saturation 2.0"), "{text}");
        assert!(text.contains("lattice_scaling_demand_replicas 0.5"), "{text}");
        assert!(text.contains("lattice_scaling_pod_deletion_cost"), "{text}");
        s.read_from(Box::new(|| None));
        assert!(!m.encode().contains("lattice_scaling_"));
    }
}
