//! `lattice bench-agents`: the agent plane's hot path against a bare tonic
//! bidirectional echo, measured in the same run on 127.0.0.1.
//!
//! Lattice: requester sessions offer tasks, the orchestrator (embedded store,
//! fsync'd group commits) assigns them to worker sessions that answer at once, and
//! the results travel back: four sequenced, acknowledged, deduplicated and
//! persisted frames per task. Echo: the same frames sent and echoed, two per
//! round trip, with nothing else. Both keep the same window of frames in flight
//! per stream; "messages" are frames on the wire in either direction, acks and
//! heartbeats not counted. Then, at half the measured task rate (open loop),
//! the dispatch latency: offer sent by the requester to assignment received by
//! the worker.
//!
//! Peers for the task round trip, in the same run: a NATS JetStream work queue
//! ([`jetstream`], fsync before every ack as in Lattice's store) and Lattice itself
//! on a shared Redis (shared dispatch through Redis Streams consumer groups; that
//! Redis's own persistence settings decide its durability).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::Stream;
use lattice_agent::{
    client::{AgentClient, ClientConfig, Event, SendOptions},
    orchestrator::{Orchestrator, OrchestratorConfig},
    store::{Store, StoreUrl},
    tools::ToolGateway,
};
use lattice_proto::{
    agent::{
        agent_coordination_server::AgentCoordinationServer, agent_message, agent_response, AgentMessage, TaskOffer,
        TaskResult,
    },
    bench::{echo_client::EchoClient, echo_server},
};
use lattice_stats::quantile;
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::BenchError;

pub mod jetstream;

/// What to measure; `lattice bench-agents` documents each as a flag.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds measured per scenario (after a 1 s warm-up).
    pub duration_secs: u64,
    /// Stream counts to measure.
    pub streams: Vec<usize>,
    /// Frames (echo) or tasks (lattice) in flight per stream.
    pub window: usize,
    /// Worker sessions answering tasks.
    pub workers: usize,
    /// Where the JSON report goes.
    pub out: std::path::PathBuf,
    /// The nats-server (>= 2.10) of the JetStream peer; found in `.venv/bin` or
    /// on PATH when unset.
    pub nats_server: Option<std::path::PathBuf>,
    /// A Redis to run Lattice's shared dispatch on (under a fresh key prefix,
    /// cleared afterwards); `None` skips that scenario.
    pub redis: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Measured {
    streams: usize,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub async fn run(args: Options) -> Result<(), BenchError> {
    if args.streams.is_empty() || args.window == 0 || args.workers == 0 {
        return Err(BenchError::Usage(
            "--streams, --window and --workers must be non-empty / at least 1".into(),
        ));
    }
    let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
    let store = Store::open(&StoreUrl::Redb(dir.path().join("agents.redb")), "bench").await?;
    let stop = CancellationToken::new();
    let plane = start_plane(store, &args, true, &stop).await?;
    let lattice_addr = plane.addr;
    let echo_addr = serve(echo_server::EchoServer::new(EchoService), &stop).await?;
    let duration = Duration::from_secs(args.duration_secs.max(1));
    let nats = match jetstream::find_server(args.nats_server.as_deref()) {
        Ok(binary) => match jetstream::NatsServer::start(&binary).await {
            Ok(server) => {
                println!("jetstream peer: {} (sync_interval: always)", binary.display());
                Some(server)
            }
            Err(e) => {
                println!("jetstream peer skipped: {e}");
                None
            }
        },
        Err(e) => {
            println!("jetstream peer skipped: {e}");
            None
        }
    };
    let redis = match &args.redis {
        Some(url) => {
            let prefix = format!("lattice-bench-{}", lattice_agent::wire::new_id());
            match Store::open(&StoreUrl::Redis(url.clone()), &prefix).await {
                Ok(store) => {
                    let plane = start_plane(store, &args, false, &stop).await?;
                    println!("lattice-redis: shared dispatch on {url} (durability is that Redis's own setting)");
                    Some((plane, prefix, url.clone()))
                }
                Err(e) => {
                    println!("lattice-redis skipped: {url}: {e}");
                    None
                }
            }
        }
        None => None,
    };

    let mut rows = Vec::new();
    for &streams in &args.streams {
        let echo = echo_load(echo_addr, streams, args.window, duration).await?;
        let lattice = lattice_load(lattice_addr, streams, args.window, duration).await?;
        let lattice_tasks = lattice.msgs_per_s / 4.0;
        println!(
            "{streams:>4} streams  echo {:>9.0} msgs/s p99 {:>6.2} ms   lattice {:>9.0} msgs/s ({:>7.0} tasks/s) p99 {:>6.2} ms   ratio {:.2}",
            echo.msgs_per_s,
            echo.p99_ms,
            lattice.msgs_per_s,
            lattice_tasks,
            lattice.p99_ms,
            lattice.msgs_per_s / echo.msgs_per_s
        );
        let mut row = json!({"streams": streams, "echo": echo, "lattice": lattice,
                             "ratio": lattice.msgs_per_s / echo.msgs_per_s});
        let js = match &nats {
            Some(server) => Some(
                jetstream::load(
                    &server.url,
                    jetstream::Load {
                        requesters: streams,
                        window: args.window,
                        workers: args.workers,
                        worker_in_flight: WORKER_IN_FLIGHT,
                        duration,
                    },
                )
                .await?,
            ),
            None => None,
        };
        if let Some(js) = &js {
            println!(
                "{streams:>4} streams  jetstream work queue {:>7.0} tasks/s p50 {:>6.2} ms p99 {:>6.2} ms (warm-up {:.1} s)   lattice/jetstream {}",
                js.tasks_per_s,
                js.p50_ms,
                js.p99_ms,
                js.warm_up_s,
                ratio(lattice_tasks, js.tasks_per_s)
            );
            row["jetstream"] = json!(js);
            row["lattice_over_jetstream"] = json!(lattice_tasks / js.tasks_per_s);
        }
        if let Some((plane, _, _)) = &redis {
            let shared = lattice_load(plane.addr, streams, args.window, duration).await?;
            let shared_tasks = shared.msgs_per_s / 4.0;
            print!(
                "{streams:>4} streams  lattice-redis (shared dispatch) {:>7.0} tasks/s p50 {:>6.2} ms p99 {:>6.2} ms",
                shared_tasks, shared.p50_ms, shared.p99_ms
            );
            if let Some(js) = &js {
                print!("   lattice-redis/jetstream {}", ratio(shared_tasks, js.tasks_per_s));
                row["lattice_redis_over_jetstream"] = json!(shared_tasks / js.tasks_per_s);
            }
            println!();
            row["lattice_redis"] = json!(shared);
        }
        rows.push(row);
    }
    // Dispatch latency at half the best task rate, open loop.
    let best_tasks = rows
        .iter()
        .filter_map(|r| r["lattice"]["msgs_per_s"].as_f64())
        .fold(0.0, f64::max)
        / 4.0;
    let rate = (best_tasks / 2.0).max(1.0);
    let (p50, p99, n) = dispatch_latency(lattice_addr, rate, duration, &plane.assigned_at).await?;
    println!("dispatch at {rate:.0} tasks/s (50% of {best_tasks:.0}): p50 {p50:.3} ms, p99 {p99:.3} ms over {n} tasks");
    let report = json!({"kind": "agents", "rows": rows,
        "dispatch": {"rate_tasks_per_s": rate, "p50_ms": p50, "p99_ms": p99, "tasks": n}});
    std::fs::create_dir_all(&args.out).map_err(anyhow::Error::from)?;
    let path = args
        .out
        .join(format!("agents-{}.json", lattice_agent::wire::now_us() / 1_000_000));
    std::fs::write(&path, serde_json::to_vec_pretty(&report).map_err(anyhow::Error::from)?)
        .map_err(anyhow::Error::from)?;
    println!("report: {}", path.display());
    stop.cancel();
    if let Some((_, prefix, url)) = &redis {
        // Tasks still in flight when the clients left keep writing results for a
        // moment after the servers stop; clear once those have landed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        lattice_agent::store::RedisBackend::connect(url, prefix)
            .await?
            .clear()
            .await?;
    }
    Ok(())
}

/// `a / b` for the table; "n/a" when the peer completed nothing in the interval
/// (its JSON ratio is then null).
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "n/a (no task completed)".into()
    }
}

/// Credits of each bench worker session (and offers each JetStream worker holds).
const WORKER_IN_FLIGHT: usize = 1024;

/// An orchestrator serving on 127.0.0.1 with `args.workers` bench workers attached.
struct Plane {
    addr: SocketAddr,
    /// When each `dispatch-*` task reached a worker.
    assigned_at: Arc<Mutex<HashMap<String, Instant>>>,
}

async fn start_plane(
    store: Store,
    args: &Options,
    adopt_all_on_start: bool,
    stop: &CancellationToken,
) -> Result<Plane, BenchError> {
    let metrics = Arc::new(lattice_observability::Metrics::new());
    let tools = ToolGateway::new(store.clone(), None, metrics.clone())?;
    let orch = Orchestrator::new(
        OrchestratorConfig {
            requester_window: u32::try_from(args.window).unwrap_or(u32::MAX),
            adopt_all_on_start,
            ..OrchestratorConfig::default()
        },
        store,
        tools,
        metrics,
    )
    .await?;
    let addr = serve(AgentCoordinationServer::new(orch), stop).await?;
    // Workers answer every assignment at once and record when it arrived.
    let assigned_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    for i in 0..args.workers {
        let (client, events) = AgentClient::connect(ClientConfig {
            endpoints: vec![format!("http://{addr}")],
            agent_id: format!("bench-worker-{i}"),
            capabilities: vec!["bench".into()],
            max_in_flight: WORKER_IN_FLIGHT as u32,
            ..ClientConfig::default()
        });
        client.established().await.map_err(anyhow::Error::from)?;
        tokio::spawn(worker(client, events, assigned_at.clone()));
    }
    Ok(Plane { addr, assigned_at })
}

async fn serve<S>(svc: S, stop: &CancellationToken) -> anyhow::Result<SocketAddr>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
    );
    Ok(addr)
}

#[derive(Clone)]
struct EchoService;

type EchoStream = Pin<Box<dyn Stream<Item = Result<AgentMessage, Status>> + Send>>;

#[tonic::async_trait]
impl echo_server::Echo for EchoService {
    type EchoStream = EchoStream;

    async fn echo(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<EchoStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn frame(i: u64) -> AgentMessage {
    AgentMessage {
        agent_id: "bench".into(),
        env: Some(lattice_agent::wire::envelope(&format!("t{i}"))),
        body: Some(agent_message::Body::Offer(TaskOffer {
            task_id: format!("t{i}"),
            capability: "bench".into(),
            payload: br#"{"tool":"echo","arguments":{"value":1}}"#.to_vec(),
            max_attempts: 0,
        })),
        ..AgentMessage::default()
    }
}

/// A task for the bench workers (they answer without running anything).
fn bench_offer(id: String) -> (agent_message::Body, SendOptions) {
    let offer = TaskOffer {
        task_id: id.clone(),
        capability: "bench".into(),
        payload: b"{}".to_vec(),
        max_attempts: 0,
    };
    let opts = SendOptions {
        priority: 2,
        correlation_id: id,
        ..SendOptions::default()
    };
    (agent_message::Body::Offer(offer), opts)
}

fn summarize(streams: usize, frames_per_op: f64, ops: u64, mut lat: Vec<f64>, elapsed: Duration) -> Measured {
    Measured {
        streams,
        msgs_per_s: ops as f64 * frames_per_op / elapsed.as_secs_f64(),
        p50_ms: quantile(&mut lat, 0.5),
        p99_ms: quantile(&mut lat, 0.99),
    }
}

/// Closed loop: each stream keeps `window` frames in flight and records each
/// frame's round trip once the warm-up second has passed.
async fn echo_load(addr: SocketAddr, streams: usize, window: usize, duration: Duration) -> anyhow::Result<Measured> {
    let done = Arc::new(AtomicU64::new(0));
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let end = measure_from + duration;
    let mut handles = Vec::new();
    for s in 0..streams {
        let (done, lat) = (done.clone(), lat.clone());
        handles.push(tokio::spawn(async move {
            let mut client = EchoClient::connect(format!("http://{addr}")).await?;
            let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(window + 1);
            let mut replies = client.echo(ReceiverStream::new(rx)).await?.into_inner();
            let mut sent: HashMap<String, Instant> = HashMap::new();
            let mut i = (s as u64) << 32;
            for _ in 0..window {
                let f = frame(i);
                sent.insert(format!("t{i}"), Instant::now());
                tx.send(f).await?;
                i += 1;
            }
            while let Some(m) = replies.message().await? {
                let now = Instant::now();
                let id = m.env.map(|e| e.correlation_id).unwrap_or_default();
                if let Some(t) = sent.remove(&id) {
                    if now >= measure_from && now < end {
                        done.fetch_add(1, Ordering::Relaxed);
                        lat.lock().push(now.duration_since(t).as_secs_f64() * 1e3);
                    }
                }
                if now >= end {
                    break;
                }
                let f = frame(i);
                sent.insert(format!("t{i}"), Instant::now());
                tx.send(f).await?;
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let lat = std::mem::take(&mut *lat.lock());
    Ok(summarize(streams, 2.0, done.load(Ordering::Relaxed), lat, duration))
}

async fn lattice_load(addr: SocketAddr, streams: usize, window: usize, duration: Duration) -> anyhow::Result<Measured> {
    let done = Arc::new(AtomicU64::new(0));
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let end = measure_from + duration;
    let mut handles = Vec::new();
    let run_id = lattice_agent::wire::new_id();
    for s in 0..streams {
        let (done, lat) = (done.clone(), lat.clone());
        let run_id = run_id.clone();
        handles.push(tokio::spawn(async move {
            let (client, mut events) = AgentClient::connect(ClientConfig {
                endpoints: vec![format!("http://{addr}")],
                agent_id: format!("bench-requester-{s}"),
                ..ClientConfig::default()
            });
            client.established().await?;
            let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
            // Offers wait on the client's window credits, given back per result.
            let offerer = {
                let (client, sent, run_id) = (client.clone(), sent.clone(), run_id.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while Instant::now() < end {
                        let id = format!("{run_id}-{s}-{i}");
                        i += 1;
                        sent.lock().insert(id.clone(), Instant::now());
                        let (offer, opts) = bench_offer(id);
                        if client.send(offer, opts).await.is_err() {
                            return;
                        }
                    }
                })
            };
            let _ = window;
            while let Some(ev) = events.recv().await {
                let now = Instant::now();
                if let Event::Frame(f) = ev {
                    if let Some(agent_response::Body::Result(r)) = f.body {
                        if let Some(t) = sent.lock().remove(&r.task_id) {
                            if now >= measure_from && now < end {
                                done.fetch_add(1, Ordering::Relaxed);
                                lat.lock().push(now.duration_since(t).as_secs_f64() * 1e3);
                            }
                        }
                    }
                }
                if now >= end {
                    break;
                }
            }
            offerer.abort();
            client.abort();
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let lat = std::mem::take(&mut *lat.lock());
    Ok(summarize(streams, 4.0, done.load(Ordering::Relaxed), lat, duration))
}

async fn worker(
    client: AgentClient,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    assigned_at: Arc<Mutex<HashMap<String, Instant>>>,
) {
    while let Some(ev) = events.recv().await {
        let Event::Frame(f) = ev else { continue };
        if let Some(agent_response::Body::Assign(a)) = f.body {
            if a.task_id.starts_with("dispatch-") {
                assigned_at.lock().insert(a.task_id.clone(), Instant::now());
            }
            let result = TaskResult {
                task_id: a.task_id,
                output: b"{}".to_vec(),
                status: Some(lattice_agent::wire::ok_status()),
                attempts: a.attempt,
                worker_id: String::new(),
                route: a.route,
            };
            let c = client.clone();
            if c.send(agent_message::Body::Result(result), SendOptions::default())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Open loop at `rate` tasks/s from one requester; latency from offer to assignment.
async fn dispatch_latency(
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    assigned_at: &Arc<Mutex<HashMap<String, Instant>>>,
) -> anyhow::Result<(f64, f64, usize)> {
    let (client, mut events) = AgentClient::connect(ClientConfig {
        endpoints: vec![format!("http://{addr}")],
        agent_id: "bench-dispatch".into(),
        ..ClientConfig::default()
    });
    client.established().await?;
    // Results are only drained, so credits come back.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let mut sent = HashMap::new();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let at = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(at).await;
        let id = format!("dispatch-{n}");
        n += 1;
        sent.insert(id.clone(), Instant::now());
        let (offer, opts) = bench_offer(id);
        client.send(offer, opts).await?;
    }
    client.flush(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let assigned = std::mem::take(&mut *assigned_at.lock());
    let mut lat: Vec<f64> = sent
        .iter()
        .filter_map(|(id, t)| assigned.get(id).map(|a| a.duration_since(*t).as_secs_f64() * 1e3))
        .collect();
    client.abort();
    Ok((quantile(&mut lat, 0.5), quantile(&mut lat, 0.99), lat.len()))
}
