//! The sweeper: a timer that applies `Event::Sweep` (reassign vanished workers'
//! tasks, expire queued deadlines, forget idle sessions) four times a second.

use std::time::Duration;

use super::{machine::Event, now, Inner};

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
        let mut st = inner.state.lock();
        if inner.draining.is_cancelled() {
            return;
        }
        let step = st.apply(Event::Sweep, now());
        if !step.ops.is_empty() || !step.wake.is_empty() || !step.effects.is_empty() {
            inner.commit(&mut st, step);
        }
    }
}
