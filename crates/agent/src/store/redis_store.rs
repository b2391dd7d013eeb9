//! Shared state for several orchestrator replicas: each collection is a Redis hash
//! `<prefix>:<coll>`; a group commit is one MULTI/EXEC; compare-and-apply is a Lua
//! script, so replicas never interleave inside it.

use std::time::Duration;

use bytes::Bytes;
use futures::{future::BoxFuture, FutureExt};
use redis::{aio::ConnectionManager, AsyncCommands};

use super::{
    redis_queue::{capabilities_key, queue_key, route_key, GROUP, RESULT_TTL},
    Mismatch, Op, StoreBackend, StoreError, StoreResult,
};

pub struct RedisBackend {
    conn: ConnectionManager,
    prefix: String,
    cas: redis::Script,
}

/// ARGV: guard field, expected value, "1" if the guard must be absent, then ops as
/// P hash field value | D hash field | I hash field by. KEYS[1] is the guard's hash.
const CAS: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[2] then
  if cur then return {0, cur} end
  return {0}
end
local i = 4
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'P' then
    redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'D' then
    redis.call('HDEL', ARGV[i+1], ARGV[i+2]); i = i + 3
  else
    redis.call('HINCRBY', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  end
end
return {1}
";

impl RedisBackend {
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisBackend> {
        let client = redis::Client::open(url)?;
        // ConnectionManager::new does not fail fast on a closed port.
        let conn = tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client))
            .await
            .map_err(|_| StoreError::ConnectTimeout(url.to_string()))??;
        Ok(RedisBackend {
            conn,
            prefix: prefix.to_string(),
            cas: redis::Script::new(CAS),
        })
    }

    /// Deletes every key under this backend's prefix: a deployment's (or a
    /// test's) whole agent state.
    pub async fn clear(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
        }
        Ok(())
    }

    fn hash(&self, coll: &str) -> String {
        format!("{}:{coll}", self.prefix)
    }
}

impl StoreBackend for RedisBackend {
    fn apply(&self, ops: std::sync::Arc<Vec<Op>>) -> BoxFuture<'_, StoreResult<()>> {
        async move {
            if ops.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for op in ops.iter() {
                match op {
                    Op::Put { coll, key, val } => {
                        pipe.hset(self.hash(coll), key, val.as_ref()).ignore();
                    }
                    Op::Del { coll, key } => {
                        pipe.hdel(self.hash(coll), key).ignore();
                    }
                    Op::Incr { coll, key, by } => {
                        pipe.hincr(self.hash(coll), key, *by).ignore();
                    }
                    Op::Publish {
                        capability,
                        priority,
                        record,
                    } => {
                        pipe.cmd("XADD")
                            .arg(queue_key(&self.prefix, capability, *priority))
                            .arg("*")
                            .arg("t")
                            .arg(record.as_ref())
                            .ignore();
                        pipe.sadd(capabilities_key(&self.prefix), capability).ignore();
                    }
                    Op::Retire {
                        capability,
                        priority,
                        entry,
                    } => {
                        let key = queue_key(&self.prefix, capability, *priority);
                        pipe.cmd("XACK").arg(&key).arg(GROUP).arg(entry).ignore();
                        pipe.cmd("XDEL").arg(&key).arg(entry).ignore();
                    }
                    Op::Deliver { route, result } => {
                        let key = route_key(&self.prefix, route);
                        pipe.cmd("XADD")
                            .arg(&key)
                            .arg("*")
                            .arg("r")
                            .arg(result.as_ref())
                            .ignore();
                        pipe.pexpire(&key, RESULT_TTL.as_millis() as i64).ignore();
                    }
                    Op::Delivered { route, entry } => {
                        pipe.cmd("XDEL").arg(route_key(&self.prefix, route)).arg(entry).ignore();
                    }
                }
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        }
        .boxed()
    }

    fn scan<'a>(&'a self, coll: &'a str) -> BoxFuture<'a, StoreResult<Vec<(String, Bytes)>>> {
        async move {
            let mut conn = self.conn.clone();
            let all: Vec<(String, Vec<u8>)> = conn.hgetall(self.hash(coll)).await?;
            let mut out: Vec<(String, Bytes)> = all.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        }
        .boxed()
    }

    fn get<'a>(&'a self, coll: &'a str, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Bytes>>> {
        async move {
            let mut conn = self.conn.clone();
            let v: Option<Vec<u8>> = conn.hget(self.hash(coll), key).await?;
            Ok(v.map(Bytes::from))
        }
        .boxed()
    }

    fn compare_and_apply<'a>(
        &'a self,
        guard: (&'a str, &'a str),
        expected: Option<Bytes>,
        ops: Vec<Op>,
    ) -> BoxFuture<'a, StoreResult<Result<(), Mismatch>>> {
        async move {
            let mut inv = self.cas.key(self.hash(guard.0));
            inv.arg(guard.1)
                .arg(expected.as_deref().unwrap_or(b""))
                .arg(if expected.is_none() { "1" } else { "0" });
            for op in ops {
                match op {
                    Op::Put { coll, key, val } => {
                        inv.arg("P").arg(self.hash(&coll)).arg(key).arg(val.as_ref());
                    }
                    Op::Del { coll, key } => {
                        inv.arg("D").arg(self.hash(&coll)).arg(key);
                    }
                    Op::Incr { coll, key, by } => {
                        inv.arg("I").arg(self.hash(&coll)).arg(key).arg(by);
                    }
                    // Compare-and-apply guards tool-cache and memory writes, which
                    // never touch the shared queue.
                    Op::Publish { .. } | Op::Retire { .. } | Op::Deliver { .. } | Op::Delivered { .. } => {
                        return Err(StoreError::QueueOpInScript);
                    }
                }
            }
            let mut conn = self.conn.clone();
            let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
            match reply.as_slice() {
                [redis::Value::Int(1)] => Ok(Ok(())),
                [redis::Value::Int(0)] => Ok(Err(None)),
                [redis::Value::Int(0), v] => Ok(Err(Some(Bytes::from(
                    redis::from_redis_value::<Vec<u8>>(v.clone())
                        .map_err(|e| StoreError::ScriptReply(e.to_string()))?,
                )))),
                other => Err(StoreError::ScriptReply(format!("{other:?}"))),
            }
        }
        .boxed()
    }
}
