//! A worker agent (`lattice agent`): holds a stream to the orchestrator, runs the
//! tasks assigned to it, and answers each with one result.
//!
//! A task's payload is JSON `{"tool": NAME, "arguments": {...}}`; the worker runs
//! it as a tool call through the orchestrator's tool gateway, with the task id as
//! the idempotency key, so a task that runs twice (its first worker was presumed
//! dead) still has its side effect once. Cancels and deadlines stop the task.

use std::{collections::HashMap, sync::Arc, time::Duration};

use lattice_observability::telemetry;
use lattice_proto::agent::{agent_message, agent_response, TaskAssign, TaskResult, ToolCall};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;

use crate::{
    client::{AgentClient, ClientConfig, Event, SendOptions},
    wire::{self, remaining, status},
};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub client: ClientConfig,
}

#[derive(Clone)]
struct Shared {
    client: AgentClient,
    /// Running tasks, cancelled by a Cancel frame.
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// Tool calls waiting for their result, by call id.
    calls: Arc<Mutex<HashMap<String, oneshot::Sender<lattice_proto::agent::ToolResult>>>>,
}

/// Runs until `shutdown` fires; then leaves with a goodbye.
pub async fn run(cfg: WorkerConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let (client, mut events) = AgentClient::connect(cfg.client);
    let shared = Shared {
        client: client.clone(),
        running: Arc::default(),
        calls: Arc::default(),
    };
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            () = &mut shutdown => break,
        };
        let Some(ev) = ev else { break };
        let Event::Frame(frame) = ev else { continue };
        let frame = *frame;
        let env = frame.env.unwrap_or_default();
        match frame.body {
            Some(agent_response::Body::Assign(task)) => {
                let token = CancellationToken::new();
                shared.running.lock().insert(task.task_id.clone(), token.clone());
                client.set_running(&task.task_id, true);
                tokio::spawn(run_task(shared.clone(), task, env.deadline_us, env.traceparent, token));
            }
            Some(agent_response::Body::Cancel(c)) => {
                if let Some(t) = shared.running.lock().get(&c.task_id) {
                    t.cancel();
                }
            }
            Some(agent_response::Body::ToolResult(r)) => {
                if let Some(tx) = shared.calls.lock().remove(&r.call_id) {
                    let _ = tx.send(r);
                }
            }
            _ => {}
        }
    }
    client.close(false).await;
    Ok(())
}

async fn run_task(shared: Shared, task: TaskAssign, deadline_us: i64, traceparent: String, token: CancellationToken) {
    let span = tracing::info_span!(
        "agent.run",
        task_id = %task.task_id,
        capability = %task.capability,
        attempt = task.attempt,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty
    );
    telemetry::adopt(&span, telemetry::context_from_traceparent(&traceparent));
    let traceparent = match telemetry::traceparent_of(&span) {
        tp if tp.is_empty() => traceparent,
        tp => tp,
    };
    run_task_in(shared, task, deadline_us, traceparent, token)
        .instrument(span)
        .await;
}

async fn run_task_in(
    shared: Shared,
    task: TaskAssign,
    deadline_us: i64,
    traceparent: String,
    token: CancellationToken,
) {
    let work = execute(&shared, &task, deadline_us, &traceparent);
    let (output, st) = tokio::select! {
        r = work => r,
        () = token.cancelled() => (Vec::new(), status(Code::Cancelled, "cancelled")),
        () = sleep_until_deadline(deadline_us) => (Vec::new(), status(Code::DeadlineExceeded, "task deadline passed")),
    };
    let result = TaskResult {
        task_id: task.task_id.clone(),
        output,
        status: Some(st),
        attempts: task.attempt,
        worker_id: String::new(),
        route: task.route.clone(),
    };
    let _ = shared
        .client
        .send(
            agent_message::Body::Result(result),
            SendOptions {
                priority: task.priority,
                correlation_id: task.task_id.clone(),
                traceparent,
                ..SendOptions::default()
            },
        )
        .await;
    shared.running.lock().remove(&task.task_id);
    shared.client.set_running(&task.task_id, false);
}

async fn sleep_until_deadline(deadline_us: i64) {
    match remaining(deadline_us) {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn execute(
    shared: &Shared,
    task: &TaskAssign,
    deadline_us: i64,
    traceparent: &str,
) -> (Vec<u8>, lattice_proto::google::rpc::Status) {
    let spec: serde_json::Value = match serde_json::from_slice(&task.payload) {
        Ok(v) => v,
        Err(e) => {
            return (
                Vec::new(),
                status(Code::InvalidArgument, format!("task payload is not JSON: {e}")),
            )
        }
    };
    let Some(tool) = spec["tool"].as_str() else {
        return (
            Vec::new(),
            status(Code::InvalidArgument, "task payload has no \"tool\""),
        );
    };
    let call_id = wire::new_id();
    let (tx, rx) = oneshot::channel();
    shared.calls.lock().insert(call_id.clone(), tx);
    let call = ToolCall {
        call_id: call_id.clone(),
        tool: tool.to_string(),
        arguments_json: spec.get("arguments").cloned().unwrap_or_default().to_string(),
        timeout_ms: spec["timeout_ms"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
    };
    let sent = shared
        .client
        .send(
            agent_message::Body::ToolCall(call),
            SendOptions {
                priority: task.priority,
                deadline_us,
                // One tool call per task: the task id makes its effect happen once.
                idempotency_key: task.task_id.clone(),
                correlation_id: task.task_id.clone(),
                traceparent: traceparent.to_string(),
            },
        )
        .await;
    if sent.is_err() {
        shared.calls.lock().remove(&call_id);
        return (Vec::new(), status(Code::Unavailable, "worker is shutting down"));
    }
    let result = rx.await;
    shared.calls.lock().remove(&call_id);
    match result {
        Ok(r) => (r.output_json.into_bytes(), r.status.unwrap_or_else(wire::ok_status)),
        Err(_) => (Vec::new(), status(Code::Unavailable, "tool call abandoned")),
    }
}

/// Convenience for tests and tools: a requester that offers tasks and collects
/// their results.
pub struct Requester {
    pub client: AgentClient,
    pub events: mpsc::Receiver<Event>,
}

impl Requester {
    pub fn connect(cfg: ClientConfig) -> Requester {
        let (client, events) = AgentClient::connect(cfg);
        Requester { client, events }
    }

    /// Offers a tool task; returns when the offer is queued locally for sending.
    pub async fn offer_tool(
        &self,
        task_id: &str,
        capability: &str,
        tool: &str,
        arguments: serde_json::Value,
        priority: i32,
        deadline: Option<Duration>,
    ) -> anyhow::Result<()> {
        let payload = serde_json::json!({"tool": tool, "arguments": arguments});
        self.client
            .send(
                agent_message::Body::Offer(lattice_proto::agent::TaskOffer {
                    task_id: task_id.to_string(),
                    capability: capability.to_string(),
                    payload: payload.to_string().into_bytes(),
                    max_attempts: 0,
                }),
                SendOptions {
                    priority,
                    deadline_us: deadline.map_or(0, |d| {
                        wire::now_us() + i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2)
                    }),
                    correlation_id: task_id.to_string(),
                    ..SendOptions::default()
                },
            )
            .await?;
        Ok(())
    }

    /// The next task result, skipping other frames.
    pub async fn next_result(&mut self) -> Option<TaskResult> {
        while let Some(ev) = self.events.recv().await {
            if let Event::Frame(f) = ev {
                if let Some(agent_response::Body::Result(r)) = f.body {
                    return Some(r);
                }
            }
        }
        None
    }
}
