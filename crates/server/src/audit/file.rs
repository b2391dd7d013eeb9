//! JSONL files, one per tenant and UTC day: `<dir>/<tenant>/<YYYY-MM-DD>.jsonl`,
//! opened append-only. A new day starts a new file (rotation); files whose day is
//! older than the retention are deleted at start and hourly.
//!
//! Write policy: woken by a record, the writer thread lingers [`LINGER`] for more,
//! takes every record waiting in the channel, writes them with one `write` per file
//! (the kernel has them from then on) and fsyncs the files it wrote every
//! `fsync_every` (default 1 s). So a `kill -9` loses only records still in the channel
//! (not yet written: queued at most `LINGER` plus one batch's write ago under load); a
//! power loss or kernel crash can also lose the last `fsync_every` of written records.
//!
//! The linger is what keeps the log cheap under load: without it the thread wakes,
//! and writes, once per request.

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::edge_metrics::AuditCounters;
use tokio::sync::mpsc;

use super::{day_of, safe_component, Msg, Record};

const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Records written per batch at most, so a flush is answered even under load.
const BATCH: usize = 4096;
/// How long the writer waits, once woken, for more records to join the batch.
pub const LINGER: Duration = Duration::from_millis(5);

pub struct FileSink {
    dir: PathBuf,
    retention: Duration,
    open: HashMap<(String, String), File>,
    dirty: HashSet<(String, String)>,
    swept: Instant,
    fsync_every: Duration,
    synced: Instant,
}

impl FileSink {
    pub fn open(dir: &Path, retention: Duration, fsync_every: Duration) -> std::io::Result<FileSink> {
        std::fs::create_dir_all(dir)?;
        let sink = FileSink {
            dir: dir.to_path_buf(),
            retention,
            open: HashMap::new(),
            dirty: HashSet::new(),
            swept: Instant::now(),
            fsync_every,
            synced: Instant::now(),
        };
        sink.sweep();
        Ok(sink)
    }

    /// The writer thread: runs until every sender is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Msg>, counters: AuditCounters) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            if matches!(first, Msg::Record(_)) {
                std::thread::sleep(LINGER);
            }
            let flushes = super::gather(first, &mut rx, &mut batch, BATCH);
            let n = batch.len() as u64;
            match self.write(&mut batch) {
                Ok(()) => counters.written(n),
                Err(e) => {
                    tracing::error!(error = %e, records = n, "audit records not written");
                    counters.failed(n);
                }
            }
            batch.clear();
            // Ticks arrive every `fsync_every`, so a pass comes at least that often.
            if !flushes.is_empty() || self.synced.elapsed() >= self.fsync_every {
                self.sync();
                self.synced = Instant::now();
            }
            if self.swept.elapsed() >= SWEEP_EVERY {
                self.sweep();
                self.swept = Instant::now();
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
        self.sync();
    }

    fn write(&mut self, batch: &mut [Record]) -> std::io::Result<()> {
        let mut per_file: HashMap<(String, String), Vec<u8>> = HashMap::new();
        for r in batch.iter() {
            let key = (safe_component(&r.tenant_id), day_of(r.ts_ms));
            let buf = per_file.entry(key).or_default();
            serde_json::to_writer(&mut *buf, r).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let today = day_of(super::now_ms());
        // Yesterday's files are done: sync and close them.
        let old: Vec<_> = self.open.keys().filter(|(_, d)| *d < today).cloned().collect();
        for k in old {
            if let Some(f) = self.open.remove(&k) {
                let _ = f.sync_data();
            }
            self.dirty.remove(&k);
        }
        for (key, bytes) in per_file {
            let f = match self.open.entry(key.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let dir = self.dir.join(&key.0);
                    std::fs::create_dir_all(&dir)?;
                    e.insert(
                        OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(dir.join(format!("{}.jsonl", key.1)))?,
                    )
                }
            };
            f.write_all(&bytes)?;
            self.dirty.insert(key);
        }
        Ok(())
    }

    fn sync(&mut self) {
        for k in self.dirty.drain() {
            if let Some(f) = self.open.get(&k) {
                if let Err(e) = f.sync_data() {
                    tracing::error!(error = %e, tenant = %k.0, "audit fsync failed");
                }
            }
        }
    }

    /// Deletes day files older than the retention.
    fn sweep(&self) {
        let cutoff =
            day_of(super::now_ms().saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX)));
        let Ok(tenants) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for t in tenants.flatten() {
            let Ok(files) = std::fs::read_dir(t.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(day) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else {
                    continue;
                };
                if day.len() == 10 && day < cutoff.as_str() {
                    match std::fs::remove_file(f.path()) {
                        Ok(()) => tracing::info!(file = %f.path().display(), "audit file past retention removed"),
                        Err(e) => {
                            tracing::warn!(file = %f.path().display(), error = %e, "audit file past retention not removed")
                        }
                    }
                }
            }
        }
    }
}

/// Every record under `dir`, in file order (tenant, day, line); for `lattice audit`.
/// `tenant` restricts the read to that tenant's directory.
pub fn read_all(dir: &Path, tenant: Option<&str>) -> std::io::Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut tenants: Vec<PathBuf> = match tenant {
        Some(t) => vec![dir.join(safe_component(t))],
        None => std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect(),
    };
    tenants.sort();
    for t in tenants {
        let Ok(rd) = std::fs::read_dir(&t) else { continue };
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)?;
            // A torn last line (the process died mid-write) is skipped, not fatal.
            out.extend(text.lines().filter_map(|l| serde_json::from_str::<Record>(l).ok()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_past_retention_are_swept_and_recent_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("acme");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("2001-01-01.jsonl"), "").unwrap();
        let today = day_of(super::super::now_ms());
        std::fs::write(t.join(format!("{today}.jsonl")), "").unwrap();
        FileSink::open(dir.path(), Duration::from_secs(180 * 86_400), Duration::from_secs(1)).unwrap();
        assert!(!t.join("2001-01-01.jsonl").exists());
        assert!(t.join(format!("{today}.jsonl")).exists());
    }
}
