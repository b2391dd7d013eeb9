//! Golden cases from the Kubernetes HPA test tables, replayed against the port in
//! `lattice_sim::policy::hpa`. Each case names its Go test; the numbers are the
//! upstream ones (`kubernetes/kubernetes:pkg/controller/podautoscaler/`
//! `replica_calculator_test.go` and `horizontal_test.go`).
//!
//! Upstream CPU tests give per-container levels and requests for two containers
//! per pod; a pod's sample here is the pod total (level × 2, request × 2), which
//! is what `GetResourceUtilizationRatio` sums.

use lattice_sim::policy::hpa::{
    external_average_value_replicas, pods_metric_replicas, resource_replicas, Behavior, Normalizer, PodPhase,
    PodSample, ScalingPolicy, ScalingRules, SelectPolicy,
};

const TOLERANCE: f64 = 0.1;

fn ready(level: i64) -> PodSample {
    PodSample {
        phase: PodPhase::Running,
        ready: true,
        deleting: false,
        value: Some(level),
        request: 0,
    }
}

/// A CPU pod with two containers each requesting `request_milli` and using `level`.
fn cpu(level: Option<i64>, request_milli: i64) -> PodSample {
    PodSample {
        phase: PodPhase::Running,
        ready: true,
        deleting: false,
        value: level.map(|l| 2 * l),
        request: 2 * request_milli,
    }
}

fn unready(mut pod: PodSample) -> PodSample {
    pod.ready = false;
    pod
}

fn phase(mut pod: PodSample, phase: PodPhase) -> PodSample {
    pod.phase = phase;
    pod
}

fn deleting(mut pod: PodSample) -> PodSample {
    pod.deleting = true;
    pod
}

// --- replica_calculator_test.go: Pods (custom) metrics, AverageValue targets ---

#[test]
fn custom_metric_cases() {
    // (Go test, current, levels in milli, target in milli, expected)
    let cases: [(&str, u32, &[i64], i64, u32); 3] = [
        ("TestReplicaCalcScaleUpCM", 3, &[20000, 10000, 30000], 15000, 4),
        (
            "TestReplicaCalcScaleDownCM",
            5,
            &[12000, 12000, 12000, 12000, 12000],
            20000,
            3,
        ),
        ("TestReplicaCalcToleranceCM", 3, &[20000, 21000, 21000], 20000, 3),
    ];
    for (name, current, levels, target, expected) in cases {
        let pods: Vec<PodSample> = levels.iter().map(|&l| ready(l)).collect();
        assert_eq!(
            pods_metric_replicas(current, target, TOLERANCE, &pods),
            Ok(expected),
            "{name}"
        );
    }
}

#[test]
fn custom_metrics_ignore_readiness() {
    // TestReplicaCalcScaleUpCMUnreadyHotCpuNoLessScale: the unready pod still counts.
    let pods = [ready(50000), ready(10000), unready(ready(30000))];
    assert_eq!(pods_metric_replicas(3, 15000, TOLERANCE, &pods), Ok(6));
    // TestReplicaCalcScaleUpCMUnreadyHotCpuScaleWouldScaleDown: average 31666
    // (integer division), ratio 2.11, ceil(6.33) = 7.
    let pods = [unready(ready(50000)), ready(15000), unready(ready(30000))];
    assert_eq!(pods_metric_replicas(3, 15000, TOLERANCE, &pods), Ok(7));
}

// --- replica_calculator_test.go: CPU utilization (readiness matters) ---

#[test]
fn cpu_utilization_cases() {
    let r = 1000;
    let cases: Vec<(&str, u32, Vec<PodSample>, i64, u32)> = vec![
        (
            "TestReplicaCalcScaleUp",
            3,
            vec![cpu(Some(300), r), cpu(Some(500), r), cpu(Some(700), r)],
            30,
            5,
        ),
        (
            "TestReplicaCalcScaleUpUnreadyLessScale",
            3,
            vec![unready(cpu(Some(300), r)), cpu(Some(500), r), cpu(Some(700), r)],
            30,
            4,
        ),
        (
            "TestReplicaCalcScaleUpUnreadyNoScale",
            3,
            vec![
                cpu(Some(400), r),
                unready(cpu(Some(500), r)),
                unready(cpu(Some(700), r)),
            ],
            30,
            3,
        ),
        (
            "TestReplicaCalcScaleUpIgnoresFailedPods",
            2,
            vec![
                cpu(Some(500), r),
                cpu(Some(700), r),
                phase(unready(cpu(None, r)), PodPhase::Failed),
                phase(unready(cpu(None, r)), PodPhase::Failed),
            ],
            30,
            4,
        ),
        (
            "TestReplicaCalcScaleUpIgnoresDeletionPods",
            2,
            vec![
                cpu(Some(500), r),
                cpu(Some(700), r),
                deleting(unready(cpu(None, r))),
                deleting(unready(cpu(None, r))),
            ],
            30,
            4,
        ),
        (
            "TestReplicaCalcScaleDown",
            5,
            vec![
                cpu(Some(100), r),
                cpu(Some(300), r),
                cpu(Some(500), r),
                cpu(Some(250), r),
                cpu(Some(250), r),
            ],
            50,
            3,
        ),
        (
            "TestReplicaCalcScaleDownIncludeUnreadyPods",
            5,
            vec![
                cpu(Some(100), r),
                cpu(Some(300), r),
                cpu(Some(500), r),
                unready(cpu(Some(250), r)),
                unready(cpu(Some(250), r)),
            ],
            50,
            2,
        ),
        (
            "TestReplicaCalcScaleDownExcludeUnscheduledPods",
            5,
            vec![
                cpu(Some(100), r),
                phase(unready(cpu(None, r)), PodPhase::Pending),
                phase(unready(cpu(None, r)), PodPhase::Pending),
                phase(unready(cpu(None, r)), PodPhase::Pending),
                phase(unready(cpu(None, r)), PodPhase::Pending),
            ],
            50,
            1,
        ),
        (
            "TestReplicaCalcScaleDownIgnoresFailedPods",
            5,
            vec![
                cpu(Some(100), r),
                cpu(Some(300), r),
                cpu(Some(500), r),
                cpu(Some(250), r),
                cpu(Some(250), r),
                phase(unready(cpu(None, r)), PodPhase::Failed),
                phase(unready(cpu(None, r)), PodPhase::Failed),
            ],
            50,
            3,
        ),
        (
            "TestReplicaCalcTolerance",
            3,
            vec![cpu(Some(1010), 900), cpu(Some(1030), 1000), cpu(Some(1020), 1100)],
            100,
            3,
        ),
        // Two pods have no sample: filled at 100 % of their request on this
        // scale-down, utilization 24 % → 62 %, ceil(0.62 × 4) = 3.
        (
            "TestReplicaCalcMissingMetrics",
            4,
            vec![cpu(Some(400), r), cpu(Some(95), r), cpu(None, r), cpu(None, r)],
            100,
            3,
        ),
        (
            "TestReplicaCalcMissingMetricsNoChangeEq",
            2,
            vec![cpu(Some(1000), r), cpu(None, r)],
            100,
            2,
        ),
        (
            "TestReplicaCalcMissingMetricsNoChangeGt",
            2,
            vec![cpu(Some(1900), r), cpu(None, r)],
            100,
            2,
        ),
        (
            "TestReplicaCalcMissingMetricsNoChangeLt",
            2,
            vec![cpu(Some(600), r), cpu(None, r)],
            100,
            2,
        ),
        (
            "TestReplicaCalcMissingMetricsUnreadyChange",
            3,
            vec![unready(cpu(Some(100), r)), cpu(Some(450), r), cpu(None, r)],
            50,
            3,
        ),
        (
            "TestReplicaCalcMissingMetricsUnreadyScaleUp",
            3,
            vec![unready(cpu(Some(100), r)), cpu(Some(2000), r), cpu(None, r)],
            50,
            4,
        ),
        (
            "TestReplicaCalcMissingMetricsUnreadyScaleDown",
            4,
            vec![
                unready(cpu(Some(100), r)),
                cpu(Some(100), r),
                cpu(Some(100), r),
                cpu(None, r),
            ],
            50,
            3,
        ),
        // A third pod (surge) without a sample would give ceil(0.8 × 3) = 3 > 2 on
        // a scale-down: the direction check keeps 2.
        (
            "TestReplicaCalcDuringRollingUpdateWithMaxSurge",
            2,
            vec![cpu(Some(100), r), cpu(Some(100), r), cpu(None, r)],
            50,
            2,
        ),
    ];
    for (name, current, pods, target, expected) in cases {
        assert_eq!(
            resource_replicas(current, target, TOLERANCE, &pods),
            Ok(expected),
            "{name}"
        );
    }
}

// --- replica_calculator_test.go: External AverageValue (KEDA's target type) ---

#[test]
fn external_per_pod_cases() {
    // (Go test, status replicas, total milli, per-pod target milli, expected)
    let cases = [
        ("TestReplicaCalcScaleUpPerPodCMExternal", 3, 8600, 2150, 4),
        ("TestReplicaCalcScaleDownPerPodCMExternal", 5, 8600, 2867, 3),
        ("TestReplicaCalcTolerancePerPodCMExternal", 3, 8600, 2900, 3),
    ];
    for (name, status, total, target, expected) in cases {
        assert_eq!(
            external_average_value_replicas(status, total, target, TOLERANCE),
            expected,
            "{name}"
        );
    }
}

// --- horizontal_test.go: TestScalingWithRules (convertDesiredReplicasWithBehaviorRate) ---

/// `generateScalingRules(pods, podsPeriod, percent, percentPeriod, window)`.
fn rules(pods: u32, pods_period: u64, percent: u32, percent_period: u64, window: u64) -> ScalingRules {
    let mut policies = Vec::new();
    if pods != 0 {
        policies.push(ScalingPolicy::Pods {
            value: pods,
            period_s: pods_period,
        });
    }
    if percent != 0 {
        policies.push(ScalingPolicy::Percent {
            value: percent,
            period_s: percent_period,
        });
    }
    ScalingRules {
        stabilization_window_s: window,
        select: SelectPolicy::Max,
        policies,
    }
}

const NOW: u64 = 10_000;

/// `generateEventsUniformDistribution(events, 120)`: events centred in equal
/// slices of the last 120 s, oldest first.
fn events(normalizer: &mut Normalizer, changes: &[u32], up: bool) {
    if changes.is_empty() {
        return;
    }
    let slice = 120 / changes.len() as u64;
    for (i, &change) in changes.iter().enumerate() {
        let age = 120 - slice * (i as u64 + 1) + slice / 2;
        let (from, to) = if up { (100, 100 + change) } else { (100 + change, 100) };
        normalizer.record_scale_event(NOW - age, from, to);
    }
}

struct RateCase {
    name: &'static str,
    up_events: &'static [u32],
    down_events: &'static [u32],
    min: u32,
    max: u32,
    up: Option<ScalingRules>,
    down: Option<ScalingRules>,
    current: u32,
    desired: u32,
    expected: u32,
}

#[test]
fn scaling_with_rules() {
    let case = |name, min, max, up, down, current, desired, expected| RateCase {
        name,
        up_events: &[],
        down_events: &[],
        min,
        max,
        up,
        down,
        current,
        desired,
        expected,
    };
    let cases = vec![
        case("prenormalized desired replicas within range", 3, 8, None, None, 5, 7, 7),
        case(
            "prenormalized desired replicas < minReplicas",
            2,
            8,
            None,
            None,
            3,
            1,
            2,
        ),
        case(
            "prenormalized desired replicas within range when minReplicas is 0",
            0,
            10,
            None,
            None,
            1,
            0,
            0,
        ),
        case(
            "maxReplicas is the limit because maxReplicas < scaleUpLimit",
            1,
            10,
            None,
            None,
            20,
            1000,
            10,
        ),
        case(
            "desired replica count is more than the maximum replica count",
            100,
            150,
            None,
            None,
            100,
            1000,
            150,
        ),
        case(
            "scaleUpLimit is the limit because scaleUpLimit < maxReplicas with user policies",
            1,
            2000,
            Some(rules(0, 0, 1, 60, 0)),
            None,
            3,
            1000,
            4,
        ),
        case("scaleUp with default behavior", 1, 1000, None, None, 10, 50, 20),
        case(
            "scaleUp with pods policy larger than percent policy",
            1,
            1000,
            Some(rules(100, 60, 100, 60, 0)),
            None,
            10,
            500,
            110,
        ),
        case(
            "scaleUp with percent policy larger than pods policy",
            1,
            1000,
            Some(rules(2, 60, 100, 60, 0)),
            None,
            10,
            500,
            20,
        ),
        case(
            "scaleUp with pod policy limitation",
            1,
            1000,
            Some(rules(30, 60, 0, 0, 0)),
            None,
            10,
            50,
            40,
        ),
        case(
            "scaleUp with percent policy limitation",
            1,
            1000,
            Some(rules(0, 0, 200, 60, 0)),
            None,
            10,
            50,
            30,
        ),
        case(
            "scaleDown with percent policy larger than pod policy",
            1,
            1000,
            None,
            Some(rules(20, 60, 1, 60, 300)),
            100,
            2,
            80,
        ),
        case(
            "scaleDown with pod policy larger than percent policy",
            1,
            1000,
            None,
            Some(rules(2, 60, 1, 60, 300)),
            100,
            2,
            98,
        ),
        case(
            "scaleDown with spec MinReplicas limitation with large percent policy",
            5,
            1000,
            None,
            Some(rules(0, 0, 100, 60, 300)),
            10,
            2,
            5,
        ),
        case(
            "scaleDown with pod policy limitation",
            1,
            1000,
            None,
            Some(rules(5, 60, 0, 0, 300)),
            10,
            2,
            5,
        ),
        case(
            "scaleDown with percent policy limitation",
            1,
            1000,
            None,
            Some(rules(0, 0, 50, 60, 300)),
            10,
            5,
            5,
        ),
        RateCase {
            up_events: &[1, 5, 9],
            ..case(
                "scaleUp with pod policy and previous scale up events",
                1,
                1000,
                Some(rules(150, 120, 0, 0, 0)),
                None,
                100,
                500,
                235,
            )
        },
        RateCase {
            up_events: &[1, 5, 9],
            ..case(
                "scaleUp with currentReplicas limitation with rate.PeriodSeconds with a lot of recent scale up events",
                1,
                1000,
                Some(rules(5, 120, 0, 0, 0)),
                None,
                100,
                500,
                100,
            )
        },
        RateCase {
            up_events: &[1, 5, 9],
            ..case(
                "scaleUp with percent policy and previous scale up events",
                1,
                1000,
                Some(rules(0, 0, 200, 120, 0)),
                None,
                100,
                500,
                255,
            )
        },
        RateCase {
            up_events: &[4],
            down_events: &[2],
            ..case(
                "scaleUp with percent policy and previous scale up and down events",
                1,
                1000,
                Some(rules(0, 0, 300, 300, 0)),
                None,
                6,
                24,
                16,
            )
        },
        RateCase {
            down_events: &[1, 5, 9],
            ..case(
                "scaleDown with pod policy limitation and previous events",
                1,
                1000,
                None,
                Some(rules(5, 120, 0, 0, 300)),
                100,
                2,
                100,
            )
        },
        RateCase {
            down_events: &[2, 4, 6],
            ..case(
                "scaleDown with percent policy limitation and previous events",
                1,
                1000,
                None,
                Some(rules(0, 0, 50, 120, 300)),
                100,
                0,
                56,
            )
        },
        RateCase {
            up_events: &[2],
            down_events: &[4],
            ..case(
                "scaleDown with percent policy and previous scale up and down events",
                1,
                1000,
                None,
                Some(rules(0, 0, 50, 180, 0)),
                10,
                1,
                6,
            )
        },
        RateCase {
            down_events: &[10, 10, 10],
            ..case(
                "scaleDown with previous events preventing further scale down",
                1,
                1000,
                None,
                Some(rules(0, 0, 10, 120, 300)),
                100,
                0,
                100,
            )
        },
    ];
    let defaults = Behavior::default();
    for c in cases {
        let mut normalizer = Normalizer::new();
        events(&mut normalizer, c.up_events, true);
        events(&mut normalizer, c.down_events, false);
        let behavior = Behavior {
            scale_up: c.up.unwrap_or_else(|| defaults.scale_up.clone()),
            scale_down: c.down.unwrap_or_else(|| defaults.scale_down.clone()),
        };
        let got = normalizer.limit_rate(NOW, c.current, c.desired, c.min, c.max, &behavior);
        assert_eq!(got, c.expected, "{}", c.name);
    }
}

// --- horizontal_test.go: TestNormalizeDesiredReplicasWithBehavior (stabilization) ---

/// (Go case, recommendations as (age s, replicas), current, proposal, up window,
/// down window, expected)
type StabilizationCase = (&'static str, &'static [(u64, u32)], u32, u32, u64, u64, u32);

#[test]
fn stabilization_windows() {
    let cases: [StabilizationCase; 8] = [
        ("empty recommendations for scaling down", &[], 100, 5, 0, 0, 5),
        (
            "simple scale down stabilization",
            &[(120, 4), (60, 5)],
            100,
            3,
            0,
            180,
            5,
        ),
        ("simple scale up stabilization", &[(120, 4), (60, 5)], 1, 7, 300, 0, 4),
        ("no scale down stabilization", &[(120, 1), (60, 2)], 100, 3, 300, 0, 3),
        ("no scale up stabilization", &[(120, 4), (60, 5)], 1, 3, 0, 300, 3),
        (
            "scale down stabilization, reuse one of obsolete recommendation element",
            &[(600, 10), (60, 4), (120, 5), (540, 9)],
            100,
            3,
            0,
            180,
            5,
        ),
        (
            "scale up and down stabilization, do not scale up when prenormalized rec goes down",
            &[(6000, 2), (180, 3)],
            2,
            1,
            300,
            300,
            2,
        ),
        (
            "scale up and down stabilization, do not scale down when prenormalized rec goes up",
            &[(6000, 2), (180, 1)],
            2,
            3,
            300,
            300,
            2,
        ),
    ];
    for (name, recommendations, current, proposal, up, down, expected) in cases {
        let mut normalizer = Normalizer::new();
        for &(age, r) in recommendations {
            normalizer.record_recommendation(NOW - age, r);
        }
        assert_eq!(
            normalizer.stabilize(NOW, current, proposal, up, down),
            expected,
            "{name}"
        );
    }
}

#[test]
fn default_scale_down_waits_for_the_300_s_window() {
    // Doc behaviour (Default Behavior: scaleDown stabilizationWindowSeconds 300):
    // after one recommendation of 10, lower recommendations only take effect once
    // it has left the window (a recommendation exactly 300 s old no longer counts:
    // `timestamp.After(now - window)`); then the default 100 % policy allows the drop.
    let behavior = Behavior::default();
    let mut normalizer = Normalizer::new();
    assert_eq!(normalizer.normalize(0, 10, 10, 1, 20, &behavior), 10);
    for t in (15..300).step_by(15) {
        assert_eq!(normalizer.normalize(t, 10, 2, 1, 20, &behavior), 10, "t = {t}");
    }
    assert_eq!(normalizer.normalize(300, 10, 2, 1, 20, &behavior), 2);
}
