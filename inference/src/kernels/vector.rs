//! f32 vector primitives for attention: the dot product of a query with a
//! key, and adding a weighted value to an output. AVX2+FMA when the CPU has
//! it (chosen once per `VectorOps::detect`), portable loops otherwise.

/// The functions a caller uses in its inner loop, picked once.
#[derive(Clone, Copy)]
pub struct VectorOps {
    /// `Σ a[i] · b[i]`.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// `y[i] += a · x[i]`.
    pub axpy: fn(f32, &[f32], &mut [f32]),
}

impl VectorOps {
    /// The fastest versions this CPU runs.
    pub fn detect() -> VectorOps {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return VectorOps {
                    dot: dot_avx2_entry,
                    axpy: axpy_avx2_entry,
                };
            }
        }
        VectorOps {
            dot: dot_portable,
            axpy: axpy_portable,
        }
    }
}

/// The portable dot product: eight partial sums, which the compiler keeps in
/// vector registers of whatever width the target has.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths");
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The portable `y += a · x`.
pub fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "vector lengths");
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths");
    // SAFETY: chosen only after run-time detection; lengths checked.
    unsafe { dot_avx2(a, b) }
}

#[cfg(target_arch = "x86_64")]
fn axpy_avx2_entry(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "vector lengths");
    // SAFETY: chosen only after run-time detection; lengths checked.
    unsafe { axpy_avx2(a, x, y) }
}

/// # Safety
/// AVX2 and FMA must be present; `a` and `b` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let n16 = a.len() / 16 * 16;
    let mut i = 0;
    while i < n16 {
        let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
        i += 16;
    }
    let mut tail = 0f32;
    while i < a.len() {
        tail += a[i] * b[i];
        i += 1;
    }
    super::hsum_avx(_mm256_add_ps(s0, s1)) + tail
}

/// # Safety
/// AVX2 and FMA must be present; `x` and `y` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let va = _mm256_set1_ps(a);
    let n8 = x.len() / 8 * 8;
    let mut i = 0;
    while i < n8 {
        let py = y.as_mut_ptr().add(i);
        let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(py));
        _mm256_storeu_ps(py, v);
        i += 8;
    }
    while i < x.len() {
        y[i] += a * x[i];
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_ops_equal_the_portable_ones() {
        let ops = VectorOps::detect();
        for n in [1, 7, 8, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let (want, got) = (dot_portable(&a, &b), (ops.dot)(&a, &b));
            assert!(
                (want - got).abs() <= 1e-5 * n as f32,
                "n={n}: {want} vs {got}"
            );
            let mut y1 = b.clone();
            let mut y2 = b.clone();
            axpy_portable(0.5, &a, &mut y1);
            (ops.axpy)(0.5, &a, &mut y2);
            for (p, q) in y1.iter().zip(&y2) {
                assert!((p - q).abs() <= 1e-6, "n={n}: {p} vs {q}");
            }
        }
    }
}
