//! Golden cases from Knative's `pkg/autoscaler/scaling/autoscaler_test.go`,
//! replayed against `lattice_sim::policy::kpa::Decider`. The test helper there
//! (`newTestAutoscalerWithScalingMetric`) uses TotalValue = target / 0.75, panic
//! threshold 2, max scale up and down rates 10 and a 60 s stable window; `now` is
//! in seconds.

use lattice_sim::policy::kpa::{Decider, DeciderSpec, ScaleResult};

/// The upstream helper's spec for a target value and target burst capacity.
fn spec(target: f64, tbc: f64) -> DeciderSpec {
    DeciderSpec {
        target_value: target,
        total_value: target / 0.75,
        target_burst_capacity: tbc,
        panic_threshold: 2.0,
        max_scale_up_rate: 10.0,
        max_scale_down_rate: 10.0,
        stable_window_s: 60.0,
        reachable: true,
        activation_scale: 1,
        scale_down_delay_s: 0.0,
    }
}

/// `expectedEBC(totCap, targetBC, recordedConcurrency, numPods)`.
fn ebc(target: f64, tbc: f64, concurrency: f64, pods: f64) -> i32 {
    (target / 0.75 * pods - tbc - concurrency).floor() as i32
}

fn result(desired: i32, excess_burst_capacity: i32) -> ScaleResult {
    ScaleResult {
        desired,
        excess_burst_capacity,
    }
}

/// (label, spec, ready pods when the decider was created 5 s earlier, ready pods,
/// stable, panic, want scale, want EBC)
type ScaleCase = (&'static str, DeciderSpec, u32, u32, f64, f64, i32, i32);

#[test]
fn autoscaler_scale_table() {
    // TestAutoscalerScale. A decider created with 5 ready pods 5 s earlier is in
    // panic since then with maxPanicPods 5: the state the upstream prepFunc sets.
    let mut up_rate = spec(1.0, 1982.0);
    up_rate.max_scale_up_rate = 1.1;
    let mut down_rate = spec(10.0, 1982.0);
    down_rate.max_scale_down_rate = 1.1;
    let mut unreachable = down_rate.clone();
    unreachable.reachable = false;
    let cases: Vec<ScaleCase> = vec![
        (
            "AutoscalerNoDataAtZeroNoAutoscale",
            spec(10.0, 100.0),
            1,
            1,
            0.0,
            0.0,
            0,
            ebc(10.0, 100.0, 0.0, 1.0),
        ),
        (
            "AutoscalerStableModeUnlimitedTBC",
            spec(181.0, -1.0),
            1,
            1,
            21.0,
            26.0,
            1,
            -1,
        ),
        ("Autoscaler0TBC", spec(10.0, 0.0), 1, 1, 50.0, 49.0, 5, 0),
        (
            "AutoscalerStableModeNoChange",
            spec(10.0, 100.0),
            1,
            1,
            50.0,
            50.0,
            5,
            ebc(10.0, 100.0, 50.0, 1.0),
        ),
        (
            "AutoscalerPanicStableLargerThanPanic",
            spec(1.0, 100.0),
            5,
            5,
            50.0,
            30.0,
            50,
            ebc(1.0, 100.0, 30.0, 5.0),
        ),
        (
            "AutoscalerPanicStableLessThanPanic",
            spec(1.0, 100.0),
            5,
            5,
            20.0,
            30.0,
            30,
            ebc(1.0, 100.0, 30.0, 5.0),
        ),
        (
            "AutoscalerStableModeNoChangeAlreadyScaled",
            spec(10.0, 100.0),
            1,
            5,
            50.0,
            50.0,
            5,
            ebc(10.0, 100.0, 50.0, 5.0),
        ),
        (
            "AutoscalerStableModeIncreaseWithSmallScaleUpRate",
            up_rate,
            1,
            2,
            3.0,
            3.1,
            3,
            ebc(1.0, 1982.0, 3.1, 2.0),
        ),
        (
            "AutoscalerStableModeDecreaseWithSmallScaleDownRate",
            down_rate,
            1,
            100,
            1.0,
            1.0,
            90,
            ebc(10.0, 1982.0, 1.0, 100.0),
        ),
        (
            "AutoscalerStableModeDecreaseNonReachable",
            unreachable,
            1,
            100,
            1.0,
            1.0,
            1,
            ebc(10.0, 1982.0, 1.0, 100.0),
        ),
        (
            "AutoscalerPanicModeDoublePodCount",
            spec(10.0, 84.0),
            1,
            1,
            50.0,
            100.0,
            10,
            ebc(10.0, 84.0, 100.0, 1.0),
        ),
    ];
    for (label, spec, created_with, ready, stable, panic, want, want_ebc) in cases {
        let mut decider = Decider::new(spec, created_with, 95.0);
        assert_eq!(
            decider.scale(100.0, ready, stable, panic),
            result(want, want_ebc),
            "{label}"
        );
    }
}

#[test]
fn stable_mode_follows_the_stable_average() {
    // TestAutoscalerStableModeIncreaseWithConcurrencyDefault
    let mut a = Decider::new(spec(10.0, 101.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 1, 50.0, 10.0).desired, 5);
    assert_eq!(a.scale(0.0, 1, 100.0, 10.0).desired, 10);
    // TestAutoscalerStableModeDecrease
    let mut a = Decider::new(spec(10.0, 98.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 8, 100.0, 100.0), result(10, ebc(10.0, 98.0, 100.0, 8.0)));
    assert_eq!(a.scale(0.0, 8, 50.0, 50.0), result(5, ebc(10.0, 98.0, 50.0, 8.0)));
}

#[test]
fn scale_to_zero_without_traffic() {
    // TestAutoscalerStableModeNoTrafficScaleToZero
    let mut a = Decider::new(spec(10.0, 75.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 1, 1.0, 0.0).desired, 1);
    assert_eq!(a.scale(0.0, 1, 0.0, 0.0).desired, 0);
}

#[test]
fn panic_mode_tracks_exponential_growth() {
    // TestAutoscalerPanicModeExponentialTrackAndStabilize
    let mut a = Decider::new(spec(1.0, 101.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 1, 6.0, 6.0), result(6, ebc(1.0, 101.0, 6.0, 1.0)));
    assert_eq!(a.scale(1.0, 6, 36.0, 36.0), result(36, ebc(1.0, 101.0, 36.0, 6.0)));
    assert!(a.in_panic());
    assert_eq!(
        a.scale(2.0, 36, 216.0, 216.0),
        result(216, ebc(1.0, 101.0, 216.0, 36.0))
    );
    assert_eq!(
        a.scale(2.0, 216, 1296.0, 1296.0),
        result(1296, ebc(1.0, 101.0, 1296.0, 216.0))
    );
    assert_eq!(
        a.scale(3.0, 1296, 1296.0, 1296.0),
        result(1296, ebc(1.0, 101.0, 1296.0, 1296.0))
    );
}

#[test]
fn panic_never_scales_down_until_the_stable_window_passes() {
    // TestAutoscalerPanicThenUnPanicScaleDown
    let mut a = Decider::new(spec(10.0, 93.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 1, 100.0, 100.0).desired, 10);
    let panic_time = 1.0;
    assert_eq!(a.scale(panic_time, 10, 100.0, 1000.0).desired, 100);
    // Traffic dropped off; still in panic, so the scale stays.
    assert_eq!(a.scale(panic_time + 30.0, 10, 1.0, 1.0).desired, 100);
    // After the stable window the panic ends and the stable value wins.
    assert_eq!(a.scale(panic_time + 61.0, 10, 1.0, 1.0).desired, 1);
    assert!(!a.in_panic());
}

#[test]
fn unpanic_after_slow_increase_and_extend_panic_window() {
    // TestAutoscalerUnpanicAfterSlowIncrease
    let mut a = Decider::new(spec(1.0, 98.0), 1, 0.0);
    let start = 10.0;
    assert_eq!(a.scale(start, 10, 11.0, 25.0), result(25, ebc(1.0, 98.0, 25.0, 10.0)));
    assert_eq!(
        a.scale(start + 30.0, 40, 30.0, 41.0),
        result(41, ebc(1.0, 98.0, 41.0, 40.0))
    );
    assert_eq!(
        a.scale(start + 62.0, 55, 50.0, 56.0),
        result(50, ebc(1.0, 98.0, 56.0, 55.0))
    );
    assert!(!a.in_panic());
    // TestAutoscalerExtendPanicWindow: still surging at half the window.
    let mut a = Decider::new(spec(1.0, 98.0), 1, 0.0);
    assert_eq!(a.scale(start, 10, 11.0, 25.0).desired, 25);
    assert_eq!(
        a.scale(start + 30.0, 40, 30.0, 80.0),
        result(80, ebc(1.0, 98.0, 80.0, 40.0))
    );
    assert!(a.in_panic());
}

#[test]
fn rate_limits() {
    // TestAutoscalerRateLimitScaleUp: need 100 pods, but only ×10 per decision.
    let mut a = Decider::new(spec(10.0, 61.0), 1, 0.0);
    assert_eq!(
        a.scale(0.0, 1, 1000.0, 1001.0),
        result(10, ebc(10.0, 61.0, 1001.0, 1.0))
    );
    assert_eq!(
        a.scale(0.0, 10, 1000.0, 1001.0),
        result(100, ebc(10.0, 61.0, 1001.0, 10.0))
    );
    // TestAutoscalerRateLimitScaleDown: need 1 pod, but only ÷10 per decision.
    let mut a = Decider::new(spec(10.0, 61.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 100, 1.0, 1.0), result(10, ebc(10.0, 61.0, 1.0, 100.0)));
    assert_eq!(a.scale(0.0, 10, 1.0, 1.0), result(1, ebc(10.0, 61.0, 1.0, 10.0)));
    // TestAutoscalerUseOnePodAsMinimumIfEndpointsNotFound: zero ready pods count
    // as one for the rate limit.
    let mut a = Decider::new(spec(10.0, 81.0), 1, 0.0);
    assert_eq!(a.scale(0.0, 0, 1000.0, 888.0), result(10, ebc(10.0, 81.0, 888.0, 0.0)));
}

#[test]
fn scale_down_delay_keeps_the_window_maximum() {
    // TestAutoscalerScaleDownDelay: target 10, rates 10, panic threshold 100
    // (never panics), scale-down delay 5 min, no ready pods, zero TBC.
    let spec = DeciderSpec {
        target_value: 10.0,
        total_value: 0.0,
        target_burst_capacity: 0.0,
        panic_threshold: 100.0,
        max_scale_up_rate: 10.0,
        max_scale_down_rate: 10.0,
        stable_window_s: 60.0,
        reachable: true,
        activation_scale: 1,
        scale_down_delay_s: 300.0,
    };
    let mut a = Decider::new(spec, 0, 0.0);
    // "simple"
    assert_eq!(a.scale(2.0, 0, 40.0, 40.0).desired, 4);
    assert_eq!(a.scale(300.0, 0, 0.0, 0.0).desired, 4, "less than the delay");
    assert_eq!(a.scale(302.0, 0, 0.0, 0.0).desired, 0, "delay passed");
    // "gradual"
    assert_eq!(a.scale(540.0, 0, 40.0, 40.0).desired, 4);
    assert_eq!(a.scale(600.0, 0, 30.0, 30.0).desired, 4, "4 still dominates");
    assert_eq!(a.scale(660.0, 0, 0.0, 0.0).desired, 4, "still at 4");
    assert_eq!(a.scale(840.0, 0, 0.0, 0.0).desired, 3, "4 scrolls out, drop to 3");
    assert_eq!(a.scale(900.0, 0, 0.0, 0.0).desired, 0, "everything scrolled out");
}

#[test]
fn start_in_panic_mode_only_with_more_than_one_pod() {
    // TestStartInPanicMode
    let spec = || DeciderSpec {
        target_value: 100.0,
        total_value: 120.0,
        panic_threshold: 2.2,
        ..spec(100.0, 11.0)
    };
    assert!(!Decider::new(spec(), 0, 0.0).in_panic());
    assert!(!Decider::new(spec(), 1, 0.0).in_panic());
    let mut a = Decider::new(spec(), 2, 0.0);
    assert!(a.in_panic());
    // maxPanicPods = 2: no drop below 2 while the panic lasts.
    assert_eq!(a.scale(1.0, 2, 10.0, 10.0).desired, 2);
}
