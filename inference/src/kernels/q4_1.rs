//! Matrix products with Q4_1 weights, as llama.cpp computes them: each row of
//! activations is quantised to Q8_1 blocks, and each 32-value block product is
//! `d_w * d_x * Σ q_w q_x + m_w * s_x`.
//!
//! Block layouts (ggml's):
//! * Q4_1, 20 bytes: `d: f16`, `m: f16`, 16 bytes of nibbles; value `j` (0..16)
//!   is the low nibble of byte `j`, value `j + 16` its high nibble; x = d·q + m.
//! * Q8_1 (ours, in memory only): `d: f32`, `s: f32 = d · Σ q`, 32 `i8`.

use half::f16;

/// Values per block.
pub const QK: usize = 32;
/// Bytes of a Q4_1 block.
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// A weight matrix in Q4_1, `rows × cols`, row-major blocks, repacked at load:
/// the f16 scale and minimum of each block widened to f32 (no conversion in
/// the inner loop), the nibbles kept as they are.
#[derive(Debug, Clone)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    /// (d, m) of each block.
    dm: Vec<(f32, f32)>,
    /// The 16 nibble bytes of each block.
    qs: Vec<[u8; 16]>,
}

/// One activation block in Q8_1.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(4))]
pub struct Q81Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

impl Q41Matrix {
    /// Wraps raw GGUF Q4_1 data of a `rows × cols` matrix.
    pub fn from_raw(rows: usize, cols: usize, data: Vec<u8>) -> Result<Q41Matrix, String> {
        if cols % QK != 0 {
            return Err(format!("{cols} columns is not a multiple of {QK}"));
        }
        let want = rows * cols / QK * Q4_1_BLOCK_BYTES;
        if data.len() != want {
            return Err(format!(
                "{} bytes of Q4_1 data, expected {want} for {rows}×{cols}",
                data.len()
            ));
        }
        let dm = data.chunks_exact(Q4_1_BLOCK_BYTES).map(block_dm).collect();
        let qs = data
            .chunks_exact(Q4_1_BLOCK_BYTES)
            .map(|b| b[4..20].try_into().unwrap())
            .collect();
        Ok(Q41Matrix { rows, cols, dm, qs })
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
            dm: &self.dm[r * per_row..(r + 1) * per_row],
            qs: &self.qs[r * per_row..(r + 1) * per_row],
        }
    }

    /// Dequantised copy (tests and reference).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (&(d, m), qs) in self.dm.iter().zip(&self.qs) {
            let mut vals = [0f32; QK];
            for j in 0..QK / 2 {
                vals[j] = d * (qs[j] & 0x0f) as f32 + m;
                vals[j + QK / 2] = d * (qs[j] >> 4) as f32 + m;
            }
            out.extend_from_slice(&vals);
        }
        out
    }

    /// `out[i][r] = Σ_c x[i][c] · w[r][c]` for `n` activation rows in `x`
    /// (`n × cols`, row-major), written to `out` (`n × rows`).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "activation size");
        let xq: Vec<Q81Block> = x
            .chunks_exact(self.cols)
            .flat_map(quantize_row_q8_1)
            .collect();
        let per_row = self.cols / QK;
        let dot = pick_dot();
        super::par_matmul(self.rows, n, out, |r, i| {
            dot(self.row(r), &xq[i * per_row..(i + 1) * per_row])
        });
    }

    /// Appends the rows of `other` (same width) below these.
    pub fn append_rows(&mut self, other: Q41Matrix) -> Result<(), String> {
        if other.cols != self.cols {
            return Err(format!("{} columns against {}", other.cols, self.cols));
        }
        self.rows += other.rows;
        self.dm.extend(other.dm);
        self.qs.extend(other.qs);
        Ok(())
    }
}

fn block_dm(block: &[u8]) -> (f32, f32) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
    (d, m)
}

/// Quantises one row of activations to Q8_1 blocks, as llama.cpp's
/// `quantize_row_q8_1` does (scale and sum rounded through f16 like its blocks).
pub fn quantize_row_q8_1(x: &[f32]) -> Vec<Q81Block> {
    x.chunks_exact(QK)
        .map(|xs| {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            // As llama.cpp: quantise with the exact scale, store it as f16.
            let exact = amax / 127.0;
            let id = if exact != 0.0 { 1.0 / exact } else { 0.0 };
            let d = f16::from_f32(exact).to_f32();
            let mut qs = [0i8; QK];
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            Q81Block {
                d,
                s: f16::from_f32(exact * sum as f32).to_f32(),
                qs,
            }
        })
        .collect()
}

/// One weight row's blocks.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    dm: &'a [(f32, f32)],
    qs: &'a [[u8; 16]],
}

type DotFn = fn(Row<'_>, &[Q81Block]) -> f32;

fn pick_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return dot_avx2_entry;
        }
    }
    dot_scalar
}

/// The reference dot product of one Q4_1 row with one Q8_1 row.
pub fn dot_scalar(w: Row<'_>, x: &[Q81Block]) -> f32 {
    let mut total = 0f32;
    for ((&(d, m), qs), xb) in w.dm.iter().zip(w.qs).zip(x) {
        let mut isum = 0i32;
        let (lo, hi) = xb.qs.split_at(QK / 2);
        for ((&q, &a), &b) in qs.iter().zip(lo).zip(hi) {
            isum += (q & 0x0f) as i32 * a as i32 + (q >> 4) as i32 * b as i32;
        }
        total += d * xb.d * isum as f32 + m * xb.s;
    }
    total
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(w: Row<'_>, x: &[Q81Block]) -> f32 {
    // SAFETY: chosen only after run-time detection of AVX2 and FMA.
    unsafe { dot_avx2(w, x) }
}

/// AVX2 dot product: nibbles unpacked to bytes, `maddubs` against the i8
/// activations, summed to i32, scaled in f32 with FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: Row<'_>, x: &[Q81Block]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for ((&(d, m), qs), xb) in w.dm.iter().zip(w.qs).zip(x) {
        let qs = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        let wq = _mm256_set_m128i(hi, lo);
        let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
        let p16 = _mm256_maddubs_epi16(wq, xq);
        let p32 = _mm256_madd_epi16(p16, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc);
        summs += m * xb.s;
    }
    super::hsum_avx(acc) + summs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic Q4_1 matrix with varied scales and mins.
    fn matrix(rows: usize, cols: usize, seed: u32) -> Q41Matrix {
        let mut state = seed.wrapping_mul(2654435761).max(1);
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0 + 0.001);
            let m = f16::from_f32(-((next() % 1000) as f32) / 10000.0);
            data.extend_from_slice(&d.to_le_bytes());
            data.extend_from_slice(&m.to_le_bytes());
            for _ in 0..16 {
                data.push((next() & 0xff) as u8);
            }
        }
        Q41Matrix::from_raw(rows, cols, data).unwrap()
    }

    fn activations(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0)
            .collect()
    }

    #[test]
    fn avx2_equals_scalar() {
        let w = matrix(8, 576, 3);
        let x = activations(1, 576);
        let xq = quantize_row_q8_1(&x);
        for r in 0..8 {
            let s = dot_scalar(w.row(r), &xq);
            let v = pick_dot()(w.row(r), &xq);
            assert!(
                (s - v).abs() <= 1e-3 * s.abs().max(1.0),
                "row {r}: {s} vs {v}"
            );
        }
    }

    #[test]
    fn matmul_is_close_to_the_dequantised_product() {
        let (rows, cols, n) = (96, 576, 3);
        let w = matrix(rows, cols, 9);
        let x = activations(n, cols);
        let mut out = vec![0f32; n * rows];
        w.matmul(&x, n, &mut out);
        let wd = w.dequantize();
        for i in 0..n {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|c| x[i * cols + c] * wd[r * cols + c]).sum();
                let got = out[i * rows + r];
                let scale: f32 = (0..cols)
                    .map(|c| (x[i * cols + c] * wd[r * cols + c]).abs())
                    .sum();
                assert!(
                    (exact - got).abs() <= 0.02 * scale,
                    "[{i},{r}] {exact} vs {got}"
                );
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(Q41Matrix::from_raw(2, 33, vec![]).is_err());
        assert!(Q41Matrix::from_raw(2, 32, vec![0; 39]).is_err());
    }
}

#[cfg(test)]
mod against_candle {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Same weights, same activations: our product equals candle's Q4_1 ×
    /// Q8_1 product up to the rounding of each activation block's sum `s`
    /// (llama.cpp and we store f16(Σq·d); candle f16(Σq)·f16(d) in f16).
    #[test]
    fn equals_candles_q4_1_product() {
        crate::kernels::testing::assert_agrees_with_candle(
            GgmlDType::Q4_1,
            3e-3,
            |rows, cols, raw, x, n, out| {
                Q41Matrix::from_raw(rows, cols, raw.to_vec())
                    .unwrap()
                    .matmul(x, n, out)
            },
        );
    }
}
