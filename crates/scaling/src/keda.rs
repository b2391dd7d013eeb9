//! The KEDA external scaler's arithmetic.
//!
//! KEDA turns an external metric into replicas with the HPA's AverageValue rule:
//! `desired = ceil(metric / target)`. To have KEDA apply a replica count the policy
//! chose, the scaler reports `metric = replicas x target`, and `target` is what it
//! declares in `GetMetricSpec`.

/// The metric value that makes KEDA ask for exactly `replicas`.
pub fn metric_for(replicas: u32, target: f64) -> f64 {
    f64::from(replicas) * target
}

/// The replicas KEDA derives from a metric value (its AverageValue rule).
pub fn replicas_for(metric: f64, target: f64) -> u32 {
    if !(metric.is_finite() && target.is_finite() && target > 0.0) || metric <= 0.0 {
        return 0;
    }
    let r = (metric / target).ceil();
    if r >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        r as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_count_round_trips_through_keda() {
        for (replicas, target) in [(0, 1.0), (1, 1.0), (7, 1.0), (7, 8.0), (13, 0.5), (1000, 3.0)] {
            assert_eq!(
                replicas_for(metric_for(replicas, target), target),
                replicas,
                "{replicas} x {target}"
            );
        }
        assert_eq!(replicas_for(f64::NAN, 1.0), 0);
        assert_eq!(replicas_for(5.0, 0.0), 0);
    }
}
