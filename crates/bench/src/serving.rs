//! `lattice bench`: the serving benchmark. In one run it measures
//! - the raw engine in-process on both cores (no server: the physical limit),
//! - `lattice serve` over HTTP/JSON and gRPC,
//! - the Python peers a user would otherwise pick (Flask under gunicorn, FastAPI under
//!   uvicorn, 2 workers each; `bench/peers/`),
//!
//! with the same request, closed-loop at each concurrency, and reports throughput,
//! p50/p99 latency, resident memory and start-up time, with ratios against the raw
//! engine and the best peer. Everything runs on 127.0.0.1 and stops by itself.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::ValueEnum;
use lattice_inference::{
    backend::{
        onnx::{OnnxBackend, SessionOptions},
        Backend,
    },
    config::EngineConfig,
    DataType, ModelRepository, RepositoryOptions, Tensor,
};
use lattice_proto::inference::{
    self as pb, grpc_inference_service_client::GrpcInferenceServiceClient, model_infer_request::InferInputTensor,
};
use lattice_stats::quantile;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::BenchError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    LatticeHttp,
    LatticeGrpc,
    /// `lattice serve --telemetry off` over HTTP: what metrics and tracing cost.
    LatticeHttpNoTelemetry,
    /// `lattice serve` exporting every request's spans (sample ratio 1) to an OTLP
    /// receiver in the benchmark: what full tracing costs.
    LatticeHttpTraced,
    /// `lattice serve` with the gateway on: API-key authentication, tenant limits
    /// (buckets large enough not to refuse) and the audit log to files; compared
    /// with `lattice-http` (gateway off) in the same run.
    LatticeHttpGateway,
    /// `--baseline-bin` (another build of `lattice`, e.g. the previous release) over
    /// HTTP and gRPC: before / after in one run.
    BaselineHttp,
    BaselineGrpc,
    /// `lattice serve` with TLS on the REST port (gateway off), loaded by wrk over
    /// kept-alive HTTPS connections; compared with `lattice-http` in the same run.
    LatticeHttpTls,
    #[value(name = "gunicorn-2w")]
    #[serde(rename = "gunicorn-2w")]
    Gunicorn2w,
    #[value(name = "uvicorn-2w")]
    #[serde(rename = "uvicorn-2w")]
    Uvicorn2w,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::LatticeHttp => "lattice-http",
            Target::LatticeGrpc => "lattice-grpc",
            Target::LatticeHttpNoTelemetry => "lattice-http-no-telemetry",
            Target::LatticeHttpTraced => "lattice-http-traced",
            Target::LatticeHttpGateway => "lattice-http-gateway",
            Target::BaselineHttp => "baseline-http",
            Target::BaselineGrpc => "baseline-grpc",
            Target::LatticeHttpTls => "lattice-http-tls",
            Target::Gunicorn2w => "gunicorn-2w",
            Target::Uvicorn2w => "uvicorn-2w",
        }
    }
}

/// What to measure; `lattice bench` documents each as a flag.
#[derive(Debug, Clone)]
pub struct Options {
    /// Models to measure (directories of the model repository).
    pub models: Vec<String>,
    /// Closed-loop client concurrency levels.
    pub concurrency: Vec<usize>,
    /// Servers to load.
    pub targets: Vec<Target>,
    /// Measured seconds per point (after the warm-up).
    pub duration_secs: f64,
    /// Unrecorded seconds of load before each measured point.
    pub warmup_secs: f64,
    /// Model repository served by every target, and loaded here for the raw engine.
    pub model_repository: PathBuf,
    /// ONNX Runtime library for the raw-engine baseline and the server.
    pub ort_library: PathBuf,
    pub load_generator: LoadGenerator,
    /// Another `lattice` binary served as the `baseline-http` / `baseline-grpc`
    /// targets, on the same repository.
    pub baseline_bin: Option<PathBuf>,
    /// Where the JSON report is written.
    pub out_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadGenerator {
    Auto,
    Wrk,
    Builtin,
}

/// The same request in every encoding a target needs.
struct Workload {
    model: String,
    http_body: Bytes,
    grpc: pb::ModelInferRequest,
    /// What the engine itself receives (tokenized for text models).
    raw: Vec<(String, Tensor)>,
    raw_outputs: Vec<String>,
    engine: RawEngine,
    describe: String,
}

/// What the raw baseline builds its engine instances from: the model file of the
/// version the repository serves, and the model's engine options, so the baseline
/// runs the session the server runs, minus the server.
struct RawEngine {
    model_file: PathBuf,
    options: EngineConfig,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Point {
    target: String,
    concurrency: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Resident memory of the server (process tree) before the point, idle.
    rss_idle_mb: Option<f64>,
    /// Peak resident memory sampled while the point ran.
    rss_load_mb: Option<f64>,
    /// CPU time the server (process tree) spent per answered request in the
    /// measured window: what a server costs, steadier than throughput when the load
    /// generator and other tenants share the cores.
    cpu_us_per_req: Option<f64>,
}

pub async fn run(args: Options) -> Result<(), BenchError> {
    let ort = args.ort_library.clone();
    if args.duration_secs <= 0.0 || args.concurrency.contains(&0) {
        return Err(BenchError::Usage("duration and concurrency must be positive".into()));
    }
    // The raw engine's model, config and tokenizer come from the repository, as the
    // server loads them (this also loads the ONNX Runtime library).
    let repo = ModelRepository::open(
        &RepositoryOptions {
            root: args.model_repository.clone(),
            ort_library: ort.clone(),
        },
        Arc::new(lattice_observability::Metrics::disabled()),
    )
    .map_err(|e| BenchError::Usage(e.to_string()))?;
    let dur = Duration::from_secs_f64(args.duration_secs);
    let warm = Duration::from_secs_f64(args.warmup_secs);
    let mut report = Vec::new();

    let needs = |f: fn(&Target) -> bool| args.targets.iter().any(f);
    let mut lattice = if needs(|t| matches!(t, Target::LatticeHttp | Target::LatticeGrpc)) {
        Some(LatticeProcess::start(&args, &ort, &[]).context("starting lattice serve")?)
    } else {
        None
    };
    let mut baseline = if needs(|t| matches!(t, Target::BaselineHttp | Target::BaselineGrpc)) {
        let bin = args
            .baseline_bin
            .clone()
            .ok_or_else(|| BenchError::Usage("the baseline targets need --baseline-bin".into()))?;
        Some(LatticeProcess::start_bin(&bin, &args, &ort, &[], None).context("starting the baseline lattice serve")?)
    } else {
        None
    };
    let mut bare = if needs(|t| *t == Target::LatticeHttpNoTelemetry) {
        Some(LatticeProcess::start(&args, &ort, &["--telemetry", "off"]).context("starting lattice serve")?)
    } else {
        None
    };
    let mut traced = if needs(|t| *t == Target::LatticeHttpTraced) {
        let sink = otlp_sink().await.context("starting the OTLP receiver")?;
        let endpoint = format!("http://{sink}");
        Some(
            LatticeProcess::start(
                &args,
                &ort,
                &["--otlp-endpoint", &endpoint, "--trace-sample-ratio", "1"],
            )
            .context("starting lattice serve")?,
        )
    } else {
        None
    };
    // The gateway's files live as long as the run.
    let gateway_dir = tempfile::tempdir().context("a directory for the gateway's files")?;
    let mut gated = if needs(|t| *t == Target::LatticeHttpGateway) {
        let keys = gateway_dir.path().join("keys.toml");
        let policy = gateway_dir.path().join("policy.toml");
        let audit = gateway_dir.path().join("audit");
        let hash: String = {
            use sha2::Digest;
            sha2::Sha256::digest(BENCH_API_KEY.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        std::fs::write(
            &keys,
            format!(
                "[[key]]\nsha256 = \"{hash}\"\ntenant = \"{BENCH_TENANT}\"\nuser = \"bench\"\nscopes = [\"infer\"]\n"
            ),
        )
        .context("writing the bench API key")?;
        // Limits on, sized so the measured load is never refused: their cost, not their effect.
        std::fs::write(
            &policy,
            format!("[tenants.{BENCH_TENANT}]\nfast = {{ burst = 1000000, per_second = 1000000 }}\nsteady = {{ burst = 1000000, per_second = 1000000 }}\nmax_concurrent = 100000\n"),
        )
        .context("writing the bench policy")?;
        let (keys, policy, audit) = (
            keys.display().to_string(),
            policy.display().to_string(),
            audit.display().to_string(),
        );
        Some(
            LatticeProcess::start(
                &args,
                &ort,
                &[
                    "--auth",
                    "on",
                    "--api-keys",
                    &keys,
                    "--gateway-policy",
                    &policy,
                    "--rate-limits",
                    "on",
                    "--audit",
                    &audit,
                ],
            )
            .context("starting lattice serve")?,
        )
    } else {
        None
    };
    let mut tls = if needs(|t| *t == Target::LatticeHttpTls) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).context("a test certificate")?;
        let (cert_path, key_path) = (gateway_dir.path().join("tls.crt"), gateway_dir.path().join("tls.key"));
        std::fs::write(&cert_path, cert.cert.pem()).context("writing the certificate")?;
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).context("writing the key")?;
        let (cert_path, key_path) = (cert_path.display().to_string(), key_path.display().to_string());
        Some(
            LatticeProcess::start_with_ca(
                &args,
                &ort,
                &["--tls-cert", &cert_path, "--tls-key", &key_path, "--tls-ports", "http"],
                Some(cert.cert.der().clone()),
            )
            .context("starting lattice serve")?,
        )
    } else {
        None
    };
    for (name, l) in [("lattice serve", &lattice), ("baseline lattice serve", &baseline)] {
        if let Some(l) = l {
            println!(
                "{name}: listening after {:.0} ms, ready (models loaded and warm) after {:.0} ms, idle RSS {:.1} MB",
                l.listen_ms,
                l.ready_ms,
                l.rss_mb()
            );
        }
    }

    for model in &args.models {
        let w = workload(&repo, &args.model_repository, model)
            .await
            .with_context(|| format!("preparing a request for {model}"))?;
        println!("\n## {model}: {}", w.describe);
        let raw = raw_engine(&w, warm, dur).context("raw engine baseline")?;
        // The engine's own CPU per inference: the floor of what a server can spend.
        let engine_cpu = raw.cpu_us_per_req.unwrap_or(f64::NAN);
        println!(
            "raw engine, 2 threads x 1 intra-op thread: {:.0} inferences/s, p50 {:.3} ms, p99 {:.3} ms, CPU {:.1} µs/inference",
            raw.rps, raw.p50_ms, raw.p99_ms, engine_cpu
        );
        let mut points = Vec::new();
        for &target in &args.targets {
            let mut peer = None;
            let startup_ms;
            let pid;
            let client = match target {
                Target::LatticeHttpNoTelemetry
                | Target::LatticeHttpTraced
                | Target::LatticeHttpGateway
                | Target::LatticeHttpTls => {
                    let l = match target {
                        Target::LatticeHttpTraced => traced.as_ref(),
                        Target::LatticeHttpGateway => gated.as_ref(),
                        Target::LatticeHttpTls => tls.as_ref(),
                        _ => bare.as_ref(),
                    }
                    .expect("started above");
                    startup_ms = l.ready_ms;
                    pid = l.child.id();
                    if target == Target::LatticeHttpTls {
                        LoadClient::https(&l.http, &w)?
                    } else {
                        LoadClient::http(&l.http, &w, args.load_generator)
                    }
                }
                Target::LatticeHttp | Target::LatticeGrpc | Target::BaselineHttp | Target::BaselineGrpc => {
                    let l = match target {
                        Target::BaselineHttp | Target::BaselineGrpc => baseline.as_ref(),
                        _ => lattice.as_ref(),
                    }
                    .expect("started above");
                    startup_ms = l.ready_ms;
                    pid = l.child.id();
                    if matches!(target, Target::LatticeHttp | Target::BaselineHttp) {
                        LoadClient::http(&l.http, &w, args.load_generator)
                    } else {
                        LoadClient::grpc(&l.grpc, &w).await?
                    }
                }
                Target::Gunicorn2w | Target::Uvicorn2w => {
                    let p = PeerProcess::start(target, model).await?;
                    startup_ms = p.ready_ms;
                    pid = p.child.id();
                    let c = LoadClient::http(&p.addr, &w, args.load_generator);
                    peer = Some(p);
                    c
                }
            };
            println!(
                "{}: ready after {:.0} ms, RSS idle {:.1} MB",
                target.name(),
                startup_ms,
                tree_rss_mb(pid)
            );
            for &c in &args.concurrency {
                let idle = tree_rss_mb(pid);
                let sampler = RssSampler::start(pid);
                let mut p = client.run(c, warm, dur, pid).await;
                p.target = target.name().into();
                p.rss_idle_mb = Some(idle);
                p.rss_load_mb = Some(sampler.stop().await);
                let cpu = p.cpu_us_per_req.unwrap_or(f64::NAN);
                println!(
                    "  {:<13} c={:<3} {:>8.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}  RSS idle {:.1} MB, load {:.1} MB  CPU {:.1} µs/req = engine {:.1} + {:.1} ({:.2}x)  ({:.2}x raw)",
                    p.target,
                    c,
                    p.rps,
                    p.p50_ms,
                    p.p99_ms,
                    p.errors,
                    idle,
                    p.rss_load_mb.unwrap_or_default(),
                    cpu,
                    engine_cpu,
                    cpu - engine_cpu,
                    cpu / engine_cpu,
                    p.rps / raw.rps
                );
                points.push(p);
            }
            if let Some(p) = peer {
                p.stop();
            }
        }
        print_summary(&raw, &points, &args.concurrency);
        print_cost(&raw, &points);
        report.push(json!({"model": model, "request": w.describe, "raw_engine": raw, "points": points}));
    }
    for l in [
        lattice.take(),
        baseline.take(),
        bare.take(),
        traced.take(),
        gated.take(),
        tls.take(),
    ]
    .into_iter()
    .flatten()
    {
        l.stop()?;
    }
    std::fs::create_dir_all(&args.out_dir).context("creating the output directory")?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let path = args.out_dir.join(format!("serving-{stamp}.json"));
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&json!({"models": report})).context("encoding")?,
    )
    .context("writing the report")?;
    println!("\nreport: {}", path.display());
    Ok(())
}

fn is_peer(target: &str) -> bool {
    target == Target::Gunicorn2w.name() || target == Target::Uvicorn2w.name()
}

fn print_summary(raw: &Point, points: &[Point], levels: &[usize]) {
    println!("\n| c | target | req/s | p50 ms | p99 ms | x raw | x best peer | p99 / best peer p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    for &c in levels {
        let at: Vec<&Point> = points.iter().filter(|p| p.concurrency == c).collect();
        let best_peer = at
            .iter()
            .filter(|p| is_peer(&p.target))
            .max_by(|a, b| a.rps.total_cmp(&b.rps))
            .copied();
        for p in &at {
            let (xp, p99r) = match best_peer {
                Some(b) if !is_peer(&p.target) => {
                    (format!("{:.2}", p.rps / b.rps), format!("{:.2}", p.p99_ms / b.p99_ms))
                }
                _ => ("".into(), "".into()),
            };
            println!(
                "| {c} | {} | {:.0} | {:.3} | {:.3} | {:.2} | {xp} | {p99r} |",
                p.target,
                p.rps,
                p.p50_ms,
                p.p99_ms,
                p.rps / raw.rps
            );
        }
        // What metrics and tracing cost: the same server with them on and off. Listing
        // the pair several times interleaves rounds; the median of the per-round
        // ratios resists the noise of a shared machine.
        let rps = |t: Target| at.iter().filter(move |p| p.target == t.name()).map(|p| p.rps);
        let cpu = |t: Target| {
            at.iter()
                .filter(move |p| p.target == t.name())
                .map(|p| p.cpu_us_per_req.unwrap_or(f64::NAN))
        };
        let median = |mut v: Vec<f64>| {
            v.retain(|x| x.is_finite());
            (!v.is_empty()).then(|| (quantile(&mut v, 0.5), v.len()))
        };
        for (what, on) in [
            ("telemetry on / off", Target::LatticeHttp),
            ("every span exported / telemetry off", Target::LatticeHttpTraced),
        ] {
            let off = Target::LatticeHttpNoTelemetry;
            let throughput = median(rps(on).zip(rps(off)).map(|(on, off)| on / off).collect());
            // Cost, not speed: server CPU per request with telemetry off over on, so
            // that below 1 is overhead on both rows.
            let cost = median(cpu(on).zip(cpu(off)).map(|(on, off)| off / on).collect());
            if let Some((ratio, rounds)) = throughput {
                println!("|   | {what} (HTTP), throughput, median of {rounds} rounds | {ratio:.3} | | | | | |");
            }
            if let Some((ratio, rounds)) = cost {
                println!("|   | {what} (HTTP), server CPU per request off / on, median of {rounds} rounds | {ratio:.3} | | | | | |");
            }
        }
        // What the gateway costs: authentication, limits and audit on, over all off.
        let (on, off) = (Target::LatticeHttpGateway, Target::LatticeHttp);
        if let Some((ratio, rounds)) = median(rps(on).zip(rps(off)).map(|(on, off)| on / off).collect()) {
            println!("|   | gateway on / off (HTTP), throughput, median of {rounds} rounds | {ratio:.3} | | | | | |");
        }
        if let Some((ratio, rounds)) = median(cpu(on).zip(cpu(off)).map(|(on, off)| off / on).collect()) {
            println!("|   | gateway on / off (HTTP), server CPU per request off / on, median of {rounds} rounds | {ratio:.3} | | | | | |");
        }
        // What TLS costs on kept-alive connections (record encryption, not handshakes).
        let on = Target::LatticeHttpTls;
        if let Some((ratio, rounds)) = median(rps(on).zip(rps(off)).map(|(on, off)| on / off).collect()) {
            println!("|   | TLS on / off (HTTP), throughput, median of {rounds} rounds | {ratio:.3} | | | | | |");
        }
        if let Some((ratio, rounds)) = median(cpu(on).zip(cpu(off)).map(|(on, off)| off / on).collect()) {
            println!("|   | TLS on / off (HTTP), server CPU per request off / on, median of {rounds} rounds | {ratio:.3} | | | | | |");
        }
    }
}

// === Workloads ===

fn tensor_json(name: &str, t: &Tensor) -> Value {
    let data: Value = match t.dtype {
        DataType::F32 => json!(t.to_f32_vec().expect("fp32")),
        DataType::I32 | DataType::I64 => json!(t.to_i64_vec().expect("ints")),
        DataType::Bytes => match &t.data {
            lattice_inference::TensorData::Strings(s) => {
                json!(s
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect::<Vec<_>>())
            }
            _ => json!([]),
        },
        other => panic!("bench workloads do not use {other}"),
    };
    json!({"name": name, "shape": t.shape, "datatype": t.dtype.as_str(), "data": data})
}

/// The request for `model` in every encoding, with the model loaded through `repo`
/// (under `root`) for the raw engine.
async fn workload(repo: &ModelRepository, root: &Path, model: &str) -> anyhow::Result<Workload> {
    let (inputs, outputs, describe): (Vec<(String, Tensor)>, Vec<String>, String) = match model {
        "magika" => {
            // Magika's features of a real file: this very binary.
            let exe = std::fs::read(std::env::current_exe()?)?;
            let f = magika_features(&exe);
            let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
            (
                vec![("bytes".into(), Tensor::raw(DataType::I32, vec![1, 2048], bytes))],
                vec!["target_label".into()],
                "features of one file, INT32 [1,2048] -> FP32 [1,214]".into(),
            )
        }
        "minilm" => (
            vec![(
                "TEXT".into(),
                Tensor::strings(
                    vec![1],
                    vec![Bytes::from_static(
                        b"How do I reset my password if I no longer have access to my email account?",
                    )],
                ),
            )],
            vec!["embedding".into()],
            "one sentence as TEXT (19 tokens) -> embedding FP32 [1,384]".into(),
        ),
        "silero_vad" => {
            let audio: Vec<f32> = (0..576).map(|i| (i as f32 * 0.1728).sin() * 0.3).collect();
            (
                vec![
                    ("input".into(), Tensor::from_f32(vec![1, 576], &audio)),
                    ("state".into(), Tensor::from_f32(vec![2, 1, 128], &[0.0; 256])),
                    ("sr".into(), Tensor::from_i64(vec![], &[16000])),
                ],
                vec!["output".into(), "stateN".into()],
                "one 36 ms chunk at 16 kHz with state -> speech probability".into(),
            )
        }
        other => bail!("no benchmark request is defined for model '{other}'"),
    };
    let http_body = serde_json::to_vec(&json!({
        "inputs": inputs.iter().map(|(n, t)| tensor_json(n, t)).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(|o| json!({"name": o})).collect::<Vec<_>>(),
    }))?;
    let grpc = pb::ModelInferRequest {
        model_name: model.into(),
        inputs: inputs
            .iter()
            .map(|(n, t)| InferInputTensor {
                name: n.clone(),
                datatype: t.dtype.as_str().into(),
                shape: t.shape.clone(),
                ..Default::default()
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|o| pb::model_infer_request::InferRequestedOutputTensor {
                name: o.clone(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: inputs.iter().map(|(_, t)| t.to_wire_bytes().to_vec()).collect(),
        ..Default::default()
    };
    // The model as the server serves it: the repository picks the version, checks
    // the config against the model file and loads the tokenizer.
    repo.load(model).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let served = repo.version(model, "").map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = served.scheduler.runtime().clone();
    let cfg = &runtime.config;
    // The engine sees token tensors where the server receives text.
    let (raw, raw_outputs) = match &runtime.text {
        Some(pipeline) => {
            let texts = match &inputs[0].1.data {
                lattice_inference::TensorData::Strings(s) => s.clone(),
                _ => bail!("text workload without strings"),
            };
            let source = cfg.pooling.as_ref().map(|p| p.source.clone()).unwrap_or_default();
            (pipeline.encode(&texts).map_err(anyhow::Error::msg)?, vec![source])
        }
        None => (inputs.clone(), outputs.clone()),
    };
    let engine = RawEngine {
        model_file: root.join(model).join(served.version.to_string()).join("model.onnx"),
        options: cfg.engine.clone(),
    };
    // The raw engine builds its own instances; the repository's would sit idle
    // beside them, holding memory.
    drop(served);
    repo.unload(model).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Workload {
        model: model.into(),
        http_body: Bytes::from(http_body),
        grpc,
        raw,
        raw_outputs,
        engine,
        describe,
    })
}

/// Magika's input features: the first and last 1024 bytes (whitespace-stripped),
/// padded with 256.
fn magika_features(content: &[u8]) -> Vec<i32> {
    let head = &content[..content.len().min(4096)];
    let head = &head[head.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(head.len())..];
    let tail = &content[content.len().saturating_sub(4096)..];
    let tail = &tail[..tail.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |i| i + 1)];
    let mut out: Vec<i32> = head.iter().take(1024).map(|&b| i32::from(b)).collect();
    out.resize(1024, 256);
    let t = &tail[tail.len().saturating_sub(1024)..];
    out.extend(std::iter::repeat_n(256, 1024 - t.len()));
    out.extend(t.iter().map(|&b| i32::from(b)));
    out
}

// === Raw engine ===

fn summarize(target: &str, c: usize, mut lat: Vec<f64>, errors: u64, dur: Duration) -> Point {
    Point {
        target: target.into(),
        concurrency: c,
        rps: lat.len() as f64 / dur.as_secs_f64(),
        p50_ms: quantile(&mut lat, 0.5),
        p99_ms: quantile(&mut lat, 0.99),
        errors,
        rss_idle_mb: None,
        rss_load_mb: None,
        cpu_us_per_req: None,
    }
}

/// Two threads, each with its own session and one intra-op thread, running the
/// engine back to back: what two cores can do with no server at all.
///
/// The sessions are built through the backend API ([`Backend`]) from the version
/// and engine options the repository loaded, not taken from the repository's
/// scheduler: its queue and instance-thread hand-off are server cost, which this
/// baseline exists to leave out.
fn raw_engine(w: &Workload, warm: Duration, dur: Duration) -> anyhow::Result<Point> {
    let model =
        std::fs::read(&w.engine.model_file).with_context(|| format!("reading {}", w.engine.model_file.display()))?;
    let threads = 2;
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warm;
    let end = measure_from + dur;
    let options = SessionOptions::new(1, &w.engine.options);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let mut backend = OnnxBackend::new(&model, &options).map_err(anyhow::Error::msg)?;
            let (inputs, outputs) = (w.raw.clone(), w.raw_outputs.clone());
            Ok(std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < start {
                    std::hint::spin_loop();
                }
                // This thread's CPU over the measured runs (one intra-op thread: the
                // engine runs on the calling thread only).
                let mut cpu_from = None;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    if t0 >= measure_from && cpu_from.is_none() {
                        cpu_from = Some(thread_cpu_secs());
                    }
                    backend.run(inputs.clone(), &outputs).expect("raw engine run");
                    if t0 >= measure_from {
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
                let cpu = cpu_from.map_or(0.0, |from| thread_cpu_secs() - from);
                (lat, cpu)
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let (mut all, mut cpu) = (Vec::new(), 0.0);
    for h in handles {
        let (lat, secs) = h.join().map_err(|_| anyhow::anyhow!("raw engine thread panicked"))?;
        all.extend(lat);
        cpu += secs;
    }
    let n = all.len() as f64;
    let mut p = summarize("raw-engine", threads, all, 0, dur);
    p.cpu_us_per_req = per_request_us(cpu, n);
    Ok(p)
}

/// User + system CPU seconds of the calling thread, from /proc (10 ms ticks: read
/// over seconds of runs, the resolution is a fraction of a percent).
fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| stat_cpu_ticks(&s))
        .map_or(0.0, |t| t as f64 / TICKS_PER_SEC)
}

/// Samples a process tree's resident memory every 100 ms until stopped; the peak.
struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0.0f64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(
                    tokio::task::spawn_blocking(move || tree_rss_mb(pid))
                        .await
                        .unwrap_or(0.0),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        });
        RssSampler { stop, task }
    }

    async fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or(f64::NAN)
    }
}

/// Per point: the server's CPU per request against the engine's own CPU per
/// inference (the raw baseline), and its memory idle and under load.
fn print_cost(raw: &Point, points: &[Point]) {
    let engine = raw.cpu_us_per_req.unwrap_or(f64::NAN);
    println!("\n| c | target | server CPU µs/req | engine CPU µs/inference | server - engine µs | server / engine | RSS idle MB | RSS load MB |");
    println!("|---|---|---|---|---|---|---|---|");
    for p in points {
        let cpu = p.cpu_us_per_req.unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {cpu:.1} | {engine:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            p.concurrency,
            p.target,
            cpu - engine,
            cpu / engine,
            p.rss_idle_mb.unwrap_or(f64::NAN),
            p.rss_load_mb.unwrap_or(f64::NAN)
        );
    }
    // Before / after in the same run: this build against --baseline-bin.
    for (now, before) in [
        (Target::LatticeHttp, Target::BaselineHttp),
        (Target::LatticeGrpc, Target::BaselineGrpc),
    ] {
        for p in points.iter().filter(|p| p.target == now.name()) {
            let Some(b) = points
                .iter()
                .find(|b| b.target == before.name() && b.concurrency == p.concurrency)
            else {
                continue;
            };
            println!(
                "| {} | {} / {} | CPU per request {:.2}x | throughput {:.2}x | RSS idle {:.2}x | RSS load {:.2}x | | |",
                p.concurrency,
                now.name(),
                before.name(),
                p.cpu_us_per_req.unwrap_or(f64::NAN) / b.cpu_us_per_req.unwrap_or(f64::NAN),
                p.rps / b.rps,
                p.rss_idle_mb.unwrap_or(f64::NAN) / b.rss_idle_mb.unwrap_or(f64::NAN),
                p.rss_load_mb.unwrap_or(f64::NAN) / b.rss_load_mb.unwrap_or(f64::NAN),
            );
        }
    }
}

// === Load generation ===

/// The credential and tenant every HTTP load client sends: what the gateway-on
/// server checks, and headers a gateway-off server reads as the tenant.
const BENCH_API_KEY: &str = "lattice-bench-key";
const BENCH_TENANT: &str = "bench";

#[derive(Clone)]
enum LoadClient {
    Http {
        client: reqwest::Client,
        url: String,
        body: Bytes,
    },
    /// wrk (C, epoll, one thread): a lighter load generator than an async Rust
    /// client, so more of the two cores go to the server under test.
    Wrk {
        url: String,
        script: PathBuf,
        _dir: Arc<tempfile::TempDir>,
    },
    Grpc {
        channels: Vec<GrpcInferenceServiceClient<Channel>>,
        req: pb::ModelInferRequest,
    },
}

impl LoadClient {
    fn http(addr: &str, w: &Workload, gen: LoadGenerator) -> LoadClient {
        let url = format!("http://{addr}/v2/models/{}/infer", w.model);
        if gen != LoadGenerator::Builtin {
            if let Some(wrk) = wrk_client(&url, &w.http_body) {
                return wrk;
            }
        }
        LoadClient::Http {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .tcp_nodelay(true)
                .build()
                .expect("HTTP client"),
            url: format!("http://{addr}/v2/models/{}/infer", w.model),
            body: w.http_body.clone(),
        }
    }

    /// HTTPS, with wrk (which does not check the server's certificate); the
    /// built-in client speaks plain HTTP only.
    fn https(addr: &str, w: &Workload) -> anyhow::Result<LoadClient> {
        let url = format!("https://{addr}/v2/models/{}/infer", w.model);
        wrk_client(&url, &w.http_body).context("the TLS target needs wrk")
    }

    async fn grpc(addr: &str, w: &Workload) -> anyhow::Result<LoadClient> {
        // A few HTTP/2 connections, as a pool of gRPC clients would hold.
        let mut channels = Vec::new();
        for _ in 0..4 {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?;
            channels.push(GrpcInferenceServiceClient::new(ch));
        }
        Ok(LoadClient::Grpc {
            channels,
            req: w.grpc.clone(),
        })
    }

    async fn once(&self, worker: usize) -> bool {
        match self {
            LoadClient::Http { client, url, body } => match client
                .post(url)
                .header("content-type", "application/json")
                .header("x-api-key", BENCH_API_KEY)
                .header("x-tenant-id", BENCH_TENANT)
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            },
            LoadClient::Grpc { channels, req } => {
                let mut c = channels[worker % channels.len()].clone();
                c.model_infer(req.clone()).await.is_ok()
            }
            LoadClient::Wrk { .. } => unreachable!("wrk runs whole points"),
        }
    }

    /// Closed loop: `c` workers send back to back; only the measured window counts.
    async fn run(&self, c: usize, warm: Duration, dur: Duration, server: u32) -> Point {
        if let LoadClient::Wrk { url, script, .. } = self {
            let (url, script) = (url.clone(), script.clone());
            return tokio::task::spawn_blocking(move || run_wrk(&url, &script, c, warm, dur, server))
                .await
                .unwrap_or_else(|_| summarize("", c, Vec::new(), 1, dur));
        }
        let measure_from = Instant::now() + warm;
        let end = measure_from + dur;
        let cpu = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = tree_cpu_secs(server);
            tokio::time::sleep_until(end.into()).await;
            tree_cpu_secs(server) - before
        });
        let tasks: Vec<_> = (0..c)
            .map(|i| {
                let me = Arc::new(self.clone());
                tokio::spawn(async move {
                    let (mut lat, mut errors) = (Vec::new(), 0u64);
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let ok = me.once(i).await;
                        if t0 >= measure_from && Instant::now() <= end {
                            if ok {
                                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                            } else {
                                errors += 1;
                            }
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        let (mut all, mut errors) = (Vec::new(), 0);
        for t in tasks {
            if let Ok((l, e)) = t.await {
                all.extend(l);
                errors += e;
            }
        }
        // Failed requests cost the server too; wrk counts them the same way.
        let answered = all.len() as u64 + errors;
        let mut p = summarize("", c, all, errors, dur);
        p.cpu_us_per_req = cpu.await.ok().and_then(|secs| per_request_us(secs, answered as f64));
        p
    }
}

fn wrk_client(url: &str, body: &Bytes) -> Option<LoadClient> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let body_path = dir.path().join("body.json");
    std::fs::write(&body_path, body).ok()?;
    let script = dir.path().join("post.lua");
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"x-api-key\"] = \"{BENCH_API_KEY}\"\nwrk.headers[\"x-tenant-id\"] = \"{BENCH_TENANT}\"\nlocal f = io.open(\"{}\", \"rb\")\nwrk.body = f:read(\"*a\")\nf:close()\n",
        body_path.display()
    );
    std::fs::write(&script, lua).ok()?;
    Some(LoadClient::Wrk {
        url: url.to_string(),
        script,
        _dir: Arc::new(dir),
    })
}

/// Parses "1.23ms" / "850.00us" / "1.02s" into milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, mul) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * mul)
}

fn run_wrk(url: &str, script: &Path, c: usize, warm: Duration, dur: Duration, server: u32) -> Point {
    let wrk = |d: Duration| {
        Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{c}"),
                &format!("-d{}s", d.as_secs().max(1)),
                "--latency",
                "--timeout",
                "10s",
            ])
            .arg("-s")
            .arg(script)
            .arg(url)
            .output()
    };
    if !warm.is_zero() {
        let _ = wrk(warm);
    }
    let before = tree_cpu_secs(server);
    let out = match wrk(dur) {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => return summarize("", c, Vec::new(), 1, dur),
    };
    let cpu = tree_cpu_secs(server) - before;
    let field = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
    };
    let errors = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + field("Socket errors:").map_or(0, |_| 1);
    // "  123456 requests in 8.00s, 12.34MB read"
    let answered = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Point {
        target: String::new(),
        concurrency: c,
        rps,
        p50_ms: field("50%").and_then(|v| wrk_ms(&v)).unwrap_or(f64::NAN),
        p99_ms: field("99%").and_then(|v| wrk_ms(&v)).unwrap_or(f64::NAN),
        errors,
        rss_idle_mb: None,
        rss_load_mb: None,
        cpu_us_per_req: answered.and_then(|n| per_request_us(cpu, n)),
    }
}

// === Processes ===

fn per_request_us(cpu_secs: f64, requests: f64) -> Option<f64> {
    (requests > 0.0 && cpu_secs > 0.0).then(|| cpu_secs * 1e6 / requests)
}

/// The process and its descendants, by pid.
fn process_tree(pid: u32) -> Vec<u32> {
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let (mut tree, mut stack) = (Vec::new(), vec![pid]);
    while let Some(p) = stack.pop() {
        tree.push(p);
        stack.extend(procs.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
    }
    tree
}

/// USER_HZ: 100 on every Linux ABI this runs on (the kernel fixes it for /proc).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime from a /proc stat line.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // After the command: state ppid ... utime is the 12th, stime the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// User + system CPU seconds of a process and its descendants so far.
fn tree_cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = process_tree(pid)
        .into_iter()
        .filter_map(|p| stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?))
        .sum();
    ticks as f64 / TICKS_PER_SEC
}

/// Sums VmRSS over a process and its descendants.
fn tree_rss_mb(pid: u32) -> f64 {
    let kb: u64 = process_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum();
    kb as f64 / 1024.0
}

fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct LatticeProcess {
    child: Child,
    http: String,
    grpc: String,
    listen_ms: f64,
    ready_ms: f64,
}

impl LatticeProcess {
    fn start(args: &Options, ort: &Path, extra: &[&str]) -> anyhow::Result<LatticeProcess> {
        LatticeProcess::start_bin(&std::env::current_exe()?, args, ort, extra, None)
    }

    /// `ca`: the REST port speaks TLS with a certificate this CA signed.
    fn start_with_ca(
        args: &Options,
        ort: &Path,
        extra: &[&str],
        ca: Option<rustls::pki_types::CertificateDer<'static>>,
    ) -> anyhow::Result<LatticeProcess> {
        LatticeProcess::start_bin(&std::env::current_exe()?, args, ort, extra, ca)
    }

    fn start_bin(
        bin: &Path,
        args: &Options,
        ort: &Path,
        extra: &[&str],
        ca: Option<rustls::pki_types::CertificateDer<'static>>,
    ) -> anyhow::Result<LatticeProcess> {
        let t0 = Instant::now();
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .arg("--model-repository")
            .arg(&args.model_repository)
            .arg("--ort-library")
            .arg(ort)
            // rustls warns per connection about wrk's IP-address SNI.
            .args(["--log", "warn,rustls=error"])
            // The serving benchmark needs no agent plane, and two servers must not
            // contend for one embedded store file.
            .args(["--agents", "off"])
            // The gateway is off unless `extra` turns it on (the overhead runs do).
            .args(if extra.contains(&"--auth") {
                &[][..]
            } else {
                &["--auth", "off", "--rate-limits", "off", "--audit", "off"][..]
            })
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        // From here on the child is stopped however start-up ends.
        let mut started = LatticeProcess {
            child,
            http: String::new(),
            grpc: String::new(),
            listen_ms: 0.0,
            ready_ms: 0.0,
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let listen_ms = t0.elapsed().as_secs_f64() * 1e3;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
                .with_context(|| format!("no {k} in {line:?}"))
        };
        let (http, grpc) = (field("http=")?, field("grpc=")?);
        match ca {
            None => wait_ready(&http, Duration::from_secs(60))?,
            Some(ca) => wait_ready_tls(&http, ca, Duration::from_secs(60))?,
        }
        started.http = http;
        started.grpc = grpc;
        started.listen_ms = listen_ms;
        started.ready_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(started)
    }

    fn rss_mb(&self) -> f64 {
        tree_rss_mb(self.child.id())
    }

    fn stop(self) -> anyhow::Result<()> {
        // Drop terminates.
        Ok(())
    }
}

impl Drop for LatticeProcess {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// An OTLP/gRPC trace receiver on 127.0.0.1 that counts and drops what it gets.
async fn otlp_sink() -> anyhow::Result<std::net::SocketAddr> {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    struct Sink;
    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            _req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

/// As [`wait_ready`], over TLS to a server whose certificate `ca` signed.
fn wait_ready_tls(addr: &str, ca: rustls::pki_types::CertificateDer<'static>, within: Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
    let deadline = Instant::now() + within;
    loop {
        let attempt = || -> anyhow::Result<bool> {
            let sock = std::net::TcpStream::connect(addr)?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            let conn = rustls::ClientConnection::new(cfg.clone(), host.clone().try_into()?)?;
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let req = format!("GET /v2/health/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            tls.write_all(req.as_bytes())?;
            let mut buf = [0u8; 12];
            tls.read_exact(&mut buf)?;
            Ok(buf.starts_with(b"HTTP/1.1 200"))
        };
        if matches!(attempt(), Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} not ready over TLS within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_ready(addr: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let req = format!("GET /v2/health/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).is_ok() {
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{addr} not ready within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct PeerProcess {
    child: Child,
    addr: String,
    ready_ms: f64,
}

impl PeerProcess {
    async fn start(target: Target, model: &str) -> anyhow::Result<PeerProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let t0 = Instant::now();
        let child = Command::new("bench/peers/run_peer.sh")
            .args([target.name(), &port.to_string(), model])
            .env("ORT_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a Python peer (run scripts/setup.sh first)")?;
        let addr = format!("127.0.0.1:{port}");
        let a = addr.clone();
        tokio::task::spawn_blocking(move || wait_ready(&a, Duration::from_secs(60))).await??;
        Ok(PeerProcess {
            child,
            addr,
            ready_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn stop(mut self) {
        terminate(&mut self.child);
    }
}
