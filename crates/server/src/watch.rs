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
) -> Result<Arc<Watched<T>>, String>
where
    T: Send + Sync + 'static,
    E: std::fmt::Display + 'static,
{
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let watched = Watched::new(value);
    let w = watched.clone();
    let path: PathBuf = path.to_path_buf();
    tokio::spawn(async move {
        let mut last = bytes;
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let Ok(bytes) = tokio::fs::read(&path).await else {
                // Mid-swap, or removed: keep what we have.
                continue;
            };
            if bytes == last {
                continue;
            }
            match parse(&bytes) {
                Ok(v) => {
                    w.set(v);
                    tracing::info!(path = %path.display(), "reloaded");
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "reload failed; the previous version stays in force")
                }
            }
            last = bytes;
        }
    });
    Ok(watched)
}
