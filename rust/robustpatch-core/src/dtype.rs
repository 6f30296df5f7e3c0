//! Element types the kernels accept, with branch-free conversions to and from
//! f32 that the compiler can vectorize (round to nearest even on the way down).

use half::{bf16, f16};

/// Runtime tag for a tensor's element type; kernels dispatch on it once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Canonical lowercase name (`"f32"`, `"f16"`, `"bf16"`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parse a name as written by [`DType::name`] or by safetensors (`F32`, `F16`, `BF16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

/// A floating-point element stored in memory, converted through f32 for arithmetic.
pub trait Element: Copy + Send + Sync + 'static {
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// The raw bit pattern type (u32 or u16), used for exact comparisons and undo records.
    type Bits: Copy + Eq + Send + Sync + std::fmt::Debug + 'static;
    fn to_f32(self) -> f32;
    /// Round to nearest, ties to even.
    fn from_f32(x: f32) -> Self;
    fn to_bits(self) -> Self::Bits;
    fn from_bits(b: Self::Bits) -> Self;

    /// True when converting whole tiles through [`Element::widen`] and
    /// [`Element::narrow`] beats converting element by element (f16 with F16C).
    const BULK: bool = false;

    /// Widen a tile to f32 (`dst.len() == src.len()`).
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// Narrow a tile from f32, round to nearest even.
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    type Bits = u32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_bits(self) -> u32 {
        f32::to_bits(self)
    }
    #[inline(always)]
    fn from_bits(b: u32) -> Self {
        f32::from_bits(b)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    type Bits = u16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(f32_to_bf16_bits(x))
    }
    #[inline(always)]
    fn to_bits(self) -> u16 {
        bf16::to_bits(self)
    }
    #[inline(always)]
    fn from_bits(b: u16) -> Self {
        bf16::from_bits(b)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const BULK: bool = true;
    type Bits = u16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(f16_bits_to_f32_bits(self.to_bits()))
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_bits(f32_to_f16_bits(x))
    }
    #[inline(always)]
    fn to_bits(self) -> u16 {
        f16::to_bits(self)
    }
    #[inline(always)]
    fn from_bits(b: u16) -> Self {
        f16::from_bits(b)
    }
    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::arch::selected_or_scalar().has(crate::arch::Path::Avx2) {
            // SAFETY: F16C/AVX were detected on this CPU.
            return unsafe { f16c::widen(src, dst) };
        }
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [f16]) {
        #[cfg(target_arch = "x86_64")]
        if crate::arch::selected_or_scalar().has(crate::arch::Path::Avx2) {
            // SAFETY: F16C/AVX were detected on this CPU.
            return unsafe { f16c::narrow(src, dst) };
        }
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*s);
        }
    }
}

/// Hardware f16 <-> f32 conversion, eight lanes at a time. Identical to the
/// scalar conversions above (IEEE round to nearest even), which tests check.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        for i in full..n {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn narrow(src: &[f32], dst: &mut [f16]) {
        let n = src.len().min(dst.len());
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            let x = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        for i in full..n {
            dst[i] = f16::from_f32(src[i]);
        }
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quieted).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded as u16
    }
}

/// f16 bits -> f32 bits, exact, without branches on the hot path
/// (subnormals are normalised through a float multiply).
#[inline(always)]
pub fn f16_bits_to_f32_bits(h: u16) -> u32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // Shift exponent+mantissa into place and rebias (112 = 127 - 15).
    let normal = (em << 13) + (112 << 23);
    let inf_nan = (em << 13) | 0x7F80_0000;
    // Subnormal: mantissa * 2^-24 computed exactly in f32.
    let sub = ((em as f32) * f32::from_bits(0x3380_0000)).to_bits();
    let bits = if em >= 0x7C00 {
        inf_nan
    } else if em < 0x0400 {
        sub
    } else {
        normal
    };
    bits | sign
}

/// f32 -> f16 bits, round to nearest even, overflow to inf, NaN quieted.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7FFF_FFFF;
    let out = if a >= 0x7F80_0000 {
        // Inf or NaN: keep the top mantissa bits, force a quiet NaN bit for NaN.
        let nan_bit = if a > 0x7F80_0000 { 0x0200 } else { 0 };
        0x7C00 | nan_bit | ((a >> 13) & 0x03FF) as u16
    } else if a >= 0x4780_0000 {
        // |x| >= 65536 overflows; [65520, 65536) reaches inf through the rounding below.
        0x7C00
    } else if a < 0x3880_0000 {
        // Result is subnormal or zero: add a magic number so the FPU rounds for us.
        let f = f32::from_bits(a) + 0.5;
        (f.to_bits() - 0x3F00_0000) as u16
    } else {
        // Normal: rebias, then round to nearest even on the 13 dropped bits.
        let mant_odd = (a >> 13) & 1;
        let r = a.wrapping_add(0xC800_0FFF + mant_odd);
        (r >> 13) as u16
    };
    out | sign
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_roundtrip_all_bit_patterns() {
        for h in 0..=u16::MAX {
            let ours = f16_bits_to_f32_bits(h);
            let reference = f16::from_bits(h).to_f32().to_bits();
            let v = f16::from_bits(h);
            if v.is_nan() {
                assert!(f32::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, reference, "h={h:#06x}");
                assert_eq!(f32_to_f16_bits(f32::from_bits(ours)), h);
            }
        }
    }

    #[test]
    fn f32_to_f16_matches_half_crate_on_a_sweep() {
        // Every 7919th f32 bit pattern (a prime step) covers all exponents and many mantissas.
        for b in (0..=u32::MAX).step_by(7919) {
            let x = f32::from_bits(b);
            let ours = f32_to_f16_bits(x);
            let reference = f16::from_f32(x);
            if x.is_nan() {
                assert!(f16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, reference.to_bits(), "x={x:e} bits={b:#010x}");
            }
        }
    }

    #[test]
    fn f32_to_bf16_matches_half_crate_on_a_sweep() {
        for b in (0..=u32::MAX).step_by(7919) {
            let x = f32::from_bits(b);
            let ours = f32_to_bf16_bits(x);
            if x.is_nan() {
                assert!(bf16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, bf16::from_f32(x).to_bits(), "bits={b:#010x}");
            }
        }
    }
}
