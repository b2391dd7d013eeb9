//! Durable state of the agent plane: sessions, outboxes, tasks, memory blocks, the
//! tool idempotency cache. Two backends behind one [`StoreBackend`] trait: an embedded
//! `redb` file (one process) and Redis (several orchestrator replicas).
//!
//! Writes go through a group committer ([`Store::submit`]): callers append ops and
//! get a ticket; one task commits everything queued in one transaction and then
//! publishes the highest durable ticket. Nothing that depends on a write (an ack, a
//! frame to a peer) leaves the process before its ticket is durable, and since
//! tickets commit in order, what is durable is always a prefix of what was
//! submitted: a `kill -9` loses only frames nobody was told about.
//!
//! On a store that replicas share, writes are *fenced*: each carries the epochs of
//! the sessions it acts for ([`Fence`]), and a commit whose epochs are not the
//! owners' lands nothing ([`Fenced`]). The replica that submitted it lost those
//! sessions to another (it was paused or partitioned while its agents moved on);
//! [`Store::on_fenced`] tells it, before any waiter learns the ticket is done.

mod embedded;
mod redis_queue;
mod redis_store;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

pub use embedded::RedbBackend;
pub use redis_queue::{Delivery, Pulled, SharedQueue};
pub use redis_store::RedisBackend;

/// One write. Collections are ordered maps of string keys (a redb key range, a
/// Redis hash).
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        coll: String,
        key: String,
        val: Bytes,
    },
    Del {
        coll: String,
        key: String,
    },
    /// Adds `by` to a decimal counter (missing = 0).
    Incr {
        coll: String,
        key: String,
        by: i64,
    },
    /// Shared dispatch only (Redis): appends a task record to its capability's
    /// priority stream in the shared queue.
    Publish {
        capability: String,
        priority: u32,
        record: Bytes,
    },
    /// Shared dispatch only: the entry a replica took is done; it leaves the queue.
    Retire {
        capability: String,
        priority: u32,
        entry: String,
    },
    /// Shared dispatch only: a result for a requester attached elsewhere, appended
    /// to its route's result stream.
    Deliver {
        route: String,
        result: Bytes,
    },
    /// Shared dispatch only: a delivered result was applied; it leaves the stream.
    Delivered {
        route: String,
        entry: String,
    },
    /// Shared dispatch only: the requester cancelled this task; whichever replica
    /// runs it (or takes it later) stops it.
    Revoke {
        task_id: String,
    },
}

/// The owner epoch a write for a session is made under. Every attach of a stream
/// to a session raises its epoch by one and *claims* it: the claim succeeds only if
/// the owner's epoch is still the one before (a replica holding a stale copy of the
/// session, or one another replica already claimed past, fails). Every other write
/// for the session succeeds only while its epoch is still the owner's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub sid: String,
    /// The epoch the writes are made under (after a claim: the claimed one).
    pub epoch: u64,
    /// For a claim, the first epoch claimed (one batch can hold two attaches of
    /// the same session): the owner's must be the one before it.
    pub claims_from: Option<u64>,
}

impl Fence {
    /// Writes for a session under the epoch its stream here holds.
    pub fn write(sid: &str, epoch: u64) -> Fence {
        Fence {
            sid: sid.to_string(),
            epoch,
            claims_from: None,
        }
    }

    /// An attach raising the session's epoch to `epoch`.
    pub fn claim(sid: &str, epoch: u64) -> Fence {
        Fence {
            sid: sid.to_string(),
            epoch,
            claims_from: Some(epoch),
        }
    }
}

/// A commit refused because another replica owns these sessions now: nothing of
/// it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub sessions: Vec<String>,
}

/// Called by the group committer with the sessions a commit was fenced off from,
/// before the commit's ticket is published.
pub type FencedHook = Box<dyn Fn(&Fenced) + Send + Sync>;

/// The outcome of a compare-and-apply whose guard did not match: the guard's
/// current value (`None` = absent).
pub type Mismatch = Option<Bytes>;

pub trait StoreBackend: Send + Sync + 'static {
    /// Applies every op atomically if every fence holds; else applies nothing and
    /// names the sessions whose fences failed. A backend only one process opens
    /// has no other owner to fence off and ignores fences.
    fn apply<'a>(&'a self, ops: Arc<Vec<Op>>, fences: &'a [Fence]) -> BoxFuture<'a, StoreResult<Result<(), Fenced>>>;
    /// Whether several processes share this backend, so fences matter.
    fn shared(&self) -> bool {
        false
    }
    /// Checks fences without writing (for the shared queue's reads that take
    /// entries): the sessions whose fences fail.
    fn check<'a>(&'a self, fences: &'a [Fence]) -> BoxFuture<'a, StoreResult<Result<(), Fenced>>> {
        let _ = fences;
        futures::FutureExt::boxed(async { Ok(Ok(())) })
    }
    /// Every entry of a collection, in key order.
    fn scan<'a>(&'a self, coll: &'a str) -> BoxFuture<'a, StoreResult<Vec<(String, Bytes)>>>;
    fn get<'a>(&'a self, coll: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Bytes>>>;
    /// Atomically: if the guard entry equals `expected` (`None` = absent), apply the
    /// ops; else change nothing and return the guard's current value.
    fn compare_and_apply<'a>(
        &'a self,
        guard: (&'a str, &'a str),
        expected: Option<Bytes>,
        ops: Vec<Op>,
    ) -> BoxFuture<'a, StoreResult<Result<(), Mismatch>>>;
}

/// Why a store operation failed. The group committer retries on any of them;
/// callers report them as UNAVAILABLE.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis at {0}: no connection within 5 s")]
    ConnectTimeout(String),
    #[error("a shared-queue op cannot be part of a compare-and-apply")]
    QueueOpInScript,
    #[error("unexpected reply from the compare-and-apply script: {0}")]
    ScriptReply(String),
    #[error("a stored record does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("a stored counter or key is corrupt: {0}")]
    Corrupt(String),
    #[error("creating the store's directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the store's worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

// redb reports each stage with its own type; all are `redb::Error`.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type StoreResult<T> = Result<T, StoreError>;

/// `--memory-store` names neither a path, `redb://` nor `redis://`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported store '{0}': use a file path, redb://PATH or redis://HOST:PORT")]
pub struct UnsupportedStore(pub String);

/// What `--memory-store` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Redb(std::path::PathBuf),
    Redis(String),
}

impl std::str::FromStr for StoreUrl {
    type Err = UnsupportedStore;

    fn from_str(s: &str) -> Result<StoreUrl, UnsupportedStore> {
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            Ok(StoreUrl::Redis(s.to_string()))
        } else if let Some(path) = s.strip_prefix("redb://") {
            Ok(StoreUrl::Redb(path.into()))
        } else if s.contains("://") {
            Err(UnsupportedStore(s.to_string()))
        } else {
            Ok(StoreUrl::Redb(s.into()))
        }
    }
}

/// Cheap-to-clone handle: the backend plus the group committer.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
    shared: Arc<Shared>,
    /// The shared task queue, on a store that several replicas share (Redis).
    queue: Option<SharedQueue>,
}

struct Shared {
    /// Last ticket handed out, the ops not yet taken by the committer and their
    /// fences.
    pending: Mutex<Pending>,
    wake: Notify,
    durable: watch::Sender<u64>,
    /// Whether fences are kept (a shared backend).
    fencing: bool,
    on_fenced: std::sync::OnceLock<FencedHook>,
    /// Commits refused by a fence, since start.
    fenced: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Pending {
    ticket: u64,
    ops: Vec<Op>,
    fences: Vec<Fence>,
}

impl Store {
    /// Opens the backend the URL names. `prefix` namespaces Redis keys, so tests and
    /// deployments can share one server.
    pub async fn open(url: &StoreUrl, prefix: &str) -> StoreResult<Store> {
        match url {
            StoreUrl::Redb(path) => Ok(Store::new(Arc::new(RedbBackend::open(path)?))),
            StoreUrl::Redis(url) => {
                let backend = Arc::new(RedisBackend::connect(url, prefix).await?);
                let queue = SharedQueue::connect(url, prefix).await?;
                Ok(Store {
                    queue: Some(queue),
                    ..Store::new(backend)
                })
            }
        }
    }

    pub fn new(backend: Arc<dyn StoreBackend>) -> Store {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            durable: watch::channel(0).0,
            fencing: backend.shared(),
            on_fenced: std::sync::OnceLock::new(),
            fenced: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(commit_task(backend.clone(), shared.clone()));
        Store {
            backend,
            shared,
            queue: None,
        }
    }

    /// Queues ops for the next group commit and returns their ticket. An empty
    /// batch still gets a ticket: a barrier after everything submitted before.
    pub fn submit(&self, ops: Vec<Op>) -> u64 {
        self.submit_fenced(ops, Vec::new())
    }

    /// [`Store::submit`] for writes made under these sessions' epochs: on a shared
    /// store the commit lands only if they are still the owners'.
    pub fn submit_fenced(&self, ops: Vec<Op>, fences: Vec<Fence>) -> u64 {
        let ticket = {
            let mut p = self.shared.pending.lock();
            p.ticket += 1;
            p.ops.extend(ops);
            if self.shared.fencing {
                p.fences.extend(fences);
            }
            p.ticket
        };
        self.shared.wake.notify_one();
        ticket
    }

    /// Drops every op submitted and not yet committed: they were made from state
    /// a fence proved stale. Their tickets still complete. The caller holds the
    /// lock under which everything is submitted, so nothing newer is dropped.
    pub fn discard_pending(&self) {
        let mut p = self.shared.pending.lock();
        p.ops.clear();
        p.fences.clear();
    }

    /// Sets what runs when a commit is refused by a fence (once; later calls are
    /// ignored). Without one, a refused commit is only dropped.
    pub fn on_fenced(&self, hook: FencedHook) {
        let _ = self.shared.on_fenced.set(hook);
    }

    /// Whether writes are fenced (replicas share this store).
    pub fn fencing(&self) -> bool {
        self.shared.fencing
    }

    /// Checks fences without writing: see [`StoreBackend::check`].
    pub async fn check(&self, fences: &[Fence]) -> StoreResult<Result<(), Fenced>> {
        self.backend.check(fences).await
    }

    /// Commits refused by a fence since start.
    pub fn fenced_commits(&self) -> u64 {
        self.shared.fenced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `ticket` is committed.
    pub async fn durable(&self, ticket: u64) {
        let mut rx = self.shared.durable.subscribe();
        // The sender lives in `shared`, which we hold: the channel cannot close.
        let _ = rx.wait_for(|d| *d >= ticket).await;
    }

    pub fn durable_now(&self) -> u64 {
        *self.shared.durable.borrow()
    }

    pub fn backend(&self) -> &dyn StoreBackend {
        &*self.backend
    }

    /// The shared task queue, when replicas share this store.
    pub fn queue(&self) -> Option<&SharedQueue> {
        self.queue.as_ref()
    }
}

async fn commit_task(backend: Arc<dyn StoreBackend>, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let (ticket, ops, fences) = {
            let mut p = shared.pending.lock();
            (p.ticket, std::mem::take(&mut p.ops), std::mem::take(&mut p.fences))
        };
        if ticket == *shared.durable.borrow() {
            shared.wake.notified().await;
            // Exit when every handle is gone: only the committer holds `shared` then.
            if Arc::strong_count(&shared) == 1 {
                return;
            }
            continue;
        }
        let ops = Arc::new(coalesce(ops));
        let fences = merge_fences(fences);
        loop {
            match backend.apply(ops.clone(), &fences).await {
                Ok(Ok(())) => break,
                Ok(Err(fenced)) => {
                    shared.fenced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match shared.on_fenced.get() {
                        Some(hook) => hook(&fenced),
                        None => tracing::warn!(sessions = ?fenced.sessions, "agent store: commit refused by a fence"),
                    }
                    break;
                }
                Err(e) => {
                    // Nothing waiting on these ops proceeds until they land: the store
                    // being down stalls the agent plane instead of losing messages.
                    tracing::error!(error = %e, "agent store commit failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        backoff = Duration::from_millis(10);
        shared.durable.send_replace(ticket);
    }
}

/// Keeps only the last Put or Del of each key: within one atomic commit the
/// earlier ones are invisible. Under load most writes are transient (an outbox
/// frame acknowledged, a task record updated twice and deleted, session metadata
/// rewritten per frame), so this removes most of the work.
fn coalesce(ops: Vec<Op>) -> Vec<Op> {
    if ops.len() < 2 {
        return ops;
    }
    let mut seen = std::collections::HashSet::with_capacity(ops.len());
    let mut kept: Vec<Op> = Vec::with_capacity(ops.len());
    for op in ops.into_iter().rev() {
        match &op {
            Op::Put { coll, key, .. } | Op::Del { coll, key } => {
                if seen.insert((coll.clone(), key.clone())) {
                    kept.push(op);
                }
            }
            // Counters add up and queue operations are events: never dropped.
            Op::Incr { .. }
            | Op::Publish { .. }
            | Op::Retire { .. }
            | Op::Deliver { .. }
            | Op::Delivered { .. }
            | Op::Revoke { .. } => kept.push(op),
        }
    }
    kept.reverse();
    kept
}

/// One fence per session: the highest epoch (what a batch wrote last) and, if any
/// write claimed, the lowest epoch claimed. Sorted, so a batch checks in one order.
fn merge_fences(fences: Vec<Fence>) -> Vec<Fence> {
    let mut by_sid: std::collections::BTreeMap<String, Fence> = std::collections::BTreeMap::new();
    for f in fences {
        match by_sid.get_mut(&f.sid) {
            None => {
                by_sid.insert(f.sid.clone(), f);
            }
            Some(m) => {
                m.epoch = m.epoch.max(f.epoch);
                m.claims_from = match (m.claims_from, f.claims_from) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    by_sid.into_values().collect()
}

/// Zero-padded so lexical key order is numeric order.
pub fn seq_key(seq: u64) -> String {
    format!("{seq:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn group_commit_makes_tickets_durable_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreUrl::Redb(dir.path().join("s.redb")), "t")
            .await
            .unwrap();
        let mut last = 0;
        for i in 0..100u64 {
            last = store.submit(vec![Op::Put {
                coll: "c".into(),
                key: seq_key(i),
                val: Bytes::from(i.to_string()),
            }]);
        }
        store.durable(last).await;
        let all = store.backend().scan("c").await.unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(all[42], (seq_key(42), Bytes::from("42")));
        assert!(store.durable_now() >= last);
    }

    #[test]
    fn coalescing_keeps_the_last_write_per_key() {
        let put = |k: &str, v: &str| Op::Put {
            coll: "c".into(),
            key: k.into(),
            val: Bytes::from(v.to_string()),
        };
        let ops = vec![
            put("a", "1"),
            put("b", "1"),
            put("a", "2"),
            Op::Del {
                coll: "c".into(),
                key: "b".into(),
            },
            Op::Incr {
                coll: "n".into(),
                key: "x".into(),
                by: 1,
            },
            Op::Incr {
                coll: "n".into(),
                key: "x".into(),
                by: 1,
            },
        ];
        let out = format!("{:?}", coalesce(ops));
        assert_eq!(out.matches("Put").count(), 1);
        assert!(out.contains("b\"2\""), "{out}");
        assert_eq!(out.matches("Del").count(), 1);
        assert_eq!(out.matches("Incr").count(), 2);
    }

    #[test]
    fn fences_merge_to_the_latest_epoch_per_session() {
        let w = Fence::write;
        let c = Fence::claim;
        let merged = |sid: &str, epoch, claims_from| Fence {
            sid: sid.into(),
            epoch,
            claims_from,
        };
        // (fences submitted, merged)
        let table = [
            (vec![], vec![]),
            (vec![w("a", 3)], vec![w("a", 3)]),
            // A re-attach on this replica: the claim covers the earlier writes.
            (vec![w("a", 3), c("a", 4)], vec![c("a", 4)]),
            (vec![c("a", 4), w("a", 4)], vec![c("a", 4)]),
            // Two attaches in one batch: the owner must be at 3 before it.
            (vec![c("a", 4), w("a", 4), c("a", 5)], vec![merged("a", 5, Some(4))]),
            (vec![w("b", 1), w("a", 2)], vec![w("a", 2), w("b", 1)]),
        ];
        for (given, want) in table {
            assert_eq!(merge_fences(given.clone()), want, "{given:?}");
        }
    }

    #[test]
    fn store_urls() {
        assert_eq!(
            "redis://127.0.0.1:6379".parse(),
            Ok(StoreUrl::Redis("redis://127.0.0.1:6379".into()))
        );
        assert_eq!("redb:///tmp/x".parse(), Ok(StoreUrl::Redb("/tmp/x".into())));
        assert_eq!("state/a.redb".parse(), Ok(StoreUrl::Redb("state/a.redb".into())));
        assert!("postgres://x".parse::<StoreUrl>().is_err());
    }
}
