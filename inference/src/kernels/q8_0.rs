//! Matrix products with Q8_0 weights against Q8_0 activations, as llama.cpp
//! computes them: each 32-value block product is `d_w · d_x · Σ q_w q_x`.
//! The default model stores its token embedding (and so its tied output
//! projection, a third of the work of a decode step) in Q8_0.
//!
//! Block layout (ggml's): `d: f16`, then 32 `i8`; value `j` is `d · q[j]`.

use half::f16;

/// Values per block.
pub const QK: usize = 32;
/// Bytes of a Q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 34;

/// A weight matrix in Q8_0, `rows × cols`, row-major blocks, kept as GGUF
/// stores them (the bytes read per token set the decode speed).
#[derive(Debug, Clone)]
pub struct Q80Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ80>,
}

/// One Q8_0 block as in the file.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ80 {
    d: f16,
    qs: [i8; QK],
}

/// One block of Q8_0 activations (scale kept in f32 once rounded through f16,
/// as llama.cpp's blocks are).
#[derive(Debug, Clone, Copy)]
pub struct Q80Block {
    d: f32,
    qs: [i8; QK],
}

impl Q80Matrix {
    /// Wraps raw GGUF Q8_0 data of a `rows × cols` matrix.
    pub fn from_raw(rows: usize, cols: usize, data: &[u8]) -> Result<Q80Matrix, String> {
        if !cols.is_multiple_of(QK) {
            return Err(format!("{cols} columns is not a multiple of {QK}"));
        }
        let want = rows * cols / QK * Q8_0_BLOCK_BYTES;
        if data.len() != want {
            return Err(format!(
                "{} bytes of Q8_0 data, expected {want} for {rows}×{cols}",
                data.len()
            ));
        }
        let blocks = data
            .chunks_exact(Q8_0_BLOCK_BYTES)
            .map(|b| {
                let mut qs = [0i8; QK];
                for (v, &byte) in qs.iter_mut().zip(&b[2..]) {
                    *v = byte as i8;
                }
                BlockQ80 {
                    d: f16::from_le_bytes([b[0], b[1]]),
                    qs,
                }
            })
            .collect();
        Ok(Q80Matrix { rows, cols, blocks })
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> Row<'_> {
        let per_row = self.cols / QK;
        Row {
            blocks: &self.blocks[r * per_row..(r + 1) * per_row],
        }
    }

    /// Writes row `r`, dequantised, to `out` (`cols` values): a token
    /// embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        for (b, o) in row.blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = b.d.to_f32();
            for (v, &q) in o.iter_mut().zip(&b.qs) {
                *v = d * q as f32;
            }
        }
    }

    /// `out[i][r] = Σ_c x[i][c] · w[r][c]` for `n` activation rows in `x`
    /// (`n × cols`, row-major), written to `out` (`n × rows`).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "activation size");
        let xq: Vec<Q80Block> = x
            .chunks_exact(self.cols)
            .flat_map(quantize_row_q8_0)
            .collect();
        let per_row = self.cols / QK;
        let dot = pick_dot();
        super::par_matmul(self.rows, n, out, |r, o| {
            for (v, x) in o.iter_mut().zip(xq.chunks_exact(per_row)) {
                *v = dot(self.row(r), x);
            }
        });
    }
}

/// Quantises one row of activations to Q8_0 blocks, as llama.cpp's
/// `quantize_row_q8_0` does on AVX2 (values rounded to nearest, ties to even).
pub fn quantize_row_q8_0(x: &[f32]) -> Vec<Q80Block> {
    x.chunks_exact(QK)
        .map(|xs| {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let exact = amax / 127.0;
            let id = if exact != 0.0 { 1.0 / exact } else { 0.0 };
            let mut qs = [0i8; QK];
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = super::round_ties_even(v * id).clamp(-127.0, 127.0) as i8;
            }
            Q80Block {
                d: f16::from_f32(exact).to_f32(),
                qs,
            }
        })
        .collect()
}

/// One weight row's blocks.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    blocks: &'a [BlockQ80],
}

type DotFn = fn(Row<'_>, &[Q80Block]) -> f32;

fn pick_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return dot_avx2_entry;
        }
    }
    dot_scalar
}

/// The reference dot product of one Q8_0 row with one Q8_0 row.
pub fn dot_scalar(w: Row<'_>, x: &[Q80Block]) -> f32 {
    let mut total = 0f32;
    for (b, xb) in w.blocks.iter().zip(x) {
        let d = b.d.to_f32();
        let isum: i32 =
            b.qs.iter()
                .zip(&xb.qs)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
        total += d * xb.d * isum as f32;
    }
    total
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(w: Row<'_>, x: &[Q80Block]) -> f32 {
    // SAFETY: chosen only after run-time detection of AVX2, FMA and F16C.
    unsafe { dot_avx2(w, x) }
}

/// AVX2 dot product. `maddubs` multiplies unsigned by signed bytes, so the
/// weights go in as |w| and the activations carry the sign of w (llama.cpp's
/// trick); -128 never occurs, quantisation clamps to ±127.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: Row<'_>, x: &[Q80Block]) -> f32 {
    use std::arch::x86_64::*;
    let block = |qs: &[i8; QK], xb: &Q80Block| {
        let wq = _mm256_loadu_si256(qs.as_ptr() as *const __m256i);
        let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
        let abs_w = _mm256_sign_epi8(wq, wq);
        let signed_x = _mm256_sign_epi8(xq, wq);
        let p16 = _mm256_maddubs_epi16(abs_w, signed_x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    };
    // Two accumulators hide the FMA latency.
    let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // f16 to f32 with F16C: exact, as `to_f32`.
    let scale =
        |b: &BlockQ80| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(b.d.to_bits()))));
    let mut blocks = w.blocks.iter().zip(x);
    while let Some((b0, x0)) = blocks.next() {
        even = _mm256_fmadd_ps(_mm256_set1_ps(scale(b0) * x0.d), block(&b0.qs, x0), even);
        if let Some((b1, x1)) = blocks.next() {
            odd = _mm256_fmadd_ps(_mm256_set1_ps(scale(b1) * x1.d), block(&b1.qs, x1), odd);
        }
    }
    super::hsum_avx(_mm256_add_ps(even, odd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn quantized(rows: usize, cols: usize) -> (QTensor, Q80Matrix) {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let ours = Q80Matrix::from_raw(rows, cols, &q.data().unwrap()).unwrap();
        (q, ours)
    }

    #[test]
    fn avx2_equals_scalar() {
        let (_, w) = quantized(8, 576);
        let x: Vec<f32> = (0..576)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let xq = quantize_row_q8_0(&x);
        for r in 0..8 {
            let s = dot_scalar(w.row(r), &xq);
            let v = pick_dot()(w.row(r), &xq);
            assert!(
                (s - v).abs() <= 1e-4 * s.abs().max(1.0),
                "row {r}: {s} vs {v}"
            );
        }
    }

    #[test]
    fn dequantized_rows_equal_candles() {
        let (q, ours) = quantized(4, 64);
        let theirs = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, want) in theirs.iter().enumerate() {
            let mut got = vec![0f32; 64];
            ours.dequantize_row(r, &mut got);
            assert_eq!(&got, want, "row {r}");
        }
    }

    /// Same weights, same activations: our product equals candle's Q8_0 ×
    /// Q8_0 product (both are llama.cpp's arithmetic).
    #[test]
    fn equals_candles_q8_0_product() {
        crate::kernels::testing::assert_agrees_with_candle(
            GgmlDType::Q8_0,
            1e-3,
            |rows, cols, raw, x, n, out| {
                Q80Matrix::from_raw(rows, cols, raw)
                    .unwrap()
                    .matmul(x, n, out)
            },
        );
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(Q80Matrix::from_raw(2, 33, &[]).is_err());
        assert!(Q80Matrix::from_raw(2, 32, &[0; 67]).is_err());
    }
}
