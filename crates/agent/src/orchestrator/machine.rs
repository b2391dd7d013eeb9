//! The routing state machine: every change an agent's frame, an attach or a sweep
//! makes to sessions, tasks and lanes, as `State::apply(event, now) -> Step`.
//!
//! Pure: it reads no clock (time arrives as [`Now`]), does no I/O, and knows no
//! async runtime, transport or metrics. What it decides comes back in the
//! [`Step`]: store ops (submitted by the shell as one group-commit ticket), frames
//! numbered into outboxes, sessions to wake, and [`Effect`]s the shell turns into
//! metrics, logs and tool cancellations. The table tests at the bottom drive it
//! with explicit instants.

use bytes::Bytes;
use lattice_proto::{
    agent::{
        agent_response, AgentResponse, Cancel, Envelope, ResumeResult, TaskAssign, TaskOffer, TaskResult, Welcome,
    },
    google::rpc::Status,
};
use prost::Message;

use crate::{
    records::{coll, SessionMeta, TaskRecord},
    store::{seq_key, Fence, Op},
    wire::new_msg_id,
};

use super::{
    state::{Breaker, Effect, Entry, Now, Pending, Phase, Session, State, Step, Task},
    TaskOutcome,
};

/// The gRPC status codes the machine answers with (google.rpc.Code numbers).
pub(super) mod code {
    pub const OK: i32 = 0;
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// A stream attaching to a session (new, or resumed after a cut).
#[derive(Debug, Clone)]
pub(super) struct Attach {
    /// The resumed session's id, or a fresh one chosen by the caller.
    pub(super) sid: String,
    pub(super) result: ResumeResult,
    pub(super) agent_id: String,
    pub(super) tenant: String,
    /// The user the gateway verified on the stream (empty without one).
    pub(super) user: String,
    pub(super) capabilities: Vec<String>,
    pub(super) max_in_flight: u32,
    /// From `Hello.resume`: the last seq the agent processed and the tasks it
    /// still runs.
    pub(super) resume: Option<(u64, Vec<String>)>,
    /// Echoed in the Welcome frame.
    pub(super) heartbeat_ms: u32,
    pub(super) orchestrator_id: String,
}

#[derive(Debug, Clone)]
pub(super) enum Event {
    Attach(Attach),
    /// The stream of this epoch ended; the session waits for a resume.
    Detach {
        sid: String,
        epoch: u64,
    },
    Offer {
        sid: String,
        deadline_us: i64,
        priority: u32,
        offer: TaskOffer,
        /// The trace context the task (and its assignment) carries.
        traceparent: String,
    },
    Result {
        sid: String,
        result: TaskResult,
    },
    /// The requester `sid` cancels one of its tasks.
    Cancel {
        sid: String,
        task_id: String,
        reason: String,
    },
    Credit {
        sid: String,
        max_in_flight: u32,
    },
    Goodbye {
        sid: String,
    },
    /// The agent acknowledged every frame up to `ack_seq`.
    Acked {
        sid: String,
        ack_seq: u64,
    },
    /// An asynchronous op (tool call, memory op) received as `seq` finished.
    Completed {
        sid: String,
        seq: u64,
        correlation_id: String,
        body: agent_response::Body,
    },
    /// Timers: vanished workers' tasks, queued deadlines, idle sessions.
    Sweep,
    Dispatch,
    /// An entry this replica took from the shared queue (new, or taken over from a
    /// replica that stopped renewing it).
    Take(Box<Take>),
    /// A result another replica delivered to the route's result stream.
    Delivered {
        route: String,
        entry: String,
        result: TaskResult,
    },
    /// The requester (on some replica) cancelled this shared task.
    Revoked {
        task_id: String,
    },
}

/// An entry taken from the shared queue.
#[derive(Debug, Clone)]
pub(super) struct Take {
    pub(super) priority: u32,
    pub(super) entry: String,
    /// Times the entry was handed out, this time included: the attempts so far.
    pub(super) deliveries: u32,
    pub(super) record: TaskRecord,
}

fn status(code: i32, message: impl Into<String>) -> Status {
    Status {
        code,
        message: message.into(),
        details: Vec::new(),
    }
}

fn envelope(correlation_id: &str, now: Now) -> Envelope {
    Envelope {
        msg_id: new_msg_id(),
        sent_at_us: now.wall_us,
        correlation_id: correlation_id.to_string(),
        ..Envelope::default()
    }
}

impl State {
    /// Applies one event and returns what it wrote.
    pub(super) fn apply(&mut self, event: Event, now: Now) -> Step {
        let mut step = Step::default();
        self.apply_into(event, now, &mut step);
        step
    }

    /// Applies one event, adding to `step` (several events under one lock hold
    /// commit as one ticket).
    pub(super) fn apply_into(&mut self, event: Event, now: Now, step: &mut Step) {
        match event {
            Event::Attach(a) => self.attach(a, now, step),
            Event::Detach { sid, epoch } => {
                if let Some(s) = self.sessions.get_mut(&sid).filter(|s| s.attached == Some(epoch)) {
                    s.attached = None;
                    s.detached_since = Some(now.at);
                    step.wake.push(sid);
                }
            }
            Event::Offer {
                sid,
                deadline_us,
                priority,
                offer,
                traceparent,
            } => self.offer(&sid, deadline_us, priority, offer, traceparent, now, step),
            Event::Result { sid, result } => self.result(&sid, result, now, step),
            Event::Cancel { sid, task_id, reason } => {
                if self.tasks.get(&task_id).is_some_and(|t| t.requester == sid) {
                    self.cancel(&task_id, &reason, now, step);
                }
            }
            Event::Credit { sid, max_in_flight } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.meta.max_in_flight = max_in_flight.max(1);
                    step.put_session(s);
                    self.dispatch(now, step);
                }
            }
            Event::Goodbye { sid } => self.end_session(&sid, now, step),
            Event::Acked { sid, ack_seq } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    let acked = s.outbox.ack(ack_seq);
                    self.acked(&sid, acked, step);
                }
            }
            Event::Completed {
                sid,
                seq,
                correlation_id,
                body,
            } => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.incomplete.remove(&seq);
                    push_frame(s, step, envelope(&correlation_id, now), body);
                    step.put_session(s);
                }
            }
            Event::Sweep => self.sweep(now, step),
            Event::Dispatch => self.dispatch(now, step),
            Event::Take(take) => self.take(*take, now, step),
            Event::Revoked { task_id } => self.revoked(task_id, now, step),
            Event::Delivered { route, entry, result } => self.delivered(route, entry, result, now, step),
        }
    }

    /// A task from the shared queue joins this replica's lanes: the requester's
    /// own copy when it is held here, else a remote one (never persisted here).
    fn take(&mut self, take: Take, now: Now, step: &mut Step) {
        let entry = Entry {
            priority: take.priority,
            id: take.entry,
        };
        let rec = take.record;
        let retire = |step: &mut Step, entry: Entry| {
            step.ops.push(Op::Retire {
                capability: rec.capability.clone(),
                priority: entry.priority,
                entry: entry.id,
            });
        };
        let attempts = take.deliveries.saturating_sub(1);
        if self.revoked.contains(&rec.task_id) && !self.tasks.contains_key(&rec.task_id) {
            // Cancelled by its requester before anyone took it.
            retire(step, entry);
            return;
        }
        if let Some(task) = self.tasks.get_mut(&rec.task_id) {
            match &task.phase {
                // Answered already (a duplicate entry, or a result that beat it).
                Phase::Done { .. } => retire(step, entry),
                Phase::Shared => {
                    task.phase = Phase::Queued;
                    task.attempts = task.attempts.max(attempts);
                    task.entry = Some(entry);
                    step.put_task(task);
                    let (cap, prio, id) = (task.capability.clone(), task.priority, task.id.clone());
                    self.enqueue(&cap, prio, id, now.at);
                }
                // Held here already: the same entry taken over from ourselves, or a
                // second entry for it (an offer published twice).
                Phase::Queued | Phase::Assigned { .. } => {
                    if task.entry.as_ref().is_some_and(|e| e.id != entry.id) {
                        retire(step, entry);
                    } else {
                        task.entry = Some(entry);
                    }
                }
            }
            self.dispatch(now, step);
            return;
        }
        if self.sessions.get(&rec.requester).is_some_and(|s| s.attached.is_some()) {
            // The requester is attached here and holds no such task: it has its
            // result already (an entry published twice, or taken over after the
            // task finished). Running it again would answer twice.
            retire(step, entry);
            return;
        }
        let mut task = Task::from_record(rec, None);
        task.attempts = attempts;
        task.remote = true;
        task.entry = Some(entry);
        let id = task.id.clone();
        if attempts >= task.max_attempts {
            // Handed out as often as it may run (each replica that took it stopped
            // renewing it): dead-letter it, as after a worker's last failure.
            task.phase = Phase::Assigned {
                worker: String::new(),
                orphaned_since: None,
            };
            self.tasks.insert(id.clone(), task);
            self.requeue(&id, "the replicas that took it stopped renewing it".into(), now, step);
            return;
        }
        task.phase = Phase::Queued;
        self.enqueue(&task.capability, task.priority, id.clone(), now.at);
        self.tasks.insert(id, task);
        self.dispatch(now, step);
    }

    /// A result from another replica: the first result wins, as from a worker.
    fn delivered(&mut self, route: String, entry: String, result: TaskResult, now: Now, step: &mut Step) {
        step.ops.push(Op::Delivered { route, entry });
        let task_id = result.task_id.clone();
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        if task.is_done() {
            return;
        }
        if task.phase == Phase::Shared {
            task.phase = Phase::Assigned {
                worker: result.worker_id.clone(),
                orphaned_since: None,
            };
            task.attempts = task.attempts.max(result.attempts);
        }
        let status = result.status.unwrap_or_else(|| status(code::OK, ""));
        self.finish(&task_id, status, Bytes::from(result.output), now, step);
        self.dispatch(now, step);
    }

    fn attach(&mut self, a: Attach, now: Now, step: &mut Step) {
        let sid = a.sid;
        if a.result != ResumeResult::Resumed || !self.sessions.contains_key(&sid) {
            let meta = SessionMeta {
                session_id: sid.clone(),
                ..SessionMeta::default()
            };
            self.sessions
                .insert(sid.clone(), Session::new(meta, self.rules.dedupe_window, now.at));
        }
        let window = self.rules.requester_window;
        let s = self.sessions.get_mut(&sid).expect("inserted above");
        s.meta.epoch += 1;
        let epoch = s.meta.epoch;
        s.attached = Some(epoch);
        s.detached_since = None;
        s.cursor = 0;
        s.control.clear();
        s.meta.agent_id = a.agent_id;
        s.meta.tenant = a.tenant;
        s.meta.user = a.user;
        s.meta.capabilities = a.capabilities;
        s.meta.max_in_flight = a.max_in_flight.max(1);
        s.meta.last_active_us = now.wall_us;
        let resumed_acks = a
            .resume
            .as_ref()
            .map(|(last, _)| s.outbox.ack(*last))
            .unwrap_or_default();
        step.effects.push(Effect::Resent(s.outbox.len()));
        s.control.push_back(AgentResponse {
            env: Some(envelope("", now)),
            body: Some(agent_response::Body::Welcome(Welcome {
                session_id: sid.clone(),
                epoch,
                result: a.result as i32,
                last_received_seq: s.completed_hwm(),
                heartbeat_interval_ms: a.heartbeat_ms,
                max_in_flight: window,
                resume_token: sid.clone().into_bytes(),
                orchestrator_id: a.orchestrator_id,
            })),
        });
        step.put_session(s);
        step.wake.push(sid.clone());
        // A worker that kept running tasks through an orchestrator restart keeps them.
        for id in a.resume.map(|(_, running)| running).unwrap_or_default() {
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            if let Phase::Assigned { worker, orphaned_since } = &mut t.phase {
                let previous = std::mem::replace(worker, sid.clone());
                *orphaned_since = None;
                if let Some(p) = self.sessions.get_mut(&previous) {
                    p.in_flight.remove(&id);
                }
                self.sessions.get_mut(&sid).expect("present").in_flight.insert(id);
            }
        }
        // Tasks assigned to this worker before it went away are its again.
        self.reclaim(&sid);
        // What the agent says it received is acknowledged like any ack: a result
        // it got just before the cut ends its task's life here too.
        self.acked(&sid, resumed_acks, step);
        self.dispatch(now, step);
        step.epoch = Some(epoch);
        step.fences.push(Fence::claim(&sid, epoch));
    }

    /// Marks the tasks assigned to `sid` as its in-flight work again (it attached,
    /// or its session was loaded here).
    pub(super) fn reclaim(&mut self, sid: &str) {
        let mut mine = Vec::new();
        for t in self.tasks.values_mut() {
            if let Phase::Assigned { worker, orphaned_since } = &mut t.phase {
                if worker == sid {
                    *orphaned_since = None;
                    mine.push(t.id.clone());
                }
            }
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            s.in_flight.extend(mine);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn offer(
        &mut self,
        sid: &str,
        deadline_us: i64,
        priority: u32,
        offer: TaskOffer,
        traceparent: String,
        now: Now,
        step: &mut Step,
    ) {
        if offer.task_id.is_empty() {
            // A nameless task cannot be tracked.
            return;
        }
        if self.tasks.contains_key(&offer.task_id) {
            // A resend of a task we hold, or a retry from a new session.
            self.retake(sid, &offer.task_id, now, step);
            return;
        }
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let task = Task {
            id: offer.task_id,
            requester: sid.to_string(),
            capability: offer.capability,
            payload: Bytes::from(offer.payload),
            priority: priority.min(5),
            deadline_us,
            attempts: 0,
            max_attempts: if offer.max_attempts > 0 {
                offer.max_attempts
            } else {
                self.rules.max_attempts
            },
            tenant: s.meta.tenant.clone(),
            user: s.meta.user.clone(),
            traceparent,
            offered_us: now.wall_us,
            phase: Phase::Queued,
            route: sid.to_string(),
            entry: None,
            remote: false,
        };
        s.outstanding += 1;
        let window = self.rules.requester_window as usize;
        let refusal = if s.outstanding > 2 * window {
            Some(status(
                code::RESOURCE_EXHAUSTED,
                format!(
                    "{} tasks outstanding, the window is {window}: wait for results",
                    s.outstanding - 1
                ),
            ))
        } else if self.queued >= self.rules.max_queued {
            Some(status(
                code::RESOURCE_EXHAUSTED,
                format!("{} tasks queued, the limit: retry later", self.queued),
            ))
        } else if deadline_us > 0 && deadline_us <= now.wall_us {
            Some(status(
                code::DEADLINE_EXCEEDED,
                "deadline passed before the task was queued",
            ))
        } else {
            None
        };
        let id = task.id.clone();
        if let Some(refusal) = refusal {
            if refusal.code == code::RESOURCE_EXHAUSTED {
                step.effects.push(Effect::Refused);
            }
            // Held (finished) until the requester acknowledges the answer, so a
            // resend of the offer is recognised.
            self.tasks.insert(
                id.clone(),
                Task {
                    phase: Phase::Assigned {
                        worker: String::new(),
                        orphaned_since: None,
                    },
                    ..task
                },
            );
            self.finish(&id, refusal, Bytes::new(), now, step);
            return;
        }
        if self.rules.shared {
            let task = Task {
                phase: Phase::Shared,
                ..task
            };
            step.put_task(&task);
            step.ops.push(Op::Publish {
                capability: task.capability.clone(),
                priority: task.priority,
                record: Bytes::from(task.to_record().encode_to_vec()),
            });
            self.tasks.insert(id, task);
            return;
        }
        step.put_task(&task);
        self.enqueue(&task.capability, task.priority, id.clone(), now.at);
        self.tasks.insert(id, task);
        self.dispatch(now, step);
    }

    /// An offer of a task held for another session of the same tenant and user: the
    /// caller lost its session (its process restarted, or a resume found a gap) and
    /// retried with the same task id. The task follows the caller: its result goes to
    /// the new session now if it has one, else when it finishes; it does not run
    /// again. A resend on the same session, or an id another caller holds, changes
    /// nothing.
    fn retake(&mut self, sid: &str, task_id: &str, now: Now, step: &mut Step) {
        let (Some(task), Some(s)) = (self.tasks.get(task_id), self.sessions.get(sid)) else {
            return;
        };
        if task.requester == sid || task.tenant != s.meta.tenant || task.user != s.meta.user {
            return;
        }
        let previous = task.requester.clone();
        step.ops.push(Op::Del {
            coll: coll::tasks(&previous),
            key: task_id.to_string(),
        });
        let task = self.tasks.get_mut(task_id).expect("checked above");
        task.requester = sid.to_string();
        // Its requester is here now: the record is this replica's to keep.
        task.remote = false;
        step.put_task(task);
        let result = match &task.phase {
            Phase::Done { result } => Some(result.clone()),
            _ => None,
        };
        if let Some(p) = self.sessions.get_mut(&previous) {
            p.outstanding = p.outstanding.saturating_sub(1);
        }
        let s = self.sessions.get_mut(sid).expect("checked above");
        s.outstanding += 1;
        if let Some(result) = result {
            push_frame(s, step, envelope(task_id, now), agent_response::Body::Result(result));
        }
    }

    fn result(&mut self, sid: &str, result: TaskResult, now: Now, step: &mut Step) {
        let task_id = result.task_id.clone();
        if let Some(w) = self.sessions.get_mut(sid) {
            w.in_flight.remove(&task_id);
        }
        let code = result.status.as_ref().map_or(code::OK, |s| s.code);
        let retryable = matches!(code, code::UNAVAILABLE | code::INTERNAL | code::UNKNOWN | code::ABORTED);
        match self.tasks.get(&task_id) {
            None if self.rules.shared && !retryable && !result.route.is_empty() => {
                // A task this replica does not hold (it took the entry before a
                // restart, or the worker resumed here from another replica): the
                // answer goes to the requester's route all the same, where the
                // first result wins. A retryable failure is dropped: the entry
                // lapses and runs again.
                let result = TaskResult {
                    worker_id: sid.to_string(),
                    ..result
                };
                step.ops.push(Op::Deliver {
                    route: result.route.clone(),
                    result: Bytes::from(result.encode_to_vec()),
                });
                return;
            }
            // Unknown, or finished: the first result won.
            None => return,
            Some(t) if t.is_done() => return,
            Some(_) => {}
        }
        if let Some(w) = self.sessions.get_mut(sid) {
            if retryable {
                w.breaker.failures += 1;
                if w.breaker.failures >= self.rules.breaker_failures {
                    w.breaker.open_until = Some(now.at + self.rules.breaker_cooldown);
                    step.effects.push(Effect::BreakerOpened {
                        worker: sid.to_string(),
                    });
                }
            } else {
                w.breaker = Breaker::default();
            }
        }
        if retryable {
            let why = result.status.map(|s| s.message).unwrap_or_default();
            self.requeue(&task_id, why, now, step);
        } else {
            let status = result.status.unwrap_or_else(|| status(code::OK, ""));
            self.finish(&task_id, status, Bytes::from(result.output), now, step);
        }
        self.dispatch(now, step);
    }

    /// Puts an assigned task back in its lane, or dead-letters it after its last
    /// attempt.
    fn requeue(&mut self, task_id: &str, why: String, now: Now, step: &mut Step) {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        // Only an assigned task goes back: a queued or finished one is where it
        // belongs (a late failure from a worker presumed dead must not queue it twice).
        let Some(worker) = task.worker().map(str::to_string) else {
            return;
        };
        if let Some(w) = self.sessions.get_mut(&worker) {
            w.in_flight.remove(task_id);
        }
        if task.attempts >= task.max_attempts {
            step.ops.push(Op::Put {
                coll: coll::DEAD_LETTER.into(),
                key: task_id.to_string(),
                val: Bytes::from(task.to_record().encode_to_vec()),
            });
            let attempts = task.attempts;
            let msg = format!("dead-lettered after {attempts} attempts; last failure: {why}");
            step.effects.push(Effect::DeadLettered {
                task_id: task_id.to_string(),
                attempts,
                why,
            });
            self.finish(task_id, status(code::ABORTED, msg), Bytes::new(), now, step);
            return;
        }
        task.phase = Phase::Queued;
        step.put_task(task);
        let (cap, prio) = (task.capability.clone(), task.priority);
        self.enqueue(&cap, prio, task_id.to_string(), now.at);
    }

    /// Records a task's outcome and queues the result for its requester.
    fn finish(&mut self, task_id: &str, status: Status, output: Bytes, now: Now, step: &mut Step) {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        if task.is_done() {
            return;
        }
        let took_us = if task.offered_us > 0 {
            (now.wall_us - task.offered_us).max(0)
        } else {
            0
        };
        step.effects.push(Effect::Finished {
            code: status.code,
            took_us,
        });
        if task.is_queued() {
            self.queued = self.queued.saturating_sub(1);
        }
        let worker = task.worker().unwrap_or_default().to_string();
        step.effects.push(Effect::Outcome(TaskOutcome {
            task_id: task_id.to_string(),
            tenant: task.tenant.clone(),
            user: task.user.clone(),
            capability: task.capability.clone(),
            code: status.code,
            attempts: task.attempts,
            worker: worker.clone(),
            offered_us: task.offered_us,
            finished_us: now.wall_us,
        }));
        let result = TaskResult {
            task_id: task_id.to_string(),
            output: output.to_vec(),
            status: Some(status),
            attempts: task.attempts,
            worker_id: worker.clone(),
            route: String::new(),
        };
        task.phase = Phase::Done { result: result.clone() };
        // The record keeps the result until the requester acknowledges it, so a
        // restart resends it rather than rerunning the task.
        task.payload = Bytes::new();
        step.put_task(task);
        if let Some(entry) = task.entry.take() {
            step.ops.push(Op::Retire {
                capability: task.capability.clone(),
                priority: entry.priority,
                entry: entry.id,
            });
        }
        let requester = task.requester.clone();
        let remote = task.remote;
        let attached_here = self.sessions.get(&requester).is_some_and(|r| r.attached.is_some());
        if remote || (self.rules.shared && !attached_here) {
            // The requester's stream is on another replica (or none yet): the
            // result goes where whichever replica holds it reads.
            step.ops.push(Op::Deliver {
                route: task.route.clone(),
                result: Bytes::from(result.encode_to_vec()),
            });
        }
        if let Some(w) = self.sessions.get_mut(&worker) {
            w.in_flight.remove(task_id);
        }
        if remote {
            self.tasks.remove(task_id);
            return;
        }
        if let Some(r) = self.sessions.get_mut(&requester) {
            push_frame(r, step, envelope(task_id, now), agent_response::Body::Result(result));
        }
    }

    /// A shared task its requester cancelled on another replica: stop it here if it
    /// runs or waits here (the requester has its answer already), else remember it
    /// so an entry of it taken later is not run.
    fn revoked(&mut self, task_id: String, now: Now, step: &mut Step) {
        let Some(task) = self.tasks.get(&task_id) else {
            self.revoked.insert(task_id);
            return;
        };
        if !task.remote || task.is_done() {
            // Its requester is here (this replica answered the cancel), or done.
            return;
        }
        if let Some(worker) = task.worker().map(str::to_string) {
            if let Some(w) = self.sessions.get_mut(&worker) {
                w.in_flight.remove(&task_id);
                push_frame(
                    w,
                    step,
                    envelope(&task_id, now),
                    agent_response::Body::Cancel(Cancel {
                        task_id: task_id.clone(),
                        reason: "cancelled by the requester".into(),
                        grace_ms: 0,
                    }),
                );
            }
            step.effects.push(Effect::CancelTools {
                task_id: task_id.clone(),
            });
        }
        let task = self.tasks.remove(&task_id).expect("checked above");
        if task.is_queued() {
            self.queued = self.queued.saturating_sub(1);
        }
        if let Some(entry) = task.entry {
            step.ops.push(Op::Retire {
                capability: task.capability,
                priority: entry.priority,
                entry: entry.id,
            });
        }
        self.dispatch(now, step);
    }

    fn cancel(&mut self, task_id: &str, reason: &str, now: Now, step: &mut Step) {
        let Some(task) = self.tasks.get(task_id) else { return };
        if task.phase == Phase::Shared {
            // Published, and perhaps running on another replica: tell them all.
            step.ops.push(Op::Revoke {
                task_id: task_id.to_string(),
            });
        }
        if let Some(worker) = task.worker() {
            if let Some(w) = self.sessions.get_mut(worker) {
                push_frame(
                    w,
                    step,
                    envelope(task_id, now),
                    agent_response::Body::Cancel(Cancel {
                        task_id: task_id.to_string(),
                        reason: reason.to_string(),
                        grace_ms: 0,
                    }),
                );
            }
            step.effects.push(Effect::CancelTools {
                task_id: task_id.to_string(),
            });
        }
        let msg = if reason.is_empty() {
            "cancelled by the requester"
        } else {
            reason
        };
        self.finish(task_id, status(code::CANCELLED, msg), Bytes::new(), now, step);
    }

    /// The agent said goodbye (or stayed away too long): cancel what it offered,
    /// requeue what it ran, and forget the session.
    fn end_session(&mut self, sid: &str, now: Now, step: &mut Step) {
        let mut offered: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.requester == sid)
            .map(|t| t.id.clone())
            .collect();
        offered.sort_unstable();
        for id in &offered {
            self.cancel(id, "the requester ended its session", now, step);
        }
        let mut running: Vec<String> = self
            .sessions
            .get(sid)
            .map(|s| s.in_flight.iter().cloned().collect())
            .unwrap_or_default();
        running.sort_unstable();
        for id in running {
            self.requeue(&id, "the worker ended its session".into(), now, step);
        }
        self.forget_session(sid, step);
        self.dispatch(now, step);
    }

    fn forget_session(&mut self, sid: &str, step: &mut Step) {
        if let Some(s) = self.sessions.remove(sid) {
            // Only the owner forgets a session: a replica that lost it to another
            // must not delete what the owner keeps.
            step.fences.push(Fence::write(sid, s.meta.epoch));
            for (seq, _) in s.outbox.pending() {
                step.ops.push(Op::Del {
                    coll: coll::outbox(sid),
                    key: seq_key(*seq),
                });
            }
            // Its writer (if any) wakes to find the session gone and ends.
            step.wake.push(sid.to_string());
        }
        let owned: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.requester == sid)
            .map(|t| t.id.clone())
            .collect();
        for id in owned {
            if self.tasks.remove(&id).is_some_and(|t| t.is_queued()) {
                self.queued = self.queued.saturating_sub(1);
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
    fn acked(&mut self, sid: &str, acked: Vec<(u64, Pending)>, step: &mut Step) {
        for (seq, p) in acked {
            step.ops.push(Op::Del {
                coll: coll::outbox(sid),
                key: seq_key(seq),
            });
            if let Some(agent_response::Body::Result(r)) = p.frame.body {
                // Only the session the task belongs to ends it: one retaken by a
                // retry waits for its new requester's acknowledgement.
                if self.tasks.get(&r.task_id).is_some_and(|t| t.requester == sid) {
                    self.tasks.remove(&r.task_id);
                    step.ops.push(Op::Del {
                        coll: coll::tasks(sid),
                        key: r.task_id,
                    });
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.outstanding = s.outstanding.saturating_sub(1);
                    }
                }
            }
        }
    }

    fn sweep(&mut self, now: Now, step: &mut Step) {
        let reassign_after = self.rules.reassign_after;
        let gone_since =
            |t: Option<std::time::Instant>| t.is_some_and(|t| now.at.saturating_duration_since(t) >= reassign_after);
        let mut gone: Vec<(String, String)> = self
            .sessions
            .values()
            .filter(|s| gone_since(s.detached_since))
            .flat_map(|s| s.in_flight.iter().map(|id| (s.meta.session_id.clone(), id.clone())))
            .collect();
        gone.extend(self.tasks.values().filter_map(|t| match &t.phase {
            Phase::Assigned { worker, orphaned_since } if gone_since(*orphaned_since) => {
                Some((worker.clone(), t.id.clone()))
            }
            _ => None,
        }));
        // Sorted, so a sweep's frames do not depend on hash order.
        gone.sort_unstable();
        for (worker, id) in gone {
            // Only if the task is still that worker's; another may have taken it.
            if self.tasks.get(&id).and_then(Task::worker) == Some(worker.as_str()) {
                // The worker may have resumed on another replica with the task:
                // only while this replica still owns it may the task move.
                if let Some(w) = self.sessions.get(&worker) {
                    step.fences.push(Fence::write(&worker, w.meta.epoch));
                }
                self.requeue(&id, "its worker disconnected".into(), now, step);
            } else if let Some(w) = self.sessions.get_mut(&worker) {
                w.in_flight.remove(&id);
            }
        }
        let mut expired: Vec<String> = self
            .tasks
            .values()
            .filter(|t| {
                (t.is_queued() || t.phase == Phase::Shared) && t.deadline_us > 0 && t.deadline_us <= now.wall_us
            })
            .map(|t| t.id.clone())
            .collect();
        expired.sort_unstable();
        for id in expired {
            self.finish(
                &id,
                status(code::DEADLINE_EXCEEDED, "deadline passed while queued"),
                Bytes::new(),
                now,
                step,
            );
        }
        let idle_after = self.rules.session_idle_timeout;
        let mut idle: Vec<String> = self
            .sessions
            .values()
            .filter(|s| {
                s.detached_since
                    .is_some_and(|t| now.at.saturating_duration_since(t) >= idle_after)
            })
            .map(|s| s.meta.session_id.clone())
            .collect();
        idle.sort_unstable();
        for sid in idle {
            step.effects.push(Effect::Evicted { session: sid.clone() });
            self.end_session(&sid, now, step);
        }
        // Lanes are cleaned lazily on pop; without workers for a capability, churn
        // (offers cancelled or expired while queued) would grow them unbounded.
        let total: usize = self.lanes.values().map(crate::lanes::Lanes::len).sum();
        if total > 2 * self.queued + 1024 {
            let tasks = &self.tasks;
            for lane in self.lanes.values_mut() {
                lane.retain(|id| tasks.get(id).is_some_and(Task::is_queued));
            }
        }
        self.dispatch(now, step);
    }

    /// Assigns queued tasks to workers with room, least loaded first.
    fn dispatch(&mut self, now: Now, step: &mut Step) {
        if self.queued == 0 {
            return;
        }
        let caps: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(c, _)| c.clone())
            .collect();
        for cap in caps {
            loop {
                let worker = self
                    .sessions
                    .values()
                    .filter(|s| s.can_take(now.at) && s.meta.capabilities.contains(&cap))
                    // Ties go to the lower id, so dispatch does not depend on hash order.
                    .min_by(|a, b| {
                        a.load()
                            .total_cmp(&b.load())
                            .then_with(|| a.meta.session_id.cmp(&b.meta.session_id))
                    })
                    .map(|s| s.meta.session_id.clone());
                let Some(worker) = worker else { break };
                let Some(task_id) = self.next_queued(&cap, now) else {
                    break;
                };
                let task = self.tasks.get_mut(&task_id).expect("next_queued checked");
                self.queued = self.queued.saturating_sub(1);
                if task.deadline_us > 0 && task.deadline_us <= now.wall_us {
                    // Not queued any more: finish must not count it out twice.
                    task.phase = Phase::Assigned {
                        worker: String::new(),
                        orphaned_since: None,
                    };
                    self.finish(
                        &task_id,
                        status(code::DEADLINE_EXCEEDED, "deadline passed while queued"),
                        Bytes::new(),
                        now,
                        step,
                    );
                    continue;
                }
                task.phase = Phase::Assigned {
                    worker: worker.clone(),
                    orphaned_since: None,
                };
                task.attempts += 1;
                step.put_task(task);
                if task.attempts == 1 && task.offered_us > 0 {
                    step.effects.push(Effect::Dispatched {
                        waited_us: (now.wall_us - task.offered_us).max(0),
                    });
                }
                let mut env = envelope(&task_id, now);
                env.deadline_us = task.deadline_us;
                env.traceparent = task.traceparent.clone();
                env.idempotency_key = task_id.clone();
                let assign = TaskAssign {
                    task_id: task_id.clone(),
                    capability: task.capability.clone(),
                    payload: task.payload.to_vec(),
                    priority: task.priority as i32,
                    attempt: task.attempts,
                    tenant: task.tenant.clone(),
                    route: task.requester.clone(),
                };
                let w = self.sessions.get_mut(&worker).expect("chosen above");
                w.in_flight.insert(task_id);
                push_frame(w, step, env, agent_response::Body::Assign(assign));
            }
        }
    }

    fn next_queued(&mut self, cap: &str, now: Now) -> Option<String> {
        let lanes = self.lanes.get_mut(cap)?;
        while let Some(id) = lanes.pop(now.at) {
            // Lanes are cleaned lazily: a cancelled or reassigned id may still sit there.
            if self.tasks.get(&id).is_some_and(Task::is_queued) {
                return Some(id);
            }
        }
        None
    }
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

#[cfg(test)]
mod tests {
    //! Table tests: each case is a script of events at explicit instants and the
    //! tasks' phases and frames it must leave. Time is whatever the script says.

    use std::{
        collections::HashMap,
        time::{Duration, Instant},
    };

    use lattice_proto::agent::{agent_response::Body, ResumeResult, TaskOffer, TaskResult};

    use super::{code, Attach, Event};
    use crate::{
        orchestrator::state::{Effect, Now, Phase, Rules, State},
        records::coll,
        store::Op,
    };

    fn rules() -> Rules {
        Rules {
            max_attempts: 2,
            max_queued: 100,
            requester_window: 4,
            dedupe_window: Duration::from_secs(600),
            aging: Duration::from_secs(1),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(10),
            reassign_after: Duration::from_secs(10),
            session_idle_timeout: Duration::from_secs(300),
            shared: false,
        }
    }

    fn attach(sid: &str, caps: &[&str], max_in_flight: u32) -> Event {
        Event::Attach(Attach {
            sid: sid.into(),
            result: ResumeResult::Fresh,
            agent_id: sid.into(),
            tenant: "t".into(),
            user: format!("u-{sid}"),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            max_in_flight,
            resume: None,
            heartbeat_ms: 5000,
            orchestrator_id: "o".into(),
        })
    }

    /// A worker's new stream that says it still runs `running`.
    fn resume(sid: &str, caps: &[&str], running: &[&str]) -> Event {
        let Event::Attach(a) = attach(sid, caps, 4) else {
            unreachable!()
        };
        Event::Attach(Attach {
            resume: Some((0, running.iter().map(|r| r.to_string()).collect())),
            ..a
        })
    }

    /// A new session whose stream was verified as `user`.
    fn attach_as(sid: &str, user: &str) -> Event {
        let Event::Attach(a) = attach(sid, &[], 1) else {
            unreachable!()
        };
        Event::Attach(Attach { user: user.into(), ..a })
    }

    /// A new stream of an existing session.
    fn resumed(sid: &str, caps: &[&str]) -> Event {
        let Event::Attach(a) = attach(sid, caps, 1) else {
            unreachable!()
        };
        Event::Attach(Attach {
            result: ResumeResult::Resumed,
            resume: Some((0, Vec::new())),
            ..a
        })
    }

    fn offer(sid: &str, id: &str, cap: &str, priority: u32) -> Event {
        offer_until(sid, id, cap, priority, 0)
    }

    fn offer_until(sid: &str, id: &str, cap: &str, priority: u32, deadline_us: i64) -> Event {
        Event::Offer {
            sid: sid.into(),
            deadline_us,
            priority,
            offer: TaskOffer {
                task_id: id.into(),
                capability: cap.into(),
                payload: b"{}".to_vec(),
                max_attempts: 0,
            },
            traceparent: String::new(),
        }
    }

    fn result(sid: &str, id: &str, code: i32) -> Event {
        Event::Result {
            sid: sid.into(),
            result: TaskResult {
                task_id: id.into(),
                output: b"out".to_vec(),
                status: Some(super::status(code, "")),
                ..TaskResult::default()
            },
        }
    }

    fn cancel(sid: &str, id: &str) -> Event {
        Event::Cancel {
            sid: sid.into(),
            task_id: id.into(),
            reason: String::new(),
        }
    }

    fn ack(sid: &str, seq: u64) -> Event {
        Event::Acked {
            sid: sid.into(),
            ack_seq: seq,
        }
    }

    fn detach(sid: &str, epoch: u64) -> Event {
        Event::Detach { sid: sid.into(), epoch }
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Queued,
        Shared,
        Assigned(&'static str),
        Done(i32),
        Gone,
    }

    struct Case {
        name: &'static str,
        rules: fn(&mut Rules),
        /// (milliseconds since the start, event)
        script: Vec<(u64, Event)>,
        tasks: Vec<(&'static str, Want)>,
        /// Every reliable frame each session was sent, in order, as "kind task [code]".
        frames: Vec<(&'static str, Vec<&'static str>)>,
        effects: Vec<Effect>,
    }

    fn no_change(_: &mut Rules) {}

    struct Run {
        st: State,
        frames: HashMap<String, Vec<String>>,
        effects: Vec<Effect>,
        outcomes: Vec<crate::orchestrator::TaskOutcome>,
        ops: Vec<Op>,
    }

    fn run(case: &Case) -> Run {
        let mut r = rules();
        (case.rules)(&mut r);
        let mut run = Run {
            st: State::new(r),
            frames: HashMap::new(),
            effects: Vec::new(),
            outcomes: Vec::new(),
            ops: Vec::new(),
        };
        let t0 = Instant::now();
        let wall0 = 1_700_000_000_000_000;
        for (ms, event) in case.script.clone() {
            let now = Now {
                at: t0 + Duration::from_millis(ms),
                wall_us: wall0 + i64::try_from(ms).unwrap() * 1000,
            };
            let step = run.st.apply(event, now);
            for (sid, seq) in &step.pushed {
                // A frame to a session the same step forgot is never sent.
                let Some(s) = run.st.sessions.get(sid) else { continue };
                let (_, p) = s.outbox.pending().find(|(q, _)| q == seq).expect("pushed frame kept");
                let text = match p.frame.body.as_ref().expect("a body") {
                    Body::Assign(a) => format!("assign {} #{}", a.task_id, a.attempt),
                    Body::Result(r) => format!("result {} {}", r.task_id, r.status.as_ref().map_or(0, |s| s.code)),
                    Body::Cancel(c) => format!("cancel {}", c.task_id),
                    other => format!("{other:?}"),
                };
                run.frames.entry(sid.clone()).or_default().push(text);
            }
            for effect in step.effects {
                match effect {
                    Effect::Resent(_) => {}
                    Effect::Outcome(o) => run.outcomes.push(o),
                    other => run.effects.push(other),
                }
            }
            run.ops.extend(step.ops);
        }
        run
    }

    fn want_of(st: &State, id: &str) -> Want {
        match st.tasks.get(id).map(|t| &t.phase) {
            None => Want::Gone,
            Some(Phase::Queued) => Want::Queued,
            Some(Phase::Assigned { worker, .. }) => Want::Assigned(Box::leak(worker.clone().into_boxed_str())),
            Some(Phase::Done { result }) => Want::Done(result.status.as_ref().map_or(0, |s| s.code)),
            Some(Phase::Shared) => Want::Shared,
        }
    }

    fn cases() -> Vec<Case> {
        let w = |caps: &[&str]| attach("w", caps, 1);
        vec![
            Case {
                name: "an offer goes to a worker of its capability",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (1, offer("r", "t1", "echo", 2)),
                ],
                tasks: vec![("t1", Want::Assigned("w"))],
                frames: vec![("w", vec!["assign t1 #1"])],
                effects: vec![Effect::Dispatched { waited_us: 0 }],
            },
            Case {
                name: "without a worker of its capability a task waits, then goes to the first that attaches",
                rules: no_change,
                script: vec![
                    (0, attach("other", &["sum"], 1)),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (500, w(&["echo"])),
                ],
                tasks: vec![("t1", Want::Assigned("w"))],
                frames: vec![("w", vec!["assign t1 #1"])],
                effects: vec![Effect::Dispatched { waited_us: 500_000 }],
            },
            Case {
                name: "higher priority first; background overtakes after waiting (aging)",
                rules: no_change,
                script: vec![
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "bg", "echo", 0)),
                    (100, offer("r", "rt", "echo", 5)),
                    (200, w(&["echo"])),
                    (300, result("w", "rt", code::OK)),
                    (6_000, offer("r", "rt2", "echo", 5)),
                    (6_000, result("w", "x", code::OK)),
                    (6_100, cancel("r", "none")),
                ],
                tasks: vec![
                    ("rt", Want::Done(code::OK)),
                    ("bg", Want::Assigned("w")),
                    ("rt2", Want::Queued),
                ],
                frames: vec![("w", vec!["assign rt #1", "assign bg #1"]), ("r", vec!["result rt 0"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 100_000 },
                    Effect::Finished {
                        code: code::OK,
                        took_us: 200_000,
                    },
                    Effect::Dispatched { waited_us: 300_000 },
                ],
            },
            Case {
                name: "least-loaded worker first",
                rules: no_change,
                script: vec![
                    (0, attach("a", &["echo"], 2)),
                    (0, attach("b", &["echo"], 4)),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (0, offer("r", "t2", "echo", 2)),
                    (0, offer("r", "t3", "echo", 2)),
                ],
                // a: 0/2 vs b: 0/4 tie → a; then b (0 < 0.5); then b (0.25 < 0.5).
                tasks: vec![
                    ("t1", Want::Assigned("a")),
                    ("t2", Want::Assigned("b")),
                    ("t3", Want::Assigned("b")),
                ],
                frames: vec![("a", vec!["assign t1 #1"]), ("b", vec!["assign t2 #1", "assign t3 #1"])],
                effects: vec![Effect::Dispatched { waited_us: 0 }; 3],
            },
            Case {
                name: "a result reaches the requester once; its ack ends the task",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (10, result("w", "t1", code::OK)),
                    (11, result("w", "t1", code::OK)),
                    (20, ack("r", 1)),
                ],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![("w", vec!["assign t1 #1"]), ("r", vec!["result t1 0"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::Finished {
                        code: code::OK,
                        took_us: 10_000,
                    },
                ],
            },
            Case {
                name: "a retryable failure runs again; after max_attempts the task is dead-lettered",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (10, result("w", "t1", code::UNAVAILABLE)),
                    (20, result("w", "t1", code::INTERNAL)),
                ],
                tasks: vec![("t1", Want::Done(code::ABORTED))],
                frames: vec![("w", vec!["assign t1 #1", "assign t1 #2"]), ("r", vec!["result t1 10"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::DeadLettered {
                        task_id: "t1".into(),
                        attempts: 2,
                        why: String::new(),
                    },
                    Effect::Finished {
                        code: code::ABORTED,
                        took_us: 20_000,
                    },
                ],
            },
            Case {
                name: "a task's own failure is its answer, not a retry",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (5, result("w", "t1", 3)),
                ],
                tasks: vec![("t1", Want::Done(3))],
                frames: vec![("w", vec!["assign t1 #1"]), ("r", vec!["result t1 3"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::Finished {
                        code: 3,
                        took_us: 5_000,
                    },
                ],
            },
            Case {
                name: "failures open the breaker; half-open after the cooldown takes one task",
                rules: |r| {
                    r.breaker_failures = 1;
                    r.max_attempts = 5;
                },
                script: vec![
                    (0, attach("w", &["echo"], 4)),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (1, result("w", "t1", code::UNAVAILABLE)),
                    (2, offer("r", "t2", "echo", 2)),
                    (11_001, Event::Dispatch),
                ],
                tasks: vec![("t1", Want::Assigned("w")), ("t2", Want::Queued)],
                frames: vec![("w", vec!["assign t1 #1", "assign t1 #2"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::BreakerOpened { worker: "w".into() },
                ],
            },
            Case {
                name: "cancel: the worker is told, the requester answered, tools stopped",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (3, cancel("w", "t1")),
                    (4, cancel("r", "t1")),
                    (5, result("w", "t1", code::OK)),
                ],
                tasks: vec![("t1", Want::Done(code::CANCELLED))],
                frames: vec![("w", vec!["assign t1 #1", "cancel t1"]), ("r", vec!["result t1 1"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::CancelTools { task_id: "t1".into() },
                    Effect::Finished {
                        code: code::CANCELLED,
                        took_us: 4_000,
                    },
                ],
            },
            Case {
                name: "a finished task offered again by a new session of its caller answers at once; another caller's offer is ignored",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (5, result("w", "t1", code::OK)),
                    (6, attach_as("r-after-restart", "u-r")),
                    (7, offer("r-after-restart", "t1", "echo", 2)),
                    (8, attach_as("x", "u-x")),
                    (8, offer("x", "t1", "echo", 2)),
                    (9, offer("r-after-restart", "t1", "echo", 2)),
                    (10, ack("r", 1)),
                    (11, ack("r-after-restart", 1)),
                ],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![
                    ("w", vec!["assign t1 #1"]),
                    ("r", vec!["result t1 0"]),
                    ("r-after-restart", vec!["result t1 0"]),
                    ("x", vec![]),
                ],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::Finished { code: code::OK, took_us: 5_000 },
                ],
            },
            Case {
                name: "a running task offered again by a new session of its caller sends its result there, once",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (1, attach_as("r2", "u-r")),
                    (2, offer("r2", "t1", "echo", 2)),
                    (3, result("w", "t1", code::OK)),
                ],
                tasks: vec![("t1", Want::Done(code::OK))],
                frames: vec![("w", vec!["assign t1 #1"]), ("r", vec![]), ("r2", vec!["result t1 0"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::Finished { code: code::OK, took_us: 3_000 },
                ],
            },
            Case {
                name: "a vanished worker's task goes to another after reassign_after, not before",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (1, detach("w", 1)),
                    (2, attach("w2", &["echo"], 1)),
                    (9_000, Event::Sweep),
                    (10_001, Event::Sweep),
                ],
                tasks: vec![("t1", Want::Assigned("w2"))],
                frames: vec![("w", vec!["assign t1 #1"]), ("w2", vec!["assign t1 #2"])],
                effects: vec![Effect::Dispatched { waited_us: 0 }],
            },
            Case {
                name: "a stale stream's detach changes nothing",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, resumed("w", &["echo"])),
                    (1, detach("w", 1)),
                    (1, attach("r", &[], 1)),
                    (20_000, Event::Sweep),
                    (20_000, offer("r", "t1", "echo", 2)),
                ],
                tasks: vec![("t1", Want::Assigned("w"))],
                frames: vec![("w", vec!["assign t1 #1"])],
                effects: vec![Effect::Dispatched { waited_us: 0 }],
            },
            Case {
                name: "a worker that resumes with its running tasks keeps them",
                rules: no_change,
                script: vec![
                    (0, w(&["echo"])),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (1, detach("w", 1)),
                    (2, resume("w-new", &["echo"], &["t1"])),
                    (20_000, Event::Sweep),
                ],
                tasks: vec![("t1", Want::Assigned("w-new"))],
                frames: vec![("w", vec!["assign t1 #1"])],
                effects: vec![Effect::Dispatched { waited_us: 0 }],
            },
            Case {
                name: "deadlines: passed at offer, or while queued",
                rules: no_change,
                script: vec![
                    (0, attach("r", &[], 1)),
                    (100, offer_until("r", "late", "echo", 2, 1_700_000_000_000_000)),
                    (100, offer_until("r", "soon", "echo", 2, 1_700_000_000_200_000)),
                    (300, Event::Sweep),
                ],
                tasks: vec![
                    ("late", Want::Done(code::DEADLINE_EXCEEDED)),
                    ("soon", Want::Done(code::DEADLINE_EXCEEDED)),
                ],
                frames: vec![("r", vec!["result late 4", "result soon 4"])],
                effects: vec![
                    Effect::Finished {
                        code: code::DEADLINE_EXCEEDED,
                        took_us: 0,
                    },
                    Effect::Finished {
                        code: code::DEADLINE_EXCEEDED,
                        took_us: 200_000,
                    },
                ],
            },
            Case {
                name: "the queue bound and the requester window refuse offers in band",
                rules: |r| {
                    r.max_queued = 2;
                    r.requester_window = 2;
                },
                script: vec![
                    (0, attach("r", &[], 1)),
                    (0, attach("r2", &[], 1)),
                    (0, offer("r", "a", "echo", 2)),
                    (0, offer("r", "b", "echo", 2)),
                    (0, offer("r", "c", "echo", 2)),
                    (0, offer("r", "a", "echo", 2)),
                    (0, offer("r2", "x", "echo", 2)),
                ],
                tasks: vec![
                    ("a", Want::Queued),
                    ("b", Want::Queued),
                    ("c", Want::Done(code::RESOURCE_EXHAUSTED)),
                    ("x", Want::Done(code::RESOURCE_EXHAUSTED)),
                ],
                frames: vec![("r", vec!["result c 8"]), ("r2", vec!["result x 8"])],
                effects: vec![
                    Effect::Refused,
                    Effect::Finished {
                        code: code::RESOURCE_EXHAUSTED,
                        took_us: 0,
                    },
                    Effect::Refused,
                    Effect::Finished {
                        code: code::RESOURCE_EXHAUSTED,
                        took_us: 0,
                    },
                ],
            },
            Case {
                name: "an idle requester is evicted with its tasks; an idle worker's task is requeued",
                rules: |r| r.session_idle_timeout = Duration::from_secs(60),
                script: vec![
                    (0, attach("w", &["echo"], 2)),
                    (0, attach("r", &[], 1)),
                    (0, attach("r2", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (0, offer("r2", "t2", "echo", 2)),
                    (0, detach("r", 1)),
                    (0, detach("w", 1)),
                    (1, attach("w2", &["echo"], 1)),
                    (61_000, Event::Sweep),
                ],
                tasks: vec![("t1", Want::Gone), ("t2", Want::Assigned("w2"))],
                frames: vec![("w2", vec!["assign t2 #2"])],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::Dispatched { waited_us: 0 },
                    Effect::Evicted { session: "r".into() },
                    Effect::Finished {
                        code: code::CANCELLED,
                        took_us: 61_000_000,
                    },
                    Effect::Evicted { session: "w".into() },
                ],
            },
            Case {
                name: "goodbye: the requester's tasks are cancelled, the worker's requeued",
                rules: no_change,
                script: vec![
                    (0, attach("a", &["echo"], 1)),
                    (0, attach("r", &[], 1)),
                    (0, offer("r", "t1", "echo", 2)),
                    (1, attach("r2", &[], 1)),
                    (1, offer("r2", "t2", "echo", 2)),
                    (2, Event::Goodbye { sid: "r".into() }),
                    (3, attach("b", &["echo"], 1)),
                    (4, result("a", "t2", code::OK)),
                    (5, Event::Goodbye { sid: "a".into() }),
                ],
                tasks: vec![("t1", Want::Gone), ("t2", Want::Done(code::OK))],
                frames: vec![
                    ("a", vec!["assign t1 #1", "cancel t1", "assign t2 #1"]),
                    ("r2", vec!["result t2 0"]),
                ],
                effects: vec![
                    Effect::Dispatched { waited_us: 0 },
                    Effect::CancelTools { task_id: "t1".into() },
                    Effect::Finished {
                        code: code::CANCELLED,
                        took_us: 2_000,
                    },
                    Effect::Dispatched { waited_us: 1_000 },
                    Effect::Finished {
                        code: code::OK,
                        took_us: 3_000,
                    },
                ],
            },
        ]
    }

    #[test]
    fn transitions() {
        for case in cases() {
            let run = run(&case);
            for (id, want) in &case.tasks {
                assert_eq!(&want_of(&run.st, id), want, "{}: task {id}", case.name);
            }
            for (sid, want) in &case.frames {
                let got = run.frames.get(*sid).cloned().unwrap_or_default();
                assert_eq!(got, *want, "{}: frames to {sid}", case.name);
            }
            assert_eq!(run.effects, case.effects, "{}: effects", case.name);
            // Every finished task has exactly one outcome for the audit log, with
            // the code its requester got.
            let finished = run
                .effects
                .iter()
                .filter(|e| matches!(e, Effect::Finished { .. }))
                .count();
            assert_eq!(
                run.outcomes.len(),
                finished,
                "{}: one outcome per finished task",
                case.name
            );
            for o in &run.outcomes {
                if let Some(Want::Done(code)) = case.tasks.iter().find(|(id, _)| *id == o.task_id).map(|(_, w)| w) {
                    assert_eq!(o.code, *code, "{}: outcome of {}", case.name, o.task_id);
                }
                assert!(o.user.starts_with("u-"), "{}: the requester's user", case.name);
            }
            // The queued count is what the tasks say.
            let queued = run.st.tasks.values().filter(|t| t.is_queued()).count();
            assert_eq!(run.st.queued, queued, "{}: queued count", case.name);
        }
    }

    #[test]
    fn dead_letter_and_finished_tasks_are_persisted() {
        let case = &cases()[5];
        let run = run(case);
        let dead = run
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Put { coll: c, .. } if c == coll::DEAD_LETTER));
        assert_eq!(dead.count(), 1);
        // The finished task's record carries its result and drops the payload.
        let last_put = run
            .ops
            .iter()
            .rev()
            .find_map(|op| match op {
                Op::Put { coll: c, val, .. } if c == &coll::tasks("r") => Some(val.clone()),
                _ => None,
            })
            .expect("task written");
        let rec = <crate::records::TaskRecord as prost::Message>::decode(last_put).unwrap();
        assert_eq!(rec.state(), crate::records::TaskState::Done);
        assert!(rec.payload.is_empty());
        assert_eq!(rec.result.and_then(|r| r.status).map(|s| s.code), Some(code::ABORTED));
    }

    #[test]
    fn codes_are_grpc_codes() {
        use tonic::Code;
        for (ours, theirs) in [
            (code::OK, Code::Ok),
            (code::CANCELLED, Code::Cancelled),
            (code::UNKNOWN, Code::Unknown),
            (code::DEADLINE_EXCEEDED, Code::DeadlineExceeded),
            (code::RESOURCE_EXHAUSTED, Code::ResourceExhausted),
            (code::ABORTED, Code::Aborted),
            (code::INTERNAL, Code::Internal),
            (code::UNAVAILABLE, Code::Unavailable),
        ] {
            assert_eq!(ours, theirs as i32);
        }
    }

    #[test]
    fn a_record_round_trips_through_the_phase() {
        for phase in [
            Phase::Queued,
            Phase::Shared,
            Phase::Assigned {
                worker: "w".into(),
                orphaned_since: None,
            },
            Phase::Done {
                result: TaskResult {
                    task_id: "t".into(),
                    ..TaskResult::default()
                },
            },
        ] {
            let task = crate::orchestrator::state::Task {
                id: "t".into(),
                requester: "r".into(),
                capability: "c".into(),
                payload: bytes::Bytes::from_static(b"p"),
                priority: 3,
                deadline_us: 7,
                attempts: 1,
                max_attempts: 2,
                tenant: "x".into(),
                user: "u".into(),
                traceparent: "tp".into(),
                offered_us: 9,
                phase: phase.clone(),
                route: "r0".into(),
                entry: None,
                remote: false,
            };
            let back = crate::orchestrator::state::Task::from_record(task.to_record(), None);
            assert_eq!(back.phase, phase);
            assert_eq!(back.to_record(), task.to_record());
        }
    }

    /// A task record as the requester's replica publishes it.
    fn published(id: &str, requester: &str) -> crate::records::TaskRecord {
        crate::records::TaskRecord {
            task_id: id.into(),
            requester: requester.into(),
            route: requester.into(),
            capability: "echo".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            priority: 2,
            max_attempts: 2,
            tenant: "t".into(),
            user: format!("u-{requester}"),
            state: crate::records::TaskState::Shared as i32,
            ..Default::default()
        }
    }

    fn take(id: &str, requester: &str, entry: &str, deliveries: u32) -> Event {
        Event::Take(Box::new(super::Take {
            priority: 2,
            entry: entry.into(),
            deliveries,
            record: published(id, requester),
        }))
    }

    /// A worker's result naming the requester's route, as every assignment does.
    fn routed_result(sid: &str, id: &str, route: &str, code: i32) -> Event {
        let Event::Result { sid, result } = result(sid, id, code) else {
            unreachable!()
        };
        Event::Result {
            sid,
            result: TaskResult {
                route: route.into(),
                ..result
            },
        }
    }

    fn delivered(route: &str, entry: &str, id: &str, code: i32) -> Event {
        Event::Delivered {
            route: route.into(),
            entry: entry.into(),
            result: TaskResult {
                task_id: id.into(),
                output: b"out".to_vec(),
                status: Some(super::status(code, "")),
                worker_id: "far".into(),
                attempts: 1,
                ..TaskResult::default()
            },
        }
    }

    /// The shared-queue ops of a run, as "publish t", "retire e", "deliver r t",
    /// "delivered r e".
    fn queue_ops(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|op| match op {
                Op::Publish { record, .. } => {
                    let rec = <crate::records::TaskRecord as prost::Message>::decode(record.clone()).unwrap();
                    Some(format!("publish {}", rec.task_id))
                }
                Op::Retire { entry, .. } => Some(format!("retire {entry}")),
                Op::Deliver { route, result } => {
                    let r = <TaskResult as prost::Message>::decode(result.clone()).unwrap();
                    Some(format!("deliver {route} {}", r.task_id))
                }
                Op::Delivered { route, entry } => Some(format!("delivered {route} {entry}")),
                Op::Revoke { task_id } => Some(format!("revoke {task_id}")),
                _ => None,
            })
            .collect()
    }

    struct SharedCase {
        name: &'static str,
        script: Vec<Event>,
        tasks: Vec<(&'static str, Want)>,
        frames: Vec<(&'static str, Vec<&'static str>)>,
        queue: Vec<&'static str>,
    }

    /// The owner epochs a step's writes depend on beyond the sessions they touch
    /// (the shell adds those): the claim of an attach, a forgotten session, and a
    /// vanished worker whose task moves.
    #[test]
    fn explicit_fences() {
        use crate::store::Fence;
        let (w, c) = (Fence::write, Fence::claim);
        let dt = Duration::from_secs(1);
        // (seconds, event, fences of its step)
        let script: Vec<(u64, Event, Vec<Fence>)> = vec![
            (0, attach("a", &["echo"], 1), vec![c("a", 1)]),
            (0, attach("r", &[], 1), vec![c("r", 1)]),
            (0, offer("r", "t1", "echo", 2), vec![]),
            (1, resumed("a", &["echo"]), vec![c("a", 2)]),
            (
                2,
                Event::Detach {
                    sid: "a".into(),
                    epoch: 2,
                },
                vec![],
            ),
            (3, attach("b", &["echo"], 1), vec![c("b", 1)]),
            // Ten seconds after `a` left, t1 moves to `b`: only while `a` is ours.
            (12, Event::Sweep, vec![w("a", 2)]),
            (13, Event::Goodbye { sid: "b".into() }, vec![w("b", 1)]),
        ];
        let mut st = State::new(rules());
        let t0 = Instant::now();
        for (secs, event, want) in script {
            let name = format!("{event:?}");
            let now = Now {
                at: t0 + dt * u32::try_from(secs).unwrap(),
                wall_us: 1_700_000_000_000_000 + i64::try_from(secs).unwrap() * 1_000_000,
            };
            let step = st.apply(event, now);
            assert_eq!(step.fences, want, "{name}");
        }
    }

    #[test]
    fn shared_dispatch() {
        let shared = |r: &mut Rules| r.shared = true;
        let cases = vec![
            SharedCase {
                name: "an offer is published, not queued here, even with a worker here",
                script: vec![
                    attach("w", &["echo"], 1),
                    attach("r", &[], 1),
                    offer("r", "t1", "echo", 2),
                ],
                tasks: vec![("t1", Want::Shared)],
                frames: vec![("w", vec![])],
                queue: vec!["publish t1"],
            },
            SharedCase {
                name: "taken back by the requester's replica: runs here, the result retires the entry",
                script: vec![
                    attach("w", &["echo"], 1),
                    attach("r", &[], 1),
                    offer("r", "t1", "echo", 2),
                    take("t1", "r", "1-0", 1),
                    result("w", "t1", code::OK),
                ],
                tasks: vec![("t1", Want::Done(code::OK))],
                frames: vec![("w", vec!["assign t1 #1"]), ("r", vec!["result t1 0"])],
                queue: vec!["publish t1", "retire 1-0"],
            },
            SharedCase {
                name: "a remote requester's task runs here; its result goes to the route and is forgotten",
                script: vec![
                    attach("w", &["echo"], 1),
                    take("t1", "far", "1-0", 1),
                    result("w", "t1", code::OK),
                ],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![("w", vec!["assign t1 #1"])],
                queue: vec!["retire 1-0", "deliver far t1"],
            },
            SharedCase {
                name: "a retryable failure of a remote task runs again here, then is dead-lettered to the route",
                script: vec![
                    attach("w", &["echo"], 1),
                    take("t1", "far", "1-0", 1),
                    result("w", "t1", code::UNAVAILABLE),
                    result("w", "t1", code::UNAVAILABLE),
                ],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![("w", vec!["assign t1 #1", "assign t1 #2"])],
                queue: vec!["retire 1-0", "deliver far t1"],
            },
            SharedCase {
                name: "an entry handed out max_attempts times is dead-lettered, not run",
                script: vec![attach("w", &["echo"], 1), take("t1", "far", "1-0", 3)],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![("w", vec![])],
                queue: vec!["retire 1-0", "deliver far t1"],
            },
            SharedCase {
                name: "a delivered result answers the waiting requester; a second one is only cleared",
                script: vec![
                    attach("r", &[], 1),
                    offer("r", "t1", "echo", 2),
                    delivered("r", "5-0", "t1", code::OK),
                    delivered("r", "6-0", "t1", code::INTERNAL),
                ],
                tasks: vec![("t1", Want::Done(code::OK))],
                frames: vec![("r", vec!["result t1 0"])],
                queue: vec!["publish t1", "delivered r 5-0", "delivered r 6-0"],
            },
            SharedCase {
                name: "a requester detached here gets its result through the route too",
                script: vec![
                    attach("w", &["echo"], 1),
                    attach("r", &[], 1),
                    offer("r", "t1", "echo", 2),
                    take("t1", "r", "1-0", 1),
                    detach("r", 1),
                    result("w", "t1", code::OK),
                ],
                tasks: vec![("t1", Want::Done(code::OK))],
                frames: vec![("r", vec!["result t1 0"])],
                queue: vec!["publish t1", "retire 1-0", "deliver r t1"],
            },
            SharedCase {
                name: "a second entry for a task held here is retired; a result already in retires the first",
                script: vec![
                    attach("w", &["echo"], 1),
                    take("t1", "far", "1-0", 1),
                    take("t1", "far", "2-0", 1),
                ],
                tasks: vec![("t1", Want::Assigned("w"))],
                frames: vec![("w", vec!["assign t1 #1"])],
                queue: vec!["retire 2-0"],
            },
            SharedCase {
                name: "a result for a task not held here goes to its route; a retryable failure is dropped",
                script: vec![
                    attach("w", &["echo"], 1),
                    routed_result("w", "t9", "far", code::OK),
                    routed_result("w", "t8", "far", code::UNAVAILABLE),
                ],
                tasks: vec![("t9", Want::Gone), ("t8", Want::Gone)],
                frames: vec![("w", vec![])],
                queue: vec!["deliver far t9"],
            },
            SharedCase {
                name: "a published task its requester cancels is revoked for every replica",
                script: vec![attach("r", &[], 1), offer("r", "t1", "echo", 2), cancel("r", "t1")],
                tasks: vec![("t1", Want::Done(code::CANCELLED))],
                frames: vec![("r", vec!["result t1 1"])],
                queue: vec!["publish t1", "revoke t1"],
            },
            SharedCase {
                name: "a revoked task running here for a remote requester is stopped, its entry retired",
                script: vec![
                    attach("w", &["echo"], 1),
                    take("t1", "far", "1-0", 1),
                    Event::Revoked { task_id: "t1".into() },
                ],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![("w", vec!["assign t1 #1", "cancel t1"])],
                queue: vec!["retire 1-0"],
            },
            SharedCase {
                name: "a task revoked before this replica takes it is retired, not run",
                script: vec![
                    attach("w", &["echo"], 1),
                    Event::Revoked { task_id: "t1".into() },
                    take("t1", "far", "1-0", 1),
                ],
                tasks: vec![("t1", Want::Gone)],
                frames: vec![("w", vec![])],
                queue: vec!["retire 1-0"],
            },
            SharedCase {
                name: "a waiting task's deadline passes: it answers DEADLINE_EXCEEDED here",
                script: vec![
                    attach("r", &[], 1),
                    offer_until("r", "t1", "echo", 2, 1_700_000_000_000_000 + 1_500),
                    Event::Sweep,
                ],
                tasks: vec![("t1", Want::Done(code::DEADLINE_EXCEEDED))],
                frames: vec![("r", vec!["result t1 4"])],
                queue: vec!["publish t1"],
            },
        ];
        for case in cases {
            let mut r = rules();
            shared(&mut r);
            let mut st = State::new(r);
            let t0 = Instant::now();
            let mut ops = Vec::new();
            let mut frames: HashMap<String, Vec<String>> = HashMap::new();
            for (i, event) in case.script.into_iter().enumerate() {
                let now = Now {
                    at: t0 + Duration::from_millis(i as u64),
                    wall_us: 1_700_000_000_000_000 + i as i64 * 1000,
                };
                let step = st.apply(event, now);
                for (sid, seq) in &step.pushed {
                    let Some(s) = st.sessions.get(sid) else { continue };
                    let (_, p) = s.outbox.pending().find(|(q, _)| q == seq).expect("pushed frame kept");
                    let text = match p.frame.body.as_ref().expect("a body") {
                        Body::Assign(a) => format!("assign {} #{}", a.task_id, a.attempt),
                        Body::Result(r) => format!("result {} {}", r.task_id, r.status.as_ref().map_or(0, |s| s.code)),
                        Body::Cancel(c) => format!("cancel {}", c.task_id),
                        other => format!("{other:?}"),
                    };
                    frames.entry(sid.clone()).or_default().push(text);
                }
                ops.extend(step.ops);
            }
            for (id, want) in &case.tasks {
                assert_eq!(&want_of(&st, id), want, "{}: task {id}", case.name);
            }
            for (sid, want) in &case.frames {
                let got = frames.get(*sid).cloned().unwrap_or_default();
                assert_eq!(got, *want, "{}: frames to {sid}", case.name);
            }
            assert_eq!(queue_ops(&ops), case.queue, "{}: queue ops", case.name);
            // Remote tasks are never written to the requester's records here.
            assert!(
                !ops.iter()
                    .any(|op| matches!(op, Op::Put { coll: c, .. } if c == &coll::tasks("far"))),
                "{}: a remote requester's records",
                case.name
            );
            let queued = st.tasks.values().filter(|t| t.is_queued()).count();
            assert_eq!(st.queued, queued, "{}: queued count", case.name);
        }
    }
}
