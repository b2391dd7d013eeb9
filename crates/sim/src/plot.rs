//! Hand-written SVG line charts: stacked panels sharing a time axis, tick labels,
//! a legend per panel, optional log scale and a dashed threshold line. A plotting
//! crate would cost more to build than these two hundred lines.

use std::fmt::Write as _;

use crate::policy::PolicyKind;
use crate::report::Report;

const WIDTH: f64 = 1120.0;
const LEFT: f64 = 72.0;
/// Room right of the plots for the legends.
const RIGHT: f64 = 264.0;
const TOP: f64 = 56.0;
const PANEL_HEIGHT: f64 = 190.0;
/// Room above each panel for its title.
const PANEL_GAP: f64 = 34.0;
const BOTTOM: f64 = 48.0;

struct Line {
    label: String,
    color: &'static str,
    values: Vec<f64>,
    dashed: bool,
}

struct Panel {
    title: &'static str,
    lines: Vec<Line>,
    log: bool,
    /// A horizontal reference line (value, label), such as the SLO.
    threshold: Option<(f64, String)>,
}

/// The chart of one run.
/// Three stacked panels over time: replicas (ready, total, and what the arrivals
/// need at the target utilisation), queue length, p99 latency against the SLO.
pub fn single(report: &Report) -> String {
    let s = &report.series;
    let replicas = Panel {
        title: "replicas",
        lines: vec![
            line(
                "total (all pod states)",
                "#1f77b4",
                s.iter().map(|r| f64::from(r.total)),
                false,
            ),
            line("ready", "#2ca02c", s.iter().map(|r| f64::from(r.ready)), false),
            line(
                "needed at target utilisation",
                "#7f7f7f",
                report.needed_replicas(),
                true,
            ),
        ],
        log: false,
        threshold: None,
    };
    let queue = Panel {
        title: "queue length (requests)",
        lines: vec![line(
            "queued at the gateway",
            "#ff7f0e",
            s.iter().map(|r| f64::from(r.queue)),
            false,
        )],
        log: false,
        threshold: None,
    };
    let latency = Panel {
        title: "p99 latency per second (ms, log scale)",
        lines: vec![line("p99", "#d62728", s.iter().map(|r| r.p99_ms), false)],
        log: true,
        threshold: Some((report.slo_ms, format!("SLO {} ms", report.slo_ms))),
    };
    let m = &report.summary;
    let title = format!("{}: {} s of trace", m.policy, m.seconds);
    let subtitle = format!(
        "{} replica-seconds · {:.2} % SLO violations ({} of {}) · {} cold starts · {} scale events · p99 {:.0} ms",
        m.replica_seconds, m.slo_violation_pct, m.slo_violations, m.requests, m.cold_starts, m.scale_events, m.p99_ms
    );
    render(&title, &subtitle, &[replicas, queue, latency], s.len())
}

/// Several runs of one trace.
/// Several policies on one trace: arrivals, replicas per policy, p99 latency per
/// policy against the SLO.
pub fn comparison(title: &str, reports: &[Report]) -> String {
    let Some(first) = reports.first() else {
        return render(title, "no runs", &[], 0);
    };
    let arrivals = Panel {
        title: "arrivals (requests per second)",
        lines: vec![line(
            "arrivals",
            "#7f7f7f",
            first.series.iter().map(|r| f64::from(r.arrivals)),
            false,
        )],
        log: false,
        threshold: None,
    };
    let label = |r: &Report| {
        let m = &r.summary;
        format!(
            "{} ({:.1} % viol., {} rep·s)",
            m.policy, m.slo_violation_pct, m.replica_seconds
        )
    };
    // KEDA drives an HPA and often overlaps it exactly; dashes keep both visible.
    let dashed = |r: &Report| r.summary.policy == PolicyKind::Keda;
    let replicas = Panel {
        title: "replicas (all pod states)",
        lines: reports
            .iter()
            .map(|r| {
                line(
                    &label(r),
                    color(r.summary.policy),
                    r.series.iter().map(|s| f64::from(s.total)),
                    dashed(r),
                )
            })
            .collect(),
        log: false,
        threshold: None,
    };
    let latency = Panel {
        title: "p99 latency per second (ms, log scale)",
        lines: reports
            .iter()
            .map(|r| {
                line(
                    r.summary.policy.name(),
                    color(r.summary.policy),
                    r.series.iter().map(|s| s.p99_ms),
                    dashed(r),
                )
            })
            .collect(),
        log: true,
        threshold: Some((first.slo_ms, format!("SLO {} ms", first.slo_ms))),
    };
    let subtitle = "same trace, same request times, same pod start-up for every policy";
    render(title, subtitle, &[arrivals, replicas, latency], first.series.len())
}

fn line(label: &str, color: &'static str, values: impl Iterator<Item = f64>, dashed: bool) -> Line {
    Line {
        label: label.to_string(),
        color,
        values: values.collect(),
        dashed,
    }
}

fn color(policy: PolicyKind) -> &'static str {
    match policy {
        PolicyKind::Hpa => "#1f77b4",
        PolicyKind::Keda => "#ff7f0e",
        PolicyKind::Kpa => "#2ca02c",
        PolicyKind::Ray => "#9467bd",
        PolicyKind::Lattice => "#d62728",
    }
}

fn render(title: &str, subtitle: &str, panels: &[Panel], len: usize) -> String {
    let height = TOP + panels.len() as f64 * (PANEL_GAP + PANEL_HEIGHT) + BOTTOM;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(svg, "<title>{}</title>", escape(title));
    let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="40" fill="#555">{}</text>"##,
        escape(subtitle)
    );
    let x_max = len.max(1) as f64;
    for (index, panel) in panels.iter().enumerate() {
        let top = TOP + index as f64 * (PANEL_GAP + PANEL_HEIGHT) + PANEL_GAP;
        draw_panel(&mut svg, panel, top, x_max, index + 1 == panels.len());
    }
    svg.push_str("</svg>\n");
    svg
}

fn draw_panel(svg: &mut String, panel: &Panel, top: f64, x_max: f64, last: bool) {
    let plot_width = WIDTH - LEFT - RIGHT;
    let bottom = top + PANEL_HEIGHT;
    let values = panel
        .lines
        .iter()
        .flat_map(|l| l.values.iter().copied())
        .chain(panel.threshold.as_ref().map(|t| t.0));
    let axis = Axis::fit(values, panel.log);
    let x = |t: f64| LEFT + t / x_max * plot_width;
    let y = |v: f64| bottom - axis.fraction(v) * PANEL_HEIGHT;

    let _ = write!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
        top - 10.0,
        escape(panel.title)
    );
    // Legend: one entry per line, in a column right of the plot.
    let lx = WIDTH - RIGHT + 14.0;
    for (i, l) in panel.lines.iter().enumerate() {
        let dash = if l.dashed { r#" stroke-dasharray="5,3""# } else { "" };
        let ly = top + 12.0 + 18.0 * i as f64;
        let _ = write!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{x2}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{tx}" y="{ty}" font-size="11">{label}</text>"#,
            x2 = lx + 18.0,
            c = l.color,
            tx = lx + 24.0,
            ty = ly + 4.0,
            label = escape(&l.label)
        );
    }
    // Grid and y ticks.
    for tick in axis.ticks() {
        let ty = y(tick);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{x2}" y2="{ty:.1}" stroke="#e5e5e5"/><text x="{tx}" y="{ly:.1}" text-anchor="end">{label}</text>"##,
            x2 = WIDTH - RIGHT,
            tx = LEFT - 6.0,
            ly = ty + 4.0,
            label = format_number(tick)
        );
    }
    // X ticks on every panel, labels on the last.
    for tick in nice_ticks(0.0, x_max, 10).into_iter().filter(|&t| t <= x_max) {
        let tx = x(tick);
        let _ = write!(
            svg,
            r##"<line x1="{tx:.1}" y1="{bottom}" x2="{tx:.1}" y2="{}" stroke="#333"/>"##,
            bottom + 4.0
        );
        if last {
            let _ = write!(
                svg,
                r#"<text x="{tx:.1}" y="{}" text-anchor="middle">{}</text>"#,
                bottom + 18.0,
                format_number(tick)
            );
        }
    }
    if last {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>"#,
            LEFT + plot_width / 2.0,
            bottom + 38.0
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#333"/>"##
    );
    if let Some((value, label)) = &panel.threshold {
        let ty = y(*value);
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" y1="{ty:.1}" x2="{x2}" y2="{ty:.1}" stroke="black" stroke-dasharray="6,4"/><text x="{tx}" y="{ly:.1}" text-anchor="end">{label}</text>"#,
            x2 = WIDTH - RIGHT,
            tx = WIDTH - RIGHT - 4.0,
            ly = ty - 4.0,
            label = escape(label)
        );
    }
    let plot_px = plot_width as usize;
    for l in &panel.lines {
        let dash = if l.dashed { r#" stroke-dasharray="5,3""# } else { "" };
        for segment in segments(&l.values, panel.log, plot_px) {
            let points: Vec<String> = segment
                .iter()
                .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(axis.clamp(v))))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5"{dash} points="{}"/>"#,
                l.color,
                points.join(" ")
            );
        }
    }
}

/// Runs of plottable values as (t, value), split at gaps (NaN, or ≤ 0 on a log
/// axis). Long runs keep each bucket's minimum and maximum, so spikes survive
/// the thinning to about two points per pixel.
fn segments(values: &[f64], log: bool, pixels: usize) -> Vec<Vec<(f64, f64)>> {
    let bucket = values.len().div_ceil(pixels.max(1)).max(1);
    let plottable = |v: f64| !v.is_nan() && (!log || v > 0.0);
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for (chunk_index, chunk) in values.chunks(bucket).enumerate() {
        let start = chunk_index * bucket;
        let points: Vec<(f64, f64)> = chunk
            .iter()
            .enumerate()
            .filter(|(_, &v)| plottable(v))
            .map(|(i, &v)| ((start + i) as f64, v))
            .collect();
        if points.len() < chunk.len() && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        if bucket == 1 || points.len() <= 2 {
            current.extend(points);
            continue;
        }
        let lo = points.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1));
        let hi = points.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let (a, b) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
            current.push(a);
            current.push(b);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A y axis: linear from 0, or log10 between decades.
struct Axis {
    log: bool,
    min: f64,
    max: f64,
}

impl Axis {
    fn fit(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let finite: Vec<f64> = values.filter(|v| v.is_finite() && (!log || *v > 0.0)).collect();
        if log {
            let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = finite.iter().copied().fold(0.0, f64::max);
            if finite.is_empty() {
                return Axis {
                    log,
                    min: 0.0,
                    max: 3.0,
                };
            }
            // Pad below the smallest value so a floor (the service time) does not
            // sit on the axis.
            let min = (lo * 0.9).log10().floor();
            let max = hi.log10().ceil().max(min + 1.0);
            Axis { log, min, max }
        } else {
            let hi = finite.iter().copied().fold(0.0, f64::max);
            let max = nice_ticks(0.0, hi.max(1.0), 5).last().copied().unwrap_or(1.0).max(hi);
            Axis { log, min: 0.0, max }
        }
    }

    fn fraction(&self, v: f64) -> f64 {
        let v = if self.log { v.log10() } else { v };
        (v - self.min) / (self.max - self.min)
    }

    fn clamp(&self, v: f64) -> f64 {
        if self.log {
            v.clamp(10f64.powf(self.min), 10f64.powf(self.max))
        } else {
            v.clamp(self.min, self.max)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            (self.min as i32..=self.max as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            nice_ticks(self.min, self.max, 5)
        }
    }
}

/// Ticks at 1, 2 or 5 × 10^k covering [lo, hi] with about `count` steps.
fn nice_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / count as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn format_number(v: f64) -> String {
    if v >= 10_000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn write_single(report: &Report, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, single(report))
}

pub fn write_comparison(title: &str, reports: &[Report], path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, comparison(title, reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ticks_use_round_steps() {
        assert_eq!(
            nice_ticks(0.0, 1800.0, 10),
            (0..=9).map(|i| f64::from(i) * 200.0).collect::<Vec<_>>()
        );
        assert_eq!(nice_ticks(0.0, 37.0, 5), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn gaps_split_polylines_and_long_runs_keep_extremes() {
        let v = [1.0, f64::NAN, 2.0, 3.0];
        assert_eq!(
            segments(&v, false, 100),
            vec![vec![(0.0, 1.0)], vec![(2.0, 2.0), (3.0, 3.0)]]
        );
        let long: Vec<f64> = (0..1000).map(|i| if i == 500 { 99.0 } else { 1.0 }).collect();
        let s = segments(&long, false, 100);
        assert!(s[0].iter().any(|&(t, v)| t == 500.0 && v == 99.0));
        assert!(s[0].len() <= 200);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
