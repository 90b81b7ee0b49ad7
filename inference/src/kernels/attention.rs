//! The two loops of attention for one query head: scores of the query
//! against every cached key, and the probability-weighted sum of the cached
//! values. AVX2+FMA versions run the whole loop inside one function (no call
//! per position); portable versions are the reference and the fallback.

/// The cached vectors of one key/value head: position `j`'s vector is
/// `data[j * stride + offset..][..width]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    /// Position-major cache of one layer.
    pub data: &'a [f32],
    /// Floats per position.
    pub stride: usize,
    /// Where this head starts within a position.
    pub offset: usize,
    /// The head's width.
    pub width: usize,
}

impl Strided<'_> {
    fn at(&self, j: usize) -> &[f32] {
        &self.data[j * self.stride + self.offset..][..self.width]
    }

    fn positions(&self) -> usize {
        self.data.len() / self.stride
    }
}

/// Attention loops chosen once for this CPU.
#[derive(Clone, Copy)]
pub struct AttentionKernels {
    /// `out[j] = scale · q · key_j` for `j < out.len()`.
    pub scores: fn(&[f32], Strided<'_>, f32, &mut [f32]),
    /// `out = Σ_j p[j] · value_j` for `j < p.len()`.
    pub mix: fn(&[f32], Strided<'_>, &mut [f32]),
}

impl AttentionKernels {
    /// The fastest versions this CPU runs for heads of `width`.
    pub fn detect(width: usize) -> AttentionKernels {
        #[cfg(target_arch = "x86_64")]
        {
            if width.is_multiple_of(8)
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return AttentionKernels {
                    scores: scores_avx2_entry,
                    mix: mix_avx2_entry,
                };
            }
        }
        let _ = width;
        AttentionKernels {
            scores: scores_portable,
            mix: mix_portable,
        }
    }
}

fn check(q_len: usize, keys: &Strided<'_>, n: usize) {
    assert_eq!(q_len, keys.width, "head width");
    assert!(
        keys.offset + keys.width <= keys.stride,
        "head inside a position"
    );
    assert!(
        n <= keys.positions(),
        "{n} positions of {}",
        keys.positions()
    );
}

/// Portable scores.
pub fn scores_portable(q: &[f32], keys: Strided<'_>, scale: f32, out: &mut [f32]) {
    check(q.len(), &keys, out.len());
    for (j, o) in out.iter_mut().enumerate() {
        *o = q.iter().zip(keys.at(j)).map(|(a, b)| a * b).sum::<f32>() * scale;
    }
}

/// Portable weighted sum.
pub fn mix_portable(p: &[f32], values: Strided<'_>, out: &mut [f32]) {
    check(out.len(), &values, p.len());
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(values.at(j)) {
            *o += pj * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn scores_avx2_entry(q: &[f32], keys: Strided<'_>, scale: f32, out: &mut [f32]) {
    check(q.len(), &keys, out.len());
    // SAFETY: chosen after run-time detection of AVX2 and FMA for widths
    // that are multiples of 8; every position read is in bounds (checked).
    unsafe { scores_avx2(q, keys, scale, out) }
}

#[cfg(target_arch = "x86_64")]
fn mix_avx2_entry(p: &[f32], values: Strided<'_>, out: &mut [f32]) {
    check(out.len(), &values, p.len());
    // SAFETY: as for `scores_avx2_entry`.
    unsafe { mix_avx2(p, values, out) }
}

/// # Safety
/// AVX2 and FMA present; `q.len() == keys.width`, a multiple of 8; `out.len()`
/// positions of `keys` in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], keys: Strided<'_>, scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let w = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let k = keys.data.as_ptr().add(j * keys.stride + keys.offset);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c + 16 <= w {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(c)),
                _mm256_loadu_ps(k.add(c)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(c + 8)),
                _mm256_loadu_ps(k.add(c + 8)),
                s1,
            );
            c += 16;
        }
        if c < w {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(c)),
                _mm256_loadu_ps(k.add(c)),
                s0,
            );
        }
        *o = super::hsum_avx(_mm256_add_ps(s0, s1)) * scale;
    }
}

/// # Safety
/// AVX2 and FMA present; `out.len() == values.width`, a multiple of 8;
/// `p.len()` positions of `values` in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mix_avx2(p: &[f32], values: Strided<'_>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let base = values.data.as_ptr().add(values.offset);
    // Eight output floats at a time, held in one register over all positions.
    for c in (0..out.len()).step_by(8) {
        let mut acc = _mm256_setzero_ps();
        for (j, &pj) in p.iter().enumerate() {
            let v = _mm256_loadu_ps(base.add(j * values.stride + c));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), v, acc);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(c), acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_kernels_equal_the_portable_ones() {
        for width in [8, 24, 64, 72] {
            let (positions, stride) = (37, 3 * width + 8);
            let data: Vec<f32> = (0..positions * stride)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let heads = Strided {
                data: &data,
                stride,
                offset: width + 8,
                width,
            };
            let q: Vec<f32> = (0..width).map(|i| (i as f32 * 0.11).cos()).collect();
            let k = AttentionKernels::detect(width);
            let (mut want, mut got) = (vec![0f32; positions], vec![0f32; positions]);
            scores_portable(&q, heads, 0.125, &mut want);
            (k.scores)(&q, heads, 0.125, &mut got);
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-5, "width {width}: {a} vs {b}");
            }
            let p: Vec<f32> = (0..positions).map(|j| 1.0 / (j + 1) as f32).collect();
            let (mut want, mut got) = (vec![0f32; width], vec![1f32; width]);
            mix_portable(&p, heads, &mut want);
            (k.mix)(&p, heads, &mut got);
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-5, "width {width}: {a} vs {b}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "positions")]
    fn reading_past_the_cache_is_refused() {
        let data = vec![0f32; 16];
        let keys = Strided {
            data: &data,
            stride: 8,
            offset: 0,
            width: 8,
        };
        let mut out = vec![0f32; 3];
        (AttentionKernels::detect(8).scores)(&[0.0; 8], keys, 1.0, &mut out);
    }
}
