//! The predictive scaling policy, run by the server: each second, this replica's
//! arrivals and queue depth go to the fleet's shared store, the fleet-wide second
//! is read back, and [`lattice_scaling::Predictive`] (the code `lattice simulate`
//! runs) decides the fleet size. The KEDA external scaler ([`crate::scaler`])
//! reports that decision, so KEDA, which asks one address for the whole fleet,
//! gets the same answer from whichever replica it reaches.
//!
//! Fleet-wide signals: with `--scaling-store redis://…` every replica writes its
//! second into one Redis hash per second (`<prefix>:scaling:<unix second>`, field =
//! replica id, kept 120 s). Every replica ticks 200 ms after each whole second and
//! writes the second that just ended; the policy reads the one before it, so
//! replicas whose clocks differ by less than about a second are all counted, and
//! the fleet size is the number of replicas that wrote. Without a store the fleet is
//! this replica alone (the one-machine default).

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lattice_scaling::{Fleet, Predictive, PredictiveConfig, Second};
use parking_lot::Mutex;
use redis::AsyncCommands;

use crate::AppState;

/// How the server runs the policy.
#[derive(Clone, Debug)]
pub struct ScalingConfig {
    pub policy: PredictiveConfig,
    /// Requests per second one pod completes; `None` measures it (instances over
    /// the mean compute time per item).
    pub pod_capacity: Option<f64>,
    pub target_utilization: f64,
    /// Pod start plus warm-up, in seconds.
    pub lead_time_s: u64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Where replicas share their per-second signals; `None` = this replica only.
    pub store: Option<String>,
    /// Key prefix in the shared store.
    pub prefix: String,
    /// This replica's name in the shared store.
    pub replica: String,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            policy: PredictiveConfig::default(),
            pod_capacity: None,
            target_utilization: 0.7,
            lead_time_s: 60,
            min_replicas: 1,
            max_replicas: 50,
            store: None,
            prefix: "lattice".into(),
            replica: format!("replica-{}", std::process::id()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScalingError {
    #[error("scaling store: {0}")]
    Store(#[from] redis::RedisError),
}

/// What the edge counts and the scaler reads; shared through [`AppState`].
#[derive(Debug, Default)]
pub struct Signals {
    /// Inference requests that reached the edge this second, refused ones included.
    arrivals: AtomicU64,
    /// The policy's latest fleet size (0 until it has decided once).
    desired: AtomicU32,
    /// Replicas seen in the latest fleet-wide second.
    fleet: AtomicU32,
}

impl Signals {
    /// Counts one inference request at the edge.
    pub fn arrival(&self) {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
    }

    pub fn desired(&self) -> u32 {
        self.desired.load(Ordering::Relaxed)
    }

    pub fn fleet(&self) -> u32 {
        self.fleet.load(Ordering::Relaxed)
    }
}

/// The policy as the server drives it: one fleet-wide second per tick, the current
/// fleet size from the store. Kept apart from the timer and the store so a test can
/// feed it a trace and compare it with the simulator.
pub struct PolicyRunner {
    policy: Predictive,
    now: u64,
}

impl PolicyRunner {
    pub fn new(config: PredictiveConfig, fleet: Fleet) -> Self {
        PolicyRunner {
            policy: Predictive::new(config, fleet),
            now: 0,
        }
    }

    /// Feeds the fleet's next second and returns the fleet size the policy wants,
    /// given `current` replicas.
    pub fn tick(&mut self, second: Second, current: u32) -> u32 {
        self.now += 1;
        self.policy.observe(second);
        self.policy.decide(self.now, current).unwrap_or(current)
    }

    pub fn set_pod_capacity(&mut self, c: f64) {
        self.policy.set_pod_capacity(c);
    }
}

fn unix_second() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The shared store of per-second signals.
enum Store {
    Local,
    Redis {
        conn: redis::aio::ConnectionManager,
        prefix: String,
        replica: String,
    },
}

impl Store {
    async fn open(cfg: &ScalingConfig) -> Result<Store, ScalingError> {
        Ok(match &cfg.store {
            None => Store::Local,
            Some(url) => Store::Redis {
                conn: redis::Client::open(url.as_str())?.get_connection_manager().await?,
                prefix: cfg.prefix.clone(),
                replica: cfg.replica.clone(),
            },
        })
    }

    /// Writes this replica's second `at`, and reads the fleet's second `at - 1`
    /// (`None` until some replica wrote it), with how many replicas wrote it.
    async fn exchange(&mut self, at: u64, mine: Second) -> Result<Option<(Second, u32)>, ScalingError> {
        match self {
            Store::Local => Ok(Some((mine, 1))),
            Store::Redis { conn, prefix, replica } => {
                let key = format!("{prefix}:scaling:{at}");
                let value = format!("{} {}", mine.arrivals, mine.queue);
                let _: () = redis::pipe()
                    .hset(&key, replica.as_str(), value)
                    .expire(&key, 120)
                    .query_async(conn)
                    .await?;
                let read: Vec<(String, String)> = conn
                    .hgetall(format!("{prefix}:scaling:{}", at.saturating_sub(1)))
                    .await?;
                if read.is_empty() {
                    return Ok(None);
                }
                let mut sum = Second::default();
                let mut n = 0u32;
                for (_, v) in &read {
                    let mut parts = v.split(' ').map(|x| x.parse::<f64>().unwrap_or(0.0));
                    sum.arrivals += parts.next().unwrap_or(0.0);
                    sum.queue += parts.next().unwrap_or(0.0);
                    n = n.saturating_add(1);
                }
                Ok(Some((sum, n)))
            }
        }
    }
}

/// Runs the policy once a second until shutdown. Signals exist only while the
/// replica is ready; a store error skips the second (the policy holds its last
/// decision) and is logged.
pub async fn run(state: AppState, cfg: ScalingConfig) -> Result<(), ScalingError> {
    let mut store = loop {
        match Store::open(&cfg).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "scaling store unreachable; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    () = state.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    };
    let signals = state.scaling.clone();
    let mut runner = PolicyRunner::new(
        cfg.policy.clone(),
        Fleet {
            pod_capacity: cfg.pod_capacity.unwrap_or(1.0),
            target_utilization: cfg.target_utilization,
            lead_time_s: cfg.lead_time_s,
            min: cfg.min_replicas,
            max: cfg.max_replicas,
        },
    );
    // Ticks just after each whole second, the same phase on every replica, so each
    // writes one sample per second key; a late tick is skipped, not doubled.
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let to_next = Duration::from_secs(1).saturating_sub(Duration::from_nanos(u64::from(since_epoch.subsec_nanos())));
    let start = tokio::time::Instant::now() + to_next + Duration::from_millis(200);
    let mut tick = tokio::time::interval_at(start, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let last_error = Mutex::new(None::<String>);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return Ok(()),
        }
        let arrivals = signals.arrivals.swap(0, Ordering::Relaxed) as f64;
        if !state.is_ready() {
            continue;
        }
        if cfg.pod_capacity.is_none() {
            if let Some(c) = measured_capacity(&state) {
                runner.set_pod_capacity(c);
            }
        }
        let (demand, _) = state.repo.load_signals(None);
        let queue = demand.saturating_sub(state.repo.in_flight()) as f64;
        // The counts cover the second that just ended.
        let covered = unix_second().saturating_sub(1);
        match store.exchange(covered, Second { arrivals, queue }).await {
            Ok(Some((fleet_second, replicas))) => {
                signals.fleet.store(replicas, Ordering::Relaxed);
                // The fleet size the policy last chose is what KEDA applies; the
                // simulator passes the same (replicas still starting are not yet
                // in the store).
                let current = match signals.desired() {
                    0 => replicas.max(1),
                    d => d,
                };
                let desired = runner.tick(fleet_second, current);
                signals.desired.store(desired, Ordering::Relaxed);
                *last_error.lock() = None;
            }
            Ok(None) => {}
            Err(e) => {
                let msg = e.to_string();
                if last_error.lock().replace(msg.clone()).as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "scaling signals not exchanged");
                }
            }
        }
    }
}

/// Requests per second this replica completes when busy: its instances over the
/// mean compute time per item.
fn measured_capacity(state: &AppState) -> Option<f64> {
    let per_item = state.repo.model_metrics().service_time_mean()?;
    let instances = state.repo.instance_count();
    (per_item > 0.0 && instances > 0).then(|| instances as f64 / per_item)
}

/// Shared by the edge and the scaler.
pub type SharedSignals = Arc<Signals>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_load_asks_for_what_it_needs() {
        let mut r = PolicyRunner::new(
            PredictiveConfig::default(),
            Fleet {
                pod_capacity: 10.0,
                target_utilization: 1.0,
                lead_time_s: 60,
                min: 1,
                max: 50,
            },
        );
        let mut current = 1;
        for _ in 0..30 {
            current = r.tick(
                Second {
                    arrivals: 35.0,
                    queue: 0.0,
                },
                current,
            );
        }
        assert_eq!(current, 4, "35 req/s at 10 per pod");
    }
}
