//! KEDA activation and scale-to-zero, and Ray Serve's delays.
//!
//! KEDA has no unit-test table for activation (its scale handler is covered by
//! e2e tests), so those cases come from the KEDA docs ("Activation vs scaling",
//! `cooldownPeriod`, `minReplicaCount`). The Ray cases are from
//! `ray-project/ray:python/ray/serve/tests/unit/test_autoscaling_policy.py`.

use lattice_sim::policy::hpa::{external_average_value_replicas, HpaConfig};
use lattice_sim::policy::keda::{Activation, KedaConfig, KedaPolicy};
use lattice_sim::policy::ray::{apply_scaling_factors, RayConfig, RayPolicy, CONTROL_LOOP_INTERVAL_S};

fn keda(config: KedaConfig) -> KedaPolicy {
    KedaPolicy::new(config, HpaConfig::default(), 10.0, 100)
}

#[test]
fn keda_activation_takes_priority_over_scaling() {
    // Docs example: threshold 10, activationThreshold 50, lag 40. The HPA alone
    // would want 4 replicas, but the trigger is inactive, so the workload goes to
    // zero.
    assert_eq!(external_average_value_replicas(1, 40_000, 10_000, 0.1), 4);
    let mut k = keda(KedaConfig {
        activation_threshold: 50.0,
        ..KedaConfig::default()
    });
    assert_eq!(k.poll(0, 1, Some(40.0)), Activation::Deactivate);
}

#[test]
fn keda_activation_is_strictly_greater_than_the_threshold() {
    let mut k = keda(KedaConfig {
        activation_threshold: 5.0,
        ..KedaConfig::default()
    });
    assert_eq!(k.poll(0, 0, Some(5.0)), Activation::Keep);
    assert_eq!(k.poll(30, 0, Some(5.5)), Activation::Activate(1));
}

#[test]
fn keda_scales_to_zero_only_after_the_cooldown() {
    let mut k = keda(KedaConfig::default());
    assert_eq!(k.poll(0, 3, Some(12.0)), Activation::Keep);
    for t in (30..300).step_by(30) {
        assert_eq!(k.poll(t, 3, Some(0.0)), Activation::Keep, "t = {t}");
    }
    assert_eq!(k.poll(300, 3, Some(0.0)), Activation::Deactivate);
    // A failed scaler changes nothing.
    assert_eq!(k.poll(330, 3, None), Activation::Keep);
}

#[test]
fn keda_min_replica_count_keeps_the_trigger_active() {
    let mut k = keda(KedaConfig {
        min_replica_count: 2,
        ..KedaConfig::default()
    });
    assert_eq!(k.poll(0, 0, Some(0.0)), Activation::Activate(2));
    assert_eq!(k.poll(1000, 2, Some(0.0)), Activation::Keep);
}

fn ray(config: RayConfig, min: u32, max: u32) -> RayPolicy {
    RayPolicy::new(config, min, max)
}

fn wait_periods(delay_s: f64) -> usize {
    (delay_s / CONTROL_LOOP_INTERVAL_S) as usize
}

#[test]
fn ray_upscale_downscale_delay() {
    // test_upscale_downscale_delay, for downscale_to_zero_delay_s None and 300.
    // The upstream test delegates the rest to `_run_upscale_downscale_flow`; the
    // down half here (2 → 1 → 0) is rebuilt from the documented delay rules.
    for to_zero in [None, Some(300.0)] {
        let config = RayConfig {
            target_ongoing_requests: 1.0,
            upscale_delay_s: 30.0,
            downscale_delay_s: 600.0,
            downscale_to_zero_delay_s: to_zero,
            ..RayConfig::default()
        };
        let mut p = ray(config, 0, 2);
        // Scale up when there are 0 replicas and requests are queued: no delay.
        assert_eq!(p.decide(0, 0, 1.0), 1);
        // Only after enough consecutive scale-up decisions.
        for i in 0..wait_periods(30.0) {
            assert_eq!(p.decide(1, 1, 100.0), 1, "up {i}");
        }
        assert_eq!(p.decide(1, 1, 100.0), 2);
        for i in 0..wait_periods(600.0) {
            assert_eq!(p.decide(2, 2, 0.0), 2, "down {i}");
        }
        assert_eq!(p.decide(2, 2, 0.0), 1);
        for i in 0..wait_periods(to_zero.unwrap_or(600.0)) {
            assert_eq!(p.decide(1, 1, 0.0), 1, "to zero {i}");
        }
        assert_eq!(p.decide(1, 1, 0.0), 0);
    }
}

#[test]
fn ray_replicas_delayed_startup() {
    // test_replicas_delayed_startup: decisions are against the target, not the
    // running replicas, so slow starts do not cause repeated scale-ups.
    let config = RayConfig {
        target_ongoing_requests: 1.0,
        upscale_delay_s: 0.0,
        downscale_delay_s: 100_000.0,
        ..RayConfig::default()
    };
    let mut p = ray(config, 1, 200);
    assert_eq!(p.decide(1, 1, 100.0), 100);
    assert_eq!(p.decide(100, 1, 100.0), 100);
    assert_eq!(p.decide(100, 3, 123.0), 123);
    assert_eq!(p.decide(123, 4, 10.0), 123);
}

#[test]
fn ray_fluctuating_ongoing_requests() {
    // test_fluctuating_ongoing_requests: alternating over- and underload never
    // accumulates enough consecutive decisions with a delay; without one it flaps.
    for delay in [30.0, 0.0] {
        let config = RayConfig {
            target_ongoing_requests: 50.0,
            upscale_delay_s: delay,
            downscale_delay_s: delay,
            ..RayConfig::default()
        };
        let mut p = ray(config, 1, 10);
        for trial in 0..1000 {
            if trial % 2 == 0 {
                let expected = if delay > 0.0 { 1 } else { 2 };
                assert_eq!(p.decide(1, 1, 100.0), expected, "delay {delay}, trial {trial}");
            } else {
                let expected = if delay > 0.0 { 2 } else { 1 };
                assert_eq!(p.decide(2, 2, 40.0), expected, "delay {delay}, trial {trial}");
            }
        }
    }
}

#[test]
fn ray_single_replica_receives_all_requests() {
    // test_single_replica_receives_all_requests: the total counts, not its spread.
    for (ongoing, expected) in [(20.0, 4), (100.0, 20), (10.0, 2)] {
        let config = RayConfig {
            target_ongoing_requests: 5.0,
            upscale_delay_s: 0.0,
            downscale_delay_s: 0.0,
            ..RayConfig::default()
        };
        assert_eq!(ray(config, 1, 50).decide(4, 4, ongoing), expected, "ongoing {ongoing}");
    }
}

#[test]
fn ray_scaling_factors() {
    // TestAutoscalingConfigParameters.test_apply_scaling_factors_*
    assert_eq!(apply_scaling_factors(20.0, 10, 0.5, 1.0), 15);
    assert_eq!(apply_scaling_factors(5.0, 20, 1.0, 0.5), 13);
    assert_eq!(
        apply_scaling_factors(9.0, 10, 1.0, 0.5),
        9,
        "stuck downscale still removes one"
    );
}

#[test]
fn ray_apply_delay_logic_upscale() {
    // test_apply_delay_logic_upscale: upscale_delay_s 0.3 is int(0.3 / 0.1) = 2
    // loop periods in floating point, as in Python.
    let config = RayConfig {
        upscale_delay_s: 0.3,
        ..RayConfig::default()
    };
    let mut p = ray(config, 1, 10);
    let periods = wait_periods(0.3);
    assert_eq!(periods, 2);
    for i in 0..periods {
        assert_eq!(p.decide(1, 1, 10.0), 1, "iteration {i}");
    }
    assert_eq!(p.decide(1, 1, 10.0), 5);
}
