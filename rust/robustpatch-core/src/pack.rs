//! Little-endian bit packing of 1–8 bit codes.
//!
//! Element i's b-bit code occupies stream bits [i·b, (i+1)·b); stream bit j is
//! bit j % 8 (LSB first) of byte j / 8. Eight codes always fill exactly `b`
//! bytes, so every element index that is a multiple of 8 starts on a byte
//! boundary: that is what lets kernels cut a packed tensor into independent
//! chunks and decode any window that starts at a multiple of 8.
//!
//! The fast paths are plain `chunks_exact` loops specialised per width (one
//! byte ↔ 8/b codes for b ∈ {1, 2, 4}, a copy for b = 8, and b bytes ↔ 8 codes
//! through a u64 for b ∈ {3, 5, 6, 7}); [`pack_scalar`] and [`unpack_scalar`]
//! move one bit at a time and are the reference the tests compare against.

use crate::error::{Error, Result};

/// Bytes needed for `n` codes of `bits` bits: ⌈n·bits/8⌉ (computed without
/// overflowing for any `n`).
#[inline]
pub fn packed_len(n: usize, bits: u8) -> usize {
    let b = bits as usize;
    n / 8 * b + (n % 8 * b).div_ceil(8)
}

fn check_bits(bits: u8) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::Value(format!("bits must be in 1..=8, got {bits}")))
    }
}

/// Pack `codes` (each < 2^bits) into `out`, which must be exactly
/// [`packed_len`]`(codes.len(), bits)` bytes. Unused high bits of the last
/// byte are written as zero.
///
/// Errors: `Value` for bits outside 1..=8 or a code that does not fit,
/// `Shape` for a wrong output length.
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_pack_args(codes, bits, out.len())?;
    pack_unchecked(codes, bits, out);
    Ok(())
}

/// Bit-by-bit reference twin of [`pack`]: same checks, same bytes.
pub fn pack_scalar(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_pack_args(codes, bits, out.len())?;
    out.fill(0);
    let b = bits as usize;
    for (i, &c) in codes.iter().enumerate() {
        for k in 0..b {
            let j = i * b + k;
            out[j / 8] |= ((c >> k) & 1) << (j % 8);
        }
    }
    Ok(())
}

fn check_pack_args(codes: &[u8], bits: u8, out_len: usize) -> Result<()> {
    check_bits(bits)?;
    let need = packed_len(codes.len(), bits);
    if out_len != need {
        return Err(Error::Shape(format!(
            "{} codes of {bits} bits need {need} bytes, got {out_len}",
            codes.len()
        )));
    }
    // An OR-reduction vectorizes; the position is only searched on failure.
    let any = codes.iter().fold(0u8, |a, &c| a | c);
    if (any as u32) >> bits != 0 {
        let i = codes
            .iter()
            .position(|&c| (c as u32) >> bits != 0)
            .unwrap_or(0);
        return Err(Error::Value(format!(
            "code {} at index {i} does not fit in {bits} bits",
            codes[i]
        )));
    }
    Ok(())
}

/// Pack without validation. Contract: `bits` in 1..=8, every code < 2^bits
/// (a larger code corrupts its neighbours), `out.len() == packed_len(codes.len(), bits)`.
#[inline(always)]
pub(crate) fn pack_unchecked(codes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        1 => pack_sub_byte::<1>(codes, out),
        2 => pack_sub_byte::<2>(codes, out),
        4 => pack_sub_byte::<4>(codes, out),
        8 => out.copy_from_slice(codes),
        3 => pack_words::<3>(codes, out),
        5 => pack_words::<5>(codes, out),
        6 => pack_words::<6>(codes, out),
        7 => pack_words::<7>(codes, out),
        _ => unreachable!("bits {bits} outside 1..=8"),
    }
}

/// Widths that divide 8: each output byte holds 8/B whole codes.
#[inline(always)]
fn pack_sub_byte<const B: usize>(codes: &[u8], out: &mut [u8]) {
    let per = 8 / B;
    let full = codes.chunks_exact(per);
    let tail = full.remainder();
    for (o, c) in out.iter_mut().zip(full) {
        let mut byte = 0u8;
        for (k, &v) in c.iter().enumerate() {
            byte |= v << (k * B);
        }
        *o = byte;
    }
    if !tail.is_empty() {
        let mut byte = 0u8;
        for (k, &v) in tail.iter().enumerate() {
            byte |= v << (k * B);
        }
        out[codes.len() / per] = byte;
    }
}

/// Widths that do not divide 8: 8 codes make exactly B bytes, assembled in a u64.
#[inline(always)]
fn pack_words<const B: usize>(codes: &[u8], out: &mut [u8]) {
    let full = codes.chunks_exact(8);
    let tail = full.remainder();
    for (o, c) in out.chunks_exact_mut(B).zip(full) {
        let mut w = 0u64;
        for (k, &v) in c.iter().enumerate() {
            w |= (v as u64) << (k * B);
        }
        o.copy_from_slice(&w.to_le_bytes()[..B]);
    }
    if !tail.is_empty() {
        let mut w = 0u64;
        for (k, &v) in tail.iter().enumerate() {
            w |= (v as u64) << (k * B);
        }
        let at = codes.len() / 8 * B;
        let n = out.len() - at;
        out[at..].copy_from_slice(&w.to_le_bytes()[..n]);
    }
}

/// Decode the codes of elements [start, start + out.len()) from `packed`.
///
/// `start` must be a multiple of 8 (so the window starts on a byte boundary for
/// every width) and the window must lie inside `packed`. Bits beyond the last
/// code are ignored. Errors: `Value` for bits or a misaligned start, `Shape`
/// for a window outside the buffer.
pub fn unpack(packed: &[u8], bits: u8, start: usize, out: &mut [u8]) -> Result<()> {
    check_unpack_args(packed, bits, start, out.len())?;
    unpack_unchecked(packed, bits, start, out);
    Ok(())
}

/// Bit-by-bit reference twin of [`unpack`]: same checks, same codes.
pub fn unpack_scalar(packed: &[u8], bits: u8, start: usize, out: &mut [u8]) -> Result<()> {
    check_unpack_args(packed, bits, start, out.len())?;
    let b = bits as usize;
    for (i, o) in out.iter_mut().enumerate() {
        let mut c = 0u8;
        for k in 0..b {
            let j = (start + i) * b + k;
            c |= ((packed[j / 8] >> (j % 8)) & 1) << k;
        }
        *o = c;
    }
    Ok(())
}

fn check_unpack_args(packed: &[u8], bits: u8, start: usize, n: usize) -> Result<()> {
    check_bits(bits)?;
    if !start.is_multiple_of(8) {
        return Err(Error::Value(format!(
            "unpack start {start} is not a multiple of 8"
        )));
    }
    let end = start
        .checked_add(n)
        .ok_or_else(|| Error::Shape(format!("unpack range {start} + {n} overflows")))?;
    if packed_len(end, bits) > packed.len() {
        return Err(Error::Shape(format!(
            "codes [{start}, {end}) of {bits} bits lie outside {} packed bytes",
            packed.len()
        )));
    }
    Ok(())
}

/// Unpack without validation, for hot loops that checked the whole tensor once.
/// Contract: `bits` in 1..=8, `start % 8 == 0`,
/// `packed_len(start + out.len(), bits) <= packed.len()` (violations panic on
/// a slice index, never read out of bounds).
#[inline(always)]
pub(crate) fn unpack_unchecked(packed: &[u8], bits: u8, start: usize, out: &mut [u8]) {
    debug_assert!(
        start.is_multiple_of(8),
        "unpack start {start} is not a multiple of 8"
    );
    let src = &packed[start / 8 * bits as usize..];
    match bits {
        1 => unpack_sub_byte::<1>(src, out),
        2 => unpack_sub_byte::<2>(src, out),
        4 => unpack_sub_byte::<4>(src, out),
        8 => out.copy_from_slice(&src[..out.len()]),
        3 => unpack_words::<3>(src, out),
        5 => unpack_words::<5>(src, out),
        6 => unpack_words::<6>(src, out),
        7 => unpack_words::<7>(src, out),
        _ => unreachable!("bits {bits} outside 1..=8"),
    }
}

#[inline(always)]
fn unpack_sub_byte<const B: usize>(src: &[u8], out: &mut [u8]) {
    let per = 8 / B;
    let mask = ((1u16 << B) - 1) as u8;
    let n_full = out.len() / per;
    let (head, tail) = out.split_at_mut(n_full * per);
    for (o, &byte) in head.chunks_exact_mut(per).zip(&src[..n_full]) {
        for (k, v) in o.iter_mut().enumerate() {
            *v = (byte >> (k * B)) & mask;
        }
    }
    if !tail.is_empty() {
        let byte = src[n_full];
        for (k, v) in tail.iter_mut().enumerate() {
            *v = (byte >> (k * B)) & mask;
        }
    }
}

#[inline(always)]
fn unpack_words<const B: usize>(src: &[u8], out: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    let n_full = out.len() / 8;
    let (head, tail) = out.split_at_mut(n_full * 8);
    for (o, s) in head
        .chunks_exact_mut(8)
        .zip(src[..n_full * B].chunks_exact(B))
    {
        let mut word = [0u8; 8];
        word[..B].copy_from_slice(s);
        let w = u64::from_le_bytes(word);
        for (k, v) in o.iter_mut().enumerate() {
            *v = ((w >> (k * B)) & mask) as u8;
        }
    }
    if !tail.is_empty() {
        let bytes = (tail.len() * B).div_ceil(8);
        let mut word = [0u8; 8];
        word[..bytes].copy_from_slice(&src[n_full * B..n_full * B + bytes]);
        let w = u64::from_le_bytes(word);
        for (k, v) in tail.iter_mut().enumerate() {
            *v = ((w >> (k * B)) & mask) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic codes < 2^bits (xorshift), so failures reproduce from the seed.
    fn codes(seed: u64, n: usize, bits: u8) -> Vec<u8> {
        let mut s = seed | 1;
        let mask = ((1u16 << bits) - 1) as u8;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 32) as u8 & mask
            })
            .collect()
    }

    #[test]
    fn packed_len_is_ceil_of_bits() {
        for bits in 1..=8u8 {
            for n in 0..100usize {
                assert_eq!(packed_len(n, bits), (n * bits as usize).div_ceil(8));
            }
        }
        // No overflow for huge element counts.
        assert_eq!(packed_len(usize::MAX / 8 * 8, 8), usize::MAX / 8 * 8);
    }

    #[test]
    fn layout_is_lsb_first_little_endian() {
        let mut o = [0u8; 1];
        pack(&[1, 0, 1], 2, &mut o).unwrap();
        assert_eq!(o[0], 0b01_00_01);
        let mut o = [0u8; 2];
        pack(&[0xA, 0x5, 0x3], 4, &mut o).unwrap();
        assert_eq!(o, [0x5A, 0x03]);
        // 3-bit codes 1..=7,0 -> stream value Σ c_k << 3k, little-endian bytes.
        let c = [1u8, 2, 3, 4, 5, 6, 7, 0];
        let w: u64 = c
            .iter()
            .enumerate()
            .map(|(k, &v)| (v as u64) << (3 * k))
            .sum();
        let mut o = [0u8; 3];
        pack(&c, 3, &mut o).unwrap();
        assert_eq!(o[..], w.to_le_bytes()[..3]);
        let mut o = [0u8; 2];
        pack(&[1, 1, 1, 1, 1, 1, 1, 1, 1], 1, &mut o).unwrap();
        assert_eq!(o, [0xFF, 0x01]);
    }

    #[test]
    fn empty_inputs_are_fine_for_every_width() {
        for bits in 1..=8u8 {
            assert_eq!(packed_len(0, bits), 0);
            pack(&[], bits, &mut []).unwrap();
            pack_scalar(&[], bits, &mut []).unwrap();
            unpack(&[], bits, 0, &mut []).unwrap();
            unpack_scalar(&[], bits, 0, &mut []).unwrap();
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        let mut out = [0u8; 1];
        assert!(matches!(pack(&[16], 4, &mut out), Err(Error::Value(_))));
        assert!(matches!(pack(&[1], 0, &mut out), Err(Error::Value(_))));
        assert!(matches!(pack(&[1], 9, &mut out), Err(Error::Value(_))));
        assert!(matches!(
            pack(&[1, 2, 3], 4, &mut out),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            pack_scalar(&[2], 1, &mut out),
            Err(Error::Value(_))
        ));
        let err = pack(&[0, 0, 0, 9], 3, &mut [0u8; 2]).unwrap_err();
        assert!(err.to_string().contains("index 3"), "{err}");
        let mut dst = [0u8; 4];
        assert!(matches!(
            unpack(&[0u8; 8], 4, 3, &mut dst),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            unpack(&[0u8; 1], 4, 0, &mut dst),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            unpack(&[0u8; 8], 0, 0, &mut dst),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            unpack_scalar(&[0u8; 8], 9, 0, &mut dst),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            unpack(&[0u8; 8], 8, usize::MAX - 7, &mut dst),
            Err(Error::Shape(_))
        ));
        // A window ending exactly at the buffer's end is fine.
        unpack(&[0u8; 4], 4, 0, &mut [0u8; 8]).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn round_trip_every_width(
            bits in 1u8..=8, n in prop_oneof![0usize..40, 0usize..3000],
            seed in any::<u64>(), start8 in 0usize..400, len in 0usize..600,
        ) {
            let c = codes(seed, n, bits);
            let mut fast = vec![0xEEu8; packed_len(n, bits)];
            let mut slow = vec![0u8; packed_len(n, bits)];
            pack(&c, bits, &mut fast).unwrap();
            pack_scalar(&c, bits, &mut slow).unwrap();
            prop_assert_eq!(&fast, &slow);
            let mut back = vec![0u8; n];
            unpack(&fast, bits, 0, &mut back).unwrap();
            prop_assert_eq!(&back, &c);
            // A byte-aligned window anywhere, possibly empty or running to the end.
            let start = (start8 * 8).min(n / 8 * 8);
            let len = len.min(n - start);
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            unpack(&fast, bits, start, &mut a).unwrap();
            unpack_scalar(&fast, bits, start, &mut b).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a[..], &c[start..start + len]);
        }

        #[test]
        fn unpack_equals_scalar_on_arbitrary_bytes(
            bits in 1u8..=8, bytes in proptest::collection::vec(any::<u8>(), 0..700),
            start8 in 0usize..100, len in 0usize..700,
        ) {
            // Arbitrary bytes, including set padding bits that pack never writes.
            let n = bytes.len() * 8 / bits as usize;
            let start = (start8 * 8).min(n / 8 * 8);
            let len = len.min(n - start);
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            unpack(&bytes, bits, start, &mut a).unwrap();
            unpack_scalar(&bytes, bits, start, &mut b).unwrap();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn out_of_range_codes_are_refused(
            bits in 1u8..=7, n in 1usize..200, seed in any::<u64>(), at in any::<prop::sample::Index>(),
        ) {
            let mut c = codes(seed, n, bits);
            let i = at.index(n);
            c[i] |= 1 << bits;
            let mut out = vec![0u8; packed_len(n, bits)];
            let err = pack(&c, bits, &mut out).unwrap_err();
            prop_assert!(matches!(err, Error::Value(_)));
            prop_assert_eq!(pack_scalar(&c, bits, &mut out).unwrap_err(), err);
        }
    }
}
