//! Shared dispatch: the loops that connect this replica's state machine to the
//! shared queue (see [`crate::store::SharedQueue`]).
//!
//! * **take**: while attached workers here have room for a capability, take that
//!   many entries (highest priority first) and apply them as `Event::Take`; with
//!   nothing to take, block on the capability streams.
//! * **results**: read the result streams of the routes whose tasks wait here for
//!   another replica's answer, and apply them as `Event::Delivered`.
//! * **lease**: renew the entries this replica still works on, and take over
//!   entries of capabilities it has workers for that no replica renewed within the
//!   lease (a replica killed, paused or left without workers).
//!
//! * **revocations**: read the tasks requesters cancelled (on any replica), and
//!   stop them here if they run or wait here (`Event::Revoked`).
//!
//! All four stop when the replica drains: its agents resume elsewhere, and the
//! entries it held lapse to the replicas they reach.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Weak},
    time::Duration,
};

use lattice_proto::agent::TaskResult;
use prost::Message;

use crate::{
    records::TaskRecord,
    store::{Delivery, Fence, Op, Pulled, SharedQueue, StoreResult},
};

use super::{
    fencing,
    machine::{Event, Take},
    now, Inner, Phase, Step,
};

/// How long a blocking read waits before looking again at room and routes.
const BLOCK: Duration = Duration::from_millis(100);
/// Entries taken over per stream per lease round.
const REAP_LIMIT: usize = 64;

pub(super) fn spawn(inner: &Arc<Inner>, queue: SharedQueue) {
    let weak = Arc::downgrade(inner);
    tokio::spawn(take_loop(weak.clone(), queue.clone()));
    tokio::spawn(result_loop(weak.clone(), queue.clone()));
    tokio::spawn(revoke_loop(weak.clone(), queue.clone()));
    tokio::spawn(lease_loop(weak, queue));
}

/// The lease after which another replica may take over an entry; renewed three
/// times within it.
fn lease(inner: &Inner) -> Duration {
    inner.cfg.reassign_after.max(Duration::from_millis(300))
}

/// Retries a failing connection with a pause, until the orchestrator is gone.
async fn connect(weak: &Weak<Inner>, queue: &SharedQueue) -> Option<redis::aio::MultiplexedConnection> {
    loop {
        weak.upgrade()?;
        match queue.blocking_connection(BLOCK).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "shared queue: no connection; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn live(weak: &Weak<Inner>) -> Option<Arc<Inner>> {
    weak.upgrade().filter(|i| !i.draining.is_cancelled())
}

async fn take_loop(weak: Weak<Inner>, queue: SharedQueue) {
    let Some(mut conn) = connect(&weak, &queue).await else {
        return;
    };
    let mut grouped: HashSet<String> = HashSet::new();
    loop {
        let Some(inner) = live(&weak) else { return };
        let wakes = inner.shared_wake.clone().expect("set with shared dispatch");
        let (room, fences) = inner.room();
        if room.is_empty() {
            drop(inner);
            // Room appears with a change: a worker attaches, finishes or credits.
            let _ = tokio::time::timeout(Duration::from_secs(1), wakes.take.notified()).await;
            continue;
        }
        let outcome = async {
            for (cap, _) in &room {
                if !grouped.contains(cap) {
                    queue.ensure_group(cap).await?;
                    grouped.insert(cap.clone());
                }
            }
            let got = match queue.take(&mut conn, &inner.cfg.id, &room, &fences).await? {
                Ok(got) => got,
                Err(fenced) => return Ok(Err(fenced)),
            };
            if !got.is_empty() {
                return Ok(Ok(got));
            }
            // What a blocking read hands out is assigned by a fenced commit: a
            // replica that lost its workers holds at most these entries until
            // their lease lapses.
            let caps: Vec<String> = room.iter().map(|(c, _)| c.clone()).collect();
            queue.wait(&mut conn, &inner.cfg.id, &caps, BLOCK).await.map(Ok)
        };
        match outcome.await {
            Ok(Ok(got)) => inner.apply_taken(got),
            Ok(Err(fenced)) => inner.fenced_off(&fenced),
            Err(e) => {
                tracing::warn!(error = %e, "shared queue: take failed; retrying");
                drop(inner);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(c) = connect(&weak, &queue).await else { return };
                conn = c;
                grouped.clear();
            }
        }
    }
}

async fn result_loop(weak: Weak<Inner>, queue: SharedQueue) {
    let Some(mut conn) = connect(&weak, &queue).await else {
        return;
    };
    // Per route, the last entry read: entries are deleted once applied, but the
    // delete lands with a later commit.
    let mut cursors: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let Some(inner) = live(&weak) else { return };
        let wakes = inner.shared_wake.clone().expect("set with shared dispatch");
        let routes = inner.awaited_routes();
        cursors.retain(|r, _| routes.contains(r));
        for r in routes {
            cursors.entry(r).or_insert_with(|| "0".to_string());
        }
        if cursors.is_empty() {
            drop(inner);
            let _ = tokio::time::timeout(Duration::from_secs(1), wakes.results.notified()).await;
            continue;
        }
        let reading: Vec<(String, String)> = cursors.iter().map(|(r, c)| (r.clone(), c.clone())).collect();
        match queue.results(&mut conn, &reading, BLOCK).await {
            Ok(got) => {
                for d in &got {
                    cursors.insert(d.route.clone(), d.entry.clone());
                }
                inner.apply_delivered(got);
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared queue: reading results failed; retrying");
                drop(inner);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(c) = connect(&weak, &queue).await else { return };
                conn = c;
            }
        }
    }
}

async fn revoke_loop(weak: Weak<Inner>, queue: SharedQueue) {
    let Some(mut conn) = connect(&weak, &queue).await else {
        return;
    };
    // Only cancellations from now on: a task cancelled earlier was answered, and
    // this replica holds none of it yet.
    let mut after = loop {
        match queue.revoked_tail().await {
            Ok(tail) => break tail,
            Err(e) => {
                tracing::warn!(error = %e, "shared queue: reading revocations failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if live(&weak).is_none() {
                    return;
                }
            }
        }
    };
    loop {
        if live(&weak).is_none() {
            return;
        }
        match queue.revoked(&mut conn, &after, BLOCK * 10).await {
            Ok(got) => {
                let Some(inner) = live(&weak) else { return };
                if let Some((last, _)) = got.last() {
                    after = last.clone();
                }
                inner.apply_each(got, |(_, task_id)| Ok(Event::Revoked { task_id }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared queue: reading revocations failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(c) = connect(&weak, &queue).await else { return };
                conn = c;
            }
        }
    }
}

async fn lease_loop(weak: Weak<Inner>, queue: SharedQueue) {
    loop {
        let period = {
            let Some(inner) = live(&weak) else { return };
            lease(&inner) / 3
        };
        tokio::time::sleep(period).await;
        let Some(inner) = live(&weak) else { return };
        if let Err(e) = inner.lease_round(&queue).await {
            tracing::warn!(error = %e, "shared queue: lease round failed");
        }
    }
}

impl Inner {
    /// Per capability, how many more tasks the attached workers here could start
    /// than are queued here already; and the fences of those workers.
    fn room(&self) -> (Vec<(String, usize)>, Vec<Fence>) {
        let durable = self.store.durable_now();
        let st = self.state.lock();
        let at = now().at;
        let mut room: HashMap<&str, usize> = HashMap::new();
        for s in st.sessions.values().filter(|s| s.can_take(at)) {
            let free = (s.meta.max_in_flight.max(1) as usize).saturating_sub(s.in_flight.len());
            for cap in &s.meta.capabilities {
                *room.entry(cap.as_str()).or_default() += free;
            }
        }
        for t in st.tasks.values().filter(|t| t.is_queued()) {
            if let Some(r) = room.get_mut(t.capability.as_str()) {
                *r = r.saturating_sub(1);
            }
        }
        let mut out: Vec<(String, usize)> = room
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        out.sort();
        (out, fencing::worker_fences(&st, durable))
    }

    /// Routes of the tasks here that wait for another replica's result, for
    /// requesters attached here: a replica holding a session only detached (its
    /// agent moved on) must not consume the results the new holder waits for.
    fn awaited_routes(&self) -> BTreeSet<String> {
        let st = self.state.lock();
        st.tasks
            .values()
            .filter(|t| t.phase == Phase::Shared)
            .filter(|t| st.sessions.get(&t.requester).is_some_and(|s| s.attached.is_some()))
            .map(|t| t.route.clone())
            .collect()
    }

    fn apply_taken(&self, got: Vec<Pulled>) {
        self.apply_each(got, |p| match TaskRecord::decode(p.record) {
            Ok(record) => Ok(Event::Take(Box::new(Take {
                priority: p.priority,
                entry: p.entry,
                deliveries: p.deliveries,
                record,
            }))),
            Err(e) => {
                tracing::error!(entry = p.entry, error = %e, "shared queue: undecodable entry retired");
                Err(Op::Retire {
                    capability: p.capability,
                    priority: p.priority,
                    entry: p.entry,
                })
            }
        });
    }

    fn apply_delivered(&self, got: Vec<Delivery>) {
        self.apply_each(got, |d| match TaskResult::decode(d.result) {
            Ok(result) => Ok(Event::Delivered {
                route: d.route,
                entry: d.entry,
                result,
            }),
            Err(e) => {
                tracing::error!(route = d.route, entry = d.entry, error = %e, "shared queue: undecodable result dropped");
                Err(Op::Delivered {
                    route: d.route,
                    entry: d.entry,
                })
            }
        });
    }

    /// Applies what was read from the shared queue as events (or, for what does
    /// not decode, the op that removes it), all under one lock hold and one ticket.
    /// A draining replica applies nothing: what it does not renew lapses to others.
    fn apply_each<T>(&self, got: Vec<T>, event: impl Fn(T) -> Result<Event, Op>) {
        if got.is_empty() {
            return;
        }
        let mut step = Step::default();
        let mut st = self.state.lock();
        if self.draining.is_cancelled() {
            return;
        }
        let now = now();
        for item in got {
            match event(item) {
                Ok(e) => st.apply_into(e, now, &mut step),
                Err(op) => step.ops.push(op),
            }
        }
        self.commit(&mut st, step);
    }

    /// Renews what this replica works on and takes over lapsed entries.
    async fn lease_round(&self, queue: &SharedQueue) -> StoreResult<()> {
        let durable = self.store.durable_now();
        let (held, caps, fences) = {
            let st = self.state.lock();
            let attached_caps: BTreeSet<String> = st
                .sessions
                .values()
                .filter(|s| s.attached.is_some())
                .flat_map(|s| s.meta.capabilities.iter().cloned())
                .collect();
            let mut held = Vec::new();
            for t in st.tasks.values() {
                let Some(entry) = &t.entry else { continue };
                // A task runs here, or waits for a worker that is here: keep it.
                // Otherwise let it lapse to a replica with workers for it.
                let working = match &t.phase {
                    Phase::Assigned { worker, .. } => st.sessions.get(worker).is_some_and(|w| w.attached.is_some()),
                    Phase::Queued => attached_caps.contains(&t.capability),
                    _ => false,
                };
                if working {
                    held.push((t.capability.clone(), entry.priority, entry.id.clone()));
                }
            }
            (held, attached_caps, fencing::worker_fences(&st, durable))
        };
        if let Err(fenced) = queue.renew(&self.cfg.id, &held, &fences).await? {
            self.fenced_off(&fenced);
            return Ok(());
        }
        if caps.is_empty() {
            return Ok(());
        }
        // Taking over is two commands (XPENDING, then XCLAIM with its idle guard);
        // a replica that lost its workers finds out first.
        if let Err(fenced) = self.store.check(&fences).await? {
            self.fenced_off(&fenced);
            return Ok(());
        }
        let published = queue.capabilities().await?;
        let ours: Vec<String> = published.into_iter().filter(|c| caps.contains(c)).collect();
        let taken = queue.reap(&self.cfg.id, &ours, lease(self), REAP_LIMIT).await?;
        if !taken.is_empty() {
            tracing::info!(
                entries = taken.len(),
                "shared queue: took over entries no replica renewed"
            );
        }
        self.apply_taken(taken);
        Ok(())
    }
}
