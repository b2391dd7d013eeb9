//! The tool gateway: registered tools with JSON-schema arguments, a per-call
//! timeout, cancellation by task, and an idempotency cache keyed by
//! (tenant, idempotency key) in the agent store: a resent call returns the stored
//! result and never runs the side effect twice.
//!
//! The cache entry is written in the same atomic step as a tool's own durable side
//! effect (the `counter` tool), so even a `kill -9` between the two cannot double
//! it. Tools whose effect is outside the store (`http_fetch`) are cached after the
//! call: a crash inside that window can repeat the call, which is why the shipped
//! outside-effect tool only reads.
//!
//! Tools of MCP servers (`mcp.rs`) join the same catalogue as `<server>.<tool>`
//! and take the same path: schema, timeout, cancellation, cache, metrics. Their
//! effect is outside the store too, so the gateway passes the idempotency key on
//! for the server to key its effect on.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use lattice_inference::{
    tensor::{DataType, Tensor, TensorData},
    ModelRepository, RequestParts,
};
use lattice_proto::agent::{ToolCall, ToolResult};
use parking_lot::Mutex;
use prost::Message;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{
    mcp::{McpHub, McpServer, McpTool, Resolved, ToolInfo},
    store::{Op, Store},
    wire::{ok_status, remaining, status},
};

pub const IDEM_COLL: &str = "tool:idem";
pub const COUNTER_COLL: &str = "tool:counter";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_FETCH_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Calculator,
    Counter,
    Echo,
    HttpFetch,
    Infer,
    Sleep,
}

struct Tool {
    kind: Kind,
    description: &'static str,
    schema: Value,
    validator: jsonschema::Validator,
}

/// What a call runs: a built-in, or a tool of an MCP server.
enum Target {
    Builtin(Kind),
    Mcp(Arc<McpServer>, Arc<McpTool>),
}

/// Who is calling, for the cache key, the deadline and cancellation.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub tenant: String,
    pub idempotency_key: String,
    /// The task the call belongs to; cancelling the task cancels the call.
    pub task_id: String,
    pub deadline_us: i64,
}

#[derive(Clone)]
pub struct ToolGateway {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Arc<crate::agent_metrics::AgentMetrics>,
    tools: HashMap<&'static str, Tool>,
    store: Store,
    repo: Option<ModelRepository>,
    http: reqwest::Client,
    /// One call per idempotency key at a time, so two concurrent resends cannot
    /// both miss the cache and both run.
    keyed: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Cancellation tokens of running calls, by task id, each with a call number.
    running: Mutex<HashMap<String, Vec<(u64, CancellationToken)>>>,
    calls: std::sync::atomic::AtomicU64,
    /// Origins `http_fetch` may reach; empty (the default) means none.
    fetch_allow: parking_lot::RwLock<Vec<reqwest::Url>>,
    /// MCP servers whose tools join the catalogue.
    mcp: McpHub,
}

impl ToolGateway {
    pub fn new(
        store: Store,
        repo: Option<ModelRepository>,
        metrics: Arc<lattice_observability::Metrics>,
    ) -> anyhow::Result<ToolGateway> {
        let specs = [
            (
                "calculator",
                Kind::Calculator,
                "Evaluates arithmetic: + - * / ^, parentheses, unary minus",
                json!({"type": "object", "required": ["expression"], "additionalProperties": false,
                       "properties": {"expression": {"type": "string", "maxLength": 1024}}}),
            ),
            (
                "counter",
                Kind::Counter,
                "Adds `by` (default 1) to a durable named counter, once per idempotency key",
                json!({"type": "object", "required": ["name"], "additionalProperties": false,
                       "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 256},
                                      "by": {"type": "integer", "minimum": 1, "maximum": 1000000}}}),
            ),
            (
                "echo",
                Kind::Echo,
                "Returns `value` unchanged",
                json!({"type": "object", "required": ["value"], "properties": {"value": {}}}),
            ),
            (
                "http_fetch",
                Kind::HttpFetch,
                "GETs a URL on the operator's allow-list (no redirects; the first 64 KiB)",
                json!({"type": "object", "required": ["url"], "additionalProperties": false,
                       "properties": {"url": {"type": "string", "pattern": "^https?://"}}}),
            ),
            (
                "infer",
                Kind::Infer,
                "Runs a served model on JSON tensors",
                json!({"type": "object", "required": ["model", "inputs"], "additionalProperties": false,
                       "properties": {"model": {"type": "string"}, "version": {"type": "string"},
                                      "inputs": {"type": "object", "additionalProperties": {
                                          "type": "object", "required": ["datatype", "shape", "data"],
                                          "properties": {"datatype": {"enum": ["FP32", "INT32", "INT64", "BYTES"]},
                                                         "shape": {"type": "array", "items": {"type": "integer"}},
                                                         "data": {"type": "array"}}}}}}),
            ),
            (
                "sleep",
                Kind::Sleep,
                "Waits `ms` milliseconds (cancellable)",
                json!({"type": "object", "required": ["ms"], "additionalProperties": false,
                       "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": 3600000}}}),
            ),
        ];
        let mut tools = HashMap::new();
        for (name, kind, description, schema) in specs {
            let validator = jsonschema::validator_for(&schema).map_err(|e| anyhow::anyhow!("schema of {name}: {e}"))?;
            tools.insert(
                name,
                Tool {
                    kind,
                    description,
                    schema,
                    validator,
                },
            );
        }
        Ok(ToolGateway {
            inner: Arc::new(Inner {
                metrics: metrics.set::<crate::agent_metrics::AgentMetrics>(),
                tools,
                store,
                repo,
                // Redirects are not followed: an allowed origin could otherwise send
                // the request to one that is not.
                http: reqwest::Client::builder()
                    .timeout(DEFAULT_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?,
                keyed: Mutex::new(HashMap::new()),
                running: Mutex::new(HashMap::new()),
                calls: std::sync::atomic::AtomicU64::new(0),
                fetch_allow: parking_lot::RwLock::new(Vec::new()),
                mcp: McpHub::default(),
            }),
        })
    }

    /// Sets the origins (`scheme://host:port`) `http_fetch` may reach. A tool runs
    /// with the server's network position (loopback, the pod's sidecars, the
    /// cluster), so nothing is reachable unless the operator lists it.
    pub fn set_fetch_allow(&self, origins: Vec<reqwest::Url>) {
        *self.inner.fetch_allow.write() = origins;
    }

    fn fetch_allowed(&self, url: &reqwest::Url) -> bool {
        let origin = url.origin();
        self.inner.fetch_allow.read().iter().any(|a| a.origin() == origin)
    }

    /// The MCP servers behind this gateway (configure with [`McpHub::apply`]).
    pub fn mcp(&self) -> &McpHub {
        &self.inner.mcp
    }

    /// Every tool `tenant` may call, with its argument schema: the built-ins, then
    /// the MCP servers' tools, each sorted by name.
    pub fn catalogue(&self, tenant: &str) -> Vec<ToolInfo> {
        let mut out: Vec<ToolInfo> = self
            .inner
            .tools
            .iter()
            .map(|(name, t)| ToolInfo {
                name: (*name).to_string(),
                description: t.description.to_string(),
                input_schema: t.schema.clone(),
                source: "builtin".into(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(self.inner.mcp.catalogue(tenant));
        out
    }

    /// Tool calls running now.
    pub fn running_calls(&self) -> usize {
        self.inner.running.lock().values().map(Vec::len).sum()
    }

    /// Cancels every running call of a task.
    pub fn cancel_task(&self, task_id: &str) {
        if let Some(tokens) = self.inner.running.lock().remove(task_id) {
            for (_, t) in tokens {
                t.cancel();
            }
        }
    }

    pub async fn call(&self, ctx: &CallContext, call: ToolCall) -> ToolResult {
        let started = std::time::Instant::now();
        let mut result = self.call_inner(ctx, &call).await;
        result.call_id = call.call_id;
        // Unknown tool names are not label values: they would let callers grow the
        // series set without bound.
        let tool = if self.inner.tools.contains_key(call.tool.as_str()) || self.inner.mcp.knows(&call.tool) {
            call.tool
        } else {
            "unknown".into()
        };
        let outcome = if result.cached {
            "cached"
        } else {
            crate::wire::code_name(Code::from_i32(result.status.as_ref().map_or(0, |s| s.code)))
        };
        let m = &self.inner.metrics;
        m.tool_duration
            .get_or_create(&crate::agent_metrics::ToolNameLabels { tool: tool.clone() })
            .observe(started.elapsed().as_secs_f64());
        m.tool_calls
            .get_or_create(&crate::agent_metrics::ToolLabels { tool, outcome })
            .inc();
        result
    }

    async fn call_inner(&self, ctx: &CallContext, call: &ToolCall) -> ToolResult {
        let target = match self.inner.tools.get(call.tool.as_str()) {
            Some(tool) => Target::Builtin(tool.kind),
            None => match self.inner.mcp.resolve(&ctx.tenant, &call.tool) {
                Some(Resolved::Tool(server, tool)) => Target::Mcp(server, tool),
                Some(Resolved::Unavailable(why)) => return failed(Code::Unavailable, why),
                Some(Resolved::NotFound(why)) => return failed(Code::NotFound, why),
                None => return failed(Code::NotFound, format!("no tool named '{}'", call.tool)),
            },
        };
        let args: Value = match serde_json::from_str(&call.arguments_json) {
            Ok(v) => v,
            Err(e) => return failed(Code::InvalidArgument, format!("arguments are not JSON: {e}")),
        };
        let validator = match &target {
            Target::Builtin(_) => &self.inner.tools[call.tool.as_str()].validator,
            Target::Mcp(_, tool) => &tool.validator,
        };
        if let Err(e) = validator.validate(&args) {
            return failed(
                Code::InvalidArgument,
                format!("arguments do not match the schema of '{}': {e}", call.tool),
            );
        }
        if ctx.idempotency_key.is_empty() {
            return self.execute(ctx, call, &target, &args).await.0;
        }
        let cache_key = format!("{}\u{1f}{}", ctx.tenant, ctx.idempotency_key);
        let lock = self.inner.keyed.lock().entry(cache_key.clone()).or_default().clone();
        let _guard = lock.lock().await;
        let out = self.cached_call(ctx, call, &target, &args, &cache_key).await;
        drop(_guard);
        let mut keyed = self.inner.keyed.lock();
        if Arc::strong_count(&lock) == 2 {
            keyed.remove(&cache_key);
        }
        out
    }

    async fn cached_call(
        &self,
        ctx: &CallContext,
        call: &ToolCall,
        target: &Target,
        args: &Value,
        cache_key: &str,
    ) -> ToolResult {
        let backend = self.inner.store.backend();
        match backend.get(IDEM_COLL, cache_key).await {
            Ok(Some(bytes)) => {
                if let Ok(mut r) = ToolResult::decode(bytes) {
                    r.cached = true;
                    return r;
                }
            }
            Ok(None) => {}
            Err(e) => return failed(Code::Unavailable, format!("idempotency cache: {e}")),
        }
        let (result, effect) = self.execute(ctx, call, target, args).await;
        // Only outcomes that would repeat are remembered: a timeout or cancel may go
        // differently next time.
        let code = Code::from_i32(result.status.as_ref().map_or(0, |s| s.code));
        if !matches!(code, Code::Ok | Code::InvalidArgument | Code::NotFound) {
            return result;
        }
        let mut ops = effect;
        ops.push(Op::Put {
            coll: IDEM_COLL.into(),
            key: cache_key.to_string(),
            val: Bytes::from(result.encode_to_vec()),
        });
        match backend.compare_and_apply((IDEM_COLL, cache_key), None, ops).await {
            Ok(Ok(())) => result,
            // A replica beat us to it: its result stands and our effect was not applied.
            Ok(Err(Some(existing))) => ToolResult::decode(existing)
                .map(|mut r| {
                    r.cached = true;
                    r
                })
                .unwrap_or(result),
            Ok(Err(None)) => result,
            Err(e) => failed(Code::Unavailable, format!("idempotency cache: {e}")),
        }
    }

    /// Runs the tool; returns its result and the store ops that are its durable
    /// side effect (committed with the cache entry).
    async fn execute(
        &self,
        ctx: &CallContext,
        call: &ToolCall,
        target: &Target,
        args: &Value,
    ) -> (ToolResult, Vec<Op>) {
        let configured = match target {
            Target::Mcp(server, _) => server.timeout(),
            Target::Builtin(_) => None,
        };
        let mut timeout = if call.timeout_ms > 0 {
            Duration::from_millis(u64::from(call.timeout_ms))
        } else {
            configured.unwrap_or(DEFAULT_TIMEOUT)
        };
        if let Some(left) = remaining(ctx.deadline_us) {
            timeout = timeout.min(left);
        }
        let token = CancellationToken::new();
        let call_no = self.inner.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !ctx.task_id.is_empty() {
            self.inner
                .running
                .lock()
                .entry(ctx.task_id.clone())
                .or_default()
                .push((call_no, token.clone()));
        }
        let run = async {
            match target {
                Target::Builtin(kind) => self.run(*kind, args).await,
                Target::Mcp(server, tool) => {
                    let traceparent = lattice_observability::telemetry::traceparent_of(&tracing::Span::current());
                    server
                        .call(tool, args, &ctx.tenant, &ctx.idempotency_key, &traceparent)
                        .await
                        .map(|v| (v, Vec::new()))
                }
            }
        };
        let out = tokio::select! {
            r = tokio::time::timeout(timeout, run) => match r {
                Ok(Ok((v, effect))) => (ToolResult { output_json: v.to_string(), status: Some(ok_status()), ..ToolResult::default() }, effect),
                Ok(Err((code, msg))) => (failed(code, msg), Vec::new()),
                Err(_) => (failed(Code::DeadlineExceeded, format!("tool '{}' did not finish within {timeout:?}", call.tool)), Vec::new()),
            },
            () = token.cancelled() => (failed(Code::Cancelled, format!("tool '{}' cancelled", call.tool)), Vec::new()),
        };
        if !ctx.task_id.is_empty() {
            let mut running = self.inner.running.lock();
            if let Some(v) = running.get_mut(&ctx.task_id) {
                v.retain(|(n, _)| *n != call_no);
                if v.is_empty() {
                    running.remove(&ctx.task_id);
                }
            }
        }
        out
    }

    async fn run(&self, kind: Kind, args: &Value) -> Result<(Value, Vec<Op>), (Code, String)> {
        match kind {
            Kind::Echo => Ok((json!({"value": args["value"]}), Vec::new())),
            Kind::Calculator => {
                let expr = args["expression"].as_str().unwrap_or_default();
                let v = calc::eval(expr).map_err(|e| (Code::InvalidArgument, e.to_string()))?;
                Ok((json!({"value": v}), Vec::new()))
            }
            Kind::Counter => {
                let name = args["name"].as_str().unwrap_or_default().to_string();
                let by = args["by"].as_i64().unwrap_or(1);
                Ok((
                    json!({"name": name, "incremented_by": by}),
                    vec![Op::Incr {
                        coll: COUNTER_COLL.into(),
                        key: name,
                        by,
                    }],
                ))
            }
            Kind::Sleep => {
                let ms = args["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok((json!({"slept_ms": ms}), Vec::new()))
            }
            Kind::HttpFetch => {
                let url = args["url"].as_str().unwrap_or_default();
                let parsed = reqwest::Url::parse(url).map_err(|e| (Code::InvalidArgument, format!("bad url: {e}")))?;
                if !self.fetch_allowed(&parsed) {
                    let origin = parsed.origin().ascii_serialization();
                    return Err((
                        Code::PermissionDenied,
                        format!("origin '{origin}' is not on the http_fetch allow-list (--tool-fetch-allow)"),
                    ));
                }
                let mut resp = self
                    .inner
                    .http
                    .get(parsed)
                    .send()
                    .await
                    .map_err(|e| (Code::Unavailable, format!("fetch failed: {e}")))?;
                let status = resp.status().as_u16();
                // Read no more than is kept, whatever the server sends.
                let mut body = Vec::new();
                while body.len() < MAX_FETCH_BYTES {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => {
                            body.extend_from_slice(&chunk[..chunk.len().min(MAX_FETCH_BYTES - body.len())])
                        }
                        Ok(None) => break,
                        Err(e) => return Err((Code::Unavailable, format!("fetch failed: {e}"))),
                    }
                }
                let text = String::from_utf8_lossy(&body).into_owned();
                Ok((json!({"status": status, "body": text}), Vec::new()))
            }
            Kind::Infer => self.infer(args).await.map(|v| (v, Vec::new())),
        }
    }

    async fn infer(&self, args: &Value) -> Result<Value, (Code, String)> {
        let Some(repo) = &self.inner.repo else {
            return Err((Code::FailedPrecondition, "this process serves no models".into()));
        };
        let model = args["model"].as_str().unwrap_or_default();
        let version = args["version"].as_str().unwrap_or("");
        let mut inputs = Vec::new();
        for (name, t) in args["inputs"].as_object().into_iter().flatten() {
            let shape: Vec<i64> = t["shape"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_i64)
                .collect();
            let data = t["data"].as_array().cloned().unwrap_or_default();
            let tensor = match t["datatype"].as_str() {
                Some("FP32") => {
                    let v: Option<Vec<f32>> = data.iter().map(|x| x.as_f64().map(|f| f as f32)).collect();
                    Tensor::from_f32(
                        shape,
                        &v.ok_or((Code::InvalidArgument, format!("{name}: FP32 data must be numbers")))?,
                    )
                }
                Some("INT32") => {
                    let v: Option<Vec<i32>> = data
                        .iter()
                        .map(|x| x.as_i64().and_then(|i| i32::try_from(i).ok()))
                        .collect();
                    let v = v.ok_or((
                        Code::InvalidArgument,
                        format!("{name}: INT32 data must be 32-bit integers"),
                    ))?;
                    let bytes: Vec<u8> = v.iter().flat_map(|i| i.to_le_bytes()).collect();
                    Tensor::raw(DataType::I32, shape, bytes)
                }
                Some("INT64") => {
                    let v: Option<Vec<i64>> = data.iter().map(Value::as_i64).collect();
                    Tensor::from_i64(
                        shape,
                        &v.ok_or((Code::InvalidArgument, format!("{name}: INT64 data must be integers")))?,
                    )
                }
                _ => {
                    let v: Option<Vec<Bytes>> = data
                        .iter()
                        .map(|x| x.as_str().map(|s| Bytes::copy_from_slice(s.as_bytes())))
                        .collect();
                    Tensor::strings(
                        shape,
                        v.ok_or((Code::InvalidArgument, format!("{name}: BYTES data must be strings")))?,
                    )
                }
            };
            inputs.push((name.clone(), tensor));
        }
        let parts = RequestParts {
            id: String::new(),
            inputs,
            outputs: Vec::new(),
            priority: None,
            timeout: None,
            sequence: None,
        };
        let resp = repo
            .infer(model, version, parts)
            .await
            .map_err(|e| (Code::InvalidArgument, e.to_string()))?;
        let mut outputs = serde_json::Map::new();
        for (name, t) in resp.outputs {
            let data = match (&t.dtype, &t.data) {
                (_, TensorData::Strings(items)) => {
                    json!(items.iter().map(|b| String::from_utf8_lossy(b)).collect::<Vec<_>>())
                }
                (DataType::I64, _) => json!(t.to_i64_vec().unwrap_or_default()),
                _ => json!(t.to_f32_vec().unwrap_or_default()),
            };
            outputs.insert(
                name,
                json!({"datatype": t.dtype.as_str(), "shape": t.shape, "data": data}),
            );
        }
        Ok(json!({"model_name": model, "model_version": resp.version.to_string(), "outputs": outputs}))
    }
}

fn failed(code: Code, message: impl Into<String>) -> ToolResult {
    ToolResult {
        status: Some(status(code, message)),
        ..ToolResult::default()
    }
}

/// Arithmetic for the `calculator` tool: + - * / ^, parentheses, unary minus.
mod calc {
    /// Why an expression has no value; the message goes back to the caller.
    #[derive(Clone, Debug, PartialEq, thiserror::Error)]
    pub enum CalcError {
        #[error("unexpected '{found}' at {at}")]
        Unexpected { found: char, at: usize },
        #[error("expected ')' at {0}")]
        Unclosed(usize),
        #[error("bad number '{0}'")]
        BadNumber(String),
        #[error("unexpected end of expression")]
        End,
        #[error("result is not a finite number")]
        NotFinite,
    }

    pub fn eval(src: &str) -> Result<f64, CalcError> {
        let mut p = Parser {
            s: src.as_bytes(),
            i: 0,
        };
        let v = p.expr()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(CalcError::Unexpected {
                found: p.s[p.i] as char,
                at: p.i,
            });
        }
        if v.is_finite() {
            Ok(v)
        } else {
            Err(CalcError::NotFinite)
        }
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
                self.i += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.i).copied()
        }

        fn expr(&mut self) -> Result<f64, CalcError> {
            let mut v = self.term()?;
            while let Some(op @ (b'+' | b'-')) = self.peek() {
                self.i += 1;
                let r = self.term()?;
                v = if op == b'+' { v + r } else { v - r };
            }
            Ok(v)
        }

        fn term(&mut self) -> Result<f64, CalcError> {
            let mut v = self.power()?;
            while let Some(op @ (b'*' | b'/')) = self.peek() {
                self.i += 1;
                let r = self.power()?;
                v = if op == b'*' { v * r } else { v / r };
            }
            Ok(v)
        }

        fn power(&mut self) -> Result<f64, CalcError> {
            let base = self.unary()?;
            if self.peek() == Some(b'^') {
                self.i += 1;
                // Right-associative: 2^3^2 = 2^9.
                return Ok(base.powf(self.power()?));
            }
            Ok(base)
        }

        fn unary(&mut self) -> Result<f64, CalcError> {
            match self.peek() {
                Some(b'-') => {
                    self.i += 1;
                    Ok(-self.unary()?)
                }
                Some(b'(') => {
                    self.i += 1;
                    let v = self.expr()?;
                    if self.peek() != Some(b')') {
                        return Err(CalcError::Unclosed(self.i));
                    }
                    self.i += 1;
                    Ok(v)
                }
                Some(c) if c.is_ascii_digit() || c == b'.' => {
                    let start = self.i;
                    while self
                        .s
                        .get(self.i)
                        .is_some_and(|c| c.is_ascii_digit() || *c == b'.' || *c == b'e' || *c == b'E')
                    {
                        self.i += 1;
                    }
                    // Digits, '.', 'e' and 'E' only: ASCII, so the lossy view is exact.
                    let text = String::from_utf8_lossy(&self.s[start..self.i]);
                    text.parse().map_err(|_| CalcError::BadNumber(text.into_owned()))
                }
                Some(c) => Err(CalcError::Unexpected {
                    found: c as char,
                    at: self.i,
                }),
                None => Err(CalcError::End),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn arithmetic() {
            assert_eq!(super::eval("1 + 2 * (3 - 4)"), Ok(-1.0));
            assert_eq!(super::eval("2^3^2"), Ok(512.0));
            assert_eq!(super::eval("-(1.5e1) / 3"), Ok(-5.0));
            assert!(super::eval("1 +").is_err());
            assert!(super::eval("1 / 0").is_err());
            assert!(super::eval("2 $ 3").is_err());
        }
    }
}
