//! The orchestrator's routing state: sessions, tasks, lanes, the rules that govern
//! them, and the [`Step`] that collects what one change writes. Plain data: no
//! clock reads, no I/O, no async runtime (time arrives as [`Now`]).

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use bytes::Bytes;
use lattice_proto::agent::{AgentResponse, TaskResult};
use prost::Message;

use crate::{
    lanes::Lanes,
    records::{coll, SessionMeta, TaskRecord, TaskState},
    session::{Inbox, Outbox},
    store::{Fence, Op},
};

/// The limits and timings the state machine applies (a subset of the
/// orchestrator's configuration, so the machine needs nothing else).
#[derive(Debug, Clone)]
pub(super) struct Rules {
    pub(super) max_attempts: u32,
    pub(super) max_queued: usize,
    pub(super) requester_window: u32,
    pub(super) dedupe_window: Duration,
    pub(super) aging: Duration,
    pub(super) breaker_failures: u32,
    pub(super) breaker_cooldown: Duration,
    pub(super) reassign_after: Duration,
    pub(super) session_idle_timeout: Duration,
    /// Offers go to the shared queue (replicas over Redis) rather than this
    /// replica's lanes; the lanes hold what this replica took from it.
    pub(super) shared: bool,
}

/// The two clocks a transition reads, sampled once by the caller: a monotonic
/// instant for timers (lanes' aging, breakers, detachment) and wall-clock
/// microseconds for the absolute deadlines and timestamps on the wire.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    pub(super) at: Instant,
    pub(super) wall_us: i64,
}

pub(super) struct State {
    pub(super) rules: Rules,
    pub(super) sessions: HashMap<String, Session>,
    /// Tasks not yet finished, and finished ones whose result the requester has not
    /// acknowledged (so a late duplicate result is recognised).
    pub(super) tasks: HashMap<String, Task>,
    pub(super) lanes: HashMap<String, Lanes>,
    pub(super) queued: usize,
    /// Shared dispatch: tasks their requester cancelled that this replica does not
    /// hold (yet): an entry of one taken later is retired, not run.
    pub(super) revoked: Revoked,
}

/// The most recent revoked task ids, at most [`Revoked::KEPT`].
#[derive(Default)]
pub(super) struct Revoked {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl Revoked {
    const KEPT: usize = 10_000;

    pub(super) fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > Self::KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

impl State {
    pub(super) fn new(rules: Rules) -> State {
        State {
            rules,
            sessions: HashMap::new(),
            tasks: HashMap::new(),
            lanes: HashMap::new(),
            queued: 0,
            revoked: Revoked::default(),
        }
    }

    /// Queues a task id in its capability's lanes.
    pub(super) fn enqueue(&mut self, capability: &str, priority: u32, task_id: String, at: Instant) {
        let aging = self.rules.aging;
        self.lanes
            .entry(capability.to_string())
            .or_insert_with(|| Lanes::new(aging))
            .push(priority, task_id, at);
        self.queued += 1;
    }
}

/// Where a task is in its life. The persisted [`TaskRecord`] carries the same as
/// an enum number and a worker string; [`Task::from_record`] and
/// [`Task::to_record`] are the only conversions.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Phase {
    Queued,
    Assigned {
        worker: String,
        /// Since when it belongs to a worker this process has not seen attach.
        orphaned_since: Option<Instant>,
    },
    /// Finished; the result waits for the requester's acknowledgement.
    Done {
        result: TaskResult,
    },
    /// In the shared queue: a replica with a worker for it takes it, and the
    /// result comes back to this one (directly, or through the route's stream).
    Shared,
}

/// Where a task this replica took from the shared queue sits there: retired when
/// the task finishes, renewed while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) priority: u32,
    pub(super) id: String,
}

#[derive(Debug, Clone)]
pub(super) struct Task {
    pub(super) id: String,
    /// The requester's session: results go to its outbox.
    pub(super) requester: String,
    pub(super) capability: String,
    pub(super) payload: Bytes,
    pub(super) priority: u32,
    pub(super) deadline_us: i64,
    pub(super) attempts: u32,
    pub(super) max_attempts: u32,
    pub(super) tenant: String,
    /// The requester's user, for the task's audit record.
    pub(super) user: String,
    pub(super) traceparent: String,
    pub(super) offered_us: i64,
    pub(super) phase: Phase,
    /// The session whose result stream gets results from other replicas.
    pub(super) route: String,
    /// Taken from the shared queue by this replica.
    pub(super) entry: Option<Entry>,
    /// Taken for a requester this replica does not hold: never persisted here, and
    /// forgotten once its result is delivered.
    pub(super) remote: bool,
}

impl Task {
    pub(super) fn is_queued(&self) -> bool {
        self.phase == Phase::Queued
    }

    pub(super) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    /// The worker session running it, while assigned.
    pub(super) fn worker(&self) -> Option<&str> {
        match &self.phase {
            Phase::Assigned { worker, .. } => Some(worker),
            _ => None,
        }
    }

    pub(super) fn from_record(rec: TaskRecord, orphaned_since: Option<Instant>) -> Task {
        let phase = match rec.state() {
            TaskState::Queued => Phase::Queued,
            TaskState::Assigned => Phase::Assigned {
                worker: rec.worker,
                orphaned_since,
            },
            TaskState::Done => Phase::Done {
                result: rec.result.unwrap_or_default(),
            },
            TaskState::Shared => Phase::Shared,
        };
        let route = if rec.route.is_empty() {
            rec.requester.clone()
        } else {
            rec.route
        };
        Task {
            id: rec.task_id,
            requester: rec.requester,
            capability: rec.capability,
            payload: rec.payload,
            priority: rec.priority,
            deadline_us: rec.deadline_us,
            attempts: rec.attempts,
            max_attempts: rec.max_attempts,
            tenant: rec.tenant,
            user: rec.user,
            traceparent: rec.traceparent,
            offered_us: rec.offered_us,
            phase,
            route,
            entry: None,
            remote: false,
        }
    }

    pub(super) fn to_record(&self) -> TaskRecord {
        let (state, worker, result) = match &self.phase {
            Phase::Queued => (TaskState::Queued, String::new(), None),
            Phase::Assigned { worker, .. } => (TaskState::Assigned, worker.clone(), None),
            Phase::Done { result } => (TaskState::Done, String::new(), Some(result.clone())),
            Phase::Shared => (TaskState::Shared, String::new(), None),
        };
        TaskRecord {
            task_id: self.id.clone(),
            requester: self.requester.clone(),
            capability: self.capability.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            deadline_us: self.deadline_us,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            state: state as i32,
            worker,
            tenant: self.tenant.clone(),
            traceparent: self.traceparent.clone(),
            result,
            offered_us: self.offered_us,
            user: self.user.clone(),
            route: self.route.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Pending {
    pub(super) frame: AgentResponse,
    /// The commit that made it durable; the writer waits for it before sending.
    pub(super) ticket: u64,
}

pub(super) struct Session {
    pub(super) meta: SessionMeta,
    pub(super) inbox: Inbox,
    /// Agent seqs received whose effects are still running (tool calls, memory
    /// ops): the acknowledged seq stays below them.
    pub(super) incomplete: BTreeSet<u64>,
    /// Ticket of the last inbound state change; acks wait for it.
    pub(super) in_ticket: u64,
    pub(super) outbox: Outbox<Pending>,
    /// Unsequenced frames waiting for the writer (welcome, heartbeat, drain, progress).
    pub(super) control: VecDeque<AgentResponse>,
    /// Highest outbox seq the current writer has sent.
    pub(super) cursor: u64,
    /// Epoch of the stream attached now, if any.
    pub(super) attached: Option<u64>,
    pub(super) detached_since: Option<Instant>,
    /// Worker: tasks assigned and not finished.
    pub(super) in_flight: HashSet<String>,
    pub(super) breaker: Breaker,
    /// Requester: tasks offered whose result is not yet acknowledged.
    pub(super) outstanding: usize,
    pub(super) rtt_us: u64,
    pub(super) last_echo_us: i64,
    /// Ticket of the commit claiming the current epoch: until it is durable, the
    /// epoch is not yet the owner's in a shared store.
    pub(super) claim_ticket: u64,
}

#[derive(Default)]
pub(super) struct Breaker {
    pub(super) failures: u32,
    pub(super) open_until: Option<Instant>,
}

impl Session {
    /// A session with no stream attached yet (new, or loaded from the store).
    pub(super) fn new(meta: SessionMeta, dedupe_window: Duration, now: Instant) -> Session {
        Session {
            inbox: Inbox::new(meta.in_hwm, dedupe_window, 65_536),
            meta,
            incomplete: BTreeSet::new(),
            in_ticket: 0,
            outbox: Outbox::new(1),
            control: VecDeque::new(),
            cursor: 0,
            attached: None,
            detached_since: Some(now),
            in_flight: HashSet::new(),
            breaker: Breaker::default(),
            outstanding: 0,
            rtt_us: 0,
            last_echo_us: 0,
            claim_ticket: 0,
        }
    }

    /// Highest agent seq whose effects are durable once `in_ticket` is.
    pub(super) fn completed_hwm(&self) -> u64 {
        match self.incomplete.first() {
            Some(first) => first - 1,
            None => self.inbox.hwm(),
        }
    }

    pub(super) fn is_worker(&self) -> bool {
        !self.meta.capabilities.is_empty()
    }

    pub(super) fn can_take(&self, now: Instant) -> bool {
        if self.attached.is_none() || !self.is_worker() {
            return false;
        }
        let cap = match self.breaker.open_until {
            Some(t) if t > now => return false,
            // Half-open: one task to probe the worker.
            Some(_) => 1,
            None => self.meta.max_in_flight.max(1) as usize,
        };
        self.in_flight.len() < cap
    }

    /// In-flight tasks per credit: the dispatcher picks the lowest.
    pub(super) fn load(&self) -> f64 {
        self.in_flight.len() as f64 / f64::from(self.meta.max_in_flight.max(1))
    }
}

/// What a transition asks the world to do besides writing the store: the shell
/// turns these into metrics, log lines and tool cancellations.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Effect {
    /// A task finished with this gRPC code, this long after it was offered.
    Finished {
        code: i32,
        took_us: i64,
    },
    /// A task's first assignment, this long after it was offered.
    Dispatched {
        waited_us: i64,
    },
    /// An offer refused for lack of room (window or queue).
    Refused,
    /// Frames a resuming agent gets again.
    Resent(usize),
    /// A running task was cancelled: stop its tool calls here.
    CancelTools {
        task_id: String,
    },
    BreakerOpened {
        worker: String,
    },
    DeadLettered {
        task_id: String,
        attempts: u32,
        why: String,
    },
    Evicted {
        session: String,
    },
    /// How a task ended, for the audit log (one per task, refused ones included).
    Outcome(super::TaskOutcome),
}

/// Changes made by one or more transitions under the state lock, submitted as one
/// ticket.
#[derive(Default)]
pub(super) struct Step {
    pub(super) ops: Vec<Op>,
    /// Frames numbered into a session's outbox: (session, seq).
    pub(super) pushed: Vec<(String, u64)>,
    /// Sessions whose writer has something to send.
    pub(super) wake: Vec<String>,
    pub(super) effects: Vec<Effect>,
    /// The epoch an attach gave the new stream.
    pub(super) epoch: Option<u64>,
    /// Owner epochs the writes depend on beyond those of the sessions they touch
    /// (which the shell adds): an attach's claim, an evicted session, a vanished
    /// worker whose tasks move.
    pub(super) fences: Vec<Fence>,
}

impl Step {
    /// Persists the session's metadata with its current high-water marks. The
    /// in-memory `meta` holds only the static fields; the marks are computed here,
    /// so no write can carry stale ones.
    pub(super) fn put_session(&mut self, s: &Session) {
        let meta = SessionMeta {
            in_hwm: s.completed_hwm(),
            out_seq: s.outbox.next_seq() - 1,
            ..s.meta.clone()
        };
        self.ops.push(Op::Put {
            coll: coll::SESSIONS.into(),
            key: meta.session_id.clone(),
            val: Bytes::from(meta.encode_to_vec()),
        });
    }

    pub(super) fn put_task(&mut self, task: &Task) {
        if task.remote {
            // Its requester's replica holds the record; the shared queue holds the
            // entry this replica works on.
            return;
        }
        self.ops.push(Op::Put {
            coll: coll::tasks(&task.requester),
            key: task.id.clone(),
            val: Bytes::from(task.to_record().encode_to_vec()),
        });
    }
}
