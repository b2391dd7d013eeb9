//! MCP tool servers behind the tool gateway.
//!
//! The operator lists Model Context Protocol servers in a TOML file
//! (`--mcp-config`): a child process spoken to over stdio, or a Streamable HTTP
//! URL, each open to every tenant or to listed ones. A supervisor per server
//! connects with the official SDK (`rmcp`), lists its tools (again when the server
//! says they changed) and keeps the connection; when the server dies (the child exits, a call finds the transport
//! closed) it reconnects with backoff (100 ms doubling to 5 s, full jitter). Its
//! tools join the gateway's catalogue as `<server>.<tool>`; the gateway validates
//! arguments against the schema the server declared, bounds the call in time,
//! cancels it (the SDK sends `notifications/cancelled`) and caches its result per
//! (tenant, idempotency key) exactly as for a built-in tool.
//!
//! While a server is down its last known tools stay in the catalogue and calls to
//! them fail with UNAVAILABLE, which the orchestrator retries: a task does not fail
//! for good because a tool server restarted. A call in flight when the server died
//! fails the same way; whether the server applied its effect before dying is
//! unknowable here, so every call carries the gateway's idempotency key in
//! `_meta["io.lattice/idempotency_key"]` (the task id for a worker's task) and a
//! server whose tool has an effect keys it on that value.
//!
//! Everything the server sends is bounded: tools per server, schema size, the
//! size of one message (stdio line or HTTP body) and of a result.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};
use rmcp::{
    model::{CallToolRequestParams, PaginatedRequestParams, RequestMetaObject},
    service::{
        ClientInitializeError, MaybeSendFuture, NotificationContext, Peer, RoleClient, RunningService, ServiceError,
        ServiceExt,
    },
    transport::{
        async_rw::AsyncRwTransport, streamable_http_client::StreamableHttpClientTransportConfig,
        StreamableHttpClientTransport,
    },
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// Servers one configuration may list.
pub const MAX_SERVERS: usize = 64;
/// Tools one server may declare; a server that declares more is refused.
pub const MAX_TOOLS_PER_SERVER: usize = 256;
/// Size of one tool's declared input schema, serialized.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Size of one call's result as the gateway returns it.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// Size of one message from a server (stdio line or HTTP body): a result plus room
/// for its envelope and escaping.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Calls one server runs at once when the configuration does not say.
const DEFAULT_MAX_CONCURRENT: usize = 16;
/// Time to start, initialize and list the tools of a server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the backoff; a server that dies right
/// after starting keeps backing off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Tenants with a rate-limit bucket per server before idle buckets are dropped.
const MAX_BUCKETS: usize = 4096;
/// The `_meta` key that carries the gateway's idempotency key to the server.
pub const IDEMPOTENCY_META_KEY: &str = "io.lattice/idempotency_key";

/// One `[[server]]` entry of the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `[a-z0-9][a-z0-9_-]{0,63}`: the prefix of its tools' names.
    pub name: String,
    /// stdio: the program to start (looked up on PATH).
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// The child's whole environment besides PATH: the server's own environment
    /// (tokens, keys) is not passed on.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Streamable HTTP: the endpoint, http(s).
    pub url: Option<String>,
    /// Tenants that see and may call the server's tools; absent means every tenant.
    pub tenants: Option<Vec<String>>,
    /// Per-call timeout when the call does not set one (the task's deadline still
    /// bounds it); default 30 s.
    pub timeout_ms: Option<u64>,
    /// Calls run at once; more wait (within their timeout).
    pub max_concurrent: Option<usize>,
    /// Calls per second per tenant (a token bucket of `burst`); absent: no limit.
    pub rate_per_sec: Option<f64>,
    pub burst: Option<u32>,
}

impl ServerConfig {
    fn transport(&self) -> &'static str {
        if self.url.is_some() {
            "streamable-http"
        } else {
            "stdio"
        }
    }

    fn allows(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.iter().any(|t| t == tenant))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    server: Vec<ServerConfig>,
}

/// A parsed and checked configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct McpConfig {
    pub servers: Vec<ServerConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid TOML for an MCP configuration: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("the file is not UTF-8")]
    Utf8,
    #[error("{0} servers listed, at most {MAX_SERVERS} allowed")]
    TooMany(usize),
    #[error("server name '{0}' must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    BadName(String),
    #[error("server '{0}' is listed twice")]
    Duplicate(String),
    #[error("server '{0}' needs exactly one of `command` (stdio) or `url` (Streamable HTTP)")]
    Transport(String),
    #[error("server '{name}': url '{url}' {why}")]
    Url { name: String, url: String, why: String },
    #[error("server '{0}': {1}")]
    Field(String, &'static str),
}

impl McpConfig {
    /// Parses the file; `url_allowed` is the operator's rule for URLs a tool may
    /// reach (the same as `http_fetch`'s: http(s) origins, never the credentialed
    /// Kubernetes API proxy), given the parsed URL, returning why not (its error's
    /// text becomes the reason in [`ConfigError::Url`]).
    pub fn parse<E: std::fmt::Display>(
        bytes: &[u8],
        url_allowed: &dyn Fn(&reqwest::Url) -> Result<(), E>,
    ) -> Result<McpConfig, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::Utf8)?;
        let file: ConfigFile = toml::from_str(text)?;
        if file.server.len() > MAX_SERVERS {
            return Err(ConfigError::TooMany(file.server.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &file.server {
            let ok_name = !s.name.is_empty()
                && s.name.len() <= 64
                && s.name
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && s.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
            if !ok_name {
                return Err(ConfigError::BadName(s.name.clone()));
            }
            if !seen.insert(s.name.clone()) {
                return Err(ConfigError::Duplicate(s.name.clone()));
            }
            match (&s.command, &s.url) {
                (Some(c), None) if !c.is_empty() => {}
                (None, Some(u)) => {
                    let bad = |why: String| ConfigError::Url {
                        name: s.name.clone(),
                        url: u.clone(),
                        why,
                    };
                    let url = reqwest::Url::parse(u).map_err(|e| bad(format!("does not parse: {e}")))?;
                    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                        return Err(bad("must be an http(s) URL with a host".into()));
                    }
                    url_allowed(&url).map_err(|e| bad(e.to_string()))?;
                }
                _ => return Err(ConfigError::Transport(s.name.clone())),
            }
            if s.timeout_ms.is_some_and(|t| t == 0 || t > 3_600_000) {
                return Err(ConfigError::Field(s.name.clone(), "timeout_ms must be 1..=3600000"));
            }
            if s.max_concurrent.is_some_and(|c| c == 0 || c > 1024) {
                return Err(ConfigError::Field(s.name.clone(), "max_concurrent must be 1..=1024"));
            }
            if s.rate_per_sec.is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= 1e6)) {
                return Err(ConfigError::Field(
                    s.name.clone(),
                    "rate_per_sec must be a number in (0, 1000000]",
                ));
            }
            if s.burst.is_some_and(|b| b == 0 || b > 1_000_000) || (s.burst.is_some() && s.rate_per_sec.is_none()) {
                return Err(ConfigError::Field(
                    s.name.clone(),
                    "burst must be 1..=1000000, with rate_per_sec",
                ));
            }
            if s.args.len() > 256 || s.env.len() > 256 || s.tenants.as_ref().is_some_and(|t| t.len() > 4096) {
                return Err(ConfigError::Field(
                    s.name.clone(),
                    "at most 256 args, 256 env entries, 4096 tenants",
                ));
            }
        }
        Ok(McpConfig { servers: file.server })
    }
}

/// One tool of a server, as the catalogue and the gateway see it.
pub struct McpTool {
    /// The name the server knows it by.
    pub name: String,
    /// `<server>.<tool>`: the gateway's name for it.
    pub full_name: String,
    pub description: String,
    pub input_schema: Value,
    pub validator: jsonschema::Validator,
}

/// What the gateway learns when it looks a name up.
pub enum Resolved {
    Tool(Arc<McpServer>, Arc<McpTool>),
    /// The server is known but has no live connection (and the tool, if it was
    /// ever listed, is still listed): retryable.
    Unavailable(String),
    NotFound(String),
}

/// A catalogue row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ToolInfo {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
    /// `builtin`, or `mcp:<server>`.
    pub source: String,
}

/// A server's state, for the catalogue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub transport: &'static str,
    /// `starting`, `up` or `down`.
    pub state: &'static str,
    /// Why it is down, if it is.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub tools: usize,
    /// Connections made since it was configured.
    pub connects: u64,
}

type Tools = Arc<BTreeMap<String, Arc<McpTool>>>;

enum Conn {
    Starting,
    Up {
        peer: Peer<RoleClient>,
        generation: u64,
        /// A call found this connection dead: reconnect now. One per connection,
        /// so a late report cannot end the next one.
        broken: Arc<Notify>,
    },
    Down {
        error: String,
    },
}

/// One configured server and its supervisor's view of it.
pub struct McpServer {
    cfg: ServerConfig,
    conn: RwLock<Conn>,
    /// The last tools listed; kept while the server is down.
    tools: RwLock<Option<Tools>>,
    generation: std::sync::atomic::AtomicU64,
    stop: CancellationToken,
    permits: Semaphore,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl McpServer {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The per-call timeout the configuration gives, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.cfg.timeout_ms.map(Duration::from_millis)
    }

    fn status(&self) -> ServerStatus {
        let (state, error) = match &*self.conn.read() {
            Conn::Starting => ("starting", String::new()),
            Conn::Up { .. } => ("up", String::new()),
            Conn::Down { error } => ("down", error.clone()),
        };
        ServerStatus {
            name: self.cfg.name.clone(),
            transport: self.cfg.transport(),
            state,
            error,
            tools: self.tools.read().as_ref().map_or(0, |t| t.len()),
            connects: self.generation.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn take_token(&self, tenant: &str) -> bool {
        let Some(rate) = self.cfg.rate_per_sec else {
            return true;
        };
        let burst = f64::from(self.cfg.burst.unwrap_or_else(|| rate.ceil().max(1.0) as u32));
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(tenant) {
            // A full bucket holds no state worth keeping.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let b = buckets
            .entry(tenant.to_string())
            .or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Calls the tool; the gateway has validated `args` and bounds the call in
    /// time. Dropping the future cancels the call on the server.
    pub async fn call(
        &self,
        tool: &McpTool,
        args: &Value,
        tenant: &str,
        idempotency_key: &str,
        traceparent: &str,
    ) -> Result<Value, (Code, String)> {
        let name = &self.cfg.name;
        let (peer, generation) = match &*self.conn.read() {
            Conn::Up { peer, generation, .. } => (peer.clone(), *generation),
            Conn::Starting => return Err((Code::Unavailable, format!("MCP server '{name}' is starting"))),
            Conn::Down { error } => {
                return Err((
                    Code::Unavailable,
                    format!("MCP server '{name}' is down and being restarted ({error})"),
                ))
            }
        };
        if !self.take_token(tenant) {
            return Err((
                Code::ResourceExhausted,
                format!(
                    "tenant '{tenant}' is over the rate limit of MCP server '{name}' ({} calls/s)",
                    self.cfg.rate_per_sec.unwrap_or_default()
                ),
            ));
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| (Code::Unavailable, format!("MCP server '{name}' was removed")))?;
        let mut meta = RequestMetaObject::new();
        if !idempotency_key.is_empty() {
            meta.insert(IDEMPOTENCY_META_KEY.into(), json!(idempotency_key));
        }
        if !traceparent.is_empty() {
            meta.set_traceparent(traceparent);
        }
        let mut params =
            CallToolRequestParams::new(tool.name.clone()).with_arguments(args.as_object().cloned().unwrap_or_default());
        params.meta = Some(meta);
        match peer.call_tool(params).await {
            Ok(result) => {
                if result.is_error == Some(true) {
                    let text: String = result
                        .content
                        .iter()
                        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
                        .collect::<Vec<_>>()
                        .join(" ");
                    return Err((
                        Code::FailedPrecondition,
                        format!("tool '{}' reported an error: {}", tool.full_name, cap(&text, 1024)),
                    ));
                }
                let mut out = json!({"content": result.content});
                if let Some(s) = result.structured_content {
                    out["structuredContent"] = s;
                }
                let size = serde_json::to_vec(&out).map_or(usize::MAX, |v| v.len());
                if size > MAX_RESULT_BYTES {
                    return Err((
                        Code::OutOfRange,
                        format!(
                            "tool '{}' returned {size} bytes, more than the {MAX_RESULT_BYTES} kept",
                            tool.full_name
                        ),
                    ));
                }
                Ok(out)
            }
            Err(ServiceError::McpError(e)) => {
                let code = match e.code.0 {
                    -32602 => Code::InvalidArgument,
                    -32601 | -32002 => Code::NotFound,
                    _ => Code::Internal,
                };
                Err((
                    code,
                    format!("MCP server '{name}' refused the call: {}", cap(&e.message, 1024)),
                ))
            }
            Err(e) => {
                // The transport is gone (child exited, HTTP server unreachable): the
                // supervisor reconnects; this call may be retried.
                self.mark_broken(generation);
                Err((
                    Code::Unavailable,
                    format!("MCP server '{name}' connection failed: {}", cap(&e.to_string(), 1024)),
                ))
            }
        }
    }

    fn mark_broken(&self, generation: u64) {
        let mut conn = self.conn.write();
        if let Conn::Up {
            generation: g, broken, ..
        } = &*conn
        {
            if *g == generation {
                broken.notify_one();
                *conn = Conn::Down {
                    error: "connection lost".into(),
                };
            }
        }
    }
}

fn cap(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The configured servers; cheap to clone.
#[derive(Clone, Default)]
pub struct McpHub {
    inner: Arc<HubInner>,
}

#[derive(Default)]
struct HubInner {
    servers: RwLock<BTreeMap<String, Arc<McpServer>>>,
    config: Mutex<McpConfig>,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        for s in self.servers.get_mut().values() {
            s.stop.cancel();
        }
    }
}

impl McpHub {
    /// Makes the running servers those of `cfg`: unchanged entries keep their
    /// connection, changed ones restart, removed ones stop (a stdio child is killed).
    pub fn apply(&self, cfg: McpConfig) {
        let mut current = self.inner.config.lock();
        if *current == cfg {
            return;
        }
        let mut servers = self.inner.servers.write();
        let wanted: HashMap<&str, &ServerConfig> = cfg.servers.iter().map(|s| (s.name.as_str(), s)).collect();
        servers.retain(|name, s| {
            let keep = wanted.get(name.as_str()).is_some_and(|w| **w == s.cfg);
            if !keep {
                s.stop.cancel();
            }
            keep
        });
        for s in &cfg.servers {
            if servers.contains_key(&s.name) {
                continue;
            }
            let server = Arc::new(McpServer {
                cfg: s.clone(),
                conn: RwLock::new(Conn::Starting),
                tools: RwLock::new(None),
                generation: std::sync::atomic::AtomicU64::new(0),
                stop: CancellationToken::new(),
                permits: Semaphore::new(s.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT)),
                buckets: Mutex::new(HashMap::new()),
            });
            tokio::spawn(supervise(server.clone()));
            servers.insert(s.name.clone(), server);
        }
        *current = cfg;
    }

    /// Re-reads `path` every second and applies it when its bytes change; a file
    /// that no longer parses leaves the running servers as they are, and says so.
    /// Stops when the hub is dropped.
    pub fn watch(&self, path: PathBuf, parse: impl Fn(&[u8]) -> Result<McpConfig, ConfigError> + Send + 'static) {
        let hub: Weak<HubInner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut last = std::fs::read(&path).ok();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(inner) = hub.upgrade() else { return };
                let bytes = match read_bounded(&path) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "MCP configuration unreadable; keeping the running servers");
                        continue;
                    }
                };
                if last.as_ref() == Some(&bytes) {
                    continue;
                }
                match parse(&bytes) {
                    Ok(cfg) => {
                        tracing::info!(path = %path.display(), servers = cfg.servers.len(), "MCP configuration reloaded");
                        McpHub { inner }.apply(cfg);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "MCP configuration does not parse; keeping the running servers")
                    }
                }
                last = Some(bytes);
            }
        });
    }

    /// Looks up `<server>.<tool>` for `tenant`; None when the name is not an MCP
    /// tool's for this tenant (a server the tenant may not use is not revealed).
    pub fn resolve(&self, tenant: &str, name: &str) -> Option<Resolved> {
        let (server, tool) = name.split_once('.')?;
        let s = self.inner.servers.read().get(server).cloned()?;
        if !s.cfg.allows(tenant) {
            return None;
        }
        let tools = s.tools.read().clone();
        let up = matches!(&*s.conn.read(), Conn::Up { .. });
        match tools.as_ref().and_then(|t| t.get(tool).cloned()) {
            Some(t) => Some(Resolved::Tool(s, t)),
            None if tools.is_none() || !up => Some(Resolved::Unavailable(format!(
                "MCP server '{server}' is not connected; its tools are not known yet"
            ))),
            None => Some(Resolved::NotFound(format!(
                "MCP server '{server}' has no tool named '{tool}'"
            ))),
        }
    }

    /// The MCP tools `tenant` may call.
    pub fn catalogue(&self, tenant: &str) -> Vec<ToolInfo> {
        let servers = self.inner.servers.read();
        let mut out = Vec::new();
        for s in servers.values().filter(|s| s.cfg.allows(tenant)) {
            for t in s.tools.read().iter().flat_map(|t| t.values()) {
                out.push(ToolInfo {
                    name: t.full_name.clone(),
                    description: t.description.clone(),
                    input_schema: t.input_schema.clone(),
                    source: format!("mcp:{}", s.cfg.name),
                });
            }
        }
        out
    }

    /// The servers `tenant` may use and their state.
    pub fn servers(&self, tenant: &str) -> Vec<ServerStatus> {
        self.inner
            .servers
            .read()
            .values()
            .filter(|s| s.cfg.allows(tenant))
            .map(|s| s.status())
            .collect()
    }

    /// Whether `name` names a tool of a configured server (for metric labels: the
    /// set is bounded by the configuration and the per-server tool cap).
    pub fn knows(&self, name: &str) -> bool {
        let Some((server, tool)) = name.split_once('.') else {
            return false;
        };
        self.inner
            .servers
            .read()
            .get(server)
            .is_some_and(|s| s.tools.read().as_ref().is_some_and(|t| t.contains_key(tool)))
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(1024 * 1024).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A live connection: the SDK's service, the child it talks to (stdio), and the
/// signal that the server's tool list changed.
struct Live {
    service: RunningService<RoleClient, Client>,
    child: Option<tokio::process::Child>,
    relist: Arc<Notify>,
}

/// The client side of a connection: told when the server's tool list changes.
struct Client {
    relist: Arc<Notify>,
}

impl rmcp::ClientHandler for Client {
    fn on_tool_list_changed(
        &self,
        _: NotificationContext<RoleClient>,
    ) -> impl std::future::Future<Output = ()> + MaybeSendFuture + '_ {
        // Coalesced: a server that says it a thousand times is listed once.
        self.relist.notify_one();
        std::future::ready(())
    }
}

async fn supervise(server: Arc<McpServer>) {
    let name = server.cfg.name.clone();
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&server.cfg)) => r,
            () = server.stop.cancelled() => return,
        };
        match attempt {
            Ok(Ok((live, tools))) => {
                let generation = server.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                tracing::info!(server = %name, tools = tools.len(), generation, "MCP server connected");
                *server.tools.write() = Some(Arc::new(tools));
                let broken = Arc::new(Notify::new());
                *server.conn.write() = Conn::Up {
                    peer: live.service.peer().clone(),
                    generation,
                    broken: broken.clone(),
                };
                let since = Instant::now();
                let why = hold(&server, live, &broken).await;
                if server.stop.is_cancelled() {
                    return;
                }
                tracing::warn!(server = %name, reason = %why, "MCP server lost; reconnecting");
                *server.conn.write() = Conn::Down { error: why };
                if since.elapsed() >= STABLE_AFTER {
                    backoff = BACKOFF_MIN;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(server = %name, error = %e, "MCP server failed to start");
                *server.conn.write() = Conn::Down {
                    error: cap(&e.to_string(), 1024).to_string(),
                };
            }
            Err(_) => {
                let e = format!("did not initialize within {CONNECT_TIMEOUT:?}");
                tracing::warn!(server = %name, error = %e, "MCP server failed to start");
                *server.conn.write() = Conn::Down { error: e };
            }
        }
        // Full jitter, as the agent client's reconnects.
        let wait = backoff.mul_f64(fastrand::f64());
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = server.stop.cancelled() => return,
        }
    }
}

/// Holds the connection until it ends, re-listing the tools when the server says
/// they changed; returns why it ended.
async fn hold(server: &McpServer, live: Live, broken: &Notify) -> String {
    let Live {
        service,
        mut child,
        relist,
    } = live;
    let ct = service.cancellation_token();
    let peer = service.peer().clone();
    let waiting = service.waiting();
    tokio::pin!(waiting);
    let why = {
        let child_exit = async {
            match child.as_mut() {
                Some(c) => c
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), |s| format!("process exited: {s}")),
                None => std::future::pending().await,
            }
        };
        tokio::pin!(child_exit);
        let mut listed = Instant::now();
        loop {
            tokio::select! {
                r = &mut waiting => break match r {
                    Ok(reason) => format!("connection closed ({reason:?})"),
                    Err(e) => format!("connection task failed: {e}"),
                },
                w = &mut child_exit => break w,
                () = broken.notified() => break "a call found the connection closed".to_string(),
                () = server.stop.cancelled() => break "removed from the configuration".to_string(),
                () = relist.notified() => {
                    // At most one listing a second, however often the server asks.
                    tokio::time::sleep_until((listed + Duration::from_secs(1)).into()).await;
                    listed = Instant::now();
                    let name = &server.cfg.name;
                    match tokio::time::timeout(CONNECT_TIMEOUT, list_tools(name, &peer)).await {
                        Ok(Ok(tools)) => {
                            tracing::info!(server = %name, tools = tools.len(), "MCP server's tools re-listed");
                            *server.tools.write() = Some(Arc::new(tools));
                        }
                        // The previous list stays: calls to tools that are gone get
                        // the server's own answer.
                        Ok(Err(e)) => tracing::warn!(server = %name, error = %e, "MCP tools re-listing refused"),
                        Err(_) => tracing::warn!(server = %name, "MCP tools re-listing timed out"),
                    }
                }
            }
        }
    };
    ct.cancel();
    if let Some(mut c) = child {
        // kill_on_drop would do it too; waiting reaps the process now.
        let _ = c.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    why
}

/// Why an MCP server could not be reached or listed; its text is the server's
/// status (`Conn::Down`) and the log line.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("http client: {0}")]
    HttpClient(reqwest::Error),
    #[error("cannot start '{program}': {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("child has no stdio pipes")]
    NoPipes,
    /// Boxed: rmcp's error is large, and this one is rare.
    #[error("initialize: {0}")]
    Initialize(Box<ClientInitializeError>),
    #[error("tools/list: {0}")]
    List(ServiceError),
    #[error("tools/list returned an empty page with a cursor")]
    EmptyPage,
    #[error("declares more than {MAX_TOOLS_PER_SERVER} tools")]
    TooManyTools,
}

async fn connect(cfg: &ServerConfig) -> Result<(Live, BTreeMap<String, Arc<McpTool>>), ConnectError> {
    let relist = Arc::new(Notify::new());
    let client = Client { relist: relist.clone() };
    let live = if let Some(url) = &cfg.url {
        // Redirects are not followed: the listed origin could send the client to
        // one that is not listed.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(ConnectError::HttpClient)?;
        let tcfg = StreamableHttpClientTransportConfig::with_uri(url.as_str())
            .max_concurrent_requests(cfg.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT))
            .max_json_response_size(MAX_MESSAGE_BYTES)
            .max_sse_event_size(MAX_MESSAGE_BYTES);
        let transport = StreamableHttpClientTransport::with_client(http, tcfg);
        let service = client
            .serve(transport)
            .await
            .map_err(|e| ConnectError::Initialize(Box::new(e)))?;
        Live {
            service,
            child: None,
            relist,
        }
    } else {
        let program = cfg.command.as_deref().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&cfg.args)
            .env_clear()
            .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
            .envs(&cfg.env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| ConnectError::Spawn {
            program: program.to_string(),
            source,
        })?;
        let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
            return Err(ConnectError::NoPipes);
        };
        let transport = AsyncRwTransport::new_client(stdout, stdin).with_max_line_length(MAX_MESSAGE_BYTES);
        let service = client
            .serve(transport)
            .await
            .map_err(|e| ConnectError::Initialize(Box::new(e)))?;
        Live {
            service,
            child: Some(child),
            relist,
        }
    };
    let tools = list_tools(&cfg.name, live.service.peer()).await?;
    Ok((live, tools))
}

async fn list_tools(server: &str, peer: &Peer<RoleClient>) -> Result<BTreeMap<String, Arc<McpTool>>, ConnectError> {
    let mut out = BTreeMap::new();
    let mut cursor = None;
    // Each page adds at least one tool or ends, so the pages are bounded too.
    loop {
        let page = peer
            .list_tools(Some(PaginatedRequestParams::default().with_cursor(cursor)))
            .await
            .map_err(ConnectError::List)?;
        if page.tools.is_empty() && page.next_cursor.is_some() {
            return Err(ConnectError::EmptyPage);
        }
        for t in page.tools {
            if out.len() >= MAX_TOOLS_PER_SERVER {
                return Err(ConnectError::TooManyTools);
            }
            let name = t.name.to_string();
            let valid_name = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid_name {
                tracing::warn!(server, tool = %cap(&name, 128), "MCP tool name is not [A-Za-z0-9_.-]{{1,128}}; skipped");
                continue;
            }
            let schema = Value::Object((*t.input_schema).clone());
            let size = serde_json::to_vec(&schema).map_or(usize::MAX, |v| v.len());
            if size > MAX_SCHEMA_BYTES {
                tracing::warn!(server, tool = %name, size, "MCP tool schema larger than {MAX_SCHEMA_BYTES} bytes; skipped");
                continue;
            }
            let validator = match jsonschema::validator_for(&schema) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(server, tool = %name, error = %e, "MCP tool schema does not compile; skipped");
                    continue;
                }
            };
            let description = t
                .description
                .as_deref()
                .map(|d| cap(d, 4096).to_string())
                .unwrap_or_default();
            out.insert(
                name.clone(),
                Arc::new(McpTool {
                    full_name: format!("{server}.{name}"),
                    name,
                    description,
                    input_schema: schema,
                    validator,
                }),
            );
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<McpConfig, ConfigError> {
        McpConfig::parse(s.as_bytes(), &|u| {
            if u.port() == Some(8001) {
                Err("is forbidden")
            } else {
                Ok(())
            }
        })
    }

    #[test]
    fn config_rules() {
        let ok = parse(
            r#"
            [[server]]
            name = "ledger"
            command = "python3"
            args = ["ledger.py"]
            env = { LEDGER = "/tmp/l" }
            tenants = ["acme"]

            [[server]]
            name = "web-1"
            url = "http://127.0.0.1:9000/mcp"
            rate_per_sec = 5.0
            "#,
        )
        .unwrap();
        assert_eq!(ok.servers.len(), 2);
        assert!(ok.servers[0].allows("acme") && !ok.servers[0].allows("other"));
        assert!(ok.servers[1].allows("anyone"));
        for bad in [
            "[[server]]\nname = \"A\"\ncommand = \"x\"",
            "[[server]]\nname = \"a.b\"\ncommand = \"x\"",
            "[[server]]\nname = \"a\"",
            "[[server]]\nname = \"a\"\ncommand = \"x\"\nurl = \"http://h/\"",
            "[[server]]\nname = \"a\"\nurl = \"file:///etc/passwd\"",
            "[[server]]\nname = \"a\"\nurl = \"http://127.0.0.1:8001/\"",
            "[[server]]\nname = \"a\"\ncommand = \"x\"\ntimeout_ms = 0",
            "[[server]]\nname = \"a\"\ncommand = \"x\"\nburst = 3",
            "[[server]]\nname = \"a\"\ncommand = \"x\"\nsurprise = 1",
            "[[server]]\nname = \"a\"\ncommand = \"x\"\n[[server]]\nname = \"a\"\ncommand = \"y\"",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limit_is_per_tenant() {
        let cfg = parse("[[server]]\nname = \"a\"\ncommand = \"x\"\nrate_per_sec = 0.001\nburst = 2")
            .unwrap()
            .servers
            .remove(0);
        let s = McpServer {
            cfg,
            conn: RwLock::new(Conn::Starting),
            tools: RwLock::new(None),
            generation: Default::default(),
            stop: CancellationToken::new(),
            permits: Semaphore::new(1),
            buckets: Mutex::new(HashMap::new()),
        };
        assert!(s.take_token("t1") && s.take_token("t1"));
        assert!(!s.take_token("t1"));
        assert!(s.take_token("t2"));
    }
}
