//! The sweeper: reassigns the tasks of workers gone too long, expires queued tasks
//! past their deadline, and forgets idle sessions.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tonic::Code;

use crate::{
    lanes::Lanes,
    records::TaskState,
    wire::{now_us, status},
};

use super::Inner;

use super::{routing::*, state::*};

/// Reassigns the tasks of workers gone too long, expires queued tasks past their
/// deadline, and forgets idle sessions.
pub(super) async fn sweep_task(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.draining.is_cancelled() {
            // A draining replica stops acting on shared state: its agents are
            // resuming elsewhere and the new owner decides for them.
            return;
        }
        let now = Instant::now();
        let mut st = inner.state.lock();
        if inner.draining.is_cancelled() {
            return;
        }
        let mut step = Step::default();
        let gone: Vec<(String, String)> = st
            .sessions
            .values()
            .filter(|s| s.detached_since.is_some_and(|t| now - t >= inner.cfg.reassign_after))
            .flat_map(|s| s.in_flight.iter().map(|id| (s.meta.session_id.clone(), id.clone())))
            .chain(
                st.tasks
                    .values()
                    .filter(|t| t.orphaned_since.is_some_and(|o| now - o >= inner.cfg.reassign_after))
                    .map(|t| (t.rec.worker.clone(), t.rec.task_id.clone())),
            )
            .collect();
        for (worker, id) in gone {
            // Only if the task is still that worker's; another may have taken it.
            if st.tasks.get(&id).is_some_and(|t| t.rec.worker == worker) {
                requeue(&inner, &mut st, &id, "its worker disconnected".into(), &mut step);
            } else if let Some(w) = st.sessions.get_mut(&worker) {
                w.in_flight.remove(&id);
            }
        }
        let expired: Vec<String> = st
            .tasks
            .values()
            .filter(|t| t.rec.state() == TaskState::Queued && t.rec.deadline_us > 0 && t.rec.deadline_us <= now_us())
            .map(|t| t.rec.task_id.clone())
            .collect();
        for id in expired {
            finish(
                &inner,
                &mut st,
                &id,
                status(Code::DeadlineExceeded, "deadline passed while queued"),
                Bytes::new(),
                &mut step,
            );
        }
        let idle: Vec<String> = st
            .sessions
            .values()
            .filter(|s| {
                s.detached_since
                    .is_some_and(|t| now - t >= inner.cfg.session_idle_timeout)
            })
            .map(|s| s.meta.session_id.clone())
            .collect();
        for sid in idle {
            tracing::info!(session = %sid, "idle session evicted");
            end_session(&inner, &mut st, &sid, &mut step);
        }
        // Lanes are cleaned lazily on pop; without workers for a capability, churn
        // (offers cancelled or expired while queued) would grow them unbounded.
        let State {
            lanes, tasks, queued, ..
        } = &mut *st;
        let total: usize = lanes.values().map(Lanes::len).sum();
        if total > 2 * *queued + 1024 {
            for lane in lanes.values_mut() {
                lane.retain(|id| tasks.get(id).is_some_and(|t| t.rec.state() == TaskState::Queued));
            }
        }
        dispatch(&inner, &mut st, &mut step);
        if !step.ops.is_empty() || !step.wake.is_empty() {
            commit(&inner, &mut st, step);
        }
    }
}
