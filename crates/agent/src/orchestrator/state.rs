//! The orchestrator's routing state: sessions, tasks, lanes, and the step that
//! collects what one change under the state lock writes.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use lattice_proto::agent::AgentResponse;
use prost::Message;
use tokio::{sync::Notify, time::Instant};

use crate::{
    lanes::Lanes,
    records::{coll, SessionMeta, TaskRecord},
    session::{Inbox, Outbox},
    store::Op,
};

#[derive(Default)]
pub(super) struct State {
    pub(super) sessions: HashMap<String, Session>,
    /// Tasks not yet finished, and finished ones whose result the requester has not
    /// acknowledged (so a late duplicate result is recognised).
    pub(super) tasks: HashMap<String, Task>,
    pub(super) lanes: HashMap<String, Lanes>,
    pub(super) queued: usize,
}

pub(super) struct Task {
    pub(super) rec: TaskRecord,
    /// When it was assigned to a worker this process has not seen attach.
    pub(super) orphaned_since: Option<Instant>,
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
    pub(super) wake: Arc<Notify>,
    /// Worker: tasks assigned and not finished.
    pub(super) in_flight: HashSet<String>,
    pub(super) breaker: Breaker,
    /// Requester: tasks offered whose result is not yet acknowledged.
    pub(super) outstanding: usize,
    pub(super) rtt_us: u64,
    pub(super) last_echo_us: i64,
}

#[derive(Default)]
pub(super) struct Breaker {
    pub(super) failures: u32,
    pub(super) open_until: Option<Instant>,
}

impl Session {
    pub(super) fn new(meta: SessionMeta, dedupe_window: Duration) -> Session {
        Session {
            inbox: Inbox::new(meta.in_hwm, dedupe_window, 65_536),
            meta,
            incomplete: BTreeSet::new(),
            in_ticket: 0,
            outbox: Outbox::new(1),
            control: VecDeque::new(),
            cursor: 0,
            attached: None,
            detached_since: Some(Instant::now()),
            wake: Arc::new(Notify::new()),
            in_flight: HashSet::new(),
            breaker: Breaker::default(),
            outstanding: 0,
            rtt_us: 0,
            last_echo_us: 0,
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
}

/// Changes made under the state lock, submitted as one ticket.
#[derive(Default)]
pub(super) struct Step {
    pub(super) ops: Vec<Op>,
    pub(super) pushed: Vec<(String, u64)>,
    pub(super) wake: Vec<String>,
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

    pub(super) fn put_task(&mut self, rec: &TaskRecord) {
        self.ops.push(Op::Put {
            coll: coll::tasks(&rec.requester),
            key: rec.task_id.clone(),
            val: Bytes::from(rec.encode_to_vec()),
        });
    }
}
