//! One agent stream: the hello and attach, the reader loop that applies each frame,
//! and the writer task that sends frames once durable, with acks and heartbeats.

use std::{sync::Arc, time::Duration};

use lattice_proto::agent::{
    agent_message, agent_response, AgentMessage, AgentResponse, Heartbeat, Hello, ResumeResult,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use lattice_observability::{telemetry, OutcomeLabels};
use tracing::Instrument;

use crate::{
    agent_metrics::FrameLabels,
    session::Verdict,
    tools::CallContext,
    wire::{self, code_name, now_us},
};

use super::{
    machine::{Attach, Event},
    now,
    state::*,
    Inner, Orchestrator,
};

/// The tenant a stream's metadata names, and whether its hello must name the same.
pub(super) struct StreamTenant {
    pub tenant: String,
    pub bound: bool,
}

impl Orchestrator {
    pub(super) async fn attach(
        &self,
        hello: Hello,
        agent_id: String,
        tenant: String,
        user: String,
    ) -> Result<(String, u64), Status> {
        if hello.protocol_version != wire::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported (this orchestrator speaks {})",
                hello.protocol_version,
                wire::PROTOCOL_VERSION
            )));
        }
        let resume = hello.resume.clone().filter(|r| !r.session_id.is_empty());
        let mut result = ResumeResult::Fresh;
        if let Some(r) = &resume {
            let found = self
                .adopt(&r.session_id)
                .await
                .map_err(|e| Status::unavailable(format!("agent store: {e}")))?;
            result = if found {
                ResumeResult::Resumed
            } else {
                ResumeResult::Gap
            };
        }
        let outcome = match result {
            ResumeResult::Fresh => "fresh",
            ResumeResult::Resumed => "resumed",
            ResumeResult::Gap => "gap",
        };
        self.inner
            .metrics
            .agent_resumes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        let sid = match (&resume, result) {
            (Some(r), ResumeResult::Resumed) => r.session_id.clone(),
            _ => wire::new_id(),
        };
        let attach = Attach {
            sid: sid.clone(),
            result,
            agent_id,
            tenant,
            user,
            capabilities: hello.capabilities,
            max_in_flight: hello.max_in_flight,
            resume: resume.map(|r| (r.last_received_seq, r.running_task_ids)),
            heartbeat_ms: u32::try_from(self.inner.cfg.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
            orchestrator_id: self.inner.cfg.id.clone(),
        };
        let mut st = self.inner.state.lock();
        st.waker(&sid);
        let step = st.apply(Event::Attach(attach), now());
        let epoch = step.epoch.expect("an attach gives an epoch");
        self.inner.commit(&mut st, step);
        Ok((sid, epoch))
    }

    /// The stream's life after the Hello: read frames until the agent leaves, the
    /// stream breaks, heartbeats stop, or the orchestrator drains.
    pub(super) async fn serve_stream(
        self,
        mut inbound: Streaming<AgentMessage>,
        tx: mpsc::Sender<Result<AgentResponse, Status>>,
        tenant: StreamTenant,
        user: String,
    ) {
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await;
        let hello = match first {
            Err(_) => {
                let _ = tx.send(Err(Status::deadline_exceeded("no hello within 10 s"))).await;
                return;
            }
            Ok(Err(status)) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(msg))) => match msg.body {
                Some(agent_message::Body::Hello(h)) => (h, msg.agent_id),
                other => {
                    let kind = other.as_ref().map_or("an empty frame", wire::request_kind);
                    let _ = tx
                        .send(Err(Status::failed_precondition(format!(
                            "the first frame must be hello, got {kind}"
                        ))))
                        .await;
                    return;
                }
            },
        };
        let (hello, agent_id) = hello;
        let tenant = if hello.tenant.is_empty() || hello.tenant == tenant.tenant {
            tenant.tenant
        } else if tenant.bound {
            let _ = tx
                .send(Err(Status::permission_denied(format!(
                    "the hello names tenant '{}', but the stream is for tenant '{}': name the same tenant in both",
                    hello.tenant.chars().take(128).collect::<String>(),
                    tenant.tenant.chars().take(128).collect::<String>()
                ))))
                .await;
            return;
        } else {
            hello.tenant.clone()
        };
        // Subscribed before the attach: a reset after it ends this stream.
        let mut resets = self.inner.resets.subscribe();
        let (sid, epoch) = match self.attach(hello, agent_id, tenant, user).await {
            Ok(v) => v,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let writer = tokio::spawn(writer_task(self.inner.clone(), sid.clone(), epoch, tx.clone()));
        let miss = self.inner.cfg.heartbeat_interval * 3;
        let end: Option<Status> = loop {
            let next = tokio::select! {
                r = tokio::time::timeout(miss, inbound.message()) => r,
                () = self.inner.draining.cancelled() => break None,
                _ = resets.changed() => break Some(Status::unavailable(
                    "another replica took over this session while this one was unreachable; resume there",
                )),
            };
            match next {
                Err(_) => break Some(Status::unavailable("no frame within three heartbeat intervals")),
                Ok(Err(status)) => break Some(status),
                Ok(Ok(None)) => break None,
                Ok(Ok(Some(msg))) => {
                    if let Err(status) = self.handle(&sid, epoch, msg).await {
                        break Some(status);
                    }
                }
            }
        };
        if self.inner.draining.is_cancelled() {
            // Let the writer flush the Drain frame before the stream ends.
            let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        } else if let Some(status) = end {
            let _ = tx.send(Err(status)).await;
        }
        let mut st = self.inner.state.lock();
        let step = st.apply(Event::Detach { sid, epoch }, now());
        for sid in &step.wake {
            if let Some(w) = st.wakers.get(sid) {
                w.notify_one();
            }
        }
    }

    pub(super) async fn handle(&self, sid: &str, epoch: u64, msg: AgentMessage) -> Result<(), Status> {
        use agent_message::Body;
        let env = msg.env.unwrap_or_default();
        let Some(body) = msg.body else {
            return Err(Status::invalid_argument("frame without a body"));
        };
        self.inner
            .metrics
            .agent_frames
            .get_or_create(&FrameLabels {
                direction: "in",
                kind: wire::request_kind(&body),
            })
            .inc();
        let priority = u32::try_from(msg.priority).unwrap_or(0).min(5);
        if self.inner.draining.is_cancelled() {
            return Err(Status::unavailable("orchestrator is draining"));
        }
        if let (Body::Offer(o), Some(_)) = (&body, &self.inner.shared_wake) {
            // A retry of a task id from a new session (its caller lost the old one,
            // say with the replica it was on): the task may be held in the store
            // for a session no replica here has loaded. Load it, and the offer
            // finds the task instead of running it again.
            let known = self.inner.state.lock().tasks.contains_key(&o.task_id);
            if !known && !o.task_id.is_empty() {
                let holder = self
                    .inner
                    .store
                    .backend()
                    .get(crate::records::coll::TASK_HOLDERS, &o.task_id)
                    .await;
                if let Ok(Some(holder)) = holder {
                    let holder = String::from_utf8_lossy(&holder).into_owned();
                    if holder != sid {
                        let _ = self.adopt(&holder).await;
                    }
                }
            }
        }
        if let Body::Result(r) = &body {
            // The requester's session may not be loaded here yet (this replica took
            // over from another): load it first.
            // With shared dispatch the result is delivered to the route instead: a
            // session is held only by the replica its agent is attached to.
            let known = self.inner.state.lock().tasks.contains_key(&r.task_id);
            if !known && !r.route.is_empty() && self.inner.shared_wake.is_none() {
                let _ = self.adopt(&r.route).await;
            }
        }
        let mut st = self.inner.state.lock();
        if self.inner.draining.is_cancelled() {
            return Err(Status::unavailable("orchestrator is draining"));
        }
        let mut step = Step::default();
        let now = now();
        let Some(s) = st.sessions.get_mut(sid) else {
            return Err(Status::unavailable("session evicted"));
        };
        if s.attached != Some(epoch) {
            return Err(Status::aborted("a newer stream of this session took over"));
        }
        s.meta.last_active_us = env.sent_at_us;
        if env.ack_seq > 0 {
            let ack = Event::Acked {
                sid: sid.to_string(),
                ack_seq: env.ack_seq,
            };
            st.apply_into(ack, now, &mut step);
        }
        if !wire::is_reliable_request(&body) {
            let s = st.sessions.get_mut(sid).expect("checked above");
            match body {
                Body::Heartbeat(hb) => {
                    if hb.echo_sent_at_us > 0 {
                        s.rtt_us = u64::try_from(now_us() - hb.echo_sent_at_us).unwrap_or(0);
                        self.inner.metrics.agent_heartbeat_rtt.observe(s.rtt_us as f64 / 1e6);
                    }
                    s.last_echo_us = hb.sent_at_us;
                }
                Body::Credit(c) => {
                    let credit = Event::Credit {
                        sid: sid.to_string(),
                        max_in_flight: c.max_in_flight,
                    };
                    st.apply_into(credit, now, &mut step);
                }
                Body::Goodbye(_) => {
                    st.apply_into(Event::Goodbye { sid: sid.to_string() }, now, &mut step);
                    self.inner.commit(&mut st, step);
                    return Err(Status::ok("goodbye"));
                }
                Body::Hello(_) => return Err(Status::failed_precondition("hello sent twice on one stream")),
                Body::Error(e) => {
                    tracing::warn!(session = sid, code = e.code, message = %e.message, "agent reported an error")
                }
                _ => {}
            }
            self.inner.commit(&mut st, step);
            return Ok(());
        }
        let s = st.sessions.get_mut(sid).expect("checked above");
        // The window is a credit the client library honours (Welcome.max_in_flight).
        // After a crash the count here can run up to one window ahead of the
        // client's (acks whose deletes were not yet durable), so offers are refused
        // in-band only past twice the window; a requester that ignores refusals and
        // does not read its results has its stream ended past three windows (it
        // resends after resuming), so its session's memory stays bounded.
        if matches!(body, Body::Offer(_)) && s.outstanding >= 3 * self.inner.cfg.requester_window as usize {
            self.inner
                .metrics
                .agent_credit_waits
                .get_or_create(&OutcomeLabels {
                    outcome: "stream_ended",
                })
                .inc();
            return Err(Status::resource_exhausted(format!(
                "{} tasks outstanding, three times the window: read your results",
                s.outstanding
            )));
        }
        match s.inbox.check(env.seq_no, &env.msg_id, env.sent_at_us) {
            Verdict::New => {}
            Verdict::Duplicate => {
                self.inner
                    .metrics
                    .agent_dropped
                    .get_or_create(&OutcomeLabels { outcome: "duplicate" })
                    .inc();
                // Re-acknowledge so the agent frees its outbox; nothing runs again.
                // The high-water mark may have moved (a msg_id seen under another
                // seq): persist it before the ack goes out.
                step.put_session(s);
                step.wake.push(sid.to_string());
                let ticket = self.inner.commit(&mut st, step);
                if let Some(s) = st.sessions.get_mut(sid) {
                    s.in_ticket = ticket;
                }
                return Ok(());
            }
            Verdict::Skewed => {
                return Err(Status::invalid_argument(format!(
                    "frame {} sent more than 30 s in the future: check the agent's clock",
                    env.seq_no
                )))
            }
            Verdict::Gap { expected } => {
                return Err(Status::failed_precondition(format!(
                    "frame seq {} arrived, {expected} expected: frames are missing",
                    env.seq_no
                )))
            }
        }
        let seq = env.seq_no;
        match body {
            Body::Offer(offer) => {
                let traceparent = if offer.task_id.is_empty() || st.tasks.contains_key(&offer.task_id) {
                    // A resend: the machine ignores it, so no span either.
                    String::new()
                } else {
                    // The task's span continues the requester's trace; the
                    // assignment carries it on, so the worker's and the tool's
                    // spans hang under it.
                    let span = tracing::info_span!(
                        "agent.task",
                        task_id = %offer.task_id,
                        capability = %offer.capability,
                        priority,
                        trace_id = tracing::field::Empty,
                        span_id = tracing::field::Empty
                    );
                    telemetry::adopt(&span, telemetry::context_from_traceparent(&env.traceparent));
                    match telemetry::traceparent_of(&span) {
                        // Spans off: the requester's own context passes on, so the
                        // worker still joins its trace.
                        tp if tp.is_empty() => env.traceparent.clone(),
                        tp => tp,
                    }
                };
                let offer = Event::Offer {
                    sid: sid.to_string(),
                    deadline_us: env.deadline_us,
                    priority,
                    offer,
                    traceparent,
                };
                st.apply_into(offer, now, &mut step);
            }
            Body::Result(result) => {
                st.apply_into(
                    Event::Result {
                        sid: sid.to_string(),
                        result,
                    },
                    now,
                    &mut step,
                );
            }
            Body::Cancel(cancel) => {
                let cancel = Event::Cancel {
                    sid: sid.to_string(),
                    task_id: cancel.task_id,
                    reason: cancel.reason,
                };
                st.apply_into(cancel, now, &mut step);
            }
            Body::ToolCall(call) => {
                // A call made for a task this worker runs acts for the task's
                // tenant (its MCP servers, limits and idempotency cache), not for
                // the worker's own.
                let task_tenant = st
                    .tasks
                    .get(&env.correlation_id)
                    .filter(|t| t.worker() == Some(sid))
                    .map(|t| t.tenant.clone());
                let s = st.sessions.get_mut(sid).expect("checked above");
                s.incomplete.insert(seq);
                let ctx = CallContext {
                    tenant: task_tenant.unwrap_or_else(|| s.meta.tenant.clone()),
                    // Without a key the frame's msg_id is one: a resend after a crash
                    // is answered from the cache instead of running again.
                    idempotency_key: if env.idempotency_key.is_empty() {
                        env.msg_id.clone()
                    } else {
                        env.idempotency_key.clone()
                    },
                    task_id: env.correlation_id.clone(),
                    deadline_us: env.deadline_us,
                };
                let this = self.clone();
                let sid = sid.to_string();
                let span = tracing::info_span!(
                    "tool.call",
                    tool = %call.tool,
                    task_id = %ctx.task_id,
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty
                );
                telemetry::adopt(&span, telemetry::context_from_traceparent(&env.traceparent));
                tokio::spawn(
                    async move {
                        let result = this.inner.tools.call(&ctx, call).await;
                        this.complete(&sid, seq, &ctx.task_id, agent_response::Body::ToolResult(result));
                    }
                    .instrument(span),
                );
            }
            Body::MemoryOp(op) => {
                s.incomplete.insert(seq);
                let tenant = s.meta.tenant.clone();
                let idem = if env.idempotency_key.is_empty() {
                    env.msg_id.clone()
                } else {
                    env.idempotency_key.clone()
                };
                let this = self.clone();
                let sid = sid.to_string();
                let corr = env.correlation_id.clone();
                tokio::spawn(async move {
                    let kind = match op.op {
                        Some(lattice_proto::agent::memory_op::Op::Get(_)) => "get",
                        Some(lattice_proto::agent::memory_op::Op::Put(_)) => "put",
                        Some(lattice_proto::agent::memory_op::Op::Sync(_)) => "sync",
                        None => "none",
                    };
                    let result = this.inner.memory.handle(&tenant, op, &idem).await;
                    let outcome = code_name(wire::code_of(&result.status));
                    this.inner
                        .metrics
                        .memory_ops
                        .get_or_create(&crate::agent_metrics::MemoryLabels { op: kind, outcome })
                        .inc();
                    this.complete(&sid, seq, &corr, agent_response::Body::Memory(result));
                });
            }
            Body::Progress(mut p) => {
                let requester = st.tasks.get(&p.task_id).map(|t| t.requester.clone());
                // Advisory: dropped for a detached requester or a full control queue.
                if let Some(r) = requester
                    .and_then(|r| st.sessions.get_mut(&r))
                    .filter(|r| r.attached.is_some() && r.control.len() < 64)
                {
                    p.route.clear();
                    r.control.push_back(wire::response(
                        wire::envelope(&p.task_id),
                        agent_response::Body::Progress(p),
                    ));
                    step.wake.push(r.meta.session_id.clone());
                }
            }
            _ => {}
        }
        if let Some(s) = st.sessions.get(sid) {
            step.put_session(s);
            step.wake.push(sid.to_string());
        }
        let ticket = self.inner.commit(&mut st, step);
        if let Some(s) = st.sessions.get_mut(sid) {
            s.in_ticket = ticket;
        }
        Ok(())
    }

    /// An asynchronous op (tool call, memory op) finished: its answer joins the
    /// outbox and the acknowledged seq may advance past it.
    pub(super) fn complete(&self, sid: &str, seq: u64, correlation_id: &str, body: agent_response::Body) {
        if self.inner.draining.is_cancelled() {
            // The agent resends the request to the replica it moves to; the tool
            // cache or the memory op's idempotency key answers it there.
            return;
        }
        let mut st = self.inner.state.lock();
        if self.inner.draining.is_cancelled() {
            return;
        }
        if !st.sessions.contains_key(sid) {
            return;
        }
        let done = Event::Completed {
            sid: sid.to_string(),
            seq,
            correlation_id: correlation_id.to_string(),
            body,
        };
        let step = st.apply(done, now());
        let ticket = self.inner.commit(&mut st, step);
        if let Some(s) = st.sessions.get_mut(sid) {
            s.in_ticket = ticket;
        }
    }
}

/// Sends the session's frames once durable, its acks, and heartbeats.
async fn writer_task(inner: Arc<Inner>, sid: String, epoch: u64, tx: mpsc::Sender<Result<AgentResponse, Status>>) {
    let mut heartbeat = tokio::time::interval(inner.cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked_sent = 0u64;
    let resets = *inner.resets.borrow();
    let wake = {
        let mut st = inner.state.lock();
        if !st.sessions.contains_key(&sid) {
            return;
        }
        st.waker(&sid)
    };
    loop {
        let (control, frames, ack, ack_ticket) = {
            let mut st = inner.state.lock();
            let Some(s) = st.sessions.get_mut(&sid) else { return };
            if s.attached != Some(epoch) {
                return;
            }
            let control: Vec<AgentResponse> = s.control.drain(..).collect();
            let cursor = s.cursor;
            let frames: Vec<Pending> = s.outbox.after(cursor).take(512).map(|(_, p)| p.clone()).collect();
            if let Some(last) = frames.last() {
                s.cursor = last.frame.env.as_ref().map_or(cursor, |e| e.seq_no);
            }
            (control, frames, s.completed_hwm(), s.in_ticket)
        };
        if control.is_empty() && frames.is_empty() && ack <= acked_sent {
            tokio::select! {
                () = wake.notified() => continue,
                _ = heartbeat.tick() => {
                    let (echo, in_flight) = {
                        let st = inner.state.lock();
                        st.sessions.get(&sid).map_or((0, 0), |s| (s.last_echo_us, s.in_flight.len()))
                    };
                    let hb = Heartbeat { sent_at_us: now_us(), echo_sent_at_us: echo, in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX), ..Heartbeat::default() };
                    if tx.send(Ok(wire::response(wire::envelope(""), agent_response::Body::Heartbeat(hb)))).await.is_err() {
                        return;
                    }
                    continue;
                }
                () = tx.closed() => return,
            }
        }
        let wait_for = frames.iter().map(|p| p.ticket).max().unwrap_or(0).max(ack_ticket);
        inner.store.durable(wait_for).await;
        if *inner.resets.borrow() != resets {
            // A fence refused what these frames depended on.
            return;
        }
        for mut c in control {
            if let Some(env) = c.env.as_mut() {
                env.ack_seq = ack;
            }
            if tx.send(Ok(c)).await.is_err() {
                return;
            }
        }
        let any_frames = !frames.is_empty();
        for p in frames {
            let mut f = p.frame;
            if let Some(body) = &f.body {
                inner
                    .metrics
                    .agent_frames
                    .get_or_create(&FrameLabels {
                        direction: "out",
                        kind: wire::response_kind(body),
                    })
                    .inc();
            }
            if let Some(env) = f.env.as_mut() {
                env.ack_seq = ack;
                env.sent_at_us = now_us();
            }
            if tx.send(Ok(f)).await.is_err() {
                return;
            }
        }
        if !any_frames && ack > acked_sent {
            let mut env = wire::envelope("");
            env.ack_seq = ack;
            let frame = wire::response(env, agent_response::Body::Ack(lattice_proto::agent::Ack {}));
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        acked_sent = acked_sent.max(ack);
    }
}
