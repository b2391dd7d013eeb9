//! Results of a run: per-second records, the summary, and the CSV/SVG writers.

use std::fmt::{self, Write as _};
use std::io;
use std::path::Path;

use crate::policy::PolicyKind;

/// One simulated second.
#[derive(Clone, Debug, PartialEq)]
pub struct SecondRecord {
    pub t: u64,
    pub arrivals: u32,
    pub rejected: u32,
    /// Pods serving traffic at the start of the second.
    pub ready: u32,
    /// Pods that exist in any state (what you pay for).
    pub total: u32,
    /// `spec.replicas` after this second's decision.
    pub desired: u32,
    /// Gateway queue at the end of the second.
    pub queue: u32,
    /// 99th percentile latency of the requests that started service in this
    /// second; NaN when none did.
    pub p99_ms: f64,
    /// Rejected requests plus requests slower than the SLO.
    pub violations: u32,
}

/// The figures a run is judged by.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub policy: PolicyKind,
    pub seconds: u64,
    pub requests: u64,
    pub served: u64,
    pub rejected: u64,
    pub slo_violations: u64,
    /// Violations as a percentage of all requests.
    pub slo_violation_pct: f64,
    /// Σ over seconds of the pods that exist: the cost.
    pub replica_seconds: u64,
    /// Pods created after the start (each one a cold start).
    pub cold_starts: u64,
    /// Changes of `spec.replicas`.
    pub scale_events: u64,
    /// Latency percentiles over all served requests, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_replicas: u32,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub summary: Summary,
    pub series: Vec<SecondRecord>,
    pub slo_ms: f64,
    /// Requests per second one pod completes, to draw the replicas a trace needs.
    pub pod_capacity: f64,
    pub target_utilization: f64,
}

// === Report ===

impl Report {
    /// Per-second CSV: `t,arrivals,rejected,ready,total,desired,queue,p99_ms,violations`
    /// (`p99_ms` empty in seconds without served requests).
    pub fn to_csv(&self) -> String {
        let mut out = String::from("t,arrivals,rejected,ready,total,desired,queue,p99_ms,violations\n");
        for r in &self.series {
            let p99 = if r.p99_ms.is_nan() {
                String::new()
            } else {
                format!("{:.1}", r.p99_ms)
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{}",
                r.t, r.arrivals, r.rejected, r.ready, r.total, r.desired, r.queue, p99, r.violations
            );
        }
        out
    }

    pub fn write_csv(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_csv())
    }

    /// Replicas the arrivals of each second need at the target utilisation.
    pub fn needed_replicas(&self) -> impl Iterator<Item = f64> + '_ {
        self.series
            .iter()
            .map(|r| f64::from(r.arrivals) / (self.pod_capacity * self.target_utilization))
    }
}

// === Summary ===

impl fmt::Display for Summary {
    /// The block `lattice simulate` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "policy           {}", self.policy)?;
        writeln!(f, "trace            {} s, {} requests", self.seconds, self.requests)?;
        writeln!(
            f,
            "replica-seconds  {} (peak {} pods)",
            self.replica_seconds, self.max_replicas
        )?;
        writeln!(
            f,
            "SLO violations   {} ({:.2} %), of which {} rejected",
            self.slo_violations, self.slo_violation_pct, self.rejected
        )?;
        writeln!(f, "cold starts      {}", self.cold_starts)?;
        writeln!(f, "scale events     {}", self.scale_events)?;
        write!(
            f,
            "latency          p50 {:.0} ms, p99 {:.0} ms",
            self.p50_ms, self.p99_ms
        )
    }
}

/// One row per report: the summary figures as CSV.
pub fn summary_csv(reports: &[Report]) -> String {
    let mut out = String::from(
        "policy,replica_seconds,slo_violations,slo_violation_pct,rejected,cold_starts,scale_events,p50_ms,p99_ms,max_replicas\n",
    );
    for s in reports.iter().map(|r| &r.summary) {
        let _ = writeln!(
            out,
            "{},{},{},{:.2},{},{},{},{:.1},{:.1},{}",
            s.policy,
            s.replica_seconds,
            s.slo_violations,
            s.slo_violation_pct,
            s.rejected,
            s.cold_starts,
            s.scale_events,
            s.p50_ms,
            s.p99_ms,
            s.max_replicas
        );
    }
    out
}

pub fn write_summary_csv(reports: &[Report], path: &Path) -> io::Result<()> {
    std::fs::write(path, summary_csv(reports))
}
