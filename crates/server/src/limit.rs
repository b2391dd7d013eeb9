//! Burst limiting at the edge: one token bucket per tenant (`x-tenant` header or
//! gRPC metadata, "default" without one), refilled at `rate` per second and holding
//! at most `burst` tokens. An inference request that finds the bucket empty is
//! refused with 429 / RESOURCE_EXHAUSTED and the time until a token is back as
//! `Retry-After`, before it is decoded or queued: a burst costs the server almost
//! nothing, and one tenant's burst cannot fill the queues other tenants share.

use std::{num::NonZeroU32, time::Duration};

use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};

pub const TENANT_HEADER: &str = "x-tenant";

pub struct Limiter {
    buckets: DefaultKeyedRateLimiter<String>,
    clock: governor::clock::DefaultClock,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    /// `None` when `rate` is 0 (limiting off).
    pub fn new(rate: u32, burst: u32) -> Option<Limiter> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Limiter {
            buckets: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: governor::clock::DefaultClock::default(),
        })
    }

    /// Takes a token for `tenant`, or says how long until one is back.
    pub fn check(&self, tenant: &str) -> Result<(), Duration> {
        // Buckets of idle tenants are dropped now and then, so the map stays small.
        if self.buckets.len() > 10_000 {
            self.buckets.retain_recent();
        }
        self.buckets
            .check_key(&tenant.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_tenant() {
        let l = Limiter::new(10, 5).unwrap();
        for _ in 0..5 {
            assert!(l.check("a").is_ok());
        }
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Another tenant has its own bucket.
        assert!(l.check("b").is_ok());
        assert!(Limiter::new(0, 5).is_none());
    }
}
