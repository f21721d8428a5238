//! SplitMix64, the crate's one seeded generator: the replica's jitter and the storage double's
//! crash outcomes come from seeds their drivers give, so runs replay exactly and no thread RNG
//! is read.

/// SplitMix64 (Steele, Lea and Flood, 2014): small, fast, and good enough for jitter.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0), by multiply-shift.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_draws_within_bounds() {
        let (mut a, mut b) = (SplitMix64::new(42), SplitMix64::new(42));
        let xs: Vec<u64> = (0..100).map(|_| a.below(4001)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(4001)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x <= 4000));
        assert!(xs.iter().any(|x| *x > 2000) && xs.iter().any(|x| *x < 2000));
        assert_eq!(SplitMix64::new(1).below(0), 0);
        assert_ne!(SplitMix64::new(1).next(), SplitMix64::new(2).next());
    }
}
