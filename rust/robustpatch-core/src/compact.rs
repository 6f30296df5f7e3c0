//! The narrowest storage of a dense float32 delta that keeps every value bit for
//! bit: bfloat16 (each value's low 16 bits are zero), else float16 (each value
//! survives the round trip), else float32. Dense signatures are stored this way.

use crate::par::{CHUNK, PARALLEL_MIN};
use half::f16;
use rayon::prelude::*;

/// The storage [`compact`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Narrowest {
    /// `out` holds the bfloat16 bits.
    BF16,
    /// `out` holds the float16 bits.
    F16,
    /// Neither holds every value: keep the float32 (`out` is unspecified).
    F32,
}

/// Choose the narrowest exact storage of `values` and write its 16-bit patterns
/// to `out` (same length). One pass when bfloat16 holds the values; a second
/// (float16) only when it does not.
pub fn compact(values: &[f32], out: &mut [u16]) -> Narrowest {
    assert_eq!(values.len(), out.len(), "compact: out must match values");
    if each_chunk(values, out, to_bf16) {
        Narrowest::BF16
    } else if each_chunk(values, out, to_f16) {
        Narrowest::F16
    } else {
        Narrowest::F32
    }
}

/// Run `narrow` over matching chunks (in parallel for large inputs); true when
/// every chunk held exactly.
fn each_chunk(values: &[f32], out: &mut [u16], narrow: fn(&[f32], &mut [u16]) -> bool) -> bool {
    if values.len() < PARALLEL_MIN {
        return narrow(values, out);
    }
    values
        .par_chunks(CHUNK)
        .zip(out.par_chunks_mut(CHUNK))
        .all(|(v, o)| narrow(v, o))
}

/// The high halves; true when every low half is zero. No early exit inside a
/// chunk: a branch-free loop vectorizes, and chunks stop early through `all`.
fn to_bf16(values: &[f32], out: &mut [u16]) -> bool {
    let mut low = 0u32;
    for (o, v) in out.iter_mut().zip(values) {
        let bits = v.to_bits();
        low |= bits & 0xffff;
        *o = (bits >> 16) as u16;
    }
    low == 0
}

/// The float16 patterns; true when each converts back to the same float32 bits.
fn to_f16(values: &[f32], out: &mut [u16]) -> bool {
    let mut exact = true;
    for (o, v) in out.iter_mut().zip(values) {
        let h = f16::from_f32(*v);
        exact &= h.to_f32().to_bits() == v.to_bits();
        *o = h.to_bits();
    }
    exact
}

#[cfg(test)]
mod tests {
    use super::*;

    fn narrowest(values: &[f32]) -> (Narrowest, Vec<u16>) {
        let mut out = vec![0u16; values.len()];
        (compact(values, &mut out), out)
    }

    #[test]
    fn each_storage_is_chosen_only_when_exact() {
        let bf = [0.5f32, -2.0, 0.0, -0.0, f32::INFINITY, 2f32.powi(100)];
        let (k, out) = narrowest(&bf);
        assert_eq!(k, Narrowest::BF16);
        let back: Vec<u32> = out.iter().map(|&h| (h as u32) << 16).collect();
        assert_eq!(back, bf.map(f32::to_bits));
        // 1 + 2^-10 is a float16 but not a bfloat16 (7 fraction bits).
        let (k, out) = narrowest(&[1.0 + 1.0 / 1024.0, 2f32.powi(-24), 0.25]);
        assert_eq!(k, Narrowest::F16);
        assert_eq!(f16::from_bits(out[0]).to_f32(), 1.0 + 1.0 / 1024.0);
        assert_eq!(narrowest(&[0.1]).0, Narrowest::F32);
        assert_eq!(narrowest(&[1.0 + 1.0 / 1024.0, 1.0e5]).0, Narrowest::F32); // f16 overflows
        assert_eq!(narrowest(&[]).0, Narrowest::BF16);
    }

    #[test]
    fn one_inexact_value_in_a_large_input_decides_for_all() {
        let mut v: Vec<f32> = (0..3 * PARALLEL_MIN).map(|i| (i % 64) as f32).collect();
        assert_eq!(narrowest(&v).0, Narrowest::BF16);
        let last = v.len() - 1;
        v[last] = 1.0 + 1.0 / 1024.0;
        assert_eq!(narrowest(&v).0, Narrowest::F16);
        v[7] = 0.1;
        assert_eq!(narrowest(&v).0, Narrowest::F32);
    }
}
