//! Order statistics: the one quantile the simulator's reports and the benchmarks'
//! latency figures are computed with, so a p99 means the same thing in both.

/// The `q` quantile (0..=1) of `values` by nearest rank: the smallest value with at
/// least `q` of the values at or below it. NaN for no values; NaN values sort last.
///
/// Reorders `values` (a selection, O(n), not a sort); calling it again on the same
/// slice for another `q` is fine.
pub fn quantile<T: Copy + Into<f64>>(values: &mut [T], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
    let (_, v, _) = values.select_nth_unstable_by(rank, |a, b| (*a).into().total_cmp(&(*b).into()));
    (*v).into()
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut v, 0.0), 1.0);
        assert!(quantile::<f32>(&mut [], 0.5).is_nan());
    }

    #[test]
    fn order_of_the_input_does_not_matter() {
        let mut v: Vec<f64> = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 0.99), 5.0);
        assert_eq!(quantile(&mut [7.0f64], 0.5), 7.0);
    }
}
