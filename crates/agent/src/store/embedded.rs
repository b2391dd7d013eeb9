//! The embedded default: one `redb` file, one table of `coll \x1f key -> bytes`.
//! redb commits are synchronous and fsync'd, so they run on the blocking pool.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use futures::{future::BoxFuture, FutureExt};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Fence, Fenced, Mismatch, Op, StoreBackend, StoreResult};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Separates the collection from the key; sorts below every printable character.
const SEP: char = '\u{1f}';

pub struct RedbBackend {
    db: Arc<Database>,
}

impl RedbBackend {
    pub fn open(path: &Path) -> StoreResult<RedbBackend> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(KV)?;
        txn.commit()?;
        Ok(RedbBackend { db: Arc::new(db) })
    }
}

fn full_key(coll: &str, key: &str) -> String {
    format!("{coll}{SEP}{key}")
}

fn apply_ops(table: &mut redb::Table<'_, &str, &[u8]>, ops: &[Op]) -> StoreResult<()> {
    for op in ops {
        match op {
            Op::Put { coll, key, val } => {
                table.insert(full_key(coll, key).as_str(), val.as_ref())?;
            }
            Op::Del { coll, key } => {
                table.remove(full_key(coll, key).as_str())?;
            }
            Op::Incr { coll, key, by } => {
                let k = full_key(coll, key);
                let cur = table
                    .get(k.as_str())?
                    .and_then(|v| std::str::from_utf8(v.value()).ok().and_then(|s| s.parse::<i64>().ok()))
                    .unwrap_or(0);
                table.insert(k.as_str(), (cur + by).to_string().as_bytes())?;
            }
            // Shared dispatch runs only on a store with a shared queue (Redis); one
            // process on an embedded store dispatches from memory.
            Op::Publish { .. } | Op::Retire { .. } | Op::Deliver { .. } | Op::Delivered { .. } | Op::Revoke { .. } => {
                debug_assert!(false, "a shared-queue op reached the embedded store: {op:?}");
            }
        }
    }
    Ok(())
}

impl StoreBackend for RedbBackend {
    /// One process opens the file (redb locks it): there is no other owner to
    /// fence off, so fences are not checked.
    fn apply<'a>(&'a self, ops: Arc<Vec<Op>>, _fences: &'a [Fence]) -> BoxFuture<'a, StoreResult<Result<(), Fenced>>> {
        let db = self.db.clone();
        async move {
            tokio::task::spawn_blocking(move || -> StoreResult<Result<(), Fenced>> {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(KV)?;
                    apply_ops(&mut table, &ops)?;
                }
                txn.commit()?;
                Ok(Ok(()))
            })
            .await?
        }
        .boxed()
    }

    fn scan<'a>(&'a self, coll: &'a str) -> BoxFuture<'a, StoreResult<Vec<(String, Bytes)>>> {
        let db = self.db.clone();
        let coll = coll.to_string();
        async move {
            tokio::task::spawn_blocking(move || -> StoreResult<Vec<(String, Bytes)>> {
                let txn = db.begin_read()?;
                let table = txn.open_table(KV)?;
                let lo = format!("{coll}{SEP}");
                let hi = format!("{coll}\u{20}");
                let mut out = Vec::new();
                for entry in table.range(lo.as_str()..hi.as_str())? {
                    let (k, v) = entry?;
                    let key = k.value()[lo.len()..].to_string();
                    out.push((key, Bytes::copy_from_slice(v.value())));
                }
                Ok(out)
            })
            .await?
        }
        .boxed()
    }

    fn get<'a>(&'a self, coll: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Bytes>>> {
        let db = self.db.clone();
        let k = full_key(coll, key);
        async move {
            tokio::task::spawn_blocking(move || -> StoreResult<Option<Bytes>> {
                let txn = db.begin_read()?;
                let table = txn.open_table(KV)?;
                Ok(table.get(k.as_str())?.map(|v| Bytes::copy_from_slice(v.value())))
            })
            .await?
        }
        .boxed()
    }

    fn compare_and_apply<'a>(
        &'a self,
        guard: (&'a str, &'a str),
        expected: Option<Bytes>,
        ops: Vec<Op>,
    ) -> BoxFuture<'a, StoreResult<Result<(), Mismatch>>> {
        let db = self.db.clone();
        let k = full_key(guard.0, guard.1);
        async move {
            tokio::task::spawn_blocking(move || -> StoreResult<Result<(), Mismatch>> {
                // redb has one writer at a time: the read and the writes below are
                // one atomic step.
                let txn = db.begin_write()?;
                let outcome = {
                    let mut table = txn.open_table(KV)?;
                    let current = table.get(k.as_str())?.map(|v| Bytes::copy_from_slice(v.value()));
                    if current == expected {
                        apply_ops(&mut table, &ops)?;
                        Ok(())
                    } else {
                        Err(current)
                    }
                };
                if outcome.is_ok() {
                    txn.commit()?;
                } else {
                    txn.abort()?;
                }
                Ok(outcome)
            })
            .await?
        }
        .boxed()
    }
}
