//! AI-quality signals: top-1 confidence and entropy of probability outputs, and
//! feature drift as a two-sample Kolmogorov–Smirnov statistic.

use std::collections::VecDeque;

/// Top-1 probability and Shannon entropy (nats) of one probability vector.
pub fn confidence_and_entropy(p: &[f32]) -> (f64, f64) {
    let mut top = 0f64;
    let mut h = 0f64;
    for &x in p {
        let x = f64::from(x).clamp(0.0, 1.0);
        top = top.max(x);
        if x > 0.0 {
            h -= x * x.ln();
        }
    }
    (top, h)
}

/// Population standard deviation.
pub fn std_dev(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// Two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical
/// distribution functions, in [0, 1].
pub fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    d
}

/// Reference sample plus a sliding window of recent values for one feature.
#[derive(Debug)]
pub struct DriftFeature {
    reference: Vec<f64>,
    reference_size: usize,
    window: VecDeque<f64>,
    window_size: usize,
}

impl DriftFeature {
    /// With a fixed reference (from a file in the model directory), or an empty one
    /// filled by the first `reference_size` observations.
    pub fn new(reference: Vec<f64>, reference_size: usize, window_size: usize) -> DriftFeature {
        DriftFeature {
            reference_size: if reference.is_empty() {
                reference_size
            } else {
                reference.len()
            },
            reference,
            window: VecDeque::with_capacity(window_size),
            window_size,
        }
    }

    pub fn observe(&mut self, x: f64) {
        if self.reference.len() < self.reference_size {
            self.reference.push(x);
            return;
        }
        if self.window.len() == self.window_size {
            self.window.pop_front();
        }
        self.window.push_back(x);
    }

    /// The KS statistic of the window against the reference; `None` until both hold
    /// enough values to mean something.
    pub fn score(&self) -> Option<f64> {
        let min = (self.window_size / 4).max(1);
        if self.reference.len() < self.reference_size || self.window.len() < min {
            return None;
        }
        let w: Vec<f64> = self.window.iter().copied().collect();
        Some(ks_statistic(&self.reference, &w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_certain() {
        let (c, h) = confidence_and_entropy(&[0.25; 4]);
        assert!((c - 0.25).abs() < 1e-9 && (h - 4f64.ln()).abs() < 1e-6);
        let (c, h) = confidence_and_entropy(&[1.0, 0.0, 0.0]);
        assert!((c - 1.0).abs() < 1e-9 && h.abs() < 1e-12);
    }

    #[test]
    fn ks_known_values() {
        let a: Vec<f64> = (0..100).map(f64::from).collect();
        assert_eq!(ks_statistic(&a, &a), 0.0);
        let shifted: Vec<f64> = (50..150).map(f64::from).collect();
        assert!((ks_statistic(&a, &shifted) - 0.5).abs() < 1e-9);
        let disjoint: Vec<f64> = (200..300).map(f64::from).collect();
        assert_eq!(ks_statistic(&a, &disjoint), 1.0);
    }

    #[test]
    fn drift_feature_fills_reference_then_windows() {
        let mut f = DriftFeature::new(Vec::new(), 10, 8);
        for i in 0..10 {
            f.observe(f64::from(i));
        }
        assert_eq!(f.score(), None, "window still empty");
        for i in 0..8 {
            f.observe(f64::from(i));
        }
        assert!(f.score().unwrap() < 0.3);
        for _ in 0..8 {
            f.observe(100.0);
        }
        assert_eq!(f.score(), Some(1.0));
    }
}
