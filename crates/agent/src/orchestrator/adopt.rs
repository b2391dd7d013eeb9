//! Adoption: loading a persisted session (and the tasks it offered) into memory,
//! when its agent resumes here or the replica starts on an embedded store.

use lattice_proto::agent::AgentResponse;
use prost::Message;

use crate::{
    records::{coll, SessionMeta, TaskRecord},
    session::Outbox,
    store::{StoreError, StoreResult},
};

use super::{now, Orchestrator};

use super::state::*;

impl Orchestrator {
    /// Loads a persisted session (and the tasks it offered) into memory, unless it
    /// is there already. Returns whether the session exists.
    pub(super) async fn adopt(&self, sid: &str) -> StoreResult<bool> {
        if self.inner.state.lock().sessions.contains_key(sid) {
            return Ok(true);
        }
        // A barrier first: this replica's own writes still in the group commit (an
        // eviction's deletes) land before the read, so an evicted session is not
        // read back to life.
        let barrier = self.inner.store.submit(Vec::new());
        self.inner.store.durable(barrier).await;
        let backend = self.inner.store.backend();
        let Some(meta) = backend.get(coll::SESSIONS, sid).await? else {
            return Ok(false);
        };
        let meta = SessionMeta::decode(meta)?;
        let frames = backend.scan(&coll::outbox(sid)).await?;
        let tasks = backend.scan(&coll::tasks(sid)).await?;
        let mut st = self.inner.state.lock();
        if st.sessions.contains_key(sid) {
            return Ok(true);
        }
        let now = now();
        let mut session = Session::new(meta, self.inner.cfg.dedupe_window, now.at);
        session.outbox = Outbox::new(session.meta.out_seq + 1);
        for (key, frame) in frames {
            let seq: u64 = key
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("outbox key {key} of session {sid}")))?;
            session.outbox.restore(
                seq,
                Pending {
                    frame: AgentResponse::decode(frame)?,
                    ticket: 0,
                },
            );
        }
        for (_, rec) in tasks {
            let rec = TaskRecord::decode(rec)?;
            session.outstanding += 1;
            if let Some(held) = st.tasks.get_mut(&rec.task_id) {
                // Taken from the shared queue for this requester before it came
                // here: its result now goes to the session, not the route.
                if held.requester == sid {
                    held.remote = false;
                }
                continue;
            }
            let mut task = Task::from_record(rec, Some(now.at));
            if st.rules.shared && matches!(task.phase, Phase::Queued | Phase::Assigned { .. }) {
                // Taken from the shared queue by the replica that held the session:
                // that replica (or the one that takes the entry over from it)
                // delivers the result to the route's stream.
                task.phase = Phase::Shared;
            }
            match &mut task.phase {
                Phase::Queued => st.enqueue(&task.capability, task.priority, task.id.clone(), now.at),
                Phase::Assigned { worker, orphaned_since } => {
                    if let Some(w) = st.sessions.get_mut(worker.as_str()).filter(|w| w.attached.is_some()) {
                        w.in_flight.insert(task.id.clone());
                        *orphaned_since = None;
                    }
                }
                Phase::Done { .. } | Phase::Shared => {}
            }
            st.tasks.insert(task.id.clone(), task);
        }
        st.sessions.insert(sid.to_string(), session);
        // Tasks other sessions hold that this worker still runs.
        st.reclaim(sid);
        Ok(true)
    }
}
