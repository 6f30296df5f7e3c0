//! Quantization of signature tensors to 1–8 bit codes.
//!
//! A tensor is cut into contiguous groups of `group_len` elements (the caller
//! maps granularities: per tensor = numel, per output channel = numel/shape[0],
//! per group = G). Every scheme decodes the same way,
//! `deq = level[code] · scale_g + offset_g`, so one decoder serves all:
//! - affine: levels are the integers, scale = (max−min)/(2^b−1), offset = min;
//! - symmetric: zero is exact; levels are the integers, offset = −2^(b−1)·scale
//!   (1 bit: scale = 2·absmax, offset = −absmax, code = x ≥ 0);
//! - log / tanh: the robust-weight-signature paper's companding; scale = absmax,
//!   offset = 0, levels follow the inverse companding curve on [−1, 1].
//!
//! Codes are rounded to the nearest level (ties to the even integer for the
//! linear schemes, upward for the companded ones), so for affine and symmetric
//! |x − deq| ≤ scale/2 up to float rounding.
//!
//! Speed: `quantize` reads the input once. Small groups are handled in runs of
//! whole groups whose length is a multiple of 8 (so each run owns whole packed
//! bytes): per group one vectorized min/max pass, then codes go through an
//! L1-sized tile straight into the packed output. Groups longer than a parallel
//! chunk (per-tensor, per-channel of big layers) get their min/max in parallel
//! first, then are encoded in parallel over byte-aligned chunks.

mod decode;
mod encode;
mod tables;

pub use decode::{dequantize, dequantize_scalar, dequantize_with};
pub use encode::{quantize, quantize_scalar, quantize_with};
pub use tables::{levels, LOG_MU, TANH_K};

use crate::error::{Error, Result};
use crate::pack::packed_len;
#[cfg(test)]
use crate::par::{CHUNK, PARALLEL_MIN, TILE};
#[cfg(test)]
use tables::{compress, thresholds};

/// How codes map to values (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Min/max per group, integer levels.
    Affine,
    /// Absmax per group, integer levels centred so that zero is exact.
    Symmetric,
    /// μ-law companding ([`LOG_MU`]): finer steps near zero.
    Log,
    /// tanh companding ([`TANH_K`]): finer steps near zero, gentler than log.
    Tanh,
}

impl Scheme {
    /// Every scheme, in a fixed order.
    pub const ALL: [Scheme; 4] = [Scheme::Affine, Scheme::Symmetric, Scheme::Log, Scheme::Tanh];

    /// Lowercase name as stored in signature metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Affine => "affine",
            Scheme::Symmetric => "symmetric",
            Scheme::Log => "log",
            Scheme::Tanh => "tanh",
        }
    }

    /// Inverse of [`Scheme::name`], ignoring ASCII case.
    pub fn parse(s: &str) -> Option<Scheme> {
        Scheme::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }

    fn companded(self) -> bool {
        matches!(self, Scheme::Log | Scheme::Tanh)
    }
}

/// Bits, scheme and group length of one quantized tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// Bits per code, 1..=8.
    pub bits: u8,
    pub scheme: Scheme,
    /// Elements per contiguous group; must divide the element count.
    pub group_len: usize,
}

impl QuantSpec {
    fn max_code(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Validate against a tensor of `numel` elements; returns the group count.
    /// Errors: `Value` for bits outside 1..=8, `Shape` when `group_len` is 0 or
    /// does not divide `numel`.
    pub fn check(&self, numel: usize) -> Result<usize> {
        if !(1..=8).contains(&self.bits) {
            return Err(Error::Value(format!(
                "bits must be in 1..=8, got {}",
                self.bits
            )));
        }
        if self.group_len == 0 || !numel.is_multiple_of(self.group_len) {
            return Err(Error::Shape(format!(
                "group length {} does not divide a tensor of {numel} elements",
                self.group_len
            )));
        }
        Ok(numel / self.group_len)
    }
}

/// An owned quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Packed codes, `packed_len(numel, bits)` bytes.
    pub codes: Vec<u8>,
    /// One scale per group (≥ 0).
    pub scale: Vec<f32>,
    /// One offset per group.
    pub offset: Vec<f32>,
    pub spec: QuantSpec,
    pub numel: usize,
}

impl Quantized {
    /// Borrow as a view (already valid: no checks repeated).
    pub fn view(&self) -> QuantView<'_> {
        QuantView {
            codes: &self.codes,
            scale: &self.scale,
            offset: &self.offset,
            spec: self.spec,
            numel: self.numel,
            levels: levels(self.spec),
        }
    }
}

/// A borrowed, validated quantized tensor (build it with [`QuantView::new`]
/// or [`Quantized::view`]; the private level table makes literals impossible,
/// so every view has passed validation).
#[derive(Clone, Copy)]
pub struct QuantView<'a> {
    /// Packed codes, `packed_len(numel, bits)` bytes.
    pub codes: &'a [u8],
    /// One scale per group.
    pub scale: &'a [f32],
    /// One offset per group.
    pub offset: &'a [f32],
    pub spec: QuantSpec,
    pub numel: usize,
    levels: &'static [f32; 256],
}

impl std::fmt::Debug for QuantView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The level table is derived from the spec; printing it is noise.
        f.debug_struct("QuantView")
            .field("spec", &self.spec)
            .field("numel", &self.numel)
            .field("code_bytes", &self.codes.len())
            .field("groups", &self.scale.len())
            .finish()
    }
}

impl<'a> QuantView<'a> {
    /// Validate and borrow. Errors: bits / group length as in
    /// [`QuantSpec::check`]; `Shape` for a code buffer that is not
    /// `packed_len(numel, bits)` bytes or scale/offset counts that are not one
    /// per group; `NonFinite` for a NaN/Inf scale or offset and `Value` for a
    /// negative scale or one whose codes decode past f32, each naming the group.
    pub fn new(
        codes: &'a [u8],
        scale: &'a [f32],
        offset: &'a [f32],
        spec: QuantSpec,
        numel: usize,
    ) -> Result<Self> {
        let groups = spec.check(numel)?;
        let need = packed_len(numel, spec.bits);
        if codes.len() != need {
            return Err(Error::Shape(format!(
                "{numel} codes of {} bits need {need} bytes, got {}",
                spec.bits,
                codes.len()
            )));
        }
        if scale.len() != groups || offset.len() != groups {
            return Err(Error::Shape(format!(
                "{groups} groups need {groups} scales and offsets, got {} and {}",
                scale.len(),
                offset.len()
            )));
        }
        let table = levels(spec);
        let (lo, hi) = table[..1 << spec.bits]
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &l| {
                (a.min(l), b.max(l))
            });
        for (g, (&s, &o)) in scale.iter().zip(offset).enumerate() {
            if !(s.is_finite() && o.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "group {g} has scale {s} and offset {o}"
                )));
            }
            if s < 0.0 {
                return Err(Error::Value(format!("group {g} has a negative scale {s}")));
            }
            // What the quantizer guarantees: every code decodes to a finite value.
            if !((lo * s + o).is_finite() && (hi * s + o).is_finite()) {
                return Err(Error::Value(format!(
                    "group {g} (scale {s:e}, offset {o:e}) decodes past the float32 range"
                )));
            }
        }
        Ok(QuantView {
            codes,
            scale,
            offset,
            spec,
            numel,
            levels: table,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// Deterministic values uniform in [−mag, mag) (xorshift).
    fn data(seed: u64, n: usize, mag: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * mag
            })
            .collect()
    }

    fn spec(bits: u8, scheme: Scheme, group_len: usize) -> QuantSpec {
        QuantSpec {
            bits,
            scheme,
            group_len,
        }
    }

    fn roundtrip(x: &[f32], spec: QuantSpec) -> (Quantized, Vec<f32>) {
        let q = quantize(x, spec).unwrap();
        let mut deq = vec![0f32; x.len()];
        dequantize(&q.view(), &mut deq).unwrap();
        (q, deq)
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Assert the half-step bound of affine/symmetric (the spec's tolerance).
    fn assert_half_step(x: &[f32], q: &Quantized, deq: &[f32]) {
        let gl = q.spec.group_len;
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in x.iter().zip(deq).enumerate() {
            let s = q.scale[i / gl];
            // Beyond the half step, the f32 roundings of the scale, the product and
            // the offset add: each at most half an ulp of a value below 2·amax.
            let tol = s / 2.0 * (1.0 + 1e-6) + 8.0 * f32::EPSILON * amax;
            assert!(
                (a - b).abs() <= tol,
                "i={i} x={a:e} deq={b:e} scale={s:e} err-s/2={:e} amax={amax:e} {:?}",
                (a - b).abs() - s / 2.0,
                q.spec
            );
        }
    }

    #[test]
    fn scheme_names_round_trip() {
        for s in Scheme::ALL {
            assert_eq!(Scheme::parse(s.name()), Some(s));
            assert_eq!(Scheme::parse(&s.name().to_uppercase()), Some(s));
        }
        assert_eq!(Scheme::parse("mu-law"), None);
        assert_eq!(Scheme::parse(""), None);
    }

    #[test]
    fn spec_errors_name_the_problem() {
        let x = data(1, 12, 1.0);
        for bits in [0u8, 9, 255] {
            let err = quantize(&x, spec(bits, Scheme::Affine, 4)).unwrap_err();
            assert!(matches!(err, Error::Value(_)), "{err}");
            assert!(quantize_scalar(&x, spec(bits, Scheme::Affine, 4)).is_err());
        }
        let err = quantize(&x, spec(4, Scheme::Affine, 5)).unwrap_err();
        assert!(matches!(err, Error::Shape(_)));
        let msg = err.to_string();
        assert!(msg.contains("12") && msg.contains('5'), "{msg}");
        assert!(matches!(
            quantize(&x, spec(4, Scheme::Affine, 0)),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            quantize(&x, spec(4, Scheme::Affine, 24)),
            Err(Error::Shape(_))
        ));
        // An empty tensor has zero groups of any length.
        let q = quantize::<f32>(&[], spec(3, Scheme::Log, 7)).unwrap();
        assert!(q.codes.is_empty() && q.scale.is_empty());
        dequantize(&q.view(), &mut []).unwrap();
    }

    #[test]
    fn quant_view_new_validates_everything() {
        let x = data(1, 12, 1.0);
        let q = quantize(&x, spec(4, Scheme::Affine, 4)).unwrap();
        let v = |c: &[u8], s: &[f32], o: &[f32]| {
            QuantView::new(c, s, o, q.spec, 12).map(|_| ()).unwrap_err()
        };
        assert!(QuantView::new(&q.codes, &q.scale, &q.offset, q.spec, 12).is_ok());
        assert!(matches!(
            v(&q.codes[1..], &q.scale, &q.offset),
            Error::Shape(_)
        ));
        let mut long = q.codes.clone();
        long.push(0);
        assert!(matches!(v(&long, &q.scale, &q.offset), Error::Shape(_)));
        assert!(matches!(
            v(&q.codes, &q.scale[1..], &q.offset),
            Error::Shape(_)
        ));
        assert!(matches!(
            v(&q.codes, &q.scale, &q.offset[1..]),
            Error::Shape(_)
        ));
        let e = v(&q.codes, &[1.0, f32::NAN, 1.0], &q.offset);
        assert!(
            matches!(e, Error::NonFinite(ref m) if m.contains("group 1")),
            "{e}"
        );
        let e = v(&q.codes, &q.scale, &[0.0, 0.0, f32::INFINITY]);
        assert!(
            matches!(e, Error::NonFinite(ref m) if m.contains("group 2")),
            "{e}"
        );
        let e = v(&q.codes, &[1.0, 1.0, -1.0], &q.offset);
        assert!(
            matches!(e, Error::Value(ref m) if m.contains("group 2")),
            "{e}"
        );
        let bad_bits = QuantSpec { bits: 9, ..q.spec };
        assert!(QuantView::new(&q.codes, &q.scale, &q.offset, bad_bits, 12).is_err());
        let bad_group = QuantSpec {
            group_len: 5,
            ..q.spec
        };
        assert!(matches!(
            QuantView::new(&q.codes, &q.scale, &q.offset, bad_group, 12),
            Err(Error::Shape(_))
        ));
        let mut out = vec![0f32; 11];
        assert!(matches!(
            dequantize(&q.view(), &mut out),
            Err(Error::Shape(_))
        ));
        assert!(dequantize_scalar(&q.view(), &mut out).is_err());
    }

    #[test]
    fn non_finite_input_is_refused_with_its_index() {
        // Small (one run), many runs, and the large-group path.
        for (n, gl, bad) in [
            (12usize, 4usize, 7usize),
            (300_032, 128, 250_001),
            (300_000, 100_000, 150_000),
            (300_000, 300_000, 299_999),
        ] {
            for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = data(2, n, 1.0);
                x[bad] = v;
                // A later bad value must not be the one reported.
                x[n - 1] = f32::NAN;
                for scheme in Scheme::ALL {
                    let s = spec(4, scheme, gl);
                    let err = quantize(&x, s).unwrap_err();
                    assert!(matches!(err, Error::NonFinite(_)), "{err}");
                    assert!(
                        err.to_string().contains(&format!("element {bad} ")),
                        "{err}"
                    );
                    assert_eq!(quantize_scalar(&x, s).unwrap_err(), err);
                }
            }
        }
        let h = [f16::from_f32(1.0), f16::NAN];
        assert!(matches!(
            quantize(&h, spec(2, Scheme::Affine, 2)),
            Err(Error::NonFinite(_))
        ));
        let b = [bf16::INFINITY, bf16::from_f32(1.0)];
        assert!(matches!(
            quantize(&b, spec(2, Scheme::Affine, 1)),
            Err(Error::NonFinite(_))
        ));
    }

    #[test]
    fn a_view_whose_codes_decode_past_f32_is_refused() {
        let codes = [0xffu8; 8];
        for scheme in Scheme::ALL {
            let s = spec(4, scheme, 16);
            let wide = QuantView::new(&codes, &[3e38], &[3e38], s, 16);
            assert!(matches!(wide, Err(Error::Value(m)) if m.contains("decodes past")));
            assert!(QuantView::new(&codes, &[1.0], &[-1.0], s, 16).is_ok());
        }
    }

    #[test]
    fn symmetric_represents_zero_exactly() {
        let mut x = data(3, 256, 1.0);
        x[17] = 0.0;
        x[200] = -0.0;
        for bits in 2..=8 {
            let (q, deq) = roundtrip(&x, spec(bits, Scheme::Symmetric, 128));
            assert_eq!(deq[17], 0.0, "bits={bits}");
            assert_eq!(deq[200], 0.0, "bits={bits}");
            assert_eq!(q.offset[0], -((1 << (bits - 1)) as f32) * q.scale[0]);
        }
    }

    #[test]
    fn one_bit_symmetric_is_the_sign() {
        let x = [0.5f32, -0.25, 0.0, -0.0, 1e-30, -1e-30, -0.75, 0.1];
        let (q, deq) = roundtrip(&x, spec(1, Scheme::Symmetric, 8));
        assert_eq!(q.scale[0], 1.5);
        assert_eq!(q.offset[0], -0.75);
        // Code = x ≥ 0 (−0.0 ≥ 0 too): bits 1,0,1,1,1,0,0,1 LSB first.
        assert_eq!(q.codes, vec![0b1001_1101]);
        for (v, d) in x.iter().zip(&deq) {
            assert_eq!(*d, if *v >= 0.0 { 0.75 } else { -0.75 });
        }
    }

    #[test]
    fn degenerate_groups_decode_exactly() {
        for scheme in Scheme::ALL {
            for bits in 1..=8 {
                let zeros = vec![0f32; 64];
                let (q, deq) = roundtrip(&zeros, spec(bits, scheme, 16));
                assert!(q.scale.iter().all(|&s| s == 0.0), "{scheme:?}");
                assert!(deq.iter().all(|&v| v == 0.0 && v.is_sign_positive()));
                if scheme == Scheme::Affine {
                    // Constant groups: scale 0, offset = the value, codes 0.
                    let c = vec![0.25f32; 64];
                    let (q, deq) = roundtrip(&c, spec(bits, scheme, 16));
                    assert!(q.codes.iter().all(|&b| b == 0));
                    assert!(deq.iter().all(|&v| v == 0.25));
                }
            }
        }
    }

    #[test]
    fn level_tables_have_the_documented_shape() {
        for bits in 1..=8u8 {
            let n = 1usize << bits;
            for scheme in [Scheme::Affine, Scheme::Symmetric] {
                let l = levels(spec(bits, scheme, 1));
                assert!((0..n).all(|c| l[c] == c as f32));
            }
            for scheme in [Scheme::Log, Scheme::Tanh] {
                let l = levels(spec(bits, scheme, 1));
                assert_eq!(l[0], -1.0);
                assert_eq!(l[n - 1], 1.0);
                assert!(l[..n].windows(2).all(|w| w[0] < w[1]), "{scheme:?} {bits}");
                // Antisymmetric: level c = −level (maxc − c).
                assert!((0..n).all(|c| (l[c] + l[n - 1 - c]).abs() <= 1e-6));
                // Steps grow away from zero (finer near zero).
                if bits >= 3 {
                    let mid = n / 2;
                    assert!(l[mid] - l[mid - 1] < l[n - 1] - l[n - 2]);
                }
                // Thresholds are the pre-images of the companded midpoints.
                let t = thresholds(scheme, bits);
                for c in 0..n - 1 {
                    let y = compress(scheme, t[c] as f64);
                    let mid = (2 * c + 1) as f64 / (n - 1) as f64 - 1.0;
                    assert!((y - mid).abs() < 1e-5, "{scheme:?} {bits} {c}");
                    assert!(l[c] < t[c] && t[c] < l[c + 1]);
                }
            }
        }
    }

    #[test]
    fn companded_codes_follow_the_definition() {
        // Nearest level in the companded domain, computed from the formula.
        for scheme in [Scheme::Log, Scheme::Tanh] {
            for bits in 1..=8u8 {
                let maxc = ((1u32 << bits) - 1) as f64;
                let x = data(bits as u64, 4096, 1.0);
                let q = quantize(&x, spec(bits, scheme, 4096)).unwrap();
                let mut codes = vec![0u8; x.len()];
                crate::pack::unpack(&q.codes, bits, 0, &mut codes).unwrap();
                let a = q.scale[0] as f64;
                for (v, &c) in x.iter().zip(&codes) {
                    let y = compress(scheme, *v as f64 / a);
                    let exact = (y + 1.0) / 2.0 * maxc;
                    let off = (exact - c as f64).abs();
                    // Differs from round() only within float noise of a tie.
                    assert!(off <= 0.5 + 1e-4, "{scheme:?} bits={bits} {exact} {c}");
                }
            }
        }
    }

    #[test]
    fn companding_is_bounded_and_finer_near_zero() {
        for scheme in [Scheme::Log, Scheme::Tanh] {
            for bits in 2..=8u8 {
                let x = data(9, 1 << 14, 1.0);
                let (q, deq) = roundtrip(&x, spec(bits, scheme, 1 << 14));
                let a = q.scale[0];
                let (l, t) = (levels(q.spec), thresholds(scheme, bits));
                let n = 1usize << bits;
                // Rounding in the companded domain puts each decision threshold
                // off the u-midpoint, so the bound is the larger side of each cell.
                let cell = (0..n - 1)
                    .map(|c| (t[c] - l[c]).max(l[c + 1] - t[c]))
                    .fold(0f32, f32::max);
                let err = |keep: &dyn Fn(f32) -> bool| {
                    x.iter()
                        .zip(&deq)
                        .filter(|(v, _)| keep(v.abs() / a))
                        .map(|(v, d)| (v - d).abs())
                        .fold(0f32, f32::max)
                };
                let all = err(&|_| true);
                assert!(
                    all <= a * cell * (1.0 + 1e-5),
                    "{scheme:?} {bits}: {all} vs cell {cell}"
                );
                // Sensible: the companded worst case (outermost cell) stays within
                // 8× the half step a uniform grid would have (measured: 5.5× for
                // log, 6.5× for tanh at 8 bits).
                if bits >= 3 {
                    let uniform_half_step = a / ((1u32 << bits) - 1) as f32;
                    assert!(all <= 8.0 * uniform_half_step, "{scheme:?} {bits}: {all}");
                }
                let near = err(&|u| u < 0.05);
                let far = err(&|u| u > 0.8);
                assert!(near < far, "{scheme:?} {bits}: near {near} vs far {far}");
            }
        }
    }

    #[test]
    fn extreme_magnitudes_stay_within_bounds() {
        // Large values whose ranges still decode in f32, and tiny subnormal
        // ranges whose 1/scale overflows (the f64 encoding path).
        let big = f32::MAX / 4.0;
        let mut x = data(5, 256, big);
        x[3] = -big;
        x[4] = big;
        let tiny: Vec<f32> = data(6, 256, 1.0).iter().map(|v| v * 1e-40).collect();
        for xs in [&x, &tiny] {
            for scheme in Scheme::ALL {
                for bits in 1..=8 {
                    let s = spec(bits, scheme, 64);
                    let (q, deq) = roundtrip(xs, s);
                    assert_eq!(q, quantize_scalar(xs, s).unwrap());
                    assert!(deq.iter().all(|v| v.is_finite()));
                    if !scheme.companded() {
                        assert_half_step(xs, &q, &deq);
                    }
                }
            }
        }
        // Ranges whose decoded values would overflow f32 are refused, naming the group.
        let wide = [0.0, 1.0, -f32::MAX, f32::MAX];
        let err = quantize(&wide, spec(1, Scheme::Affine, 2)).unwrap_err();
        assert!(
            matches!(err, Error::Value(ref m) if m.contains("group 1")),
            "{err}"
        );
        assert_eq!(
            quantize_scalar(&wide, spec(1, Scheme::Affine, 2)).unwrap_err(),
            err
        );
        // Symmetric 2-bit decodes 3·absmax − 2·absmax: 3·absmax must fit.
        let err = quantize(&[f32::MAX / 2.0, 0.0], spec(2, Scheme::Symmetric, 2)).unwrap_err();
        assert!(matches!(err, Error::Value(_)), "{err}");
        // Companded schemes decode level·absmax with |level| ≤ 1: any finite input fits.
        for scheme in [Scheme::Log, Scheme::Tanh] {
            let (_, deq) = roundtrip(&wide, spec(8, scheme, 4));
            assert_eq!(deq[2..], [-f32::MAX, f32::MAX]);
        }
    }

    /// Group lengths that exercise every path: tiny, odd, multiples of 8, the
    /// parallel-run path and the large-group path (above CHUNK).
    fn group_lens() -> impl Strategy<Value = usize> {
        prop_oneof![
            1usize..40,
            proptest::sample::select(vec![27usize, 64, 128, 576, 1000, 4097]),
            proptest::sample::select(vec![CHUNK - 1, CHUNK + 8, 3 * CHUNK + 5]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn affine_symmetric_error_within_half_step(
            bits in 1u8..=8, sym in any::<bool>(), groups in 1usize..30, gl in 1usize..400,
            seed in any::<u64>(), mag in prop_oneof![Just(1.0f32), 1e-6f32..1e4],
            shift in prop_oneof![Just(0.0f32), -1.0f32..1.0],
        ) {
            let scheme = if sym { Scheme::Symmetric } else { Scheme::Affine };
            // Shifted data gives groups that do not straddle zero.
            let x: Vec<f32> = data(seed, groups * gl, mag).iter().map(|v| v + shift * mag).collect();
            let (q, deq) = roundtrip(&x, spec(bits, scheme, gl));
            assert_half_step(&x, &q, &deq);
        }

        #[test]
        fn quantize_equals_scalar_twin(
            bits in 1u8..=8, scheme in proptest::sample::select(Scheme::ALL.to_vec()),
            gl in group_lens(), big in any::<bool>(), seed in any::<u64>(),
        ) {
            // `big` pushes the tensor above PARALLEL_MIN so the parallel runs are used.
            let want = if big { PARALLEL_MIN + 1000 } else { 3000 };
            let n = want.div_ceil(gl) * gl;
            let x = data(seed, n, 0.1);
            let s = spec(bits, scheme, gl);
            let fast = quantize(&x, s).unwrap();
            let slow = quantize_scalar(&x, s).unwrap();
            prop_assert_eq!(&fast.codes, &slow.codes);
            prop_assert!(same_bits(&fast.scale, &slow.scale));
            prop_assert!(same_bits(&fast.offset, &slow.offset));
        }

        #[test]
        fn dequantize_equals_scalar_twin(
            bits in 1u8..=8, scheme in proptest::sample::select(Scheme::ALL.to_vec()),
            gl in group_lens(), big in any::<bool>(), seed in any::<u64>(),
        ) {
            let want = if big { PARALLEL_MIN + 1000 } else { 3000 };
            let n = want.div_ceil(gl) * gl;
            let x = data(seed, n, 3.0);
            let q = quantize(&x, spec(bits, scheme, gl)).unwrap();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            dequantize(&q.view(), &mut a).unwrap();
            dequantize_scalar(&q.view(), &mut b).unwrap();
            prop_assert!(same_bits(&a, &b));
        }

        #[test]
        fn accumulate_range_equals_twin_and_formula(
            bits in 1u8..=8, scheme in proptest::sample::select(Scheme::ALL.to_vec()),
            gl in prop_oneof![1usize..40, proptest::sample::select(vec![27usize, 128, 576])],
            groups in 1usize..20, seed in any::<u64>(), alpha in -3.0f32..3.0,
            start_frac in 0.0f64..1.0, len_frac in 0.0f64..1.0,
        ) {
            let n = gl * groups;
            let x = data(seed, n, 0.5);
            let q = quantize(&x, spec(bits, scheme, gl)).unwrap();
            let v = q.view();
            // A byte-aligned window of any length, usually spanning several groups.
            let start = ((n as f64 * start_frac) as usize) / 8 * 8;
            let len = ((n - start) as f64 * len_frac) as usize;
            let init = data(seed ^ 7, len, 1.0);
            let (mut a, mut b, mut m) = (init.clone(), init.clone(), init.clone());
            let mut scratch = vec![0u8; len + 3];
            v.accumulate_range(alpha, start, &mut a, &mut scratch);
            v.accumulate_range_scalar(alpha, start, &mut b, &mut []);
            prop_assert!(same_bits(&a, &b));
            // Manual formula from the unpacked codes and the level table.
            let mut codes = vec![0u8; n];
            crate::pack::unpack(&q.codes, bits, 0, &mut codes).unwrap();
            let l = levels(q.spec);
            for (i, acc) in m.iter_mut().enumerate() {
                let e = start + i;
                let g = e / gl;
                *acc += l[codes[e] as usize] * (alpha * q.scale[g]) + alpha * q.offset[g];
            }
            prop_assert!(same_bits(&a, &m));
            // With α = 1 on a zero accumulator it is dequantize.
            let mut z = vec![0f32; len];
            v.accumulate_range(1.0, start, &mut z, &mut scratch);
            let mut full = vec![0f32; n];
            dequantize(&v, &mut full).unwrap();
            prop_assert!(z.iter().zip(&full[start..]).all(|(p, q)| p == q));
        }

        #[test]
        fn half_inputs_quantize_like_their_f32_values(
            bits in 1u8..=8, scheme in proptest::sample::select(Scheme::ALL.to_vec()),
            gl in prop_oneof![1usize..40, Just(128usize)], groups in 1usize..40, seed in any::<u64>(),
        ) {
            let x = data(seed, gl * groups, 2.0);
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let s = spec(bits, scheme, gl);
            let hf: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
            let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            let qh = quantize(&h, s).unwrap();
            prop_assert_eq!(&qh, &quantize(&hf, s).unwrap());
            prop_assert_eq!(&qh, &quantize_scalar(&h, s).unwrap());
            let qb = quantize(&b, s).unwrap();
            prop_assert_eq!(&qb, &quantize(&bf, s).unwrap());
            prop_assert_eq!(&qb, &quantize_scalar(&b, s).unwrap());
        }

        #[test]
        fn non_finite_anywhere_is_refused(
            n in 1usize..3000, gl_pick in 0usize..4, at in any::<prop::sample::Index>(),
            kind in 0u8..3, scheme in proptest::sample::select(Scheme::ALL.to_vec()),
        ) {
            let gl = [1, n, 8, 3][gl_pick];
            let n = n / gl * gl;
            prop_assume!(n > 0);
            let mut x = data(n as u64, n, 1.0);
            let i = at.index(n);
            x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][kind as usize];
            let s = spec(3, scheme, gl);
            let err = quantize(&x, s).unwrap_err();
            prop_assert!(err.to_string().contains(&format!("element {i} ")), "{}", err);
            prop_assert_eq!(quantize_scalar(&x, s).unwrap_err(), err);
        }
    }

    /// `cargo test -p robustpatch-core --release perf_ -- --ignored --nocapture`:
    /// quantize+pack of 64M f32 at 4 bits, groups of 128, against a memcpy of the
    /// same tensor, on 2 threads (the benchmark's target is ≤ 1.5×).
    #[test]
    #[ignore]
    fn perf_quantize_4bit_g128_vs_memcpy() {
        let n = 64 << 20;
        let x = data(11, n, 0.01);
        let mut dst = vec![0f32; n];
        dst.copy_from_slice(&x);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let best = |f: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let copy = best(&mut || dst.copy_from_slice(std::hint::black_box(&x)));
        let s = spec(4, Scheme::Affine, 128);
        let quant = pool.install(|| best(&mut || drop(std::hint::black_box(quantize(&x, s)))));
        let q = quantize(&x, s).unwrap();
        let deq = pool.install(|| best(&mut || dequantize(&q.view(), &mut dst).unwrap()));
        let mut scratch = vec![0u8; TILE];
        let acc = best(&mut || {
            let v = q.view();
            for (t, a) in dst.chunks_mut(TILE).enumerate() {
                v.accumulate_range(0.5, t * TILE, a, &mut scratch);
            }
        });
        println!(
            "memcpy {:.1} ms | quantize {:.1} ms ({:.2}x) | dequantize {:.1} ms | \
             accumulate (1 thread, baseline ISA) {:.1} ms",
            copy * 1e3,
            quant * 1e3,
            quant / copy,
            deq * 1e3,
            acc * 1e3
        );
    }
}
