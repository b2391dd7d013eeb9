//! The shipped traces (`crates/sim/traces/*.csv`) and the formulas that made them.
//!
//! Each is a deterministic rate curve λ(t) with Poisson noise from a fixed seed, so
//! `cargo run -p lattice-sim --example regenerate` rewrites the files byte for byte
//! and a test checks that the committed files still match.

use std::f64::consts::TAU;

use crate::rng::Rng;
use crate::trace::Trace;

/// A compressed day in two hours: a night trough of 20 req/s, a morning ramp, a
/// lunch dip and an evening peak of about 300 req/s.
///
/// λ(t) = 20 + 280·(½ − ½·cos(2πt/T))·(1 − 0.15·sin²(3πt/T)), T = 7200 s.
pub fn diurnal() -> Trace {
    const T: f64 = 7200.0;
    noisy(7200, 11, |t| {
        let day = 0.5 - 0.5 * (TAU * t / T).cos();
        let lunch = 1.0 - 0.15 * (1.5 * TAU * t / T).sin().powi(2);
        20.0 + 280.0 * day * lunch
    })
}

/// A steady 100 req/s, then 800 req/s (8×) from t = 600 s for four minutes, then
/// 100 req/s again until t = 1800 s. The step is sudden, as when a batch client or
/// a retry storm starts.
pub fn spike() -> Trace {
    noisy(1800, 12, |t| if (600.0..840.0).contains(&t) { 800.0 } else { 100.0 })
}

/// Bursts of 150 req/s for two minutes, then eight minutes of silence, six times
/// over an hour: long enough idle periods for KEDA's and Knative's scale to zero.
pub fn onoff() -> Trace {
    noisy(3600, 13, |t| if t % 600.0 < 120.0 { 150.0 } else { 0.0 })
}

fn noisy(seconds: usize, seed: u64, rate: impl Fn(f64) -> f64) -> Trace {
    let mut rng = Rng::new(seed);
    Trace::new((0..seconds).map(|s| rng.poisson(rate(s as f64))).collect())
}
