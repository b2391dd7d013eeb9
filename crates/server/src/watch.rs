//! Files the server re-reads while it runs (signing keys, API keys, the gateway
//! policy): polled every interval and swapped in when their bytes change.
//!
//! Polling rather than inotify: it sees Kubernetes' Secret and ConfigMap updates
//! (a symlink swapped under the mount) the same as an edit in place, and costs one
//! small read per second. A file that no longer parses leaves the last good value in
//! place and says so in the log, so a bad edit cannot lock every caller out.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

/// Why a watched file could not be loaded at start-up (later failures only log).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The files' parser refused them; `reason` is its message.
    #[error("{paths}: {reason}")]
    Parse { paths: String, reason: String },
}

/// How often watched files are read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The current value parsed from a file; cheap to clone and to read.
pub struct Watched<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Watched<T> {
    pub fn new(value: T) -> Arc<Watched<T>> {
        Arc::new(Watched {
            current: RwLock::new(Arc::new(value)),
        })
    }

    pub fn get(&self) -> Arc<T> {
        self.current.read().clone()
    }

    pub fn set(&self, value: T) {
        *self.current.write() = Arc::new(value);
    }
}

/// Loads `path` with `parse` now (an error here is a start-up error), then keeps
/// the value fresh until `stop`.
pub fn load_and_watch<T, E>(
    path: &Path,
    parse: fn(&[u8]) -> Result<T, E>,
    stop: CancellationToken,
) -> Result<Arc<Watched<T>>, WatchError>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display + 'static,
{
    load_and_watch_files(vec![path.to_path_buf()], move |files| parse(&files[0]), stop)
}

/// As [`load_and_watch`], for a value made of several files (a certificate and its
/// key): `parse` gets their bytes in the order of `paths`, again whenever any of
/// them changes. A half-done update (the certificate written, its key not yet)
/// fails to parse, keeps the previous value, and is parsed again when the next
/// file lands.
pub fn load_and_watch_files<T, E, P>(
    paths: Vec<PathBuf>,
    parse: P,
    stop: CancellationToken,
) -> Result<Arc<Watched<T>>, WatchError>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display + 'static,
    P: Fn(&[Vec<u8>]) -> Result<T, E> + Send + 'static,
{
    let names = || {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut bytes = Vec::with_capacity(paths.len());
    for p in &paths {
        bytes.push(std::fs::read(p).map_err(|source| WatchError::Read {
            path: p.display().to_string(),
            source,
        })?);
    }
    let value = parse(&bytes).map_err(|e| WatchError::Parse {
        paths: names(),
        reason: e.to_string(),
    })?;
    let watched = Watched::new(value);
    let w = watched.clone();
    let shown = names();
    tokio::spawn(async move {
        let mut last = bytes;
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'poll: loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let mut now = Vec::with_capacity(paths.len());
            for p in &paths {
                match tokio::fs::read(p).await {
                    Ok(b) => now.push(b),
                    // Mid-swap, or removed: keep what we have.
                    Err(_) => continue 'poll,
                }
            }
            if now == last {
                continue;
            }
            match parse(&now) {
                Ok(v) => {
                    w.set(v);
                    tracing::info!(path = %shown, "reloaded");
                }
                Err(e) => {
                    tracing::error!(path = %shown, error = %e, "reload failed; the previous version stays in force")
                }
            }
            last = now;
        }
    });
    Ok(watched)
}
