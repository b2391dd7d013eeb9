//! One audit record per agent task: the orchestrator reports how each task offered
//! to it ended (done, failed, refused, cancelled, dead-lettered), whoever offered it
//! (an agent's stream or `POST /v1/agents/tasks`), and the record goes to the same
//! log as the requests'.
//!
//! The record's `protocol` is `agent-task`, its `api` the stream's RPC, `status`
//! the task's final gRPC code mapped as for requests, and `response_ms` the time
//! from offer to outcome. The stream that carried the offer has its own record too
//! (written when the stream ends).

use std::collections::BTreeMap;

use lattice_agent::orchestrator::{TaskAudit, TaskOutcome};

use super::{grpc_to_http, now_ms, rfc3339, AuditLog, Record};

/// The RPC tasks arrive on.
pub const TASK_API: &str = "/lattice.agent.v1.AgentCoordination/NegotiateTask";

/// Writes task outcomes to the audit log.
pub struct TaskRecords(pub AuditLog);

impl TaskAudit for TaskRecords {
    fn task_finished(&self, t: TaskOutcome) {
        let ts_ms = now_ms();
        let mut headers = BTreeMap::new();
        if !t.worker.is_empty() {
            headers.insert("worker-session".to_string(), t.worker);
        }
        headers.insert("attempts".to_string(), t.attempts.to_string());
        self.0.record(Record {
            request_id: uuid::Uuid::now_v7().to_string(),
            time: rfc3339(ts_ms),
            ts_ms,
            client_ip: None,
            tenant_id: t.tenant,
            user_id: t.user,
            protocol: "agent-task".to_string(),
            api: TASK_API.to_string(),
            model: None,
            version: None,
            status: grpc_to_http(t.code),
            grpc_status: Some(t.code),
            response_ms: t.finished_us.saturating_sub(t.offered_us).max(0) as f64 / 1000.0,
            bytes_in: 0,
            bytes_out: 0,
            refusal: None,
            headers,
            task_id: Some(t.task_id),
            capability: Some(t.capability),
        });
    }
}
