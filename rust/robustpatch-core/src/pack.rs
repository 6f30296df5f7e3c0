//! Little-endian bit packing of 1–8 bit codes.
//!
//! Element i's code occupies stream bits [i·b, (i+1)·b); stream bit j is bit
//! j % 8 (LSB first) of byte j / 8. Eight codes always fill exactly `b` bytes,
//! so any element index that is a multiple of 8 starts on a byte boundary.

use crate::error::{Error, Result};

/// Bytes needed for `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

fn check_bits(bits: u8) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::Value(format!("bits must be in 1..=8, got {bits}")))
    }
}

/// Pack `codes` (each < 2^bits) into `out` (exactly `packed_len` bytes).
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_pack_args(codes, bits, out.len())?;
    pack_unchecked(codes, bits, out);
    Ok(())
}

/// Bit-by-bit reference twin of [`pack`].
pub fn pack_scalar(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_pack_args(codes, bits, out.len())?;
    out.fill(0);
    for (i, &c) in codes.iter().enumerate() {
        for k in 0..bits as usize {
            let j = i * bits as usize + k;
            out[j / 8] |= ((c >> k) & 1) << (j % 8);
        }
    }
    Ok(())
}

fn check_pack_args(codes: &[u8], bits: u8, out_len: usize) -> Result<()> {
    check_bits(bits)?;
    if out_len != packed_len(codes.len(), bits) {
        return Err(Error::Shape(format!(
            "{} codes of {bits} bits need {} bytes, got {out_len}",
            codes.len(),
            packed_len(codes.len(), bits)
        )));
    }
    if let Some(i) = codes.iter().position(|&c| (c as u32) >> bits != 0) {
        return Err(Error::Value(format!(
            "code {} at index {i} does not fit in {bits} bits",
            codes[i]
        )));
    }
    Ok(())
}

/// Pack without validation; `out.len() == packed_len(codes.len(), bits)`.
#[inline]
pub(crate) fn pack_unchecked(codes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            let pairs = codes.chunks_exact(2);
            let tail = pairs.remainder();
            for (o, p) in out.iter_mut().zip(pairs) {
                *o = p[0] | (p[1] << 4);
            }
            if let [last] = tail {
                out[out.len() - 1] = *last;
            }
        }
        _ => {
            let b = bits as usize;
            let eights = codes.chunks_exact(8);
            let tail = eights.remainder();
            for (o, c) in out.chunks_exact_mut(b).zip(eights) {
                let mut acc = 0u64;
                for (k, &v) in c.iter().enumerate() {
                    acc |= (v as u64) << (k * b);
                }
                o.copy_from_slice(&acc.to_le_bytes()[..b]);
            }
            if !tail.is_empty() {
                let mut acc = 0u64;
                for (k, &v) in tail.iter().enumerate() {
                    acc |= (v as u64) << (k * b);
                }
                let start = codes.len() / 8 * b;
                let n = out.len() - start;
                out[start..].copy_from_slice(&acc.to_le_bytes()[..n]);
            }
        }
    }
}

/// Decode the codes of elements [start, start + out.len()); `start` must be a
/// multiple of 8 and the range must lie inside `packed`.
pub fn unpack(packed: &[u8], bits: u8, start: usize, out: &mut [u8]) -> Result<()> {
    check_unpack_args(packed, bits, start, out.len())?;
    unpack_unchecked(packed, bits, start, out);
    Ok(())
}

/// Bit-by-bit reference twin of [`unpack`].
pub fn unpack_scalar(packed: &[u8], bits: u8, start: usize, out: &mut [u8]) -> Result<()> {
    check_unpack_args(packed, bits, start, out.len())?;
    for (i, o) in out.iter_mut().enumerate() {
        let mut c = 0u8;
        for k in 0..bits as usize {
            let j = (start + i) * bits as usize + k;
            c |= ((packed[j / 8] >> (j % 8)) & 1) << k;
        }
        *o = c;
    }
    Ok(())
}

fn check_unpack_args(packed: &[u8], bits: u8, start: usize, n: usize) -> Result<()> {
    check_bits(bits)?;
    if start % 8 != 0 {
        return Err(Error::Value(format!(
            "unpack start {start} is not a multiple of 8"
        )));
    }
    let end = start
        .checked_add(n)
        .ok_or_else(|| Error::Shape("unpack range overflows".into()))?;
    if packed_len(end, bits) > packed.len() {
        return Err(Error::Shape(format!(
            "codes [{start}, {end}) of {bits} bits lie outside {} packed bytes",
            packed.len()
        )));
    }
    Ok(())
}

/// Unpack without validation (see [`unpack`] for the contract).
#[inline(always)]
pub(crate) fn unpack_unchecked(packed: &[u8], bits: u8, start: usize, out: &mut [u8]) {
    let b = bits as usize;
    let src = &packed[start / 8 * b..];
    match bits {
        8 => out.copy_from_slice(&src[..out.len()]),
        4 => {
            let n2 = out.len() / 2;
            for (o, &byte) in out.chunks_exact_mut(2).zip(&src[..n2]) {
                o[0] = byte & 0x0F;
                o[1] = byte >> 4;
            }
            if out.len() % 2 == 1 {
                out[out.len() - 1] = src[n2] & 0x0F;
            }
        }
        _ => {
            let mask = (1u64 << b) - 1;
            let full = out.len() / 8;
            for (o, s) in out.chunks_exact_mut(8).zip(src.chunks_exact(b)) {
                let mut word = [0u8; 8];
                word[..b].copy_from_slice(s);
                let acc = u64::from_le_bytes(word);
                for (k, v) in o.iter_mut().enumerate() {
                    *v = ((acc >> (k * b)) & mask) as u8;
                }
            }
            let tail = &mut out[full * 8..];
            if !tail.is_empty() {
                let bytes = packed_len(tail.len(), bits);
                let mut word = [0u8; 8];
                word[..bytes].copy_from_slice(&src[full * b..full * b + bytes]);
                let acc = u64::from_le_bytes(word);
                for (k, v) in tail.iter_mut().enumerate() {
                    *v = ((acc >> (k * b)) & mask) as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codes(seed: u64, n: usize, bits: u8) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 32) as u8 & (((1u16 << bits) - 1) as u8)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn round_trip_every_width(bits in 1u8..=8, n in 0usize..2000, seed in any::<u64>(), start8 in 0usize..50) {
            let c = codes(seed, n, bits);
            let mut fast = vec![0u8; packed_len(n, bits)];
            let mut slow = vec![0u8; packed_len(n, bits)];
            pack(&c, bits, &mut fast).unwrap();
            pack_scalar(&c, bits, &mut slow).unwrap();
            prop_assert_eq!(&fast, &slow);
            let mut back = vec![0u8; n];
            unpack(&fast, bits, 0, &mut back).unwrap();
            prop_assert_eq!(&back, &c);
            // A byte-aligned window in the middle.
            let start = (start8 * 8).min(n / 8 * 8);
            let len = (n - start).min(77);
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            unpack(&fast, bits, start, &mut a).unwrap();
            unpack_scalar(&fast, bits, start, &mut b).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a[..], &c[start..start + len]);
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        let mut out = [0u8; 1];
        assert!(pack(&[16], 4, &mut out).is_err());
        assert!(pack(&[1], 0, &mut out).is_err());
        assert!(pack(&[1], 9, &mut out).is_err());
        assert!(pack(&[1, 2, 3], 4, &mut out).is_err());
        let mut dst = [0u8; 4];
        assert!(unpack(&[0u8; 2], 4, 3, &mut dst).is_err());
        assert!(unpack(&[0u8; 1], 4, 0, &mut dst).is_err());
        // Layout: LSB first.
        let mut o = [0u8; 1];
        pack(&[1, 0, 1], 2, &mut o).unwrap();
        assert_eq!(o[0], 0b01_00_01);
    }
}
