//! A tiny seeded random source, so runs are reproducible without a dependency.
//!
//! SplitMix64 passes BigCrush and is plenty for arrival jitter and trace noise; the
//! point is that the same seed gives every policy exactly the same requests.

pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A Poisson sample: Knuth's product method for small means, the normal
    /// approximation above 30 where Knuth gets slow and the approximation is good.
    pub(crate) fn poisson(&mut self, mean: f64) -> u32 {
        if mean <= 0.0 {
            return 0;
        }
        if mean < 30.0 {
            let limit = (-mean).exp();
            let mut k = 0;
            let mut p = self.uniform();
            while p > limit {
                k += 1;
                p *= self.uniform();
            }
            return k;
        }
        // Box-Muller; 1 - u keeps the logarithm finite.
        let z = (-2.0 * (1.0 - self.uniform()).ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos();
        (mean + mean.sqrt() * z).round().max(0.0) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn poisson_mean_is_close_to_the_requested_mean() {
        let mut rng = Rng::new(7);
        for mean in [0.5, 4.0, 100.0] {
            let n = 20_000;
            let total: u64 = (0..n).map(|_| u64::from(rng.poisson(mean))).sum();
            let avg = total as f64 / n as f64;
            assert!((avg - mean).abs() < 0.05 * mean + 0.02, "mean {mean}: got {avg}");
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
    }
}
