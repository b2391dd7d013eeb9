//! The audit log: one record per request (refused ones included) and per agent task
//! offered to the orchestrator ([`tasks`]), written off the request path.
//!
//! Requests hand their record to a bounded channel with `try_send` and never wait:
//! when the channel is full (the sink is slower than the traffic, or NATS is down
//! long enough to fill it) the record is dropped and counted in
//! `lattice_audit_records_total{outcome="dropped"}`. Records carry no credential:
//! only the scheme that was used (`Bearer`, `api-key`).
//!
//! Sinks: [`file`] (JSONL per tenant and day, fsync'd in batches) and [`nats`]
//! (a JetStream stream with the same retention).

pub mod file;
pub mod nats;
pub mod tasks;

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// Records waiting for the sink, by default.
pub const DEFAULT_QUEUE: usize = 65_536;
/// How long records are kept, by default: 180 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(180 * 24 * 3600);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub request_id: String,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The same instant in Unix milliseconds, for filtering.
    pub ts_ms: u64,
    pub client_ip: Option<String>,
    pub tenant_id: String,
    pub user_id: String,
    /// `http` or `grpc`.
    pub protocol: String,
    /// The REST path or the gRPC method path.
    pub api: String,
    pub model: Option<String>,
    pub version: Option<String>,
    /// HTTP status; for gRPC, the status its code maps to (OK 200, UNAUTHENTICATED
    /// 401, PERMISSION_DENIED 403, RESOURCE_EXHAUSTED 429, ...).
    pub status: u16,
    pub grpc_status: Option<i32>,
    pub response_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Why the gateway refused the request, if it did.
    pub refusal: Option<String>,
    /// The request headers that matter for an investigation; never a credential.
    pub headers: BTreeMap<String, String>,
    /// Set on a task's record (protocol `agent-task`): the task and the capability
    /// it asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
}

pub(crate) enum Msg {
    Record(Box<Record>),
    /// Answered once every record before it is written and synced.
    Flush(oneshot::Sender<()>),
    /// Periodic: sync, sweep retention.
    Tick,
}

/// Takes `first` and what is already queued behind it, up to `max` records, into
/// `batch`; returns the flushes that wait for them. Both sinks write in such batches.
pub(crate) fn gather(
    first: Msg,
    rx: &mut mpsc::Receiver<Msg>,
    batch: &mut Vec<Record>,
    max: usize,
) -> Vec<oneshot::Sender<()>> {
    let mut flushes = Vec::new();
    let mut msg = Some(first);
    while let Some(m) = msg.take() {
        match m {
            Msg::Record(r) => batch.push(*r),
            Msg::Flush(done) => flushes.push(done),
            Msg::Tick => {}
        }
        if batch.len() < max {
            msg = rx.try_recv().ok();
        }
    }
    flushes
}

/// Hands records to the sink. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    outcomes: crate::edge_metrics::AuditCounters,
}

impl AuditLog {
    pub(crate) fn new(queue: usize, outcomes: crate::edge_metrics::AuditCounters) -> (AuditLog, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (AuditLog { tx, outcomes }, rx)
    }

    /// Queues a record; never waits. A full queue drops it (counted).
    pub fn record(&self, r: Record) {
        match self.tx.try_send(Msg::Record(Box::new(r))) {
            Ok(()) => {}
            Err(_) => self.outcomes.dropped(),
        }
    }

    /// Waits until every record queued before the call is written and synced.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) fn tick(&self) {
        let _ = self.tx.try_send(Msg::Tick);
    }
}

/// Where records go.
#[derive(Clone, Debug)]
pub enum SinkConfig {
    File {
        dir: std::path::PathBuf,
        /// Interval between fsyncs of the files written since the last one.
        fsync_every: Duration,
    },
    Nats {
        url: String,
        stream: String,
    },
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub sink: SinkConfig,
    pub retention: Duration,
    pub queue: usize,
}

/// Why the audit log could not start: a start-up error, the server does not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditStartError {
    #[error("--audit {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
    #[error("audit writer thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
}

/// Starts the sink's writer and returns the handle requests use.
pub async fn start(
    cfg: &AuditConfig,
    metrics: &lattice_observability::Metrics,
    stop: tokio_util::sync::CancellationToken,
) -> Result<AuditLog, AuditStartError> {
    let counters = metrics.set::<crate::edge_metrics::EdgeMetrics>().audit_counters();
    let (log, rx) = AuditLog::new(cfg.queue, counters.clone());
    let tick_every = match &cfg.sink {
        SinkConfig::File { dir, fsync_every } => {
            let sink =
                file::FileSink::open(dir, cfg.retention, *fsync_every).map_err(|source| AuditStartError::Dir {
                    dir: dir.display().to_string(),
                    source,
                })?;
            std::thread::Builder::new()
                .name("audit-file".into())
                .spawn(move || sink.run(rx, counters))
                .map_err(AuditStartError::Thread)?;
            *fsync_every
        }
        SinkConfig::Nats { url, stream } => {
            let sink = nats::NatsSink::connect(url, stream, cfg.retention).await?;
            tokio::spawn(sink.run(rx, counters));
            Duration::from_millis(200)
        }
    };
    let ticker = log.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick_every.max(Duration::from_millis(10)));
        loop {
            tokio::select! {
                _ = tick.tick() => ticker.tick(),
                () = stop.cancelled() => return,
            }
        }
    });
    Ok(log)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2025-01-31`.
pub fn day_of(ts_ms: u64) -> String {
    let (y, m, d) = civil((ts_ms / 86_400_000) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `2025-01-31T12:34:56.789Z`.
pub fn rfc3339(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let rem = secs % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        day_of(ts_ms),
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ts_ms % 1000
    )
}

/// Parses what `rfc3339` writes (and `YYYY-MM-DD`, and plain Unix milliseconds),
/// for `lattice audit --since/--until`.
pub fn parse_time(s: &str) -> Option<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Some(ms);
    }
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let mut it = date.split('-');
    let (y, m, d): (i64, i64, i64) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (inverse of `civil`).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let time = time.trim_end_matches('Z');
    let mut t = time.split(':');
    let h: u64 = t.next()?.parse().ok()?;
    let mi: u64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next().unwrap_or("0").parse().ok()?;
    let ms = u64::try_from(days).ok()? * 86_400_000 + h * 3_600_000 + mi * 60_000 + (sec * 1000.0).round() as u64;
    Some(ms)
}

/// The HTTP status a gRPC code stands for (the usual gateway mapping).
pub fn grpc_to_http(code: i32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// A tenant name as a file or subject component: `[A-Za-z0-9_-]`, others as `_`,
/// at most 64 characters.
pub fn safe_component(tenant: &str) -> String {
    let s: String = tenant
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for ms in [0u64, 951_782_400_000, 1_700_000_123_456, 4_102_444_800_000] {
            assert_eq!(parse_time(&rfc3339(ms)), Some(ms), "{}", rfc3339(ms));
        }
        assert_eq!(rfc3339(1_700_000_123_456), "2023-11-14T22:15:23.456Z");
        assert_eq!(parse_time("2023-11-14"), Some(1_699_920_000_000));
    }
}
