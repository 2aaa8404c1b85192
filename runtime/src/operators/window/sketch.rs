//! The state of the statistical aggregates: moments for `variance` and
//! `stddev`, values or a quantile sketch for `median` and `percentile`,
//! hashes or a HyperLogLog for `count_distinct`.
//!
//! These are written by hand, not taken from a crate, because they are
//! checkpointed: their serialized form is part of rivulet's state format and
//! must stay readable for as long as a checkpoint may be restored.
//!
//! **Quantiles** are exact while a window holds at most
//! [`EXACT_VALUES`] values (linear interpolation between the closest
//! ranks, as numpy's default and most SQL `PERCENTILE_CONT`). Above that a
//! DDSketch (Masson, Rim, Lee, VLDB 2019) with relative accuracy
//! [`ALPHA`] takes over: the result is the value of rank `⌊p·(n−1)⌋`
//! within 1 % of it (relative to its magnitude). Values closer to zero than
//! [`MIN_MAGNITUDE`] count as zero. Each side (positive, negative) keeps at
//! most [`MAX_BINS`] bins; beyond that the bins nearest to zero are folded
//! together (their values lose the guarantee), which needs a range of more
//! than 10^17 between the smallest and largest magnitude.
//!
//! **Distinct counts** are exact while a window saw at most
//! [`EXACT_DISTINCT`] different values (64-bit hashes of the values; a
//! collision among 512 values has a probability below 10^-14). Above that a
//! HyperLogLog with 4,096 registers estimates the count with a standard
//! error of 1.6 %.

use serde::{Deserialize, Serialize};

/// Values kept as they are before the quantile sketch takes over.
pub const EXACT_VALUES: usize = 128;
/// The sketch's relative accuracy.
pub const ALPHA: f64 = 0.01;
/// Magnitudes below this count as zero in the sketch.
pub const MIN_MAGNITUDE: f64 = 1e-9;
/// Bins per side of the sketch.
pub const MAX_BINS: usize = 2048;
/// Distinct hashes kept before the HyperLogLog takes over.
pub const EXACT_DISTINCT: usize = 512;
/// HyperLogLog precision: 2^12 registers.
const HLL_BITS: u32 = 12;

/// Count, mean and sum of squared deviations (Welford), merged with Chan's
/// formula: numerically stable for large offsets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    pub fn merge(&mut self, o: &Moments) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = o.clone();
            return;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        self.mean += d * o.n as f64 / n as f64;
        self.m2 += o.m2 + d * d * (self.n as f64 * o.n as f64 / n as f64);
        self.n = n;
    }

    /// The variance: of the sample (`n − 1`, `None` below two values) or
    /// of the population (`n`).
    pub fn variance(&self, sample: bool) -> Option<f64> {
        let d = if sample {
            self.n.checked_sub(1)?
        } else {
            self.n
        };
        if d == 0 {
            return None;
        }
        Some((self.m2 / d as f64).max(0.0))
    }
}

/// Bins of one side of the sketch: `counts[i]` counts the values of bin
/// `offset + i`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Bins {
    offset: i32,
    counts: Vec<u64>,
}

impl Bins {
    fn add(&mut self, bin: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = bin;
            self.counts.push(n);
            return;
        }
        let mut bin = bin;
        if bin < self.offset {
            let grow = (self.offset - bin) as usize;
            if self.counts.len() + grow > MAX_BINS {
                // Fold what is nearest to zero into the lowest bin kept.
                bin = self.offset;
            } else {
                self.counts.splice(0..0, std::iter::repeat_n(0, grow));
                self.offset = bin;
            }
        }
        let i = (bin - self.offset) as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
            if self.counts.len() > MAX_BINS {
                let fold = self.counts.len() - MAX_BINS;
                let low: u64 = self.counts.drain(..fold).sum();
                self.counts[0] += low;
                self.offset += fold as i32;
            }
        }
        let i = (bin - self.offset) as usize;
        self.counts[i] += n;
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// A DDSketch over positive and negative values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Sketch {
    positive: Bins,
    negative: Bins,
    zero: u64,
}

fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

/// The bin of a magnitude: `γ^(i−1) < m ≤ γ^i`.
fn bin_of(m: f64) -> i32 {
    (m.ln() / gamma().ln()).ceil() as i32
}

/// The value that stands for bin `i`: within `ALPHA` of every value in it.
fn value_of(i: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(i) / (g + 1.0)
}

impl Sketch {
    fn add(&mut self, x: f64) {
        if x.abs() < MIN_MAGNITUDE {
            self.zero += 1;
        } else if x > 0.0 {
            self.positive.add(bin_of(x), 1);
        } else {
            self.negative.add(bin_of(-x), 1);
        }
    }

    fn merge(&mut self, o: &Sketch) {
        self.zero += o.zero;
        for (i, &n) in o.positive.counts.iter().enumerate() {
            if n > 0 {
                self.positive.add(o.positive.offset + i as i32, n);
            }
        }
        for (i, &n) in o.negative.counts.iter().enumerate() {
            if n > 0 {
                self.negative.add(o.negative.offset + i as i32, n);
            }
        }
    }

    fn count(&self) -> u64 {
        self.zero + self.positive.total() + self.negative.total()
    }

    /// The value of rank `rank` (0-based), within `ALPHA`.
    fn at_rank(&self, rank: u64) -> Option<f64> {
        let mut seen = 0u64;
        // Most negative first: the negative side's highest bins.
        for (i, &n) in self.negative.counts.iter().enumerate().rev() {
            seen += n;
            if seen > rank {
                return Some(-value_of(self.negative.offset + i as i32));
            }
        }
        seen += self.zero;
        if seen > rank {
            return Some(0.0);
        }
        for (i, &n) in self.positive.counts.iter().enumerate() {
            seen += n;
            if seen > rank {
                return Some(value_of(self.positive.offset + i as i32));
            }
        }
        None
    }
}

/// The state of `median(e)` and `percentile(e, p)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quantile {
    /// The quantile asked for, in `[0, 1]`.
    pub p: f64,
    /// The values while there are at most [`EXACT_VALUES`].
    exact: Vec<f64>,
    /// The sketch once there were more.
    sketch: Option<Sketch>,
}

impl Quantile {
    pub fn new(p: f64) -> Self {
        Quantile {
            p,
            exact: Vec::new(),
            sketch: None,
        }
    }

    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        match &mut self.sketch {
            Some(s) => s.add(x),
            None => {
                self.exact.push(x);
                if self.exact.len() > EXACT_VALUES {
                    self.switch_to_sketch();
                }
            }
        }
    }

    fn switch_to_sketch(&mut self) {
        let mut s = self.sketch.take().unwrap_or_default();
        for x in self.exact.drain(..) {
            s.add(x);
        }
        self.exact = Vec::new();
        self.sketch = Some(s);
    }

    pub fn merge(&mut self, o: &Quantile) {
        match &o.sketch {
            Some(theirs) => {
                self.switch_to_sketch();
                if let Some(s) = &mut self.sketch {
                    s.merge(theirs);
                }
            }
            None => {
                for &x in &o.exact {
                    self.add(x);
                }
            }
        }
    }

    /// Whether the result is exact (no sketch yet).
    pub fn is_exact(&self) -> bool {
        self.sketch.is_none()
    }

    pub fn result(&self) -> Option<f64> {
        if let Some(s) = &self.sketch {
            let n = s.count();
            if n == 0 {
                return None;
            }
            let rank = (self.p * (n - 1) as f64).floor() as u64;
            return s.at_rank(rank.min(n - 1));
        }
        if self.exact.is_empty() {
            return None;
        }
        let mut v = self.exact.clone();
        v.sort_by(f64::total_cmp);
        let h = self.p * (v.len() - 1) as f64;
        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
        Some(v[lo] + (h - lo as f64) * (v[hi] - v[lo]))
    }
}

/// The state of `count_distinct(e)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Distinct {
    /// Sorted hashes while there are at most [`EXACT_DISTINCT`].
    exact: Vec<u64>,
    /// HyperLogLog registers once there were more (empty before).
    registers: Vec<u8>,
}

impl Distinct {
    pub fn add_hash(&mut self, h: u64) {
        if !self.registers.is_empty() {
            self.register(h);
            return;
        }
        if let Err(i) = self.exact.binary_search(&h) {
            self.exact.insert(i, h);
            if self.exact.len() > EXACT_DISTINCT {
                self.switch_to_hll();
            }
        }
    }

    fn register(&mut self, h: u64) {
        let j = (h >> (64 - HLL_BITS)) as usize;
        // The rest of the bits, with a stop bit so that rho ≤ 64 − bits + 1.
        let w = (h << HLL_BITS) | (1 << (HLL_BITS - 1));
        let rho = w.leading_zeros() as u8 + 1;
        if let Some(r) = self.registers.get_mut(j) {
            *r = (*r).max(rho);
        }
    }

    fn switch_to_hll(&mut self) {
        if self.registers.is_empty() {
            self.registers = vec![0; 1 << HLL_BITS];
        }
        for h in std::mem::take(&mut self.exact) {
            self.register(h);
        }
    }

    pub fn merge(&mut self, o: &Distinct) {
        if !o.registers.is_empty() {
            self.switch_to_hll();
            for (a, b) in self.registers.iter_mut().zip(&o.registers) {
                *a = (*a).max(*b);
            }
        } else {
            for &h in &o.exact {
                self.add_hash(h);
            }
        }
    }

    /// Whether the count is exact (no HyperLogLog yet).
    pub fn is_exact(&self) -> bool {
        self.registers.is_empty()
    }

    pub fn result(&self) -> u64 {
        if self.registers.is_empty() {
            return self.exact.len() as u64;
        }
        let m = self.registers.len() as f64;
        let sum: f64 = self.registers.iter().map(|&r| 2f64.powi(-(r as i32))).sum();
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let zeros = self.registers.iter().filter(|&&r| r == 0).count();
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            // Linear counting for small cardinalities.
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact value of rank `⌊p·(n−1)⌋`.
    fn rank_value(values: &[f64], p: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        v[(p * (v.len() - 1) as f64).floor() as usize]
    }

    #[test]
    fn moments_match_a_two_pass_computation_and_merge() {
        // A large offset: the naive sum-of-squares formula loses it all.
        let xs: Vec<f64> = (0..1000).map(|i| 1e9 + (i % 17) as f64 * 0.25).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let ss: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
        let mut m = Moments::default();
        xs.iter().for_each(|&x| m.add(x));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        assert!(close(m.variance(true).unwrap(), ss / 999.0));
        assert!(close(m.variance(false).unwrap(), ss / 1000.0));
        let (mut a, mut b) = (Moments::default(), Moments::default());
        for (i, &x) in xs.iter().enumerate() {
            if i % 3 == 0 { &mut a } else { &mut b }.add(x);
        }
        a.merge(&b);
        assert!(close(a.variance(true).unwrap(), ss / 999.0));
        let mut one = Moments::default();
        one.add(5.0);
        assert_eq!(one.variance(true), None, "one value has no sample variance");
        assert_eq!(one.variance(false), Some(0.0));
        assert_eq!(Moments::default().variance(false), None);
    }

    #[test]
    fn small_windows_get_exact_interpolated_quantiles() {
        let mut q = Quantile::new(0.5);
        for x in [4.0, 1.0, 3.0, 2.0] {
            q.add(x);
        }
        assert_eq!(q.result(), Some(2.5));
        let mut p90 = Quantile::new(0.9);
        (1..=11).for_each(|x| p90.add(x as f64));
        assert_eq!(p90.result(), Some(10.0));
        let mut lo = Quantile::new(0.0);
        let mut hi = Quantile::new(1.0);
        for x in [-3.5, 7.25, 0.0] {
            lo.add(x);
            hi.add(x);
        }
        assert_eq!((lo.result(), hi.result()), (Some(-3.5), Some(7.25)));
        assert_eq!(Quantile::new(0.5).result(), None);
    }

    #[test]
    fn the_sketch_stays_within_its_relative_error_on_skewed_and_signed_data() {
        let mut rng = fastrand::Rng::with_seed(3);
        // Log-normal-ish readings, some negative, some zero.
        let xs: Vec<f64> = (0..20_000)
            .map(|i| {
                let m = (rng.f64() * 12.0 - 4.0).exp();
                match i % 10 {
                    0 => -m,
                    1 => 0.0,
                    _ => m,
                }
            })
            .collect();
        for p in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let mut q = Quantile::new(p);
            xs.iter().for_each(|&x| q.add(x));
            assert!(!q.is_exact());
            let (got, want) = (q.result().unwrap(), rank_value(&xs, p));
            assert!(
                (got - want).abs() <= ALPHA * want.abs() + 1e-12,
                "p={p}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn quantile_merges_equal_adding_everything_to_one() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f64 / 10.0)
            .collect();
        for split in [10, 100, 500] {
            let mut whole = Quantile::new(0.75);
            xs.iter().for_each(|&x| whole.add(x));
            let (mut a, mut b) = (Quantile::new(0.75), Quantile::new(0.75));
            xs[..split].iter().for_each(|&x| a.add(x));
            xs[split..].iter().for_each(|&x| b.add(x));
            b.merge(&a);
            assert_eq!(b.result(), whole.result(), "split at {split}");
        }
        // Two exact halves stay exact when the whole fits.
        let (mut a, mut b) = (Quantile::new(0.5), Quantile::new(0.5));
        xs[..50].iter().for_each(|&x| a.add(x));
        xs[50..100].iter().for_each(|&x| b.add(x));
        a.merge(&b);
        assert!(a.is_exact());
    }

    #[test]
    fn bins_fold_the_values_nearest_zero_past_the_cap() {
        let mut b = Bins::default();
        b.add(0, 1);
        b.add(MAX_BINS as i32 + 10, 1);
        assert_eq!(b.counts.len(), MAX_BINS);
        assert_eq!(b.total(), 2);
        b.add(-5, 3);
        assert_eq!(b.counts.len(), MAX_BINS);
        assert_eq!(
            (b.counts[0], b.total()),
            (4, 5),
            "folded into the lowest bin"
        );
    }

    #[test]
    fn distinct_counts_are_exact_up_to_the_bound_then_within_the_hll_error() {
        let hash = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        let mut d = Distinct::default();
        for i in 0..EXACT_DISTINCT as u64 {
            d.add_hash(hash(i));
            d.add_hash(hash(i)); // seen twice, counted once
        }
        assert!(d.is_exact());
        assert_eq!(d.result(), EXACT_DISTINCT as u64);
        for n in [1_000u64, 10_000, 100_000] {
            let mut d = Distinct::default();
            (0..n).for_each(|i| d.add_hash(hash(i)));
            assert!(!d.is_exact());
            let err = (d.result() as f64 - n as f64).abs() / n as f64;
            // Three standard errors of 4,096 registers.
            assert!(err < 0.05, "{n}: {} ({err})", d.result());
        }
        // Merging equals counting everything in one.
        let (mut a, mut b, mut whole) = (
            Distinct::default(),
            Distinct::default(),
            Distinct::default(),
        );
        for i in 0..3000u64 {
            whole.add_hash(hash(i % 2000));
            if i % 2 == 0 { &mut a } else { &mut b }.add_hash(hash(i % 2000));
        }
        a.merge(&b);
        assert_eq!(a.result(), whole.result());
        let (mut small, other) = (Distinct::default(), Distinct::default());
        small.add_hash(1);
        small.merge(&other);
        assert_eq!(small.result(), 1);
    }
}
