//! Rewrites the shipped traces and the README figures:
//!
//! ```text
//! cargo run --release -p lattice-sim --example regenerate
//! ```
//!
//! - `traces/{spike,diurnal,onoff}.csv` from `lattice_sim::synth`;
//! - `docs/{trace}.svg` and `docs/{trace}_summary.csv`: the five policies on each
//!   trace with the default config (the spike chart is the README figure);
//! - `docs/spike-lattice.svg`: the single-run chart of the Lattice policy.
//!
//! A test (`tests/spike.rs`) fails when `docs/spike_summary.csv` no longer matches
//! what the simulator computes, so the README numbers cannot go stale silently.

use std::error::Error;
use std::path::Path;

use lattice_sim::{
    plot,
    report::{summary_csv, write_summary_csv},
};
use lattice_sim::{run, synth, PolicyKind, ProgressBar, SimConfig, Trace};

fn main() -> Result<(), Box<dyn Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let traces = [
        ("spike", synth::spike(), "Spike: 100 → 800 req/s for 4 min"),
        ("diurnal", synth::diurnal(), "Diurnal: a day in 2 h, 20 to 300 req/s"),
        (
            "onoff",
            synth::onoff(),
            "On/off: 2 min bursts of 150 req/s, 8 min silences",
        ),
    ];
    let config = SimConfig::default();
    for (name, trace, title) in traces {
        let path = root.join("traces").join(format!("{name}.csv"));
        std::fs::write(&path, trace.to_csv())?;
        let trace = Trace::load(&path)?;
        let mut reports = Vec::new();
        for policy in PolicyKind::ALL {
            eprintln!("{name} / {policy}");
            let mut bar = ProgressBar::new(std::io::stderr(), 40);
            let mut progress = |done, total| bar.update(done, total);
            reports.push(run(&trace, policy, &config, Some(&mut progress)));
            bar.finish();
        }
        let docs = root.join("docs");
        plot::write_comparison(title, &reports, &docs.join(format!("{name}.svg")))?;
        write_summary_csv(&reports, &docs.join(format!("{name}_summary.csv")))?;
        if name == "spike" {
            if let Some(lattice) = reports.iter().find(|r| r.summary.policy == PolicyKind::Lattice) {
                plot::write_single(lattice, &docs.join("spike-lattice.svg"))?;
            }
        }
        println!("{name}:\n{}", summary_csv(&reports));
    }
    Ok(())
}
