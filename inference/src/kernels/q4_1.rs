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

/// A weight matrix in Q4_1, `rows × cols`, row-major blocks, kept as GGUF
/// stores them: decoding a token streams every weight once, so the bytes read
/// set the speed, and widening the f16 scales to f32 would add a fifth.
#[derive(Debug, Clone)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ41>,
}

/// One Q4_1 block as in the file.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ41 {
    d: f16,
    m: f16,
    qs: [u8; 16],
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
        if !cols.is_multiple_of(QK) {
            return Err(format!("{cols} columns is not a multiple of {QK}"));
        }
        let want = rows * cols / QK * Q4_1_BLOCK_BYTES;
        if data.len() != want {
            return Err(format!(
                "{} bytes of Q4_1 data, expected {want} for {rows}×{cols}",
                data.len()
            ));
        }
        let blocks = data
            .chunks_exact(Q4_1_BLOCK_BYTES)
            .map(|b| BlockQ41 {
                d: f16::from_le_bytes([b[0], b[1]]),
                m: f16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Ok(Q41Matrix { rows, cols, blocks })
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

    /// Dequantised copy (tests and reference).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in &self.blocks {
            let (d, m, qs) = (b.d.to_f32(), b.m.to_f32(), &b.qs);
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
        let dots = pick_dots();
        super::par_matmul(self.rows, n, out, |r, o| dots(self.row(r), &xq, per_row, o));
    }

    /// Appends the rows of `other` (same width) below these.
    pub fn append_rows(&mut self, other: Q41Matrix) -> Result<(), String> {
        if other.cols != self.cols {
            return Err(format!("{} columns against {}", other.cols, self.cols));
        }
        self.rows += other.rows;
        self.blocks.extend(other.blocks);
        Ok(())
    }
}

/// Quantises one row of activations to Q8_1 blocks, as llama.cpp's
/// `quantize_row_q8_1` does on AVX2 (values rounded to nearest, ties to even;
/// scale and sum rounded through f16 like its blocks).
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
                *q = super::round_ties_even(v * id).clamp(-127.0, 127.0) as i8;
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
    blocks: &'a [BlockQ41],
}

/// One weight row against every activation row (`per_row` blocks each).
type DotsFn = fn(Row<'_>, &[Q81Block], usize, &mut [f32]);

fn pick_dots() -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return dots_avx2_entry;
        }
    }
    dots_scalar
}

/// The reference dot product of one Q4_1 row with one Q8_1 row.
pub fn dot_scalar(w: Row<'_>, x: &[Q81Block]) -> f32 {
    let mut total = 0f32;
    for (b, xb) in w.blocks.iter().zip(x) {
        let (d, m, qs) = (b.d.to_f32(), b.m.to_f32(), &b.qs);
        let mut isum = 0i32;
        let (lo, hi) = xb.qs.split_at(QK / 2);
        for ((&q, &a), &b) in qs.iter().zip(lo).zip(hi) {
            isum += (q & 0x0f) as i32 * a as i32 + (q >> 4) as i32 * b as i32;
        }
        total += d * xb.d * isum as f32 + m * xb.s;
    }
    total
}

fn dots_scalar(w: Row<'_>, xq: &[Q81Block], per_row: usize, out: &mut [f32]) {
    for (v, x) in out.iter_mut().zip(xq.chunks_exact(per_row)) {
        *v = dot_scalar(w, x);
    }
}

#[cfg(target_arch = "x86_64")]
fn dots_avx2_entry(w: Row<'_>, xq: &[Q81Block], per_row: usize, out: &mut [f32]) {
    assert_eq!(w.blocks.len(), per_row, "blocks per row");
    assert_eq!(xq.len(), out.len() * per_row, "activation rows");
    let mut rows = xq.chunks_exact(per_row);
    let mut outs = out.chunks_exact_mut(4);
    // SAFETY (both calls): chosen only after run-time detection of AVX2 and
    // FMA; every activation row has `per_row` blocks (checked above).
    for o in &mut outs {
        let x: [&[Q81Block]; 4] = std::array::from_fn(|_| rows.next().unwrap());
        o.copy_from_slice(&unsafe { dot4_avx2(w, x) });
    }
    for (o, x) in outs.into_remainder().iter_mut().zip(rows) {
        *o = unsafe { dot_avx2(w, x) };
    }
}

/// A block's scale and minimum, f16 to f32 with F16C (exact, as `to_f32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scales(b: &BlockQ41) -> (f32, f32) {
    use std::arch::x86_64::*;
    let bits = u32::from(b.d.to_bits()) | (u32::from(b.m.to_bits()) << 16);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Unpacks the 32 nibbles of a Q4_1 block to bytes (values 0..15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_nibbles(qs: &[u8; 16]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0f);
    let qs = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let lo = _mm_and_si128(qs, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Σ q_w · q_x of one block as eight i32 lanes converted to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_products(
    wq: std::arch::x86_64::__m256i,
    xb: &Q81Block,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
    let p16 = _mm256_maddubs_epi16(wq, xq);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// AVX2 dot product of one weight row with one activation row: nibbles
/// unpacked to bytes, `maddubs` against the i8 activations, summed to i32,
/// scaled in f32 with FMA. Two accumulators hide the FMA latency.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `x` has as many blocks as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: Row<'_>, x: &[Q81Block]) -> f32 {
    use std::arch::x86_64::*;
    let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut summs = 0f32;
    let mut blocks = w.blocks.iter().zip(x);
    while let Some((b0, x0)) = blocks.next() {
        let (d0, m0) = scales(b0);
        let p = block_products(unpack_nibbles(&b0.qs), x0);
        even = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x0.d), p, even);
        summs += m0 * x0.s;
        if let Some((b1, x1)) = blocks.next() {
            let (d1, m1) = scales(b1);
            let p = block_products(unpack_nibbles(&b1.qs), x1);
            odd = _mm256_fmadd_ps(_mm256_set1_ps(d1 * x1.d), p, odd);
            summs += m1 * x1.s;
        }
    }
    super::hsum_avx(_mm256_add_ps(even, odd)) + summs
}

/// One weight row against four activation rows: each block's nibbles are
/// unpacked once for all four (prefill). Each row sums exactly as
/// `dot_avx2` does (even and odd blocks apart, then together), so a prompt
/// prefilled at once computes the same values as token by token.
///
/// # Safety
/// AVX2, FMA and F16C must be present; every `x[k]` has as many blocks as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(w: Row<'_>, x: [&[Q81Block]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let z = _mm256_setzero_ps();
    // Accumulators of even and odd blocks, for each of the four rows.
    let (mut e0, mut e1, mut e2, mut e3) = (z, z, z, z);
    let (mut o0, mut o1, mut o2, mut o3) = (z, z, z, z);
    let mut summs = [0f32; 4];
    let n = w.blocks.len();
    // One block into one accumulator of each row.
    macro_rules! block {
        ($b:expr, $a0:ident, $a1:ident, $a2:ident, $a3:ident) => {{
            let b = $b;
            let blk = w.blocks.get_unchecked(b);
            let (d, m) = scales(blk);
            let wq = unpack_nibbles(&blk.qs);
            let (x0, x1, x2, x3) = (
                x[0].get_unchecked(b),
                x[1].get_unchecked(b),
                x[2].get_unchecked(b),
                x[3].get_unchecked(b),
            );
            $a0 = _mm256_fmadd_ps(_mm256_set1_ps(d * x0.d), block_products(wq, x0), $a0);
            $a1 = _mm256_fmadd_ps(_mm256_set1_ps(d * x1.d), block_products(wq, x1), $a1);
            $a2 = _mm256_fmadd_ps(_mm256_set1_ps(d * x2.d), block_products(wq, x2), $a2);
            $a3 = _mm256_fmadd_ps(_mm256_set1_ps(d * x3.d), block_products(wq, x3), $a3);
            summs[0] += m * x0.s;
            summs[1] += m * x1.s;
            summs[2] += m * x2.s;
            summs[3] += m * x3.s;
        }};
    }
    let mut b = 0;
    while b + 1 < n {
        block!(b, e0, e1, e2, e3);
        block!(b + 1, o0, o1, o2, o3);
        b += 2;
    }
    if b < n {
        block!(b, e0, e1, e2, e3);
    }
    let acc = [(e0, o0), (e1, o1), (e2, o2), (e3, o3)];
    let total = |k: usize| super::hsum_avx(_mm256_add_ps(acc[k].0, acc[k].1)) + summs[k];
    [total(0), total(1), total(2), total(3)]
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

    /// The run-time chosen kernel (AVX2: four rows at a time, then one at a
    /// time for the rest) equals the scalar reference.
    #[test]
    fn chosen_kernel_equals_scalar() {
        let w = matrix(8, 576, 3);
        let x = activations(6, 576);
        let xq: Vec<Q81Block> = x.chunks_exact(576).flat_map(quantize_row_q8_1).collect();
        for r in 0..8 {
            let (mut want, mut got) = ([0f32; 6], [0f32; 6]);
            dots_scalar(w.row(r), &xq, 18, &mut want);
            pick_dots()(w.row(r), &xq, 18, &mut got);
            for (s, v) in want.iter().zip(&got) {
                assert!(
                    (s - v).abs() <= 1e-3 * s.abs().max(1.0),
                    "row {r}: {s} vs {v}"
                );
            }
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
