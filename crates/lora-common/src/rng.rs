//! The workspace's seeded generators, written here so that every result is reproducible bit for bit across
//! platforms and dependency upgrades (nothing depends on libtorch's or the OS's generator).
//!
//! - [`SplitMix64`]: LoRA initialisation, data order, sampling at generation, the probe's bootstrap.
//! - [`Xoshiro256`] (xoshiro256** seeded through SplitMix64): search order, synthetic suites, the paired bootstrap
//!   ([`Xoshiro256::stream`] gives resample `k` its own generator, so results do not depend on thread count).

/// One SplitMix64 step: advances `state` and returns a well-mixed 64-bit value.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes several words into one 64-bit seed (order-sensitive).
///
/// Each word is XORed into a fully mixed state, which is then mixed again (one SplitMix64 step: state advance
/// *and* output finaliser), so words that differ in a few bits give unrelated seeds.
///
/// ```
/// use lora_common::rng::mix;
/// assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
/// assert_eq!(mix(&[7, 8, 9]), mix(&[7, 8, 9]));
/// ```
pub fn mix(words: &[u64]) -> u64 {
    let mut h = 0x6A09_E667_F3BC_C908_u64;
    for &w in words {
        let mut state = h ^ w;
        h = splitmix64(&mut state);
    }
    h
}

/// Stream separation constant (an odd 64-bit multiplier) shared by the derived generators.
const STREAM: u64 = 0xD1B5_4A32_D192_ED03;

/// SplitMix64: a tiny, fast generator whose stream is fixed by its seed.
///
/// ```
/// use lora_common::rng::SplitMix64;
/// let p = SplitMix64::derived(7, 1).permutation(5);
/// assert_eq!(p.len(), 5);
/// assert_eq!(p, SplitMix64::derived(7, 1).permutation(5));
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for stream `stream` of `seed` (e.g. one per epoch or per row).
    pub fn derived(seed: u64, stream: u64) -> Self {
        let mut r = SplitMix64(seed ^ stream.wrapping_mul(STREAM));
        r.next_u64();
        r
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)` (`n > 0`), by rejection so it is unbiased.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// In `[0, n)` by one multiply-shift (no rejection: bias below 2^-64 · n; what the probe's bootstrap uses).
    pub fn below_fast(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A Fisher–Yates permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// xoshiro256** seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        Xoshiro256 { s: [splitmix64(&mut st), splitmix64(&mut st), splitmix64(&mut st), splitmix64(&mut st)] }
    }

    /// Generator number `stream` of `seed`: independent streams for resample `k` of a bootstrap.
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut sm = seed;
        let mut sm = splitmix64(&mut sm) ^ stream.wrapping_mul(STREAM);
        Xoshiro256 { s: [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)] }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift with rejection, unbiased); `n ≤ 1` gives 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }

    /// Uniform float in `[0, 1)` with 53 bits of precision.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal deviate (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // in (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 from seed 0 (Vigna's reference output).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn reproducible_and_in_range() {
        let (mut a, mut b) = (Xoshiro256::new(7), Xoshiro256::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Xoshiro256::new(1);
        for _ in 0..1000 {
            assert!(r.below(13) < 13);
            assert!((0.0..1.0).contains(&r.unit()));
        }
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(Xoshiro256::stream(1, 0).next_u64(), Xoshiro256::stream(1, 1).next_u64());
    }

    #[test]
    fn mix_decorrelates_small_words() {
        // Regression: XORing words into an unmixed state made {mix([s, i]) : i < 256} the same set for every
        // small s, so per-sample noise summed to the same value for every seed.
        let sum = |s: u64| (0..256u64).map(|i| Xoshiro256::new(mix(&[s, 0x5A, i])).normal()).sum::<f64>();
        let sums: Vec<f64> = (0..8).map(sum).collect();
        assert!(sums.windows(2).all(|w| (w[0] - w[1]).abs() > 1e-9), "{sums:?}");
    }

    #[test]
    fn normal_moments() {
        let mut r = Xoshiro256::new(3);
        let n = 20000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.03, "mean {m}");
        assert!((v - 1.0).abs() < 0.05, "var {v}");
    }
}
