//! A signature entry as the kernels see it: either a dense delta in any
//! supported dtype or a quantized one, decoded tile by tile into f32.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::quant::QuantView;
use half::{bf16, f16};

/// A borrowed dense tensor of one of the supported dtypes.
#[derive(Clone, Copy, Debug)]
pub enum Dense<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Dense<'_> {
    pub fn len(&self) -> usize {
        match self {
            Dense::F32(x) => x.len(),
            Dense::F16(x) => x.len(),
            Dense::BF16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Dense::F32(_) => DType::F32,
            Dense::F16(_) => DType::F16,
            Dense::BF16(_) => DType::BF16,
        }
    }

    /// Index of the first NaN or Inf, if any: those whose exponent bits are all
    /// ones. Blocks are tested without a branch per element (so the test
    /// vectorizes); only a block that holds one is searched.
    pub fn first_non_finite(&self) -> Option<usize> {
        fn find<T: Element>(x: &[T], exponent: u32, bits: impl Fn(T) -> u32) -> Option<usize> {
            let hit = |v: &T| bits(*v) & exponent == exponent;
            x.chunks(FINITE_BLOCK).enumerate().find_map(|(b, block)| {
                let any = block.iter().fold(false, |any, v| any | hit(v));
                any.then(|| b * FINITE_BLOCK + block.iter().position(hit).expect("found"))
            })
        }
        match self {
            Dense::F32(x) => find(x, 0x7f80_0000, |v| v.to_bits()),
            Dense::F16(x) => find(x, 0x7c00, |v| v.to_bits() as u32),
            Dense::BF16(x) => find(x, 0x7f80, |v| v.to_bits() as u32),
        }
    }
}

/// Elements per block of [`Dense::first_non_finite`].
const FINITE_BLOCK: usize = 4096;

/// One signature entry: what gets scaled by α and added to a target tensor.
#[derive(Clone, Copy, Debug)]
pub enum Delta<'a> {
    Dense(Dense<'a>),
    Quant(QuantView<'a>),
}

impl Delta<'_> {
    /// Number of elements the delta covers.
    pub fn numel(&self) -> usize {
        match self {
            Delta::Dense(d) => d.len(),
            Delta::Quant(q) => q.numel,
        }
    }

    /// `acc[i] += alpha * delta[start + i]`, the one decoding step every kernel
    /// shares, so that apply, remove and dot see identical values.
    /// `start` must be a multiple of 8 (packed codes are byte-aligned there);
    /// `scratch` holds unpacked codes and must be at least `acc.len()` long.
    #[inline(always)]
    pub fn accumulate(&self, alpha: f32, start: usize, acc: &mut [f32], scratch: &mut [u8]) {
        match self {
            Delta::Dense(Dense::F32(x)) => add_scaled(&x[start..start + acc.len()], alpha, acc),
            Delta::Dense(Dense::F16(x)) => add_scaled(&x[start..start + acc.len()], alpha, acc),
            Delta::Dense(Dense::BF16(x)) => add_scaled(&x[start..start + acc.len()], alpha, acc),
            Delta::Quant(q) => {
                #[cfg(target_arch = "x86_64")]
                if nibbles::applies(q)
                    && crate::arch::selected_or_scalar().has(crate::arch::Path::Avx2)
                {
                    // SAFETY: AVX2 was detected on this CPU just above.
                    return unsafe { nibbles::accumulate(q, alpha, start, acc) };
                }
                q.accumulate_range(alpha, start, acc, scratch)
            }
        }
    }

    /// Reference twin of [`Delta::accumulate`]: element by element, used by
    /// the scalar kernels the tests compare against.
    pub fn accumulate_scalar(&self, alpha: f32, start: usize, acc: &mut [f32], scratch: &mut [u8]) {
        match self {
            Delta::Quant(q) => q.accumulate_range_scalar(alpha, start, acc, scratch),
            dense => dense.accumulate(alpha, start, acc, scratch),
        }
    }
}

/// 4-bit linear codes (the common signature format) decoded straight from the
/// packed bytes in registers: eight codes are one u32, split with a variable
/// shift, so no unpacked-code buffer is written and read back. Computes exactly
/// what [`QuantView::accumulate_range`] does for these codes:
/// `acc += (code as f32 · (α·scale)) + α·offset`, unfused.
#[cfg(target_arch = "x86_64")]
mod nibbles {
    use crate::quant::{QuantView, Scheme};
    use std::arch::x86_64::*;

    /// True when `q` holds 4-bit integer-level codes in groups of whole
    /// eights, so every group segment of a tile starts on a byte boundary.
    #[inline(always)]
    pub fn applies(q: &QuantView) -> bool {
        q.spec.bits == 4
            && matches!(q.spec.scheme, Scheme::Affine | Scheme::Symmetric)
            && q.spec.group_len.is_multiple_of(8)
    }

    /// `start` is a multiple of 8 and [start, start + acc.len()) lies in `q`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn accumulate(q: &QuantView, alpha: f32, start: usize, acc: &mut [f32]) {
        let end = start + acc.len();
        assert!(start.is_multiple_of(8) && end <= q.numel && q.codes.len() * 2 >= q.numel);
        let gl = q.spec.group_len;
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let low4 = _mm256_set1_epi32(0xF);
        let mut e = start;
        while e < end {
            let g = e / gl;
            let stop = ((g + 1) * gl).min(end);
            let (a, b) = (alpha * q.scale[g], alpha * q.offset[g]);
            let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
            let full = e + (stop - e) / 8 * 8;
            while e < full {
                // Codes of elements e..e+8 (LSB first); inside `codes` by the assert.
                let word = (q.codes.as_ptr().add(e / 2) as *const u32).read_unaligned();
                let c = _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts),
                    low4,
                );
                let v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c), va), vb);
                let x = acc.as_mut_ptr().add(e - start);
                _mm256_storeu_ps(x, _mm256_add_ps(_mm256_loadu_ps(x), v));
                e += 8;
            }
            // Only the tensor's last few elements end off an eight.
            for i in e..stop {
                let c = (q.codes[i / 2] >> (4 * (i % 2))) & 0xF;
                acc[i - start] += c as f32 * a + b;
            }
            e = stop;
        }
    }
}

#[inline(always)]
fn add_scaled<T: Element>(x: &[T], alpha: f32, acc: &mut [f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += alpha * v.to_f32();
    }
}

/// Check that every delta covers `numel` elements and every α is finite.
pub fn check_deltas(deltas: &[(Delta, f32)], numel: usize) -> Result<()> {
    if deltas.is_empty() {
        return Err(Error::Value("at least one delta is required".into()));
    }
    for (k, (d, alpha)) in deltas.iter().enumerate() {
        if d.numel() != numel {
            return Err(Error::Shape(format!(
                "delta {k} has {} elements but the target has {numel}",
                d.numel()
            )));
        }
        if !alpha.is_finite() {
            return Err(Error::NonFinite(format!("alpha {k} is {alpha}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn first_non_finite_finds_the_first_nan_or_inf_of_each_dtype() {
        use half::{bf16, f16};
        let n = 3 * FINITE_BLOCK + 5;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, FINITE_BLOCK - 1, FINITE_BLOCK, n - 1] {
                let mut v = vec![-1.0e30f32; n];
                v[at] = bad;
                v[n - 1] = bad; // a later one never hides the first
                let mut h: Vec<f16> = v.iter().map(|x| f16::from_f32(x.max(-65504.0))).collect();
                h[at] = f16::from_f32(bad);
                h[n - 1] = f16::from_f32(bad);
                let b: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
                assert_eq!(Dense::F32(&v).first_non_finite(), Some(at));
                assert_eq!(Dense::F16(&h).first_non_finite(), Some(at));
                assert_eq!(Dense::BF16(&b).first_non_finite(), Some(at));
            }
        }
        let finite = [f32::MAX, f32::MIN, 0.0, -0.0, f32::MIN_POSITIVE / 2.0];
        assert_eq!(Dense::F32(&finite).first_non_finite(), None);
        let h = [f16::MAX, f16::MIN, f16::from_bits(1)];
        assert_eq!(Dense::F16(&h).first_non_finite(), None);
    }

    use super::*;
    use crate::quant::{quantize, QuantSpec, Scheme};

    /// The register decoder of 4-bit codes (used where AVX2 exists) must give
    /// the reference twin's bits, for any group length that takes it and any
    /// 8-aligned window, including ones ending mid-group.
    #[test]
    fn four_bit_fast_path_matches_scalar_twin() {
        let n = 8 * 3 * 5 * 17 * 4;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
            .collect();
        for scheme in [Scheme::Affine, Scheme::Symmetric] {
            for group_len in [8, 16, 24, 136, n] {
                let spec = QuantSpec {
                    bits: 4,
                    scheme,
                    group_len,
                };
                let q = quantize(&x, spec).unwrap();
                let d = Delta::Quant(q.view());
                for (start, len) in [(0, n), (8, 100), (64, n - 64), (n - 16, 13)] {
                    let mut fast = vec![0.25f32; len];
                    let mut slow = fast.clone();
                    let mut scratch = vec![0u8; len];
                    d.accumulate(-0.7, start, &mut fast, &mut scratch);
                    d.accumulate_scalar(-0.7, start, &mut slow, &mut scratch);
                    let same = fast
                        .iter()
                        .zip(&slow)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{scheme:?} g{group_len} window {start}+{len}");
                }
            }
        }
    }
}
