//! Adoption: loading a persisted session (and the tasks it offered) into memory,
//! when its agent resumes here or the replica starts on an embedded store.

use lattice_proto::agent::AgentResponse;
use prost::Message;
use tokio::time::Instant;

use crate::{
    lanes::Lanes,
    records::{coll, SessionMeta, TaskRecord, TaskState},
    session::Outbox,
};

use super::Orchestrator;

use super::state::*;

impl Orchestrator {
    /// Loads a persisted session (and the tasks it offered) into memory, unless it
    /// is there already. Returns whether the session exists.
    pub(super) async fn adopt(&self, sid: &str) -> anyhow::Result<bool> {
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
        let mut session = Session::new(meta, self.inner.cfg.dedupe_window);
        session.outbox = Outbox::new(session.meta.out_seq + 1);
        for (key, frame) in frames {
            let seq: u64 = key.parse()?;
            session.outbox.restore(
                seq,
                Pending {
                    frame: AgentResponse::decode(frame)?,
                    ticket: 0,
                },
            );
        }
        let now = Instant::now();
        for (_, rec) in tasks {
            let rec = TaskRecord::decode(rec)?;
            session.outstanding += 1;
            if st.tasks.contains_key(&rec.task_id) {
                continue;
            }
            let mut task = Task {
                rec,
                orphaned_since: None,
            };
            match TaskState::try_from(task.rec.state) {
                Ok(TaskState::Queued) => {
                    st.lanes
                        .entry(task.rec.capability.clone())
                        .or_insert_with(|| Lanes::new(self.inner.cfg.aging))
                        .push(task.rec.priority, task.rec.task_id.clone(), now);
                    st.queued += 1;
                }
                Ok(TaskState::Assigned) => match st.sessions.get_mut(&task.rec.worker) {
                    Some(w) if w.attached.is_some() => {
                        w.in_flight.insert(task.rec.task_id.clone());
                    }
                    _ => task.orphaned_since = Some(now),
                },
                _ => {}
            }
            st.tasks.insert(task.rec.task_id.clone(), task);
        }
        // Tasks other sessions hold that this worker still runs.
        let sid_owned = sid.to_string();
        let mine: Vec<String> = st
            .tasks
            .values_mut()
            .filter(|t| t.rec.worker == sid_owned && t.rec.state() == TaskState::Assigned)
            .map(|t| {
                t.orphaned_since = None;
                t.rec.task_id.clone()
            })
            .collect();
        session.in_flight.extend(mine);
        st.sessions.insert(sid_owned, session);
        Ok(true)
    }
}
