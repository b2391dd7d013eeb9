//! `lattice simulate`: replays a load trace through autoscaling policies.

use std::path::PathBuf;

use clap::Args;

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// CSV of `second,arrivals` (shipped: crates/sim/traces/{spike,diurnal,onoff}.csv).
    #[arg(long, env = "LATTICE_SIM_TRACE")]
    pub trace: PathBuf,
    /// Autoscaler model(s): hpa, keda, kpa, ray, lattice (comma-separated; several
    /// policies also write a comparison plot).
    #[arg(long, env = "LATTICE_SIM_POLICY", value_delimiter = ',', default_value = "lattice")]
    pub policy: Vec<String>,
    /// Directory for <policy>.csv, <policy>.svg and, with several policies, comparison.svg.
    #[arg(long, env = "LATTICE_SIM_OUT", default_value = "sim-out")]
    pub out: PathBuf,
    /// Time a request holds a slot, in milliseconds.
    #[arg(long, env = "LATTICE_SIM_SERVICE_TIME_MS", default_value_t = 100.0)]
    pub service_time_ms: f64,
    /// Requests one pod serves at once.
    #[arg(long, env = "LATTICE_SIM_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u32,
    /// Seconds from pod creation to a running container.
    #[arg(long, env = "LATTICE_SIM_POD_START_S", default_value_t = 20)]
    pub pod_start_s: u64,
    /// Seconds of model load and warm-up before the pod is ready.
    #[arg(long, env = "LATTICE_SIM_WARMUP_S", default_value_t = 40)]
    pub warmup_s: u64,
    /// Latency objective, in milliseconds; slower or rejected requests violate it.
    #[arg(long, env = "LATTICE_SIM_SLO_MS", default_value_t = 500.0)]
    pub slo_ms: f64,
    #[arg(long, env = "LATTICE_SIM_MIN_REPLICAS", default_value_t = 1)]
    pub min_replicas: u32,
    #[arg(long, env = "LATTICE_SIM_MAX_REPLICAS", default_value_t = 50)]
    pub max_replicas: u32,
}

pub fn run(args: SimulateArgs) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let trace = lattice_sim::Trace::load(&args.trace).map_err(|e| Failure::Usage(format!("--trace: {e}")))?;
    let policies = args
        .policy
        .iter()
        .map(|p| lattice_sim::parse_policy(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let cfg = lattice_sim::SimConfig {
        service_time_ms: args.service_time_ms,
        concurrency: args.concurrency,
        pod_start_s: args.pod_start_s,
        warmup_s: args.warmup_s,
        slo_ms: args.slo_ms,
        min_replicas: args.min_replicas,
        max_replicas: args.max_replicas,
        ..lattice_sim::SimConfig::default()
    };
    cfg.validate().map_err(|e| Failure::Usage(e.to_string()))?;
    std::fs::create_dir_all(&args.out).map_err(|e| Failure::Usage(format!("--out {}: {e}", args.out.display())))?;
    let mut reports = Vec::new();
    for policy in policies {
        eprintln!("simulating {policy} on {}", args.trace.display());
        let report = if std::io::stderr().is_terminal() {
            let mut bar = lattice_sim::ProgressBar::new(std::io::stderr(), 40);
            let mut draw = |done, total| bar.update(done, total);
            let r = lattice_sim::run(&trace, policy, &cfg, Some(&mut draw));
            bar.finish();
            r
        } else {
            lattice_sim::run(&trace, policy, &cfg, None)
        };
        println!("{}", report.summary);
        report
            .write_csv(&args.out.join(format!("{policy}.csv")))
            .and_then(|()| lattice_sim::plot::write_single(&report, &args.out.join(format!("{policy}.svg"))))
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("writing to {}: {e}", args.out.display())))?;
        reports.push(report);
    }
    if reports.len() > 1 {
        let title = format!("{}", args.trace.display());
        lattice_sim::plot::write_comparison(&title, &reports, &args.out.join("comparison.svg"))
            .and_then(|()| lattice_sim::report::write_summary_csv(&reports, &args.out.join("summary.csv")))
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("writing to {}: {e}", args.out.display())))?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
