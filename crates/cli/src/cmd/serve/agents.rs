//! Flags of the agent plane `lattice serve` hosts on its gRPC port.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use lattice_inference::ModelRepository;
use lattice_observability::Metrics;

use crate::{cmd::Switch, Failure};

#[derive(Args, Debug, Clone)]
pub struct AgentPlaneArgs {
    /// The agent plane (orchestrator, memory broker, tool gateway, chat) on the gRPC port.
    #[arg(long, env = "LATTICE_AGENTS", value_enum, default_value_t = Switch::On)]
    pub agents: Switch,
    /// Where sessions, outboxes, tasks, memory and the tool cache persist: a file
    /// path (embedded redb, one replica) or redis://HOST:PORT (shared by replicas).
    #[arg(long, env = "LATTICE_MEMORY_STORE", default_value = "lattice-state/agents.redb")]
    pub memory_store: lattice_agent::store::StoreUrl,
    /// Key prefix in a shared Redis, so several deployments can use one server.
    #[arg(long, env = "LATTICE_STORE_PREFIX", default_value = "lattice")]
    pub store_prefix: String,
    /// Heartbeat interval of agent streams, in milliseconds; three missed ones end a stream.
    #[arg(long, env = "LATTICE_HEARTBEAT_MS", default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// Seconds a disconnected session is kept for its agent to resume.
    #[arg(long, env = "LATTICE_SESSION_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub session_idle_timeout_secs: u64,
    /// Milliseconds after which the tasks of a disconnected worker go to another worker.
    #[arg(long, env = "LATTICE_REASSIGN_AFTER_MS", default_value_t = 10_000)]
    pub reassign_after_ms: u64,
    /// Attempts before a task is dead-lettered.
    #[arg(long, env = "LATTICE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Tasks queued across all priorities before offers are refused.
    #[arg(long, env = "LATTICE_MAX_QUEUED_TASKS", default_value_t = 100_000)]
    pub max_queued_tasks: usize,
    /// Tasks one requester may have outstanding before its stream is no longer read.
    #[arg(long, env = "LATTICE_REQUESTER_WINDOW", default_value_t = 1024)]
    pub requester_window: u32,
    /// Bearer token agent streams must carry; none when unset.
    #[arg(long, env = "LATTICE_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Origins the `http_fetch` tool may reach, comma-separated (e.g.
    /// "https://api.example.com,http://10.0.0.5:8080"). Empty, the default, means
    /// none: a tool runs with the server's network position, which includes
    /// loopback and the pod's sidecars.
    #[arg(long, env = "LATTICE_TOOL_FETCH_ALLOW", value_delimiter = ',')]
    pub tool_fetch_allow: Vec<String>,
    /// A TOML file listing MCP tool servers (stdio commands or Streamable HTTP
    /// URLs, per tenant or global) whose tools join the tool gateway as
    /// `<server>.<tool>`; re-read every second while the server runs.
    #[arg(long, env = "LATTICE_MCP_CONFIG")]
    pub mcp_config: Option<PathBuf>,
}

impl AgentPlaneArgs {
    /// `kube_api`: the credentialed Kubernetes API proxy, which no tool may reach.
    pub async fn build(
        &self,
        repo: Option<ModelRepository>,
        metrics: Arc<Metrics>,
        kube_api: &str,
    ) -> Result<Option<lattice_server::AgentPlane>, Failure> {
        use lattice_agent::{
            orchestrator::{Orchestrator, OrchestratorConfig},
            store::{Store, StoreUrl},
            tools::ToolGateway,
        };
        if self.agents == Switch::Off {
            return Ok(None);
        }
        if self.heartbeat_ms == 0 || self.requester_window == 0 || self.max_attempts == 0 {
            return Err(Failure::Usage(
                "--heartbeat-ms, --requester-window and --max-attempts must be at least 1".into(),
            ));
        }
        let store = Store::open(&self.memory_store, &self.store_prefix)
            .await
            .map_err(|e| Failure::Usage(format!("--memory-store: {e:#}")))?;
        let tools = ToolGateway::new(store.clone(), repo, metrics.clone())?;
        tools
            .set_fetch_allow(fetch_allow(&self.tool_fetch_allow, kube_api).map_err(|e| Failure::Usage(e.to_string()))?);
        if let Some(path) = &self.mcp_config {
            let kube = kube_api.to_string();
            // An MCP URL follows --tool-fetch-allow's rule: any http(s) origin the
            // operator lists, except the credentialed Kubernetes API proxy.
            let parse = move |bytes: &[u8]| {
                lattice_agent::mcp::McpConfig::parse(bytes, &|u| fetch_allow(&[u.to_string()], &kube).map(|_| ()))
            };
            let bytes =
                std::fs::read(path).map_err(|e| Failure::Usage(format!("--mcp-config {}: {e}", path.display())))?;
            let cfg = parse(&bytes).map_err(|e| Failure::Usage(format!("--mcp-config {}: {e}", path.display())))?;
            tools.mcp().apply(cfg);
            tools.mcp().watch(path.clone(), parse);
        }
        let cfg = OrchestratorConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms),
            session_idle_timeout: Duration::from_secs(self.session_idle_timeout_secs),
            reassign_after: Duration::from_millis(self.reassign_after_ms),
            max_attempts: self.max_attempts,
            max_queued: self.max_queued_tasks,
            requester_window: self.requester_window,
            // One replica owns an embedded store; replicas sharing Redis adopt
            // sessions as their agents resume.
            adopt_all_on_start: matches!(self.memory_store, StoreUrl::Redb(_)),
            auth_token: self.agent_token.clone(),
            ..OrchestratorConfig::default()
        };
        let orchestrator = Orchestrator::new(cfg, store, tools, metrics).await?;
        Ok(Some(lattice_server::AgentPlane {
            orchestrator,
            chat: lattice_agent::chat::ChatService::default(),
            token: self.agent_token.clone(),
        }))
    }
}

/// A `--tool-fetch-allow` entry (or MCP server URL) no tool may be given.
#[derive(Debug, thiserror::Error)]
enum FetchAllowError {
    #[error("--tool-fetch-allow: '{entry}': {source}")]
    Parse { entry: String, source: url::ParseError },
    #[error("--tool-fetch-allow: '{0}' must be an http(s) origin such as https://host:port")]
    NotAnOrigin(String),
    #[error("--tool-fetch-allow: '{0}' is the Kubernetes API proxy (--kube-api), which no tool may reach")]
    KubeApi(String),
}

/// Parses `--tool-fetch-allow`; the Kubernetes API proxy is refused even if listed,
/// under any name for loopback.
fn fetch_allow(entries: &[String], kube_api: &str) -> Result<Vec<reqwest::Url>, FetchAllowError> {
    let kube = reqwest::Url::parse(kube_api).ok();
    let is_loopback = |u: &reqwest::Url| match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    let is_kube = |u: &reqwest::Url| {
        kube.as_ref().is_some_and(|k| {
            u.origin() == k.origin()
                || (is_loopback(u) && is_loopback(k) && u.port_or_known_default() == k.port_or_known_default())
        })
    };
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let url = reqwest::Url::parse(e.trim()).map_err(|source| FetchAllowError::Parse {
                entry: e.clone(),
                source,
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(FetchAllowError::NotAnOrigin(e.clone()));
            }
            if is_kube(&url) {
                return Err(FetchAllowError::KubeApi(e.clone()));
            }
            Ok(url)
        })
        .collect()
}
