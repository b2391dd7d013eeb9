//! The agent plane as it is deployed: `lattice serve` (orchestrator, tool gateway,
//! memory broker) and `lattice agent` worker processes, talking through a TCP
//! proxy the test controls. The orchestrator is killed with SIGKILL mid-run, or
//! the proxy cuts connections at random; every task must complete exactly once,
//! which the `counter` tool's durable per-task counters prove.

mod support;

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use lattice_agent::{
    client::{ClientConfig, LinkState},
    records::{coll, SessionMeta},
    store::{RedbBackend, RedisBackend, StoreBackend},
    tools::COUNTER_COLL,
    worker::Requester,
};
use parking_lot::Mutex;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

struct Orchestrator {
    child: Child,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

/// Kills what is still running when a test fails half-way.
impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Agents(Vec<Child>);

impl Agents {
    fn spawn(n: usize, orchestrators: &str) -> Agents {
        Agents((0..n).map(|_| spawn_agent(orchestrators)).collect())
    }

    fn stop(&mut self) {
        for a in &mut self.0 {
            signal(a, "-TERM");
            assert!(a.wait().unwrap().success());
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.0 {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

/// `lattice serve` with no models: the agent plane alone.
fn spawn_orchestrator(store: &str, empty_repo: &Path, extra: &[&str]) -> Orchestrator {
    // Local test server: no credentials, no tenant limits, no audit files.
    let mut child = support::serve()
        .args(["--auth", "off", "--rate-limits", "off", "--audit", "off"])
        .args(["--model-repository"])
        .arg(empty_repo)
        .args([
            "--memory-store",
            store,
            "--heartbeat-ms",
            "500",
            "--reassign-after-ms",
            "3000",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |key: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("bound addresses on the first line, got {line:?}"))
            .parse()
            .unwrap()
    };
    Orchestrator {
        grpc: addr("grpc="),
        metrics: addr("metrics="),
        child,
    }
}

fn spawn_agent(orchestrators: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lattice"))
        .current_dir(support::root())
        .env_remove("RUST_LOG")
        .args([
            "agent",
            "--orchestrator",
            orchestrators,
            "--capability",
            "tools",
            "--max-in-flight",
            "32",
        ])
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Forwards connections to the current upstream; can cut every live one at once,
/// or each one after a random lifetime.
#[derive(Clone)]
struct Proxy {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    live: Arc<Mutex<Vec<JoinHandle<()>>>>,
    chaos: Arc<Mutex<Option<(u64, u64)>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream: Arc::new(Mutex::new(upstream)),
            live: Arc::default(),
            chaos: Arc::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let upstream = *p.upstream.lock();
                let lifetime = p
                    .chaos
                    .lock()
                    .map(|(lo, hi)| Duration::from_millis(fastrand::u64(lo..hi)));
                let conn = tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = down.set_nodelay(true);
                    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
                    match lifetime {
                        Some(l) => {
                            let _ = tokio::time::timeout(l, copy).await;
                        }
                        None => {
                            let _ = copy.await;
                        }
                    }
                });
                let mut live = p.live.lock();
                live.retain(|h| !h.is_finished());
                live.push(conn);
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn point_to(&self, upstream: SocketAddr) {
        *self.upstream.lock() = upstream;
    }

    fn cut_all(&self) {
        for h in self.live.lock().drain(..) {
            h.abort();
        }
    }
}

struct Started {
    a: Orchestrator,
    b: Orchestrator,
    agents: Agents,
    req: Requester,
    offering: JoinHandle<()>,
}

/// One Redis key prefix that replicas share (and that a test clears at its end).
struct SharedRedis {
    prefix: String,
    empty_repo: tempfile::TempDir,
}

impl SharedRedis {
    fn new() -> SharedRedis {
        SharedRedis {
            prefix: format!("lattice-test-{}-{}", std::process::id(), fastrand::u64(..)),
            empty_repo: tempfile::tempdir().unwrap(),
        }
    }

    /// A `lattice serve` replica on this store.
    fn replica(&self) -> Orchestrator {
        let flags = ["--store-prefix", self.prefix.as_str()];
        spawn_orchestrator("redis://127.0.0.1:6379", self.empty_repo.path(), &flags)
    }

    /// Two replicas; three workers and a requester with both in their lists, so
    /// all start on A; the requester offering `n` counter tasks.
    async fn everyone_on_a(&self, n: usize) -> Started {
        let (a, b) = (self.replica(), self.replica());
        let agents = Agents::spawn(3, &format!("http://{},http://{}", a.grpc, b.grpc));
        let req = requester(vec![format!("http://{}", a.grpc), format!("http://{}", b.grpc)]);
        req.client.established().await.unwrap();
        let offering = offer_all(&req, n);
        Started {
            a,
            b,
            agents,
            req,
            offering,
        }
    }

    async fn backend(&self) -> RedisBackend {
        RedisBackend::connect("redis://127.0.0.1:6379", &self.prefix)
            .await
            .unwrap()
    }
}

fn requester(endpoints: Vec<String>) -> Requester {
    Requester::connect(ClientConfig {
        endpoints,
        agent_id: "requester".into(),
        outbox_capacity: 2048,
        ..ClientConfig::default()
    })
}

/// Offers `n` counter tasks named k0..k{n-1} from a background task.
fn offer_all(req: &Requester, n: usize) -> JoinHandle<()> {
    offer_ids(req, (0..n).collect())
}

/// Offers the counter tasks k{i} for these `i` from a background task.
fn offer_ids(req: &Requester, ids: Vec<usize>) -> JoinHandle<()> {
    let client = req.client.clone();
    tokio::spawn(async move {
        let r = Requester {
            client,
            events: tokio::sync::mpsc::channel(1).1,
        };
        for i in ids {
            let prio = (i % 6) as i32;
            r.offer_tool(
                &format!("k{i}"),
                "tools",
                "counter",
                serde_json::json!({"name": format!("k{i}")}),
                prio,
                None,
            )
            .await
            .unwrap();
        }
    })
}

/// Waits for the next result; it must be a success for a task not seen before.
async fn next_unique_ok(req: &mut Requester, done: &mut HashSet<String>) {
    let r = tokio::time::timeout(Duration::from_secs(20), req.next_result())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "stalled at {} results; link {:?}, unacked {}",
                done.len(),
                req.client.state().borrow().clone(),
                req.client.unacked()
            )
        })
        .unwrap();
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
    assert!(done.insert(r.task_id.clone()), "{} completed twice", r.task_id);
}

async fn check_counters(backend: &dyn StoreBackend, n: usize) {
    let counters = backend.scan(COUNTER_COLL).await.unwrap();
    let mut seen = 0;
    for (name, v) in counters {
        if !name.starts_with('k') {
            continue;
        }
        let v: i64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
        assert_eq!(v, 1, "side effect of {name} ran {v} times");
        seen += 1;
    }
    assert_eq!(seen, n, "every task's side effect ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_survive_two_orchestrator_kills() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let store = dir.path().join("agents.redb");
    let store_arg = store.to_str().unwrap().to_string();
    let mut orch = spawn_orchestrator(&store_arg, empty.path(), &[]);
    let proxy = Proxy::start(orch.grpc).await;
    let mut agents = Agents::spawn(3, &proxy.url());
    let mut req = requester(vec![proxy.url()]);
    req.client.established().await.unwrap();
    let offering = offer_all(&req, N);

    let mut done = HashSet::new();
    let mut recoveries = Vec::new();
    let kills = [N * 3 / 10, N * 65 / 100];
    let started = Instant::now();
    while done.len() < N {
        if recoveries.len() < kills.len() && done.len() >= kills[recoveries.len()] {
            signal(&orch.child, "-KILL");
            let _ = orch.child.wait();
            proxy.cut_all();
            let killed = Instant::now();
            let old = req.client.state().borrow().clone();
            orch = spawn_orchestrator(&store_arg, empty.path(), &[]);
            proxy.point_to(orch.grpc);
            // Recovery: from the kill until the requester has resumed on the new
            // process and receives a result it did not hold before the kill.
            let mut state = req.client.state();
            tokio::time::timeout(
                Duration::from_secs(30),
                state.wait_for(|s| matches!(s, LinkState::Established { .. }) && *s != old),
            )
            .await
            .unwrap()
            .unwrap();
            let resumed = killed.elapsed();
            // Results buffered before the kill come first.
            while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(1), req.next_result()).await {
                assert!(done.insert(r.task_id.clone()), "{} completed twice", r.task_id);
            }
            let r = tokio::time::timeout(Duration::from_secs(30), req.next_result())
                .await
                .unwrap()
                .unwrap();
            recoveries.push((resumed, killed.elapsed()));
            assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
            assert!(done.insert(r.task_id.clone()), "{} completed twice", r.task_id);
            continue;
        }
        next_unique_ok(&mut req, &mut done).await;
    }
    offering.await.unwrap();
    let elapsed = started.elapsed();
    // No late duplicates either.
    assert!(tokio::time::timeout(Duration::from_millis(500), req.next_result())
        .await
        .is_err());
    eprintln!(
        "agents: {N} tasks, 2 SIGKILLs, {:.1} s, {:.0} tasks/s; recovery after each kill (resumed, first new result): {:?}",
        elapsed.as_secs_f64(),
        N as f64 / elapsed.as_secs_f64(),
        recoveries
    );
    assert_eq!(recoveries.len(), 2);
    req.client.close(false).await;
    agents.stop();
    signal(&orch.child, "-TERM");
    assert!(orch.child.wait().unwrap().success());
    let backend = RedbBackend::open(&store).unwrap();
    check_counters(&backend, N).await;
}

async fn redis_pair(stop_a_with: &str) {
    const N: usize = 3_000;
    let store = SharedRedis::new();
    let Started {
        mut a,
        mut b,
        mut agents,
        mut req,
        offering,
    } = store.everyone_on_a(N).await;
    let mut done = HashSet::new();
    let mut killed_at = None;
    let mut last_result: Option<Instant> = None;
    let mut longest_gap = Duration::ZERO;
    while done.len() < N {
        if done.len() == N / 3 && killed_at.is_none() {
            // Everyone started on `a` (first in their lists): stop it.
            signal(&a.child, stop_a_with);
            let status = a.child.wait().unwrap();
            if stop_a_with == "-TERM" {
                assert!(status.success(), "a graceful stop exits 0: {status}");
            }
            killed_at = Some(Instant::now());
            last_result = None;
        }
        next_unique_ok(&mut req, &mut done).await;
        if let Some(k) = killed_at {
            if let Some(prev) = last_result.replace(Instant::now()) {
                if prev >= k {
                    longest_gap = longest_gap.max(prev.elapsed());
                }
            }
        }
    }
    offering.await.unwrap();
    eprintln!("agents/redis {stop_a_with}: {N} tasks; longest pause between results after the stop: {longest_gap:?}");
    if stop_a_with == "-TERM" {
        assert!(req.client.drains() >= 1, "SIGTERM sends Drain to agent streams");
    }
    let session = req.client.session_id();
    assert!(session.is_some());
    assert!(req.client.reconnects() >= 1, "the requester moved to the other replica");
    req.client.close(false).await;
    agents.stop();
    signal(&b.child, "-TERM");
    assert!(b.child.wait().unwrap().success());
    let backend = store.backend().await;
    check_counters(&backend, N).await;
    // Leave nothing behind in the shared Redis.
    backend.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_sharing_redis_take_over_after_sigkill() {
    redis_pair("-KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_agent_streams_to_the_other_replica() {
    redis_pair("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_at_random_lose_and_duplicate_nothing() {
    const N: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let store = dir.path().join("agents.redb");
    let mut orch = spawn_orchestrator(store.to_str().unwrap(), empty.path(), &[]);
    let proxy = Proxy::start(orch.grpc).await;
    // Every connection through the proxy dies 100-600 ms after it opens.
    *proxy.chaos.lock() = Some((100, 600));
    let mut agents = Agents::spawn(3, &proxy.url());
    let mut req = requester(vec![proxy.url()]);
    req.client.established().await.unwrap();
    let offering = offer_all(&req, N);
    let mut done = HashSet::new();
    while done.len() < N {
        next_unique_ok(&mut req, &mut done).await;
    }
    offering.await.unwrap();
    let cuts = req.client.reconnects();
    eprintln!("agents/chaos: {N} tasks through {cuts} requester reconnects");
    assert!(cuts >= 3, "the proxy cut the requester's stream ({cuts} reconnects)");
    *proxy.chaos.lock() = None;
    req.client.close(false).await;
    agents.stop();
    signal(&orch.child, "-TERM");
    assert!(orch.child.wait().unwrap().success());
    check_counters(&RedbBackend::open(&store).unwrap(), N).await;
}

/// Which replica a split run kills (and restarts) a third of the way through.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    None,
    Requesters,
    Workers,
}

/// A requester attached only to replica A and workers attached only to replica B:
/// every task crosses the shared queue (taken by B, its result delivered back to
/// A through the requester's result stream). With a `kill -9` of either replica
/// mid-run (restarted behind the same proxy), nothing is lost and no side effect
/// runs twice.
async fn split_replicas(kill: Kill) {
    const N: usize = 1_500;
    let store = SharedRedis::new();
    let (mut a, mut b) = (store.replica(), store.replica());
    let to_a = Proxy::start(a.grpc).await;
    let to_b = Proxy::start(b.grpc).await;
    let mut agents = Agents::spawn(3, &to_b.url());
    let mut req = requester(vec![to_a.url()]);
    req.client.established().await.unwrap();
    let offering = offer_all(&req, N);
    let mut done = HashSet::new();
    let mut killed = false;
    while done.len() < N {
        if kill != Kill::None && !killed && done.len() >= N / 3 {
            killed = true;
            let (victim, proxy) = match kill {
                Kill::Requesters => (&mut a, &to_a),
                _ => (&mut b, &to_b),
            };
            signal(&victim.child, "-KILL");
            let _ = victim.child.wait();
            proxy.cut_all();
            *victim = store.replica();
            proxy.point_to(victim.grpc);
        }
        next_unique_ok(&mut req, &mut done).await;
    }
    offering.await.unwrap();
    // No late duplicates either.
    assert!(tokio::time::timeout(Duration::from_millis(500), req.next_result())
        .await
        .is_err());
    req.client.close(false).await;
    agents.stop();
    for o in [&mut a, &mut b] {
        signal(&o.child, "-TERM");
        assert!(o.child.wait().unwrap().success());
    }
    let backend = store.backend().await;
    check_counters(&backend, N).await;
    backend.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_on_one_replica_is_served_by_workers_on_another() {
    split_replicas(Kill::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_replicas_survive_a_kill_of_the_requesters_replica() {
    split_replicas(Kill::Requesters).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_replicas_survive_a_kill_of_the_workers_replica() {
    split_replicas(Kill::Workers).await;
}

/// Fencing with a real pause: every agent is attached to replica A when A is
/// stopped (SIGSTOP); they move to B and work goes on there; then A continues
/// (SIGCONT) still holding its sessions in memory. Everything A then tries to write
/// for them is refused (B owns them now), A ends its streams, and no task is lost
/// or runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_is_fenced_when_it_continues() {
    const N: usize = 1_500;
    let store = SharedRedis::new();
    let Started {
        mut a,
        mut b,
        mut agents,
        mut req,
        offering,
    } = store.everyone_on_a(N).await;
    let mut done = HashSet::new();
    let mut stopped_at = None;
    let mut continued = false;
    while done.len() < N {
        if stopped_at.is_none() && done.len() >= N / 3 {
            // Everyone started on A (first in their lists).
            signal(&a.child, "-STOP");
            stopped_at = Some(done.len());
        }
        if let Some(at) = stopped_at {
            if !continued && done.len() >= at + N / 3 {
                signal(&a.child, "-CONT");
                continued = true;
            }
        }
        next_unique_ok(&mut req, &mut done).await;
    }
    offering.await.unwrap();
    assert!(continued, "A was stopped and continued mid-run");
    // A acts on what it held: its lease and reassignment timers have fired.
    let fenced = Instant::now();
    let refused = loop {
        let n = metric(a.metrics, "lattice_agent_fenced_total").await;
        if n >= 1.0 {
            break n;
        }
        assert!(
            fenced.elapsed() < Duration::from_secs(30),
            "A never tried to write after continuing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // No late duplicates either, past A's reassignment delay.
    assert!(tokio::time::timeout(Duration::from_secs(4), req.next_result())
        .await
        .is_err());
    eprintln!("agents/fencing: {N} tasks; A's refused commits: {refused}");
    assert!(req.client.reconnects() >= 1, "the requester moved to B");
    req.client.close(false).await;
    agents.stop();
    for o in [&mut a, &mut b] {
        signal(&o.child, "-TERM");
        assert!(o.child.wait().unwrap().success());
    }
    let backend = store.backend().await;
    check_counters(&backend, N).await;
    check_owners(&backend).await;
    backend.clear().await.unwrap();
}

/// The sum of a metric family's series on a `/metrics` endpoint (0 if absent).
async fn metric(addr: SocketAddr, family: &str) -> f64 {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every stored session record carries the epoch of its owner: no replica wrote
/// one under an epoch it no longer owned.
async fn check_owners(backend: &dyn StoreBackend) {
    use prost::Message;
    let owners: std::collections::HashMap<String, u64> = backend
        .scan(coll::OWNERS)
        .await
        .unwrap()
        .into_iter()
        .map(|(sid, e)| (sid, std::str::from_utf8(&e).unwrap().parse().unwrap()))
        .collect();
    let sessions = backend.scan(coll::SESSIONS).await.unwrap();
    assert!(!sessions.is_empty());
    for (sid, meta) in sessions {
        let meta = SessionMeta::decode(meta).unwrap();
        assert_eq!(Some(&meta.epoch), owners.get(&sid), "session {sid}");
    }
}

/// A requester attached to replica A loses A (`kill -9`) and retries every task it
/// has no result for from a new session on replica B, with the same task ids: the
/// tasks A held are found through the store, so each retry gets the task's result
/// (stored, or when it finishes) and nothing runs again, which the tool gateway's
/// cache-hit count on B proves (a second run of a task would be a cached call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_replica_gets_the_held_task() {
    const N: usize = 600;
    let store = SharedRedis::new();
    let (mut a, mut b) = (store.replica(), store.replica());
    let mut agents = Agents::spawn(3, &format!("http://{}", b.grpc));
    let mut first = requester(vec![format!("http://{}", a.grpc)]);
    first.client.established().await.unwrap();
    let offering = offer_all(&first, N);
    let mut done = HashSet::new();
    while done.len() < N / 3 {
        next_unique_ok(&mut first, &mut done).await;
    }
    signal(&a.child, "-KILL");
    let _ = a.child.wait();
    offering.abort();
    drop(first);
    let mut second = requester(vec![format!("http://{}", b.grpc)]);
    second.client.established().await.unwrap();
    let retried: Vec<usize> = (0..N).filter(|i| !done.contains(&format!("k{i}"))).collect();
    let retrying = offer_ids(&second, retried);
    while done.len() < N {
        next_unique_ok(&mut second, &mut done).await;
    }
    retrying.await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), second.next_result())
        .await
        .is_err());
    let cached = metric_where(b.metrics, "lattice_tool_calls_total", "outcome=\"cached\"").await;
    assert_eq!(cached, 0.0, "a retried task ran again");
    second.client.close(false).await;
    agents.stop();
    signal(&b.child, "-TERM");
    assert!(b.child.wait().unwrap().success());
    let backend = store.backend().await;
    check_counters(&backend, N).await;
    backend.clear().await.unwrap();
}

/// The sum of a metric family's series whose labels contain `label`.
async fn metric_where(addr: SocketAddr, family: &str, label: &str) -> f64 {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{') && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A requester on replica A cancels a task that a worker on replica B runs: the
/// requester is answered CANCELLED at once, and B stops the worker's tool call
/// (a 60 s sleep ends cancelled within seconds) instead of finishing it for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_replica_running_the_task() {
    use lattice_agent::client::SendOptions;
    use lattice_proto::agent::{agent_message, Cancel};
    let store = SharedRedis::new();
    let (mut a, mut b) = (store.replica(), store.replica());
    let mut agents = Agents::spawn(1, &format!("http://{}", b.grpc));
    let mut req = requester(vec![format!("http://{}", a.grpc)]);
    req.client.established().await.unwrap();
    req.offer_tool("long", "tools", "sleep", serde_json::json!({"ms": 60_000}), 2, None)
        .await
        .unwrap();
    // Cancel once the worker's tool call runs on B (a cancel that reaches the
    // worker first stops the task before it calls anything).
    let waited = Instant::now();
    while metric_where(b.metrics, "lattice_agent_frames_total", "kind=\"tool_call\"").await < 1.0 {
        assert!(waited.elapsed() < Duration::from_secs(30), "the task never ran on B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = Cancel {
        task_id: "long".into(),
        reason: "not needed".into(),
        grace_ms: 0,
    };
    req.client
        .send(agent_message::Body::Cancel(cancel), SendOptions::default())
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), req.next_result())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(1), "{r:?}");
    let cancelled = Instant::now();
    loop {
        let n = metric_where(b.metrics, "lattice_tool_calls_total", "outcome=\"cancelled\"").await;
        if n >= 1.0 {
            break;
        }
        assert!(
            cancelled.elapsed() < Duration::from_secs(30),
            "the sleep on B was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    req.client.close(false).await;
    agents.stop();
    for o in [&mut a, &mut b] {
        signal(&o.child, "-TERM");
        assert!(o.child.wait().unwrap().success());
    }
    store.backend().await.clear().await.unwrap();
}
