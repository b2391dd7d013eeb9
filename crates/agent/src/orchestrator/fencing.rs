//! Fencing on a store replicas share: which owner epochs a step's writes depend
//! on, and what a replica does when a commit proves it lost sessions to another.
//!
//! Every write for a session (its record, outbox or offered tasks) carries the
//! epoch of the stream this replica holds it under; an attach claims the next
//! epoch. A replica that was paused or partitioned while its agents resumed
//! elsewhere still holds their sessions in memory at older epochs, so its next
//! commit is refused whole ([`crate::store::Fenced`]). It then cannot tell which
//! of its other in-memory state is stale either, so it starts over: every stream
//! here ends, the state is emptied, and what was submitted but not committed is
//! dropped before any frame that depended on it is sent. Agents resume (here or
//! elsewhere) from what is durable, exactly as after a restart.

use crate::{
    records::coll,
    store::{Fence, Fenced, Op},
};

use super::{Inner, State};

/// The session whose state an op writes, if any.
pub(super) fn session_of(op: &Op) -> Option<&str> {
    let (c, key) = match op {
        Op::Put { coll, key, .. } | Op::Del { coll, key } => (coll.as_str(), key.as_str()),
        _ => return None,
    };
    if c == coll::SESSIONS {
        return Some(key);
    }
    c.strip_prefix("outbox:").or_else(|| c.strip_prefix("tasks:"))
}

/// The fences a step's writes need: the explicit ones (claims, sessions already
/// forgotten, vanished workers) and, for every session an op writes that is held
/// here, its current epoch.
pub(super) fn fences(st: &State, ops: &[Op], mut explicit: Vec<Fence>) -> Vec<Fence> {
    let mut seen: Vec<&str> = Vec::new();
    for sid in ops.iter().filter_map(session_of) {
        if seen.contains(&sid) {
            continue;
        }
        seen.push(sid);
        if let Some(s) = st.sessions.get(sid) {
            explicit.push(Fence::write(sid, s.meta.epoch));
        }
    }
    explicit
}

/// Index ops for the task records a step writes (shared dispatch): which session
/// holds each task id, so a retry from a new session on another replica finds it.
pub(super) fn holder_index(ops: &[Op]) -> Vec<Op> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Put { coll: c, key, .. } => c.strip_prefix("tasks:").map(|sid| Op::Put {
                coll: coll::TASK_HOLDERS.into(),
                key: key.clone(),
                val: bytes::Bytes::copy_from_slice(sid.as_bytes()),
            }),
            Op::Del { coll: c, key } if c.starts_with("tasks:") => Some(Op::Del {
                coll: coll::TASK_HOLDERS.into(),
                key: key.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Fences for the shared queue's reads that take entries for this replica's
/// workers: every attached worker whose epoch is durably its own (one still being
/// claimed is covered by the commit that assigns it work).
pub(super) fn worker_fences(st: &State, durable: u64) -> Vec<Fence> {
    let mut out: Vec<Fence> = st
        .sessions
        .values()
        .filter(|s| s.attached.is_some() && s.is_worker() && s.claim_ticket <= durable)
        .map(|s| Fence::write(&s.meta.session_id, s.meta.epoch))
        .collect();
    out.sort_by(|a, b| a.sid.cmp(&b.sid));
    out
}

impl Inner {
    /// A commit or a take was refused: another replica owns sessions this one
    /// holds. End every stream, forget everything, drop what was not committed.
    /// Called before the refused commit's ticket is published, so no frame that
    /// depended on it leaves (writers check the reset count after waiting).
    pub(super) fn fenced_off(&self, fenced: &Fenced) {
        self.metrics.agent_fenced.inc();
        tracing::warn!(
            sessions = ?fenced.sessions.iter().take(8).collect::<Vec<_>>(),
            "another replica owns sessions held here: ending every stream; agents resume from the store"
        );
        let wakers = {
            let mut st = self.state.lock();
            // Everything is submitted under this lock: what is pending now came
            // from the state being dropped.
            self.store.discard_pending();
            self.resets.send_modify(|n| *n += 1);
            let rules = st.machine.rules.clone();
            st.machine = State::new(rules);
            std::mem::take(&mut st.wakers)
        };
        for w in wakers.values() {
            w.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn task_records_are_indexed_by_id() {
        let put = |c: &str, k: &str| Op::Put {
            coll: c.into(),
            key: k.into(),
            val: Bytes::new(),
        };
        let del = |c: &str, k: &str| Op::Del {
            coll: c.into(),
            key: k.into(),
        };
        let idx = |k: &str, sid: &str| Op::Put {
            coll: coll::TASK_HOLDERS.into(),
            key: k.into(),
            val: Bytes::from(sid.to_string()),
        };
        // (a step's ops, the index ops added)
        let table: Vec<(Vec<Op>, Vec<Op>)> = vec![
            (vec![put(&coll::tasks("r"), "t1")], vec![idx("t1", "r")]),
            (vec![del(&coll::tasks("r"), "t1")], vec![del(coll::TASK_HOLDERS, "t1")]),
            // A task moved to a new session: the Put comes last and wins.
            (
                vec![del(&coll::tasks("r"), "t1"), put(&coll::tasks("r2"), "t1")],
                vec![del(coll::TASK_HOLDERS, "t1"), idx("t1", "r2")],
            ),
            (vec![put(coll::SESSIONS, "r"), put(&coll::outbox("r"), "1")], vec![]),
        ];
        for (ops, want) in table {
            assert_eq!(format!("{:?}", holder_index(&ops)), format!("{want:?}"), "{ops:?}");
        }
    }

    #[test]
    fn the_session_an_op_writes() {
        let put = |c: &str, k: &str| Op::Put {
            coll: c.into(),
            key: k.into(),
            val: Bytes::new(),
        };
        let table: [(Op, Option<&str>); 7] = [
            (put(coll::SESSIONS, "s1"), Some("s1")),
            (put(&coll::outbox("s2"), "00000000000000000001"), Some("s2")),
            (
                Op::Del {
                    coll: coll::tasks("s3"),
                    key: "t".into(),
                },
                Some("s3"),
            ),
            (put(coll::DEAD_LETTER, "t"), None),
            (put("counters", "k"), None),
            (
                Op::Incr {
                    coll: "counters".into(),
                    key: "k".into(),
                    by: 1,
                },
                None,
            ),
            (
                Op::Deliver {
                    route: "s4".into(),
                    result: Bytes::new(),
                },
                None,
            ),
        ];
        for (op, want) in table {
            assert_eq!(session_of(&op), want, "{op:?}");
        }
    }
}
