//! The shared task queue of replicas over one Redis: one stream per capability and
//! priority (`<prefix>:q:<capability>:<priority>`) read through one consumer group,
//! and one result stream per requester route (`<prefix>:r:<route>`).
//!
//! * Offers are appended by the group commit (`Op::Publish`), in the same
//!   commit as the requester's task record, so a task is queued exactly when
//!   its record is durable.
//! * A replica takes entries for the capabilities its attached workers have room
//!   for (`XREADGROUP >`, highest priority first); a taken entry sits in that
//!   replica's pending list until the task finishes (`Op::Retire`: XACK + XDEL in
//!   the commit that records the outcome).
//! * A replica renews the entries it still works on (`XCLAIM … JUSTID` to itself
//!   resets their idle time); entries idle past the lease belong to a replica that
//!   died, paused or lost its workers, and any replica with workers for the
//!   capability takes them over (`XPENDING IDLE` + `XCLAIM`, whose idle guard lets
//!   one claimer win). The delivery count is the attempt count.
//! * Results for requesters attached to another replica are appended to the
//!   route's result stream (`Op::Deliver`); the replica holding the requester
//!   reads it (`XREAD`) and deletes what it applied (`Op::Delivered`).
//!
//! Blocking reads use their own connections (a blocked command stalls every later
//! one on a multiplexed socket), with a response timeout above the block time.

use std::time::Duration;

use bytes::Bytes;
use redis::{
    aio::{ConnectionManager, MultiplexedConnection},
    streams::{StreamClaimReply, StreamPendingCountReply, StreamRangeReply, StreamReadReply},
    AsyncConnectionConfig,
};

use super::{
    redis_store::{fence_args, fence_reply, fenced_script},
    Fence, Fenced, StoreError, StoreResult,
};
use crate::records::coll;

/// Fenced take: for each capability (room, number of streams, streams highest
/// priority first), read new entries until the room is used; reply with
/// (stream, id, record) triples.
const TAKE: &str = r"
if #failed > 0 then return {0, unpack(failed)} end
local out = {1}
local group, consumer = ARGV[next], ARGV[next + 1]
local i = next + 2
while i <= #ARGV do
  local room, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2
  for k = 0, n - 1 do
    if room > 0 then
      local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', room, 'STREAMS', ARGV[i + k], '>')
      if r then
        for _, e in ipairs(r[1][2]) do
          local rec = ''
          local f = e[2]
          for j = 1, #f, 2 do
            if f[j] == 't' then rec = f[j + 1] end
          end
          out[#out + 1] = ARGV[i + k]
          out[#out + 1] = e[1]
          out[#out + 1] = rec
          room = room - 1
        end
      end
    end
  end
  i = i + n
end
return out
";

/// Fenced renewal: (stream, id) pairs claimed to this consumer with JUSTID.
const RENEW: &str = r"
if #failed > 0 then return {0, unpack(failed)} end
local group, consumer = ARGV[next], ARGV[next + 1]
local i = next + 2
while i <= #ARGV do
  redis.call('XCLAIM', ARGV[i], group, consumer, 0, ARGV[i + 1], 'JUSTID')
  i = i + 2
end
return {1}
";

/// The one consumer group every replica reads the task streams through.
pub const GROUP: &str = "lattice";
/// Priority levels (0 is the most urgent), as the lanes have.
const LEVELS: u32 = 6;
/// A result stream nobody reads (its requester is gone) expires after this.
pub const RESULT_TTL: Duration = Duration::from_secs(3600);

/// An entry a replica took from the shared queue.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub capability: String,
    pub priority: u32,
    pub entry: String,
    /// How many times the entry was handed out, this time included.
    pub deliveries: u32,
    /// The task record, as the requester's replica published it.
    pub record: Bytes,
}

/// A result read from a route's result stream.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub route: String,
    pub entry: String,
    /// An encoded `TaskResult`.
    pub result: Bytes,
}

/// Key names, shared by the queue and the group commit.
pub(super) fn queue_key(prefix: &str, capability: &str, priority: u32) -> String {
    format!("{prefix}:q:{capability}:{}", priority.min(LEVELS - 1))
}

pub(super) fn route_key(prefix: &str, route: &str) -> String {
    format!("{prefix}:r:{route}")
}

/// Cancelled tasks, for the replicas that run or will take them.
pub(super) fn revoked_key(prefix: &str) -> String {
    format!("{prefix}:revoked")
}

/// Revocations kept in their stream (trimmed approximately, as XADD MAXLEN ~ does):
/// a replica reads them as they come, so only a replica that was away longer than
/// this many cancellations misses one (its task then runs and the result is dropped).
pub const REVOKED_KEPT: usize = 10_000;

/// The set of capabilities ever published, so a reaper finds every stream.
pub(super) fn capabilities_key(prefix: &str) -> String {
    format!("{prefix}:qcaps")
}

/// Cheap-to-clone handle on the shared queue.
#[derive(Clone)]
pub struct SharedQueue {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    take: std::sync::Arc<redis::Script>,
    renew: std::sync::Arc<redis::Script>,
}

impl SharedQueue {
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<SharedQueue> {
        let client = redis::Client::open(url)?;
        let conn = tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client.clone()))
            .await
            .map_err(|_| StoreError::ConnectTimeout(url.to_string()))??;
        Ok(SharedQueue {
            client,
            conn,
            prefix: prefix.to_string(),
            take: std::sync::Arc::new(fenced_script(TAKE)),
            renew: std::sync::Arc::new(fenced_script(RENEW)),
        })
    }

    /// A connection of its own for blocking reads of up to `block`.
    pub async fn blocking_connection(&self, block: Duration) -> StoreResult<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        Ok(self.client.get_multiplexed_async_connection_with_config(&cfg).await?)
    }

    /// Creates the consumer group on a capability's streams (from their start, so
    /// entries published before any replica read them are seen).
    pub async fn ensure_group(&self, capability: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        for level in 0..LEVELS {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(queue_key(&self.prefix, capability, level))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Takes up to `room` new entries per capability, highest priority first,
    /// without waiting, if the fences of the workers it takes them for hold (a
    /// replica that lost its workers to another takes nothing). Streams are read
    /// one at a time: a read over several keys returns up to COUNT from each, all
    /// of it then pending on this replica.
    pub async fn take(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        wanted: &[(String, usize)],
        fences: &[Fence],
    ) -> StoreResult<Result<Vec<Pulled>, Fenced>> {
        let mut inv = self.take.key(format!("{}:{}", self.prefix, coll::OWNERS));
        fence_args(&mut inv, fences);
        inv.arg(GROUP).arg(consumer);
        let mut names = std::collections::HashMap::new();
        for (capability, room) in wanted {
            inv.arg(*room).arg(LEVELS);
            for level in 0..LEVELS {
                let key = queue_key(&self.prefix, capability, level);
                inv.arg(&key);
                names.insert(key, (capability.clone(), level));
            }
        }
        let reply: Vec<redis::Value> = inv.invoke_async(conn).await?;
        let rest = match fence_reply(&reply)? {
            Ok(rest) => rest,
            Err(fenced) => return Ok(Err(fenced)),
        };
        let mut out = Vec::new();
        for triple in rest.chunks_exact(3) {
            let text = |v: &redis::Value| {
                redis::from_redis_value::<Vec<u8>>(v.clone()).map_err(|e| StoreError::ScriptReply(e.to_string()))
            };
            let key = String::from_utf8_lossy(&text(&triple[0])?).into_owned();
            let entry = String::from_utf8_lossy(&text(&triple[1])?).into_owned();
            let record = text(&triple[2])?;
            let Some((capability, priority)) = names.get(&key).cloned() else {
                continue;
            };
            if record.is_empty() {
                continue;
            }
            out.push(Pulled {
                capability,
                priority,
                entry,
                deliveries: 1,
                record: Bytes::from(record),
            });
        }
        Ok(Ok(out))
    }

    /// Waits up to `block` for one new entry on any of these capabilities' streams.
    pub async fn wait(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        capabilities: &[String],
        block: Duration,
    ) -> StoreResult<Vec<Pulled>> {
        if capabilities.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::new();
        let mut names = std::collections::HashMap::new();
        for c in capabilities {
            for level in 0..LEVELS {
                let key = queue_key(&self.prefix, c, level);
                names.insert(key.clone(), (c.clone(), level));
                keys.push(key);
            }
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(&keys);
        for _ in &keys {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
        Ok(entries(reply, |key| names.get(key).cloned().unwrap_or_default()))
    }

    /// Resets the idle time of entries this replica still works on, so no other
    /// replica takes them over, if the fences of the workers it holds them for
    /// hold. `JUSTID` leaves the delivery count alone.
    pub async fn renew(
        &self,
        consumer: &str,
        held: &[(String, u32, String)],
        fences: &[Fence],
    ) -> StoreResult<Result<(), Fenced>> {
        if held.is_empty() {
            return Ok(Ok(()));
        }
        let mut inv = self.renew.key(format!("{}:{}", self.prefix, coll::OWNERS));
        fence_args(&mut inv, fences);
        inv.arg(GROUP).arg(consumer);
        for (capability, priority, entry) in held {
            inv.arg(queue_key(&self.prefix, capability, *priority)).arg(entry);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
        Ok(fence_reply(&reply)?.map(|_| ()))
    }

    /// Takes over up to `limit` entries per stream of these capabilities that no
    /// replica renewed within `lease`.
    pub async fn reap(
        &self,
        consumer: &str,
        capabilities: &[String],
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<Pulled>> {
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for capability in capabilities {
            for level in 0..LEVELS {
                let key = queue_key(&self.prefix, capability, level);
                let pending: StreamPendingCountReply = match redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(GROUP)
                    .arg("IDLE")
                    .arg(lease_ms)
                    .arg("-")
                    .arg("+")
                    .arg(limit)
                    .query_async(&mut conn)
                    .await
                {
                    Ok(p) => p,
                    // No group yet: nothing was ever taken from this stream.
                    Err(e) if e.code() == Some("NOGROUP") => continue,
                    Err(e) => return Err(e.into()),
                };
                if pending.ids.is_empty() {
                    continue;
                }
                let counts: std::collections::HashMap<String, usize> =
                    pending.ids.iter().map(|p| (p.id.clone(), p.times_delivered)).collect();
                let mut claim = redis::cmd("XCLAIM");
                claim.arg(&key).arg(GROUP).arg(consumer).arg(lease_ms);
                for p in &pending.ids {
                    claim.arg(&p.id);
                }
                // The idle guard: an entry another replica renewed or claimed since
                // the XPENDING is not taken.
                let claimed: StreamClaimReply = claim.query_async(&mut conn).await?;
                for id in claimed.ids {
                    let Some(record) = id.get::<Vec<u8>>("t") else { continue };
                    let before = counts.get(&id.id).copied().unwrap_or(0);
                    out.push(Pulled {
                        capability: capability.clone(),
                        priority: level,
                        deliveries: u32::try_from(before + 1).unwrap_or(u32::MAX),
                        entry: id.id,
                        record: Bytes::from(record),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The id of the newest revocation ("0-0" when none): where a reader that
    /// cares only about revocations from now on starts.
    pub async fn revoked_tail(&self) -> StoreResult<String> {
        let mut conn = self.conn.clone();
        let last: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(revoked_key(&self.prefix))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        Ok(last.ids.into_iter().next().map_or_else(|| "0-0".to_string(), |i| i.id))
    }

    /// Task ids revoked after the entry `after`, waiting up
    /// to `block`; with the id of the last one read.
    pub async fn revoked(
        &self,
        conn: &mut MultiplexedConnection,
        after: &str,
        block: Duration,
    ) -> StoreResult<Vec<(String, String)>> {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(revoked_key(&self.prefix))
            .arg(after)
            .query_async(conn)
            .await?;
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            for id in k.ids {
                if let Some(task) = id.get::<String>("t") {
                    out.push((id.id, task));
                }
            }
        }
        Ok(out)
    }

    /// Every capability that was ever published.
    pub async fn capabilities(&self) -> StoreResult<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut caps: Vec<String> = redis::cmd("SMEMBERS")
            .arg(capabilities_key(&self.prefix))
            .query_async(&mut conn)
            .await?;
        caps.sort();
        Ok(caps)
    }

    /// Reads results after each route's cursor, waiting up to `block` when there
    /// are none.
    pub async fn results(
        &self,
        conn: &mut MultiplexedConnection,
        routes: &[(String, String)],
        block: Duration,
    ) -> StoreResult<Vec<Delivery>> {
        if routes.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS");
        let mut names = std::collections::HashMap::new();
        for (route, _) in routes {
            let key = route_key(&self.prefix, route);
            names.insert(key.clone(), route.clone());
            cmd.arg(key);
        }
        for (_, after) in routes {
            cmd.arg(after);
        }
        let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(route) = names.get(&k.key) else { continue };
            for id in k.ids {
                let Some(result) = id.get::<Vec<u8>>("r") else { continue };
                out.push(Delivery {
                    route: route.clone(),
                    entry: id.id,
                    result: Bytes::from(result),
                });
            }
        }
        Ok(out)
    }
}

fn entries(reply: Option<StreamReadReply>, name: impl Fn(&str) -> (String, u32)) -> Vec<Pulled> {
    let mut out = Vec::new();
    for k in reply.map(|r| r.keys).unwrap_or_default() {
        let (capability, priority) = name(&k.key);
        for id in k.ids {
            let Some(record) = id.get::<Vec<u8>>("t") else { continue };
            out.push(Pulled {
                capability: capability.clone(),
                priority,
                entry: id.id,
                deliveries: 1,
                record: Bytes::from(record),
            });
        }
    }
    out
}
