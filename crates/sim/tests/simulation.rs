//! Whole runs on the shipped traces with the default config: the claim the README
//! makes, and the delays each autoscaler is known for showing up end to end.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lattice_sim::report::summary_csv;
use lattice_sim::{run, PolicyKind, Report, SimConfig, Trace};

fn crate_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn trace(name: &str) -> Trace {
    let path = crate_path(&format!("traces/{name}.csv"));
    Trace::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The five policies on the spike trace, computed once for all tests here.
fn spike_reports() -> &'static [Report] {
    static REPORTS: OnceLock<Vec<Report>> = OnceLock::new();
    REPORTS.get_or_init(|| {
        let trace = trace("spike");
        PolicyKind::ALL
            .iter()
            .map(|&p| run(&trace, p, &SimConfig::default(), None))
            .collect()
    })
}

fn report(reports: &[Report], policy: PolicyKind) -> &Report {
    reports
        .iter()
        .find(|r| r.summary.policy == policy)
        .expect("every policy was run")
}

#[test]
fn on_the_spike_lattice_violates_the_slo_less_than_hpa_for_at_most_ten_percent_more_replica_seconds() {
    let reports = spike_reports();
    eprintln!("spike trace, default config:\n{}", summary_csv(reports));
    let hpa = &report(reports, PolicyKind::Hpa).summary;
    let lattice = &report(reports, PolicyKind::Lattice).summary;
    let cost_ratio = lattice.replica_seconds as f64 / hpa.replica_seconds as f64;
    let violation_ratio = lattice.slo_violations as f64 / hpa.slo_violations as f64;
    eprintln!(
        "lattice / hpa: replica-seconds {} / {} = {cost_ratio:.3}, SLO violations {} / {} = {violation_ratio:.3}",
        lattice.replica_seconds, hpa.replica_seconds, lattice.slo_violations, hpa.slo_violations
    );
    assert!(lattice.slo_violations < hpa.slo_violations);
    assert!(cost_ratio <= 1.10, "lattice costs {cost_ratio:.3} × HPA");
}

#[test]
fn the_readme_figures_match_the_simulator() {
    // `cargo run --release -p lattice-sim --example regenerate` rewrites them.
    let committed = std::fs::read_to_string(crate_path("docs/spike_summary.csv")).unwrap_or_default();
    assert_eq!(
        committed,
        summary_csv(spike_reports()),
        "docs/spike_summary.csv is stale; run the regenerate example"
    );
}

/// Seconds from the first time `desired` reaches its peak to its first decrease.
fn hold_after_peak(report: &Report) -> u64 {
    let peak = report.series.iter().map(|r| r.desired).max().unwrap_or(0);
    let reached = report.series.iter().position(|r| r.desired == peak).unwrap_or(0);
    let dropped = report.series[reached..]
        .iter()
        .position(|r| r.desired < peak)
        .map(|i| reached + i);
    dropped.map_or(u64::MAX, |d| (d - reached) as u64)
}

#[test]
fn hpa_holds_its_peak_for_the_scale_down_stabilization_window() {
    let reports = spike_reports();
    for policy in [PolicyKind::Hpa, PolicyKind::Keda] {
        let hold = hold_after_peak(report(reports, policy));
        assert!(hold >= 300, "{policy} dropped {hold} s after its peak");
    }
}

#[test]
fn ray_holds_its_target_for_the_downscale_delay() {
    let hold = hold_after_peak(report(spike_reports(), PolicyKind::Ray));
    assert!(hold >= 600, "ray dropped {hold} s after its peak");
}

#[test]
fn everyone_returns_to_the_baseline_after_the_spike() {
    for r in spike_reports() {
        let last = r.series.last().map_or(0, |s| s.total);
        assert!(last <= 6, "{} ends with {last} pods", r.summary.policy);
    }
}

#[test]
fn scale_to_zero_waits_for_keda_cooldown_and_knative_stable_window_plus_grace() {
    // On/off trace: bursts in [0, 120) and [600, 720), silence in between.
    let trace = trace("onoff");
    let config = SimConfig::default();
    // When `spec.replicas` first becomes 0 (the draining pods go a second later).
    let first_zero = |policy| {
        let r = run(&trace, policy, &config, None);
        r.series.iter().position(|s| s.desired == 0).map(|t| t as u64)
    };
    // KEDA: last active poll at t = 120, cooldown 300 s, polls every 30 s.
    assert_eq!(first_zero(PolicyKind::Keda), Some(420));
    // Knative: the 60 s stable average reaches zero about a minute after the
    // last request, then the 30 s grace period.
    let kpa = first_zero(PolicyKind::Kpa).unwrap_or(u64::MAX);
    assert!((180..=240).contains(&kpa), "kpa reached zero at {kpa}");
    // The HPA never goes below minReplicas.
    assert_eq!(first_zero(PolicyKind::Hpa), None);
}

#[test]
fn runs_are_deterministic_and_report_progress() {
    let trace = Trace::new(vec![50; 120]);
    let config = SimConfig::default();
    let mut calls = Vec::new();
    let mut progress = |done, total| calls.push((done, total));
    let a = run(&trace, PolicyKind::Lattice, &config, Some(&mut progress));
    let b = run(&trace, PolicyKind::Lattice, &config, None);
    assert_eq!(a.series, b.series);
    assert_eq!(a.summary, b.summary);
    assert_eq!(calls.len(), 120);
    assert_eq!(calls.last(), Some(&(120, 120)));
}
