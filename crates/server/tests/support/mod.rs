//! Shared by the integration tests: start a real server on 127.0.0.1:0 against a copy
//! of the bundled model repository, and wait for conditions without fixed sleeps.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use lattice_inference::{ModelRepository, RepositoryOptions};
use lattice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lattice_server::{AppState, Listeners, ServerConfig};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Copies the named models of the bundled repository into a fresh directory. Model
/// files are hard-linked (they are never written), configs are copied so a test may
/// edit them.
pub fn repo_copy(models: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = workspace_root().join("models");
    for m in models {
        copy_tree(&src.join(m), &dir.path().join(m));
    }
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read model dir").flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else if p.extension().is_some_and(|x| x == "onnx") {
            std::fs::hard_link(&p, &dest)
                .or_else(|_| std::fs::copy(&p, &dest).map(|_| ()))
                .expect("link");
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}

/// Rewrites a model's config.toml with `edit`.
pub fn edit_config(repo: &Path, model: &str, edit: impl FnOnce(String) -> String) {
    let p = repo.join(model).join("config.toml");
    let s = std::fs::read_to_string(&p).expect("config");
    std::fs::write(&p, edit(s)).expect("write config");
}

pub struct TestServer {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// The agent plane's embedded store, when it runs.
    _store_dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn grpc_client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("grpc connect")
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub fn repo(&self) -> &ModelRepository {
        &self.state.repo
    }

    /// Sends the shutdown signal and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
        }
    }
}

pub struct Options {
    pub max_body_bytes: usize,
    pub load_models: bool,
    /// The gateway (authentication, limits, policy, audit); all off by default.
    pub gateway: lattice_server::gateway::GatewayConfig,
    /// Runs the agent plane (orchestrator, tool gateway on the repository, REST
    /// task gateway) on an embedded store.
    pub agents: bool,
    pub agent_token: Option<String>,
    pub scaling: lattice_server::scaling::ScalingConfig,
    /// TLS of the ports.
    pub tls: Option<lattice_server::tls::TlsConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_body_bytes: 16 << 20,
            load_models: true,
            gateway: Default::default(),
            agents: false,
            agent_token: None,
            scaling: lattice_server::scaling::ScalingConfig::default(),
            tls: None,
        }
    }
}

pub async fn start(repo: &Path, opts: Options) -> TestServer {
    let root = workspace_root();
    let ort = lattice_inference::backend::onnx::find_library(&root)
        .expect("ONNX Runtime library in .venv: run scripts/setup.sh first");
    let repository = ModelRepository::open(
        &RepositoryOptions {
            root: repo.to_path_buf(),
            ort_library: ort,
        },
        std::sync::Arc::new(lattice_observability::Metrics::new()),
    )
    .expect("open repository");
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    let listeners = Listeners {
        http: bind().await,
        grpc: bind().await,
        metrics: bind().await,
    };
    let (http, grpc, metrics) = (
        listeners.http.local_addr().unwrap(),
        listeners.grpc.local_addr().unwrap(),
        listeners.metrics.local_addr().unwrap(),
    );
    let metrics_registry = repository.metrics().clone();
    let agents_repo = repository.clone();
    let mut state = AppState::new(
        repository,
        ServerConfig {
            max_body_bytes: opts.max_body_bytes,
            max_response_bytes: 64 * 1024 * 1024,
            connections: lattice_server::conn::Limits::default(),
            task_session_idle: Duration::from_secs(60),
            scaling: opts.scaling.clone(),
            drain_timeout: Duration::from_secs(10),
            telemetry: true,
            warmup: lattice_server::Warmup::default(),
            shm: Default::default(),
        },
    );
    let mut store_dir = None;
    if opts.agents {
        use lattice_agent::{
            orchestrator::{Orchestrator, OrchestratorConfig},
            store::{Store, StoreUrl},
            tools::ToolGateway,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreUrl::Redb(dir.path().join("agents.redb")), "t")
            .await
            .expect("store");
        let tools = ToolGateway::new(store.clone(), Some(agents_repo), metrics_registry.clone()).expect("tools");
        let orchestrator = Orchestrator::new(
            OrchestratorConfig {
                auth_token: opts.agent_token.clone(),
                ..OrchestratorConfig::default()
            },
            store,
            tools,
            metrics_registry,
        )
        .await
        .expect("orchestrator");
        state = state.with_agents(lattice_server::AgentPlane {
            orchestrator,
            chat: lattice_agent::chat::ChatService::default(),
            token: opts.agent_token.clone(),
        });
        store_dir = Some(dir);
    }
    let gateway =
        lattice_server::gateway::Gateway::start(&opts.gateway, state.repo.metrics().clone(), state.shutdown.clone())
            .await
            .expect("gateway");
    state = state.with_gateway(gateway);
    if let Some(tls) = &opts.tls {
        let acceptors = lattice_server::tls::Acceptors::start(tls, state.shutdown.clone()).expect("TLS files");
        state = state.with_tls(acceptors);
    }
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(lattice_server::run(state.clone(), listeners, opts.load_models, async {
        let _ = rx.await;
    }));
    let s = TestServer {
        http,
        grpc,
        metrics,
        state,
        stop: Some(tx),
        task: Some(task),
        _store_dir: store_dir,
    };
    let st = s.state.clone();
    assert_eventually(Duration::from_secs(60), || st.is_ready()).await;
    s
}

/// Polls `cond` until it holds, panicking after `within`.
pub async fn assert_eventually(within: Duration, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < until,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A magika feature vector: the first and last 1024 bytes of a file, padded with 256,
/// exactly as Magika prepares its input.
pub fn magika_features(content: &[u8]) -> Vec<i32> {
    let head: Vec<u8> = content.iter().take(4096).copied().collect();
    let tail_start = content.len().saturating_sub(4096);
    let tail: Vec<u8> = content[tail_start..].to_vec();
    let head = trim_start(&head);
    let tail = trim_end(&tail);
    let mut out: Vec<i32> = head.iter().take(1024).map(|&b| b as i32).collect();
    out.resize(1024, 256);
    let t: Vec<i32> = tail[tail.len().saturating_sub(1024)..]
        .iter()
        .map(|&b| b as i32)
        .collect();
    out.extend(std::iter::repeat_n(256, 1024 - t.len()));
    out.extend(t);
    out
}

fn trim_start(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    &b[i..]
}

fn trim_end(b: &[u8]) -> &[u8] {
    let i = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &b[..i]
}

pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}
