//! Trace parsing, the shipped traces, and the CSV and SVG writers.

use std::path::{Path, PathBuf};

use lattice_sim::{parse_policy, run, synth, PolicyKind, SimConfig, Trace, TraceError};
use lattice_sim::{plot, report::write_summary_csv};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lattice-sim-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse_error(text: &str) -> String {
    match Trace::parse(text) {
        Ok(t) => panic!("parsed {} seconds from {text:?}", t.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn traces_parse_and_gaps_are_silent_seconds() {
    let t = Trace::parse("second,arrivals\n0,5\n1,7\n\n4,2\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.arrivals(), &[5, 7, 0, 0, 2]);
    assert_eq!(t.total(), 14);
    // Header case and spaces do not matter; the CSV round-trips.
    let t = Trace::parse(" Second , Arrivals \n0, 3\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(Trace::parse(&t.to_csv()).ok(), Some(t));
}

#[test]
fn trace_errors_name_the_line_and_the_problem() {
    assert_eq!(parse_error(""), "trace is empty: expected a `second,arrivals` header");
    assert_eq!(
        parse_error("t,n\n0,1\n"),
        "line 1: expected the header `second,arrivals`, found `t,n`"
    );
    assert_eq!(parse_error("second,arrivals\n"), "trace has a header but no data lines");
    assert_eq!(
        parse_error("second,arrivals\n0,1\n1,x\n"),
        "line 3: arrivals `x` is not a non-negative integer"
    );
    assert_eq!(
        parse_error("second,arrivals\n0,1\n-1,2\n"),
        "line 3: second `-1` is not a non-negative integer"
    );
    assert_eq!(
        parse_error("second,arrivals\n0,1,2\n"),
        "line 2: expected 2 fields `second,arrivals`, found 3"
    );
    assert_eq!(
        parse_error("second,arrivals\n5,1\n\n5,2\n"),
        "line 4: second 5 does not increase (expected 6 or later)"
    );
    assert!(parse_error("second,arrivals\n99999999,1\n").starts_with("line 2: second 99999999 is beyond"));
    let missing = Trace::load(Path::new("/nonexistent/trace.csv"));
    assert!(matches!(missing, Err(TraceError::Io { .. })));
}

#[test]
fn shipped_traces_are_the_documented_formulas() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
    for (name, generated) in [
        ("diurnal", synth::diurnal()),
        ("spike", synth::spike()),
        ("onoff", synth::onoff()),
    ] {
        let shipped = Trace::load(&dir.join(format!("{name}.csv"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(shipped, generated, "traces/{name}.csv differs from synth::{name}()");
        assert!(shipped.len() <= 7200, "{name} is longer than two hours");
    }
    let spike = synth::spike();
    let mean = |range: std::ops::Range<usize>| {
        spike.arrivals()[range.clone()]
            .iter()
            .map(|&a| f64::from(a))
            .sum::<f64>()
            / range.len() as f64
    };
    let ratio = mean(600..840) / mean(0..600);
    assert!((7.0..=9.0).contains(&ratio), "spike is {ratio:.1}× the baseline");
    assert!(
        synth::onoff().arrivals()[200..600].iter().all(|&a| a == 0),
        "on/off has silent gaps"
    );
}

#[test]
fn policy_names_parse() {
    for p in PolicyKind::ALL {
        assert_eq!(parse_policy(p.name()), Ok(p));
    }
    assert_eq!(parse_policy(" KPA "), Ok(PolicyKind::Kpa));
    assert_eq!(parse_policy("vpa"), Err(lattice_sim::UnknownPolicy("vpa".to_string())));
    assert_eq!(
        parse_policy("vpa").unwrap_err().to_string(),
        "unknown policy `vpa`; expected one of hpa, keda, kpa, ray, lattice"
    );
}

#[test]
fn csv_and_svg_files_are_well_formed() {
    let dir = TempDir::new("output");
    let trace = Trace::new(
        (0..300)
            .map(|t| if (100..160).contains(&t) { 300 } else { 40 })
            .collect(),
    );
    let config = SimConfig::default();
    let reports: Vec<_> = [PolicyKind::Hpa, PolicyKind::Lattice]
        .iter()
        .map(|&p| run(&trace, p, &config, None))
        .collect();
    let report = &reports[1];

    let csv_path = dir.0.join("run.csv");
    report.write_csv(&csv_path).unwrap_or_else(|e| panic!("{e}"));
    let csv = std::fs::read_to_string(&csv_path).unwrap_or_default();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("t,arrivals,rejected,ready,total,desired,queue,p99_ms,violations")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), trace.len());
    assert!(rows.iter().all(|r| r.len() == 9));
    assert!(rows.iter().enumerate().all(|(t, r)| r[0] == t.to_string()));
    let violations: u64 = rows.iter().map(|r| r[8].parse::<u64>().unwrap_or(0)).sum();
    assert_eq!(violations, report.summary.slo_violations);

    let svg_path = dir.0.join("run.svg");
    plot::write_single(report, &svg_path).unwrap_or_else(|e| panic!("{e}"));
    check_svg(&std::fs::read_to_string(&svg_path).unwrap_or_default(), 3);

    let comparison = dir.0.join("compare.svg");
    plot::write_comparison("hpa & lattice <test>", &reports, &comparison).unwrap_or_else(|e| panic!("{e}"));
    let svg = std::fs::read_to_string(&comparison).unwrap_or_default();
    check_svg(&svg, 3);
    assert!(svg.contains("hpa &amp; lattice &lt;test&gt;"));
    assert!(
        svg.contains("lattice (") && svg.contains("hpa ("),
        "legend names the policies"
    );

    let text = report.summary.to_string();
    assert!(text.starts_with("policy           lattice\n"), "{text}");
    assert!(text.contains(&format!("replica-seconds  {}", report.summary.replica_seconds)));

    let summary = dir.0.join("summary.csv");
    write_summary_csv(&reports, &summary).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&summary).unwrap_or_default();
    assert_eq!(text.lines().count(), 3);
    assert!(text.lines().nth(2).is_some_and(|l| l.starts_with("lattice,")));
}

/// XML-ish checks: one root `<svg>`, balanced elements, polylines with numeric
/// points, and one plot frame per panel.
fn check_svg(svg: &str, panels: usize) {
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    let mut depth: i64 = 0;
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..]
            .find('>')
            .map(|e| start + e)
            .unwrap_or_else(|| panic!("unclosed tag"));
        let tag = &rest[start + 1..end];
        if tag.starts_with('/') {
            depth -= 1;
        } else if !tag.ends_with('/') {
            depth += 1;
        }
        assert!(depth >= 0, "closing tag without opening: <{tag}>");
        assert!(!rest[start + 1..end].contains('<'), "`<` inside a tag");
        rest = &rest[end + 1..];
    }
    assert_eq!(depth, 0, "unbalanced elements");
    let polylines: Vec<&str> = svg.split("<polyline").skip(1).collect();
    assert!(polylines.len() >= panels, "{} polylines", polylines.len());
    for p in polylines {
        let points = p
            .split("points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("");
        assert!(!points.is_empty());
        for pair in points.split(' ') {
            let (x, y) = pair.split_once(',').unwrap_or_else(|| panic!("bad point {pair}"));
            assert!(x.parse::<f64>().is_ok() && y.parse::<f64>().is_ok(), "bad point {pair}");
        }
    }
    assert_eq!(
        svg.matches(r##"fill="none" stroke="#333""##).count(),
        panels,
        "one frame per panel"
    );
}
