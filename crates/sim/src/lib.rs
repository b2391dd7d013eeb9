//! `lattice-sim`: replays a load trace through models of the autoscalers people
//! run inference services with — Kubernetes HPA, KEDA, Knative KPA, Ray Serve —
//! and through Lattice's predictive policy, then reports cost (replica-seconds)
//! against SLO violations.
//!
//! # Layout
//!
//! - [`trace`]: the `second,arrivals` CSV format; [`synth`]: the shipped traces.
//! - `cluster`: the service being scaled — gateway token buckets and a bounded
//!   FIFO queue, pods that start, warm up, serve and drain.
//! - `metrics`: the delayed, sampled view each autoscaler gets (Prometheus
//!   scrapes, Knative's one-second buckets, Ray's pushed averages, the gateway's
//!   own counters). No policy reads the cluster directly.
//! - [`policy`]: one module per autoscaler; the upstream decision functions are
//!   public and checked against upstream test tables in `tests/`.
//! - [`report`]: per-second series, summary, CSV and SVG output (`plot` draws).
//! - [`ProgressBar`]: a stderr-friendly bar for the CLI.
//!
//! Architecture Invariant: a run is deterministic. The same trace, policy and
//! config (seed included) give the same report, and every policy sees the same
//! request arrival times.
//!
//! ```no_run
//! use lattice_sim::{run, parse_policy, SimConfig, Trace};
//! let trace = Trace::load("crates/sim/traces/spike.csv".as_ref()).unwrap();
//! let report = run(&trace, parse_policy("lattice").unwrap(), &SimConfig::default(), None);
//! println!("{} replica-seconds", report.summary.replica_seconds);
//! ```

mod cluster;
mod config;
pub mod plot;
pub mod policy;
mod progress;
pub mod report;
mod rng;
mod signals;
pub mod synth;
pub mod trace;

pub use config::{InvalidConfig, MetricsConfig, SimConfig, TokenBucketConfig};
pub use policy::{parse_policy, PolicyKind, UnknownPolicy};
pub use progress::ProgressBar;
pub use report::{Report, SecondRecord, Summary};
pub use trace::{Trace, TraceError};

use cluster::{Cluster, PodState};
use signals::{ClusterView, MetricsPipeline, Scrape, SecondSignals};

/// Simulates `trace` under `policy`. `progress`, if given, is called after every
/// simulated second with (seconds done, seconds total).
///
/// Panics if `config.validate()` fails; call it first on user-supplied configs.
pub fn run(
    trace: &Trace,
    policy: PolicyKind,
    config: &SimConfig,
    mut progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Report {
    if let Err(problem) = config.validate() {
        panic!("invalid simulation config: {problem}");
    }
    let initial = initial_replicas(trace, config);
    let mut cluster = Cluster::new(config, initial);
    let mut pipeline = MetricsPipeline::new(&config.metrics);
    let mut autoscaler = config.autoscaler(policy, initial);
    let total_seconds = trace.len() as u64;
    let mut series = Vec::with_capacity(trace.len());
    let mut latencies: Vec<f32> = Vec::with_capacity(trace.total() as usize);
    let mut scale_events = 0;
    let mut replica_seconds = 0;
    let mut max_replicas = 0;

    for (t, &arrivals) in trace.arrivals().iter().enumerate() {
        let now = t as u64;
        cluster.advance(now);
        if pipeline.scrape_due(now) {
            pipeline.push_scrape(Scrape {
                at: now,
                pods: cluster.in_flight_by_ready_pod(now),
                queue: cluster.queue_len(),
            });
        }
        let pods = cluster.pods();
        let view = ClusterView {
            now,
            desired: cluster.desired(),
            pods: &pods,
            metrics: &pipeline,
        };
        if let Some(desired) = autoscaler.tick(&view) {
            if desired != cluster.desired() {
                scale_events += 1;
                cluster.set_desired(now, desired);
            }
        }
        let ready = cluster.count(PodState::Ready);
        let total = cluster.total();
        replica_seconds += u64::from(total);
        max_replicas = max_replicas.max(total);
        let mut outcome = cluster.serve_second(now, arrivals);
        pipeline.record_second(SecondSignals {
            offered: outcome.offered,
            queue_end: outcome.queue_end,
            concurrency: outcome.concurrency,
        });
        series.push(SecondRecord {
            t: now,
            arrivals,
            rejected: outcome.rejected,
            ready,
            total,
            desired: cluster.desired(),
            queue: outcome.queue_end,
            p99_ms: lattice_stats::quantile(&mut outcome.latencies_ms, 0.99),
            violations: outcome.violations,
        });
        latencies.append(&mut outcome.latencies_ms);
        if let Some(callback) = progress.as_mut() {
            callback(now + 1, total_seconds);
        }
    }

    // Requests still queued at the end are served by the pods that are ready, or
    // count as violations; they are booked to the last second.
    let mut tail = cluster.drain_tail();
    if let Some(last) = series.last_mut() {
        last.violations += tail.violations;
    }
    latencies.append(&mut tail.latencies_ms);

    let violations: u64 = series.iter().map(|r| u64::from(r.violations)).sum();
    let rejected: u64 = series.iter().map(|r| u64::from(r.rejected)).sum();
    let requests = trace.total();
    let summary = Summary {
        policy,
        seconds: total_seconds,
        requests,
        served: latencies.len() as u64,
        rejected,
        slo_violations: violations,
        slo_violation_pct: if requests == 0 {
            0.0
        } else {
            100.0 * violations as f64 / requests as f64
        },
        replica_seconds,
        cold_starts: cluster.pod_starts(),
        scale_events,
        p50_ms: lattice_stats::quantile(&mut latencies, 0.5),
        p99_ms: lattice_stats::quantile(&mut latencies, 0.99),
        max_replicas,
    };
    Report {
        summary,
        series,
        slo_ms: config.slo_ms,
        pod_capacity: config.pod_capacity(),
        target_utilization: config.target_utilization,
    }
}

/// `config.initial_replicas`, or enough pods for the first minute's mean rate at
/// the target utilisation, within the replica bounds.
fn initial_replicas(trace: &Trace, config: &SimConfig) -> u32 {
    config.initial_replicas.unwrap_or_else(|| {
        let minute = &trace.arrivals()[..trace.len().min(60)];
        let rate = minute.iter().map(|&a| f64::from(a)).sum::<f64>() / minute.len().max(1) as f64;
        let needed = (rate / (config.pod_capacity() * config.target_utilization)).ceil() as u32;
        needed.clamp(config.min_replicas.max(1), config.max_replicas)
    })
}
