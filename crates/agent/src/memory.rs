//! The memory broker: named namespaces (`memory_ref`) of versioned blocks shared by
//! agents. Every write bumps the namespace version under optimistic concurrency (a
//! writer that saw an older version gets ABORTED); the op log keeps the last
//! [`OPLOG_KEEP`] writes so a client that resumes at version v receives the delta
//! since v, or a snapshot when the log no longer reaches back that far.

use bytes::Bytes;
use lattice_proto::agent::{memory_op, MemoryBlock, MemoryOp, MemoryResult};
use prost::Message;
use tonic::Code;

use crate::{
    store::{seq_key, Op, Store},
    wire::{ok_status, status},
};

/// Writes kept per namespace for delta sync.
pub const OPLOG_KEEP: u64 = 1024;

#[derive(Clone)]
pub struct MemoryBroker {
    store: Store,
}

struct Names {
    versions: String,
    blocks: String,
    log: String,
    idem: String,
}

fn names(tenant: &str, mref: &str) -> Names {
    Names {
        versions: format!("mem:v:{tenant}"),
        blocks: format!("mem:b:{tenant}:{mref}"),
        log: format!("mem:l:{tenant}:{mref}"),
        idem: format!("mem:i:{tenant}:{mref}"),
    }
}

fn parse_version(v: Option<Bytes>) -> u64 {
    v.and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

impl MemoryBroker {
    pub fn new(store: Store) -> MemoryBroker {
        MemoryBroker { store }
    }

    /// Runs one op. `idempotency_key` makes a resent write return its first outcome.
    pub async fn handle(&self, tenant: &str, op: MemoryOp, idempotency_key: &str) -> MemoryResult {
        let mref = op.memory_ref.clone();
        let mut res = match self.run(tenant, op, idempotency_key).await {
            Ok(r) => r,
            Err(e) => MemoryResult {
                status: Some(status(Code::Unavailable, format!("memory store: {e}"))),
                ..MemoryResult::default()
            },
        };
        res.memory_ref = mref;
        res
    }

    async fn run(&self, tenant: &str, op: MemoryOp, idem: &str) -> anyhow::Result<MemoryResult> {
        if op.memory_ref.is_empty() {
            return Ok(MemoryResult {
                status: Some(status(Code::InvalidArgument, "memory op without a memory_ref")),
                ..MemoryResult::default()
            });
        }
        let n = names(tenant, &op.memory_ref);
        let backend = self.store.backend();
        let version = parse_version(backend.get(&n.versions, &op.memory_ref).await?);
        match op.op {
            None => Ok(MemoryResult {
                status: Some(status(Code::InvalidArgument, "memory op without get, put or sync")),
                ..MemoryResult::default()
            }),
            Some(memory_op::Op::Get(get)) => {
                let all = backend.scan(&n.blocks).await?;
                let blocks = all
                    .into_iter()
                    .filter(|(k, _)| get.block_ids.is_empty() || get.block_ids.contains(k))
                    .filter_map(|(_, v)| MemoryBlock::decode(v).ok())
                    .collect();
                Ok(MemoryResult {
                    version,
                    blocks,
                    status: Some(ok_status()),
                    ..MemoryResult::default()
                })
            }
            Some(memory_op::Op::Sync(sync)) => {
                if sync.since_version >= version {
                    return Ok(MemoryResult {
                        version,
                        status: Some(ok_status()),
                        ..MemoryResult::default()
                    });
                }
                let log: Vec<MemoryBlock> = backend
                    .scan(&n.log)
                    .await?
                    .into_iter()
                    .filter_map(|(_, v)| MemoryBlock::decode(v).ok())
                    .filter(|b| b.version > sync.since_version)
                    .collect();
                if log.first().map(|b| b.version) == Some(sync.since_version + 1) {
                    Ok(MemoryResult {
                        version,
                        blocks: log,
                        status: Some(ok_status()),
                        ..MemoryResult::default()
                    })
                } else {
                    // The log no longer reaches back to the client's version.
                    let blocks = backend
                        .scan(&n.blocks)
                        .await?
                        .into_iter()
                        .filter_map(|(_, v)| MemoryBlock::decode(v).ok())
                        .collect();
                    Ok(MemoryResult {
                        version,
                        blocks,
                        snapshot: true,
                        status: Some(ok_status()),
                        ..MemoryResult::default()
                    })
                }
            }
            Some(memory_op::Op::Put(put)) => {
                if put.block_id.is_empty() {
                    return Ok(MemoryResult {
                        version,
                        status: Some(status(Code::InvalidArgument, "memory put without a block_id")),
                        ..MemoryResult::default()
                    });
                }
                if put.expected_version != version {
                    return self.conflict_or_replay(&n, idem, version, put.expected_version).await;
                }
                let next = version + 1;
                let block = MemoryBlock {
                    block_id: put.block_id.clone(),
                    value: put.value,
                    version: next,
                };
                let encoded = Bytes::from(block.encode_to_vec());
                let mut ops = vec![
                    Op::Put {
                        coll: n.versions.clone(),
                        key: op.memory_ref.clone(),
                        val: Bytes::from(next.to_string()),
                    },
                    Op::Put {
                        coll: n.blocks.clone(),
                        key: put.block_id,
                        val: encoded.clone(),
                    },
                    Op::Put {
                        coll: n.log.clone(),
                        key: seq_key(next),
                        val: encoded,
                    },
                ];
                if next > OPLOG_KEEP {
                    ops.push(Op::Del {
                        coll: n.log.clone(),
                        key: seq_key(next - OPLOG_KEEP),
                    });
                }
                if !idem.is_empty() {
                    ops.push(Op::Put {
                        coll: n.idem.clone(),
                        key: idem.to_string(),
                        val: Bytes::from(next.to_string()),
                    });
                }
                let expected = (version > 0).then(|| Bytes::from(version.to_string()));
                match backend
                    .compare_and_apply((&n.versions, &op.memory_ref), expected, ops)
                    .await?
                {
                    Ok(()) => Ok(MemoryResult {
                        version: next,
                        status: Some(ok_status()),
                        ..MemoryResult::default()
                    }),
                    // Another writer (perhaps on another replica) got there first.
                    Err(current) => {
                        self.conflict_or_replay(&n, idem, parse_version(current), put.expected_version)
                            .await
                    }
                }
            }
        }
    }

    async fn conflict_or_replay(
        &self,
        n: &Names,
        idem: &str,
        current: u64,
        expected: u64,
    ) -> anyhow::Result<MemoryResult> {
        if !idem.is_empty() {
            if let Some(v) = self.store.backend().get(&n.idem, idem).await? {
                // This very write already landed (its ack was lost): same answer again.
                return Ok(MemoryResult {
                    version: parse_version(Some(v)),
                    status: Some(ok_status()),
                    ..MemoryResult::default()
                });
            }
        }
        Ok(MemoryResult {
            version: current,
            status: Some(status(
                Code::Aborted,
                format!("version conflict: expected {expected}, namespace is at {current}"),
            )),
            ..MemoryResult::default()
        })
    }
}
