//! Shared state for several orchestrator replicas: each collection is a Redis hash
//! `<prefix>:<coll>`. A group commit is one Lua script that first checks the
//! batch's fences against `<prefix>:owners` (session → owner epoch) and then
//! applies every op, or applies nothing and names the sessions it was fenced off
//! from; a batch without fences is one MULTI/EXEC. Compare-and-apply is a Lua
//! script too, so replicas never interleave inside either.

use std::time::Duration;

use bytes::Bytes;
use futures::{future::BoxFuture, FutureExt};
use redis::{aio::ConnectionManager, AsyncCommands};

use super::{
    redis_queue::{capabilities_key, queue_key, revoked_key, route_key, GROUP, RESULT_TTL, REVOKED_KEPT},
    Fence, Fenced, Mismatch, Op, StoreBackend, StoreError, StoreResult,
};
use crate::records::coll;

pub struct RedisBackend {
    conn: ConnectionManager,
    prefix: String,
    cas: redis::Script,
    commit: redis::Script,
    check: redis::Script,
}

/// Checks the fences in ARGV[2..] (count in ARGV[1]; each: session, epoch, and the
/// first claimed epoch or "" for a plain write) against the owners hash KEYS[1].
/// Leaves in `failed` the sessions whose fence does not hold and in `next` the
/// index after the fences. A claim needs the owner at the epoch before it (absent
/// counts as 0, so only a new session claims from nothing); a write needs the
/// owner at its epoch.
const FENCES: &str = r"
local failed = {}
local nf = tonumber(ARGV[1])
local next = 2
for _ = 1, nf do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[next])) or 0
  local epoch = tonumber(ARGV[next + 1])
  local from = ARGV[next + 2]
  local ok
  if from == '' then ok = (cur == epoch) else ok = (cur == tonumber(from) - 1) end
  if not ok then failed[#failed + 1] = ARGV[next] end
  next = next + 3
end
";

/// Fences, then (if they all hold) the claims and the ops from the index after
/// the fences (see [`OPS`]).
const COMMIT: &str = r"
if #failed > 0 then return {0, unpack(failed)} end
local i = 2
for _ = 1, nf do
  if ARGV[i + 2] ~= '' then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  i = i + 3
end
";

/// Applies the ops in ARGV from index `i` on, then answers `{1}`: P hash field value
/// | D hash field | I hash field by | A stream field value (XADD *) | S set member |
/// K stream group id (XACK + XDEL) | Z stream id (XDEL) | E key ms (PEXPIRE) |
/// R stream task (XADD to the revocations, trimmed to about `REVOKED_KEPT`).
const OPS: &str = r"
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'P' then
    redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'D' then
    redis.call('HDEL', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'I' then
    redis.call('HINCRBY', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'A' then
    redis.call('XADD', ARGV[i+1], '*', ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'S' then
    redis.call('SADD', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'K' then
    redis.call('XACK', ARGV[i+1], ARGV[i+2], ARGV[i+3]); redis.call('XDEL', ARGV[i+1], ARGV[i+3]); i = i + 4
  elseif op == 'Z' then
    redis.call('XDEL', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'E' then
    redis.call('PEXPIRE', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'R' then
    redis.call('XADD', ARGV[i+1], 'MAXLEN', '~', 10000, '*', 't', ARGV[i+2]); i = i + 3
  else
    return redis.error_reply('unknown op ' .. op)
  end
end
return {1}
";

const CHECK: &str = r"
if #failed > 0 then return {0, unpack(failed)} end
return {1}
";

/// The fence arguments every fenced script starts with.
pub(super) fn fence_args(inv: &mut redis::ScriptInvocation<'_>, fences: &[Fence]) {
    inv.arg(fences.len());
    for f in fences {
        inv.arg(&f.sid).arg(f.epoch);
        match f.claims_from {
            Some(from) => inv.arg(from),
            None => inv.arg(""),
        };
    }
}

/// A fenced script's reply: `{1, ...}` when the fences held, `{0, sessions...}`
/// when they did not.
pub(super) fn fence_reply(reply: &[redis::Value]) -> StoreResult<Result<&[redis::Value], Fenced>> {
    match reply {
        [redis::Value::Int(1), rest @ ..] => Ok(Ok(rest)),
        [redis::Value::Int(0), sessions @ ..] => {
            let sessions = sessions
                .iter()
                .map(|v| redis::from_redis_value::<String>(v.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::ScriptReply(e.to_string()))?;
            Ok(Err(Fenced { sessions }))
        }
        other => Err(StoreError::ScriptReply(format!("{other:?}"))),
    }
}

/// A fenced script: the fence check, then `body`.
pub(super) fn fenced_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{FENCES}{body}"))
}

/// ARGV: guard field, expected value, "1" if the guard must be absent, then ops
/// from ARGV[4] (see [`OPS`]). KEYS[1] is the guard's hash.
const CAS_GUARD: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[2] then
  if cur then return {0, cur} end
  return {0}
end
local i = 4
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
            cas: redis::Script::new(&format!("{CAS_GUARD}{OPS}")),
            commit: fenced_script(&format!("{COMMIT}{OPS}")),
            check: fenced_script(CHECK),
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

    /// The group commit as one MULTI/EXEC (a batch without fences).
    async fn apply_multi(&self, ops: &[Op]) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for op in ops {
            match op {
                Op::Put { coll, key, val } => {
                    pipe.hset(self.hash(coll), key, val.as_ref()).ignore();
                }
                Op::Del { coll, key } => {
                    pipe.hdel(self.hash(coll), key).ignore();
                    if coll == coll::SESSIONS {
                        pipe.hdel(self.hash(coll::OWNERS), key).ignore();
                    }
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
                Op::Revoke { task_id } => {
                    pipe.cmd("XADD")
                        .arg(revoked_key(&self.prefix))
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(REVOKED_KEPT)
                        .arg("*")
                        .arg("t")
                        .arg(task_id)
                        .ignore();
                }
            }
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// The group commit as the fenced script.
    async fn apply_fenced(&self, ops: &[Op], fences: &[Fence]) -> StoreResult<Result<(), Fenced>> {
        let mut inv = self.commit.key(self.hash(coll::OWNERS));
        fence_args(&mut inv, fences);
        for op in ops {
            match op {
                Op::Put { coll, key, val } => {
                    inv.arg("P").arg(self.hash(coll)).arg(key).arg(val.as_ref());
                }
                Op::Del { coll, key } => {
                    inv.arg("D").arg(self.hash(coll)).arg(key);
                    // An evicted session's owner entry goes with it: a later claim
                    // of it from a stale copy needs an owner and finds none.
                    if coll == coll::SESSIONS {
                        inv.arg("D").arg(self.hash(coll::OWNERS)).arg(key);
                    }
                }
                Op::Incr { coll, key, by } => {
                    inv.arg("I").arg(self.hash(coll)).arg(key).arg(by);
                }
                Op::Publish {
                    capability,
                    priority,
                    record,
                } => {
                    inv.arg("A")
                        .arg(queue_key(&self.prefix, capability, *priority))
                        .arg("t")
                        .arg(record.as_ref());
                    inv.arg("S").arg(capabilities_key(&self.prefix)).arg(capability);
                }
                Op::Retire {
                    capability,
                    priority,
                    entry,
                } => {
                    inv.arg("K")
                        .arg(queue_key(&self.prefix, capability, *priority))
                        .arg(GROUP)
                        .arg(entry);
                }
                Op::Deliver { route, result } => {
                    let key = route_key(&self.prefix, route);
                    inv.arg("A").arg(&key).arg("r").arg(result.as_ref());
                    inv.arg("E").arg(&key).arg(RESULT_TTL.as_millis() as i64);
                }
                Op::Delivered { route, entry } => {
                    inv.arg("Z").arg(route_key(&self.prefix, route)).arg(entry);
                }
                Op::Revoke { task_id } => {
                    inv.arg("R").arg(revoked_key(&self.prefix)).arg(task_id);
                }
            }
        }
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
        Ok(fence_reply(&reply)?.map(|_| ()))
    }
}

impl StoreBackend for RedisBackend {
    fn apply<'a>(
        &'a self,
        ops: std::sync::Arc<Vec<Op>>,
        fences: &'a [Fence],
    ) -> BoxFuture<'a, StoreResult<Result<(), Fenced>>> {
        async move {
            if fences.is_empty() {
                if !ops.is_empty() {
                    self.apply_multi(&ops).await?;
                }
                return Ok(Ok(()));
            }
            self.apply_fenced(&ops, fences).await
        }
        .boxed()
    }

    fn shared(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, fences: &'a [Fence]) -> BoxFuture<'a, StoreResult<Result<(), Fenced>>> {
        async move {
            if fences.is_empty() {
                return Ok(Ok(()));
            }
            let mut inv = self.check.key(self.hash(coll::OWNERS));
            fence_args(&mut inv, fences);
            let mut conn = self.conn.clone();
            let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
            Ok(fence_reply(&reply)?.map(|_| ()))
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
                    Op::Publish { .. }
                    | Op::Retire { .. }
                    | Op::Deliver { .. }
                    | Op::Delivered { .. }
                    | Op::Revoke { .. } => {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn put(coll: &str, key: &str, val: &str) -> Op {
        Op::Put {
            coll: coll.into(),
            key: key.into(),
            val: Bytes::from(val.to_string()),
        }
    }

    /// The fence rules against a real Redis, as a table: each row is one commit
    /// (its fences and one write of the row's number) and whether it lands.
    #[tokio::test]
    async fn commits_land_only_under_the_owners_epoch() {
        let prefix = format!("lattice-test-fence-{}-{}", std::process::id(), fastrand::u64(..));
        let b = RedisBackend::connect("redis://127.0.0.1:6379", &prefix).await.unwrap();
        let (w, c) = (Fence::write, Fence::claim);
        let table: Vec<(Vec<Fence>, Option<Vec<&str>>)> = vec![
            // A new session claims epoch 1 from nothing.
            (vec![c("s", 1)], None),
            (vec![w("s", 1)], None),
            // Another replica resumes it: epoch 2.
            (vec![c("s", 2)], None),
            // The first replica, still at 1, writes: refused, and so is its
            // re-attach from its stale copy (it would claim 2 again).
            (vec![w("s", 1)], Some(vec!["s"])),
            (vec![c("s", 2)], Some(vec!["s"])),
            // One stale fence refuses the whole batch.
            (vec![c("t", 1), w("s", 1)], Some(vec!["s"])),
            (vec![w("s", 2)], None),
            // Two attaches in one batch need the owner at the epoch before both.
            (vec![c("s", 3), c("s", 4)], None),
            (vec![w("s", 3)], Some(vec!["s"])),
            (vec![w("s", 4), w("u", 1)], Some(vec!["u"])),
        ];
        for (i, (fences, refused)) in table.into_iter().enumerate() {
            let fences = super::super::merge_fences(fences);
            let ops = Arc::new(vec![put("data", &i.to_string(), "x")]);
            let got = b.apply(ops, &fences).await.unwrap();
            let landed = b.get("data", &i.to_string()).await.unwrap().is_some();
            match refused {
                None => assert!(got.is_ok() && landed, "row {i}: {fences:?} should land: {got:?}"),
                Some(sessions) => {
                    assert_eq!(
                        got,
                        Err(Fenced {
                            sessions: sessions.iter().map(|s| s.to_string()).collect()
                        }),
                        "row {i}"
                    );
                    assert!(!landed, "row {i}: nothing of a refused commit lands");
                }
            }
            assert_eq!(b.check(&fences).await.unwrap().is_ok(), {
                // After a claim lands, the same claim is stale; a write is not.
                fences.iter().all(|f| f.claims_from.is_none()) && got.is_ok()
            });
        }
        // The owner forgets the session: its owner entry goes too, so a stale copy
        // cannot claim it back.
        let forget = Arc::new(vec![Op::Del {
            coll: coll::SESSIONS.into(),
            key: "s".into(),
        }]);
        assert!(b.apply(forget, &[w("s", 4)]).await.unwrap().is_ok());
        assert!(b.get(coll::OWNERS, "s").await.unwrap().is_none());
        let stale = Arc::new(vec![put("data", "late", "x")]);
        assert!(b.apply(stale, &[c("s", 3)]).await.unwrap().is_err());
        b.clear().await.unwrap();
    }
}
