//! CPU kernels of our own where candle has no fast path: the Q4_1 weight ×
//! Q8_1 activation product (the default model's layers) and the Q8_0 × Q8_0
//! product (its tied output projection).
//! Each kernel has a scalar version (the reference, and the fallback) and an
//! AVX2 version chosen at run time; tests hold them to each other and to
//! candle's dequantised product. `par_matmul` spreads the weight rows of one
//! product over rayon's threads.

use rayon::prelude::*;

pub mod attention;
pub mod q4_1;
pub mod q8_0;

/// Rounds `x` (|x| < 2²²) to the nearest integer, ties to even, as
/// llama.cpp's AVX2 quantisation does (`_mm256_round_ps`, nearest): adding
/// and subtracting 1.5·2²³ leaves no fraction bits. Plain float arithmetic,
/// so it vectorises on every x86-64, where `f32::round` is a libm call per
/// value (SSE2 has no rounding instruction).
#[inline]
pub(crate) fn round_ties_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (x + MAGIC) - MAGIC
}

/// Weight rows per rayon task: enough tasks to balance, few enough that
/// dispatch stays small next to the work.
fn rows_per_task(rows: usize) -> usize {
    (rows / (rayon::current_num_threads() * 4)).max(16)
}

/// `out[i * rows + r]` = weight row `r` · activation row `i`, for every
/// weight row and the `n` activation rows: `row_product(r, o)` fills `o`
/// (`n` values) with row `r`'s products, so a kernel can unpack a weight
/// block once for several activation rows. Weight rows are split across
/// rayon's threads.
pub(crate) fn par_matmul(
    rows: usize,
    n: usize,
    out: &mut [f32],
    row_product: impl Fn(usize, &mut [f32]) + Sync,
) {
    assert_eq!(out.len(), rows * n, "output size");
    let chunk = rows_per_task(rows);
    if n == 1 {
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            for (k, v) in o.chunks_exact_mut(1).enumerate() {
                row_product(c * chunk + k, v);
            }
        });
        return;
    }
    // Row-major by weight row, then transposed into `out`.
    let mut by_row = vec![0f32; rows * n];
    by_row
        .par_chunks_mut(chunk * n)
        .enumerate()
        .for_each(|(c, o)| {
            for (k, row_out) in o.chunks_exact_mut(n).enumerate() {
                row_product(c * chunk + k, row_out);
            }
        });
    for (r, row_out) in by_row.chunks_exact(n).enumerate() {
        for (i, &v) in row_out.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
}

/// The sum of the eight lanes of `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum_avx(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounding_is_to_nearest_with_ties_to_even() {
        for (x, want) in [
            (0.4, 0.0),
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-2.5, -2.0),
            (-0.6, -1.0),
            (126.7, 127.0),
            (-127.2, -127.0),
        ] {
            assert_eq!(super::round_ties_even(x), want, "{x}");
            assert_eq!(super::round_ties_even(x), f32::round_ties_even(x), "{x}");
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// `len` normal samples (Box-Muller) from a fixed seed.
    fn normal(seed: u64, len: usize, std: f32) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len)
            .map(|_| {
                let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    /// Quantises normal weights to `dtype` and multiplies normal activations
    /// with candle's `QMatMul` and with `ours(rows, cols, raw, x, n, out)`;
    /// every output must agree within `tol` (relative, floor 1).
    ///
    /// The inputs come from fixed seeds: the two products differ by design
    /// in how they round (see each caller), and with fresh random inputs on
    /// every run that rounding now and then crossed `tol` (a CI run saw
    /// 0.0035 against 3e-3 for Q4_1): a test that fails by chance checks
    /// nothing. Fixed inputs make it fail only when the kernel changes.
    pub fn assert_agrees_with_candle(
        dtype: GgmlDType,
        tol: f32,
        ours: impl Fn(usize, usize, &[u8], &[f32], usize, &mut [f32]),
    ) {
        let (rows, cols, n) = (64, 576, 3);
        let w = Tensor::from_vec(normal(1, rows * cols, 0.05), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let raw = q.data().unwrap().into_owned();
        let x = Tensor::from_vec(normal(2, n * cols, 1.0), (n, cols), &Device::Cpu).unwrap();
        let theirs = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut out = vec![0f32; n * rows];
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        ours(rows, cols, &raw, &xs, n, &mut out);
        for (i, want) in theirs.iter().enumerate() {
            for (r, &b) in want.iter().enumerate() {
                let a = out[i * rows + r];
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "[{i},{r}] ours {a} candle {b}"
                );
            }
        }
    }
}
