//! Routing transitions under the state lock: offers, results, requeue and
//! dead-letter, cancellation, session end, and dispatch to the least-loaded worker.

use bytes::Bytes;
use lattice_proto::agent::{agent_response, AgentResponse, Cancel, Envelope, TaskAssign, TaskResult};
use prost::Message;
use tokio::time::Instant;
use tonic::Code;

use lattice_observability::{metrics::OutcomeLabels, telemetry};

use crate::{
    lanes::Lanes,
    records::{coll, TaskRecord, TaskState},
    store::{seq_key, Op},
    wire::{self, now_us, status},
};

use super::{code_name, Inner};

use super::state::*;

pub(super) fn commit(inner: &Inner, st: &mut State, mut step: Step) -> u64 {
    // A session that got frames persists its numbering with them.
    let mut pushed_to: Vec<&String> = step.pushed.iter().map(|(sid, _)| sid).collect();
    pushed_to.sort();
    pushed_to.dedup();
    let metas: Vec<Op> = pushed_to
        .into_iter()
        .filter_map(|sid| st.sessions.get(sid))
        .map(|s| {
            let mut one = Step::default();
            one.put_session(s);
            one.ops.pop().expect("put_session pushes one op")
        })
        .collect();
    step.ops.extend(metas);
    let ticket = inner.store.submit(step.ops);
    for (sid, seq) in step.pushed {
        if let Some(p) = st.sessions.get_mut(&sid).and_then(|s| s.outbox.get_mut(seq)) {
            p.ticket = ticket;
        }
    }
    for sid in step.wake {
        if let Some(s) = st.sessions.get(&sid) {
            s.wake.notify_one();
        }
    }
    ticket
}

/// Numbers a reliable frame, keeps it in the session's outbox and persists it.
pub(super) fn push_frame(s: &mut Session, step: &mut Step, env: Envelope, body: agent_response::Body) {
    let sid = s.meta.session_id.clone();
    let (seq, pending) = s.outbox.push(|seq| Pending {
        frame: AgentResponse {
            env: Some(Envelope { seq_no: seq, ..env }),
            body: Some(body),
        },
        ticket: 0,
    });
    step.ops.push(Op::Put {
        coll: coll::outbox(&sid),
        key: seq_key(seq),
        val: Bytes::from(pending.frame.encode_to_vec()),
    });
    step.pushed.push((sid.clone(), seq));
    step.wake.push(sid);
}

pub(super) fn on_offer(
    inner: &Inner,
    st: &mut State,
    sid: &str,
    env: &Envelope,
    priority: u32,
    offer: lattice_proto::agent::TaskOffer,
    step: &mut Step,
) {
    if offer.task_id.is_empty() || st.tasks.contains_key(&offer.task_id) {
        // A resend of a task we hold (or a nameless one we cannot track).
        return;
    }
    // The task's span continues the requester's trace; the assignment carries it on,
    // so the worker's and the tool's spans hang under it.
    let span = tracing::info_span!(
        "agent.task",
        task_id = %offer.task_id,
        capability = %offer.capability,
        priority,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty
    );
    telemetry::adopt(&span, telemetry::context_from_traceparent(&env.traceparent));
    let traceparent = telemetry::traceparent_of(&span);
    let s = st.sessions.get_mut(sid).expect("caller checked");
    let mut rec = TaskRecord {
        task_id: offer.task_id.clone(),
        requester: sid.to_string(),
        capability: offer.capability,
        payload: Bytes::from(offer.payload),
        priority,
        deadline_us: env.deadline_us,
        attempts: 0,
        max_attempts: if offer.max_attempts > 0 {
            offer.max_attempts
        } else {
            inner.cfg.max_attempts
        },
        state: TaskState::Queued as i32,
        worker: String::new(),
        tenant: s.meta.tenant.clone(),
        traceparent,
        result: None,
        offered_us: now_us(),
        user: s.meta.user.clone(),
    };
    s.outstanding += 1;
    let refusal = if s.outstanding > 2 * inner.cfg.requester_window as usize {
        Some(status(
            Code::ResourceExhausted,
            format!(
                "{} tasks outstanding, the window is {}: wait for results",
                s.outstanding - 1,
                inner.cfg.requester_window
            ),
        ))
    } else if st.queued >= inner.cfg.max_queued {
        Some(status(
            Code::ResourceExhausted,
            format!("{} tasks queued, the limit: retry later", st.queued),
        ))
    } else if env.deadline_us > 0 && env.deadline_us <= now_us() {
        Some(status(
            Code::DeadlineExceeded,
            "deadline passed before the task was queued",
        ))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        if refusal.code == Code::ResourceExhausted as i32 {
            inner
                .metrics
                .agent_credit_waits
                .get_or_create(&OutcomeLabels { outcome: "refused" })
                .inc();
        }
        rec.set_state(TaskState::Done);
        st.tasks.insert(
            rec.task_id.clone(),
            Task {
                rec: rec.clone(),
                orphaned_since: None,
            },
        );
        finish(inner, st, &rec.task_id, refusal, Bytes::new(), step);
        return;
    }
    step.put_task(&rec);
    st.lanes
        .entry(rec.capability.clone())
        .or_insert_with(|| Lanes::new(inner.cfg.aging))
        .push(priority, rec.task_id.clone(), Instant::now());
    st.queued += 1;
    st.tasks.insert(
        rec.task_id.clone(),
        Task {
            rec,
            orphaned_since: None,
        },
    );
    dispatch(inner, st, step);
}

pub(super) fn on_result(inner: &Inner, st: &mut State, sid: &str, result: TaskResult, step: &mut Step) {
    let task_id = result.task_id.clone();
    if let Some(w) = st.sessions.get_mut(sid) {
        w.in_flight.remove(&task_id);
    }
    let Some(task) = st.tasks.get(&task_id) else {
        return;
    };
    if task.rec.state() == TaskState::Done {
        return;
    }
    let code = wire::code_of(&result.status);
    let retryable = matches!(code, Code::Unavailable | Code::Internal | Code::Unknown | Code::Aborted);
    if let Some(w) = st.sessions.get_mut(sid) {
        if retryable {
            w.breaker.failures += 1;
            if w.breaker.failures >= inner.cfg.breaker_failures {
                w.breaker.open_until = Some(Instant::now() + inner.cfg.breaker_cooldown);
                tracing::warn!(worker = sid, "circuit breaker open");
            }
        } else {
            w.breaker = Breaker::default();
        }
    }
    if retryable {
        requeue(
            inner,
            st,
            &task_id,
            result.status.map(|s| s.message).unwrap_or_default(),
            step,
        );
    } else {
        let status = result.status.unwrap_or_else(wire::ok_status);
        finish(inner, st, &task_id, status, Bytes::from(result.output), step);
    }
    dispatch(inner, st, step);
}

/// Puts an assigned task back in its lane, or dead-letters it after its last attempt.
pub(super) fn requeue(inner: &Inner, st: &mut State, task_id: &str, why: String, step: &mut Step) {
    let Some(task) = st.tasks.get_mut(task_id) else {
        return;
    };
    // Only an assigned task goes back: a queued or finished one is where it belongs
    // (a late failure from a worker presumed dead must not queue it twice).
    if task.rec.state() != TaskState::Assigned {
        return;
    }
    if let Some(w) = st.sessions.get_mut(&task.rec.worker) {
        w.in_flight.remove(task_id);
    }
    if task.rec.attempts >= task.rec.max_attempts {
        let rec = task.rec.clone();
        step.ops.push(Op::Put {
            coll: coll::DEAD_LETTER.into(),
            key: task_id.to_string(),
            val: Bytes::from(rec.encode_to_vec()),
        });
        tracing::warn!(task = task_id, attempts = rec.attempts, reason = %why, "task dead-lettered");
        let msg = format!("dead-lettered after {} attempts; last failure: {why}", rec.attempts);
        finish(inner, st, task_id, status(Code::Aborted, msg), Bytes::new(), step);
        return;
    }
    task.rec.set_state(TaskState::Queued);
    task.rec.worker.clear();
    task.orphaned_since = None;
    step.put_task(&task.rec);
    let (cap, prio) = (task.rec.capability.clone(), task.rec.priority);
    st.lanes
        .entry(cap)
        .or_insert_with(|| Lanes::new(inner.cfg.aging))
        .push(prio, task_id.to_string(), Instant::now());
    st.queued += 1;
}

/// Records a task's outcome and queues the result for its requester.
pub(super) fn finish(
    inner: &Inner,
    st: &mut State,
    task_id: &str,
    status: lattice_proto::google::rpc::Status,
    output: Bytes,
    step: &mut Step,
) {
    let Some(task) = st.tasks.get_mut(task_id) else {
        return;
    };
    let outcome = code_name(Code::from_i32(status.code));
    inner
        .metrics
        .agent_tasks
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    if task.rec.offered_us > 0 {
        inner
            .metrics
            .agent_task_duration
            .observe((now_us() - task.rec.offered_us).max(0) as f64 / 1e6);
    }
    if task.rec.state() == TaskState::Queued {
        st.queued = st.queued.saturating_sub(1);
    }
    let worker = std::mem::take(&mut task.rec.worker);
    task.rec.set_state(TaskState::Done);
    if let Some(audit) = inner.task_audit.get() {
        audit.task_finished(super::TaskOutcome {
            task_id: task_id.to_string(),
            tenant: task.rec.tenant.clone(),
            user: task.rec.user.clone(),
            capability: task.rec.capability.clone(),
            code: status.code,
            attempts: task.rec.attempts,
            worker: worker.clone(),
            offered_us: task.rec.offered_us,
            finished_us: now_us(),
        });
    }
    let result = TaskResult {
        task_id: task_id.to_string(),
        output: output.to_vec(),
        status: Some(status),
        attempts: task.rec.attempts,
        worker_id: worker.clone(),
        route: String::new(),
    };
    task.rec.result = Some(result.clone());
    // The record keeps the result until the requester acknowledges it, so a
    // restart resends it rather than rerunning the task.
    task.rec.payload = Bytes::new();
    step.put_task(&task.rec);
    let requester = task.rec.requester.clone();
    if let Some(w) = st.sessions.get_mut(&worker) {
        w.in_flight.remove(task_id);
    }
    if let Some(r) = st.sessions.get_mut(&requester) {
        push_frame(r, step, wire::envelope(task_id), agent_response::Body::Result(result));
    }
}

pub(super) fn cancel_task(inner: &Inner, st: &mut State, task_id: &str, reason: &str, step: &mut Step) {
    let Some(task) = st.tasks.get(task_id) else {
        return;
    };
    if task.rec.state() == TaskState::Assigned {
        let worker = task.rec.worker.clone();
        if let Some(w) = st.sessions.get_mut(&worker) {
            push_frame(
                w,
                step,
                wire::envelope(task_id),
                agent_response::Body::Cancel(Cancel {
                    task_id: task_id.to_string(),
                    reason: reason.to_string(),
                    grace_ms: 0,
                }),
            );
        }
        inner.tools.cancel_task(task_id);
    }
    if task.rec.state() != TaskState::Done {
        let msg = if reason.is_empty() {
            "cancelled by the requester".to_string()
        } else {
            reason.to_string()
        };
        finish(inner, st, task_id, status(Code::Cancelled, msg), Bytes::new(), step);
    }
}

/// The agent said goodbye: cancel what it offered and forget the session.
pub(super) fn end_session(inner: &Inner, st: &mut State, sid: &str, step: &mut Step) {
    let offered: Vec<String> = st
        .tasks
        .values()
        .filter(|t| t.rec.requester == sid)
        .map(|t| t.rec.task_id.clone())
        .collect();
    for id in &offered {
        cancel_task(inner, st, id, "the requester ended its session", step);
    }
    let running: Vec<String> = st
        .sessions
        .get(sid)
        .map(|s| s.in_flight.iter().cloned().collect())
        .unwrap_or_default();
    for id in running {
        requeue(inner, st, &id, "the worker ended its session".into(), step);
    }
    forget_session(st, sid, step);
    dispatch(inner, st, step);
}

pub(super) fn forget_session(st: &mut State, sid: &str, step: &mut Step) {
    if let Some(s) = st.sessions.remove(sid) {
        for (seq, _) in s.outbox.pending() {
            step.ops.push(Op::Del {
                coll: coll::outbox(sid),
                key: seq_key(*seq),
            });
        }
        s.wake.notify_one();
    }
    let owned: Vec<String> = st
        .tasks
        .values()
        .filter(|t| t.rec.requester == sid)
        .map(|t| t.rec.task_id.clone())
        .collect();
    for id in owned {
        if let Some(t) = st.tasks.remove(&id) {
            if t.rec.state() == TaskState::Queued {
                st.queued = st.queued.saturating_sub(1);
            }
        }
        step.ops.push(Op::Del {
            coll: coll::tasks(sid),
            key: id,
        });
    }
    step.ops.push(Op::Del {
        coll: coll::SESSIONS.into(),
        key: sid.to_string(),
    });
}

/// Frames the agent acknowledged: a delivered result ends its task's life.
pub(super) fn on_acked(_inner: &Inner, st: &mut State, sid: &str, acked: Vec<(u64, Pending)>, step: &mut Step) {
    for (seq, p) in acked {
        step.ops.push(Op::Del {
            coll: coll::outbox(sid),
            key: seq_key(seq),
        });
        if let Some(agent_response::Body::Result(r)) = p.frame.body {
            if let Some(t) = st.tasks.remove(&r.task_id) {
                step.ops.push(Op::Del {
                    coll: coll::tasks(&t.rec.requester),
                    key: r.task_id,
                });
            }
            if let Some(s) = st.sessions.get_mut(sid) {
                s.outstanding = s.outstanding.saturating_sub(1);
            }
        }
    }
}

/// Assigns queued tasks to workers with room, least loaded first.
pub(super) fn dispatch(inner: &Inner, st: &mut State, step: &mut Step) {
    if st.queued == 0 {
        return;
    }
    let now = Instant::now();
    let caps: Vec<String> = st
        .lanes
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(c, _)| c.clone())
        .collect();
    for cap in caps {
        loop {
            let worker = st
                .sessions
                .values()
                .filter(|s| s.can_take(now) && s.meta.capabilities.contains(&cap))
                .min_by(|a, b| {
                    let la = a.in_flight.len() as f64 / f64::from(a.meta.max_in_flight.max(1));
                    let lb = b.in_flight.len() as f64 / f64::from(b.meta.max_in_flight.max(1));
                    la.total_cmp(&lb)
                })
                .map(|s| s.meta.session_id.clone());
            let Some(worker) = worker else { break };
            let Some(task_id) = next_queued(st, &cap, now) else {
                break;
            };
            let task = st.tasks.get_mut(&task_id).expect("next_queued checked");
            if task.rec.deadline_us > 0 && task.rec.deadline_us <= now_us() {
                st.queued = st.queued.saturating_sub(1);
                task.rec.set_state(TaskState::Assigned);
                finish(
                    inner,
                    st,
                    &task_id,
                    status(Code::DeadlineExceeded, "deadline passed while queued"),
                    Bytes::new(),
                    step,
                );
                continue;
            }
            st.queued = st.queued.saturating_sub(1);
            task.rec.set_state(TaskState::Assigned);
            task.rec.worker = worker.clone();
            task.rec.attempts += 1;
            step.put_task(&task.rec);
            if task.rec.attempts == 1 && task.rec.offered_us > 0 {
                inner
                    .metrics
                    .agent_dispatch
                    .observe((now_us() - task.rec.offered_us).max(0) as f64 / 1e6);
            }
            let rec = task.rec.clone();
            let w = st.sessions.get_mut(&worker).expect("chosen above");
            w.in_flight.insert(task_id.clone());
            let mut env = wire::envelope(&task_id);
            env.deadline_us = rec.deadline_us;
            env.traceparent = rec.traceparent.clone();
            env.idempotency_key = task_id.clone();
            push_frame(
                w,
                step,
                env,
                agent_response::Body::Assign(TaskAssign {
                    task_id,
                    capability: rec.capability,
                    payload: rec.payload.to_vec(),
                    priority: rec.priority as i32,
                    attempt: rec.attempts,
                    tenant: rec.tenant,
                    route: rec.requester,
                }),
            );
        }
    }
}

pub(super) fn next_queued(st: &mut State, cap: &str, now: Instant) -> Option<String> {
    let lanes = st.lanes.get_mut(cap)?;
    while let Some(id) = lanes.pop(now) {
        // Lanes are cleaned lazily: a cancelled or reassigned id may still sit there.
        if st.tasks.get(&id).is_some_and(|t| t.rec.state() == TaskState::Queued) {
            return Some(id);
        }
    }
    None
}
