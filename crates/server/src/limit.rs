//! Per-tenant admission at the edge: two token buckets in series and a cap on
//! requests in flight.
//!
//! The fast bucket (burst 100, refilled at 50/s) cuts spikes; the steady bucket
//! (burst 200, refilled at 20/s) cuts sustained rates above 20/s that the fast one
//! lets through. A request takes one token from each, or from neither: a refused
//! request costs the tenant nothing. The wait it is told (`Retry-After`, gRPC
//! `RetryInfo`) is the time until both buckets hold a token again, so a client that
//! waits that long is admitted (unless it spent the token meanwhile).
//!
//! The concurrency cap is a count held by a [`Permit`]: dropping the permit (the
//! answer is sent, the handler unwound, the client left) gives the slot back.
//!
//! Limits come from the gateway policy ([`crate::gateway::policy`]) and change when
//! that file is reloaded; a tenant's buckets keep their fill across a reload.
//! Time is tokio's clock, so tests pause it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

/// The tenant header everything behind the gateway reads (the gateway sets it to
/// the verified tenant).
pub const TENANT_HEADER: &str = "x-tenant";

/// A tenant's limits; the defaults are the design's.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    pub fast: BucketSpec,
    pub steady: BucketSpec,
    /// Requests (and open streams) in flight at once.
    pub max_concurrent: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            fast: BucketSpec {
                burst: 100,
                per_second: 50.0,
            },
            steady: BucketSpec {
                burst: 200,
                per_second: 20.0,
            },
            max_concurrent: 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    /// Tokens the bucket holds when full.
    pub burst: u32,
    /// Tokens added per second.
    pub per_second: f64,
}

/// A tenant's limits that cannot work (a bucket that never admits anything).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The bucket (`fast` or `steady`) has no tokens or no refill.
    #[error("{0}: burst and per_second must be above 0")]
    EmptyBucket(&'static str),
    #[error("max_concurrent must be above 0")]
    NoConcurrency,
}

impl TenantLimits {
    pub fn validate(&self) -> Result<(), LimitError> {
        for (name, b) in [("fast", self.fast), ("steady", self.steady)] {
            if b.burst == 0 || !(b.per_second.is_finite() && b.per_second > 0.0) {
                return Err(LimitError::EmptyBucket(name));
            }
        }
        if self.max_concurrent == 0 {
            return Err(LimitError::NoConcurrency);
        }
        Ok(())
    }
}

/// Why a request was refused; the label of `lattice_gateway_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Fast,
    Steady,
    Concurrency,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Fast => "rate_fast",
            Reason::Steady => "rate_steady",
            Reason::Concurrency => "concurrency",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    /// Time until the request would be admitted (buckets), or a nominal second
    /// (concurrency: the end of some request cannot be known).
    pub retry_after: Duration,
    pub max_concurrent: u32,
}

// === Bucket ===

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(spec: BucketSpec, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(spec.burst),
            at: now,
        }
    }

    fn refill(&mut self, spec: BucketSpec, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * spec.per_second).min(f64::from(spec.burst));
        self.at = now;
    }

    /// Time until one token is there.
    fn wait(&self, spec: BucketSpec) -> Duration {
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        // A nanosecond more than the exact refill time, so rounding never leaves
        // the bucket a hair short at the time it names.
        Duration::from_secs_f64((1.0 - self.tokens) / spec.per_second) + Duration::from_nanos(1)
    }

    fn is_full(&self, spec: BucketSpec) -> bool {
        self.tokens >= f64::from(spec.burst)
    }
}

struct TenantState {
    fast: Bucket,
    steady: Bucket,
    in_flight: Arc<AtomicU32>,
}

// === Limiter ===

/// Buckets and in-flight counts of every tenant seen.
pub struct Limiter {
    tenants: Mutex<HashMap<String, TenantState>>,
}

/// A tenant's slot in its concurrency cap, given back on drop.
#[derive(Debug)]
pub struct Permit(Arc<AtomicU32>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Above this many tenants, the ones whose buckets are full and that have nothing
/// in flight (the same as a tenant never seen) are forgotten.
const MAX_TRACKED: usize = 10_000;

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter {
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one request of `tenant` under `limits`: a concurrency slot and a token
    /// from each bucket, or nothing.
    pub fn admit(&self, tenant: &str, limits: &TenantLimits) -> Result<Permit, Refusal> {
        let now = Instant::now();
        let mut tenants = self.tenants.lock();
        if tenants.len() >= MAX_TRACKED && !tenants.contains_key(tenant) {
            tenants.retain(|_, t| {
                t.fast.refill(limits.fast, now);
                t.steady.refill(limits.steady, now);
                !(t.fast.is_full(limits.fast)
                    && t.steady.is_full(limits.steady)
                    && t.in_flight.load(Ordering::Acquire) == 0)
            });
        }
        let t = tenants.entry(tenant.to_string()).or_insert_with(|| TenantState {
            fast: Bucket::full(limits.fast, now),
            steady: Bucket::full(limits.steady, now),
            in_flight: Arc::new(AtomicU32::new(0)),
        });
        if t.in_flight.load(Ordering::Acquire) >= limits.max_concurrent {
            return Err(Refusal {
                reason: Reason::Concurrency,
                retry_after: Duration::from_secs(1),
                max_concurrent: limits.max_concurrent,
            });
        }
        t.fast.refill(limits.fast, now);
        t.steady.refill(limits.steady, now);
        let (wf, ws) = (t.fast.wait(limits.fast), t.steady.wait(limits.steady));
        if !wf.is_zero() || !ws.is_zero() {
            return Err(Refusal {
                reason: if wf >= ws { Reason::Fast } else { Reason::Steady },
                retry_after: wf.max(ws),
                max_concurrent: limits.max_concurrent,
            });
        }
        t.fast.tokens -= 1.0;
        t.steady.tokens -= 1.0;
        t.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Permit(t.in_flight.clone()))
    }

    /// Takes one token from each bucket without a concurrency slot: each request
    /// of an already admitted stream.
    pub fn take(&self, tenant: &str, limits: &TenantLimits) -> Result<(), Refusal> {
        self.admit(
            tenant,
            &TenantLimits {
                max_concurrent: u32::MAX,
                ..*limits
            },
        )
        .map(drop)
    }

    /// Requests of `tenant` in flight now.
    pub fn in_flight(&self, tenant: &str) -> u32 {
        self.tenants
            .lock()
            .get(tenant)
            .map_or(0, |t| t.in_flight.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(l: &Limiter, tenant: &str, n: usize) -> usize {
        let limits = TenantLimits::default();
        (0..n).filter(|_| l.admit(tenant, &limits).is_ok()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_above_100_is_cut_by_the_fast_bucket() {
        let l = Limiter::new();
        let limits = TenantLimits::default();
        assert_eq!(passed(&l, "a", 150), 100);
        let r = l.admit("a", &limits).unwrap_err();
        assert_eq!(r.reason, Reason::Fast);
        // One token at 50/s: 20 ms.
        assert!(
            r.retry_after > Duration::from_millis(19) && r.retry_after <= Duration::from_millis(21),
            "{r:?}"
        );
        // Waiting exactly the time named admits the request.
        tokio::time::advance(r.retry_after).await;
        assert!(l.admit("a", &limits).is_ok());
        // Another tenant has its own buckets.
        assert_eq!(passed(&l, "b", 100), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_traffic_above_20_per_second_is_cut_by_the_steady_bucket() {
        let l = Limiter::new();
        // 40 requests/s for 20 s: the fast bucket (50/s) never empties, the steady
        // one (200 + 20/s) does after 10 s.
        let mut admitted = 0;
        let mut steady_refusals = 0;
        for _ in 0..800 {
            match l.admit("a", &TenantLimits::default()) {
                Ok(_) => admitted += 1,
                Err(r) => {
                    assert_eq!(r.reason, Reason::Steady);
                    steady_refusals += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(25)).await;
        }
        // 200 of burst plus 20/s over 20 s = 600 (the last refill rounds).
        assert!((599..=601).contains(&admitted), "{admitted}");
        assert_eq!(admitted + steady_refusals, 800);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_the_wait_for_both_buckets() {
        let l = Limiter::new();
        let limits = TenantLimits::default();
        // 40/s: the fast bucket keeps up, the steady one empties after ~10 s.
        let refusal = loop {
            match l.admit("a", &limits) {
                Ok(_) => tokio::time::advance(Duration::from_millis(25)).await,
                Err(r) => break r,
            }
        };
        assert_eq!(refusal.reason, Reason::Steady);
        // One steady token at 20/s is at most 50 ms away.
        assert!(refusal.retry_after <= Duration::from_millis(51), "{refusal:?}");
        // Short of the wait: still refused; at the wait: admitted.
        if refusal.retry_after > Duration::from_millis(2) {
            tokio::time::advance(refusal.retry_after - Duration::from_millis(2)).await;
            assert!(l.admit("a", &limits).is_err());
            tokio::time::advance(Duration::from_millis(2)).await;
        } else {
            tokio::time::advance(refusal.retry_after).await;
        }
        assert!(
            l.admit("a", &limits).is_ok(),
            "waiting {:?} must be enough",
            refusal.retry_after
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_concurrency_cap_is_held_by_permits() {
        let l = Limiter::new();
        let limits = TenantLimits {
            max_concurrent: 2,
            ..TenantLimits::default()
        };
        let a = l.admit("a", &limits).unwrap();
        let _b = l.admit("a", &limits).unwrap();
        let r = l.admit("a", &limits).unwrap_err();
        assert_eq!(r.reason, Reason::Concurrency);
        // Refused for concurrency: no token was taken.
        drop(a);
        assert_eq!(l.in_flight("a"), 1);
        assert!(l.admit("a", &limits).is_ok());
        // Stream requests take tokens, not slots.
        assert!(l.take("a", &limits).is_ok());
    }
}
