//! Arguments as a caller in another language passes them: integers arrive wide
//! (i64) and are range-checked here, once, so that `bits = 300` or `-1` is a
//! clear [`Error::Value`] rather than an overflow at the language boundary.

use crate::error::{Error, Result};
use crate::quant::{QuantSpec, Scheme};

/// Bits per code, 1..=8.
pub fn bits(bits: i64) -> Result<u8> {
    match u8::try_from(bits) {
        Ok(b @ 1..=8) => Ok(b),
        _ => Err(Error::Value(format!("bits must be in 1..=8, got {bits}"))),
    }
}

/// A count or length: not negative and addressable on this machine.
pub fn count(what: &str, n: i64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::Value(format!("{what} must be ≥ 0, got {n}")))
}

/// The size of one element of a byte buffer of `len` bytes: 1, 2, 4 or 8, and
/// a divisor of `len`.
pub fn itemsize(size: i64, len: usize) -> Result<usize> {
    match size {
        1 | 2 | 4 | 8 if len.is_multiple_of(size as usize) => Ok(size as usize),
        1 | 2 | 4 | 8 => Err(Error::Shape(format!(
            "{len} bytes are not a whole number of {size}-byte elements"
        ))),
        _ => Err(Error::Value(format!(
            "itemsize must be 1, 2, 4 or 8, got {size}"
        ))),
    }
}

/// A quantization spec from its wide parts: bits 1..=8, a known scheme, and a
/// group length ≥ 1 (whether it divides the tensor is checked with the tensor).
pub fn spec(bits_: i64, scheme: &str, group_len: i64) -> Result<QuantSpec> {
    let bits = bits(bits_)?;
    let scheme = Scheme::parse(scheme).ok_or_else(|| {
        Error::Value(format!(
            "unknown scheme {scheme:?}; expected affine, symmetric, log or tanh"
        ))
    })?;
    if group_len < 1 {
        return Err(Error::Value(format!(
            "group length must be ≥ 1, got {group_len}"
        )));
    }
    let group_len = count("group length", group_len)?;
    Ok(QuantSpec {
        bits,
        scheme,
        group_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_outside_one_to_eight_are_refused_whatever_their_width() {
        for b in [i64::MIN, -1, 0, 9, 256, 300, i64::MAX] {
            let err = bits(b).unwrap_err();
            assert_eq!(err, Error::Value(format!("bits must be in 1..=8, got {b}")));
        }
        assert_eq!(
            (1..=8).map(|b| bits(b).unwrap()).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<u8>>()
        );
    }

    #[test]
    fn negative_counts_are_refused() {
        assert!(matches!(count("numel", -1), Err(Error::Value(m)) if m.contains("numel")));
        assert_eq!(count("numel", 1 << 40).unwrap(), 1 << 40);
    }

    #[test]
    fn an_itemsize_is_a_power_of_two_up_to_eight_that_divides_the_length() {
        assert_eq!(itemsize(4, 12).unwrap(), 4);
        assert!(matches!(itemsize(4, 10), Err(Error::Shape(_))));
        for s in [0, 3, 16, -4] {
            assert!(matches!(itemsize(s, 48), Err(Error::Value(m)) if m.contains("itemsize")));
        }
    }

    #[test]
    fn a_spec_checks_each_part() {
        let ok = spec(4, "Affine", 128).unwrap();
        assert_eq!((ok.bits, ok.scheme, ok.group_len), (4, Scheme::Affine, 128));
        assert!(matches!(spec(300, "affine", 8), Err(Error::Value(m)) if m.contains("bits")));
        assert!(matches!(spec(4, "cubic", 8), Err(Error::Value(m)) if m.contains("scheme")));
        for g in [0, -1, i64::MIN] {
            assert!(matches!(spec(4, "affine", g), Err(Error::Value(m)) if m.contains("group")));
        }
    }
}
