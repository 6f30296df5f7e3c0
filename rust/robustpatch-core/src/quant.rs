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

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::pack::{pack_scalar, pack_unchecked, packed_len, unpack_unchecked};
use crate::par::{CHUNK, PARALLEL_MIN, TILE};
use rayon::prelude::*;
use std::sync::OnceLock;

/// μ of the log (μ-law) companding: y = sign(u)·ln(1+μ|u|)/ln(1+μ).
pub const LOG_MU: f32 = 255.0;
/// Steepness k of the tanh companding: y = tanh(k·u)/tanh(k).
pub const TANH_K: f32 = 2.0;

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
        if self.group_len == 0 || numel % self.group_len != 0 {
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
    /// negative scale, both naming the group.
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
        for (g, (&s, &o)) in scale.iter().zip(offset).enumerate() {
            if !(s.is_finite() && o.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "group {g} has scale {s} and offset {o}"
                )));
            }
            if s < 0.0 {
                return Err(Error::Value(format!("group {g} has a negative scale {s}")));
            }
        }
        Ok(QuantView {
            codes,
            scale,
            offset,
            spec,
            numel,
            levels: levels(spec),
        })
    }

    /// `acc[i] += (α·scale_g)·level[code] + α·offset_g` for the elements
    /// [start, start + acc.len()), which may span several groups.
    ///
    /// `start` must be a multiple of 8 (packed codes are byte-aligned there) and
    /// `scratch` at least `acc.len()` bytes (it receives the unpacked codes);
    /// a window past `numel` panics. The products are computed as
    /// `code as f32 * a + b` (never fused) so the loop vectorizes and matches
    /// [`QuantView::accumulate_range_scalar`] bit for bit.
    #[inline(always)]
    pub fn accumulate_range(&self, alpha: f32, start: usize, acc: &mut [f32], scratch: &mut [u8]) {
        debug_assert!(start % 8 == 0, "start {start} is not a multiple of 8");
        debug_assert!(scratch.len() >= acc.len());
        debug_assert!(start + acc.len() <= self.numel);
        let codes = &mut scratch[..acc.len()];
        unpack_unchecked(self.codes, self.spec.bits, start, codes);
        let linear = !self.spec.scheme.companded();
        let levels = self.levels;
        self.for_each_segment(start, acc.len(), |g, r| {
            let (a, b) = (alpha * self.scale[g], alpha * self.offset[g]);
            let (acc, codes) = (&mut acc[r.clone()], &codes[r]);
            if linear {
                for (x, &c) in acc.iter_mut().zip(codes) {
                    *x += c as f32 * a + b;
                }
            } else {
                for (x, &c) in acc.iter_mut().zip(codes) {
                    *x += levels[c as usize] * a + b;
                }
            }
        });
    }

    /// Element-by-element reference twin of [`QuantView::accumulate_range`]:
    /// codes read bit by bit, one group lookup per element. `scratch` is unused.
    pub fn accumulate_range_scalar(
        &self,
        alpha: f32,
        start: usize,
        acc: &mut [f32],
        _scratch: &mut [u8],
    ) {
        for (i, x) in acc.iter_mut().enumerate() {
            let e = start + i;
            let g = e / self.spec.group_len;
            let c = code_at(self.codes, self.spec.bits, e);
            *x += self.levels[c as usize] * (alpha * self.scale[g]) + alpha * self.offset[g];
        }
    }

    /// `out[i] = level[code]·scale_g + offset_g` for elements [start, start + out.len()),
    /// tile by tile so the unpacked codes stay in L1.
    #[inline(always)]
    fn decode_range(&self, start: usize, out: &mut [f32]) {
        let mut scratch = [0u8; TILE];
        let linear = !self.spec.scheme.companded();
        let levels = self.levels;
        for (t, o) in out.chunks_mut(TILE).enumerate() {
            let s = start + t * TILE;
            let codes = &mut scratch[..o.len()];
            unpack_unchecked(self.codes, self.spec.bits, s, codes);
            self.for_each_segment(s, o.len(), |g, r| {
                let (a, b) = (self.scale[g], self.offset[g]);
                let (o, codes) = (&mut o[r.clone()], &codes[r]);
                if linear {
                    for (x, &c) in o.iter_mut().zip(codes) {
                        *x = c as f32 * a + b;
                    }
                } else {
                    for (x, &c) in o.iter_mut().zip(codes) {
                        *x = levels[c as usize] * a + b;
                    }
                }
            });
        }
    }

    /// Call `f(group, local_range)` for each run of elements of one group
    /// inside [start, start + len).
    #[inline(always)]
    fn for_each_segment(
        &self,
        start: usize,
        len: usize,
        mut f: impl FnMut(usize, std::ops::Range<usize>),
    ) {
        let gl = self.spec.group_len;
        let end = start + len;
        let mut e = start;
        while e < end {
            let g = e / gl;
            let stop = ((g + 1) * gl).min(end);
            f(g, e - start..stop - start);
            e = stop;
        }
    }
}

/// Code of element `e`, read one bit at a time (reference path only).
fn code_at(packed: &[u8], bits: u8, e: usize) -> u8 {
    let b = bits as usize;
    let mut c = 0u8;
    for k in 0..b {
        let j = e * b + k;
        c |= ((packed[j / 8] >> (j % 8)) & 1) << k;
    }
    c
}

/// Index of a (scheme, bits) pair in the per-process tables.
fn table_index(scheme: Scheme, bits: u8) -> usize {
    let s = Scheme::ALL.iter().position(|&k| k == scheme).unwrap_or(0);
    s * 8 + bits.clamp(1, 8) as usize - 1
}

/// The value of each code before scale and offset: entries 0..2^bits are used,
/// the rest are zero. Integers for affine/symmetric, the inverse companding
/// curve sampled at y_c = 2c/(2^b−1) − 1 for log/tanh (computed in f64, then
/// rounded). Built once per process; `bits` outside 1..=8 is clamped.
pub fn levels(spec: QuantSpec) -> &'static [f32; 256] {
    static TABLES: OnceLock<Vec<[f32; 256]>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let mut v = Vec::with_capacity(32);
        for scheme in Scheme::ALL {
            for bits in 1..=8u8 {
                let maxc = ((1u32 << bits) - 1) as f64;
                let mut t = [0f32; 256];
                for (c, l) in t.iter_mut().enumerate().take(1 << bits) {
                    *l = match scheme {
                        Scheme::Affine | Scheme::Symmetric => c as f32,
                        _ => expand(scheme, 2.0 * c as f64 / maxc - 1.0) as f32,
                    };
                }
                v.push(t);
            }
        }
        v
    });
    &tables[table_index(spec.scheme, spec.bits)]
}

/// Decision thresholds of the companded schemes in the u = x/absmax domain:
/// entry c is the pre-image of the midpoint between companded levels c and c+1,
/// so "code = number of thresholds ≤ u" is exactly "nearest level in the
/// companded domain, ties upward" without evaluating ln/tanh per element.
/// Entries past 2^b − 2 are +∞ (never counted).
fn thresholds(scheme: Scheme, bits: u8) -> &'static [f32; 256] {
    static TABLES: OnceLock<Vec<[f32; 256]>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let mut v = Vec::with_capacity(32);
        for scheme in Scheme::ALL {
            for bits in 1..=8u8 {
                let maxc = ((1u32 << bits) - 1) as usize;
                let mut t = [f32::INFINITY; 256];
                for (c, th) in t.iter_mut().enumerate().take(maxc) {
                    let y = (2 * c + 1) as f64 / maxc as f64 - 1.0;
                    *th = expand(scheme, y) as f32;
                }
                v.push(t);
            }
        }
        v
    });
    &tables[table_index(scheme, bits)]
}

/// Inverse companding curve: y ∈ [−1, 1] → u ∈ [−1, 1].
fn expand(scheme: Scheme, y: f64) -> f64 {
    match scheme {
        Scheme::Log => {
            let mu = LOG_MU as f64;
            y.signum() * ((y.abs() * mu.ln_1p()).exp_m1() / mu)
        }
        Scheme::Tanh => {
            let k = TANH_K as f64;
            (y * k.tanh()).clamp(-1.0, 1.0).atanh() / k
        }
        Scheme::Affine | Scheme::Symmetric => y,
    }
}

/// Companding curve u → y (the scheme's definition; used by tests to check the
/// threshold tables).
#[cfg(test)]
fn compress(scheme: Scheme, u: f64) -> f64 {
    match scheme {
        Scheme::Log => {
            let mu = LOG_MU as f64;
            u.signum() * (mu * u.abs()).ln_1p() / mu.ln_1p()
        }
        Scheme::Tanh => {
            let k = TANH_K as f64;
            (k * u).tanh() / k.tanh()
        }
        Scheme::Affine | Scheme::Symmetric => u,
    }
}

/// How one group's elements become codes.
#[derive(Clone, Copy)]
enum Enc {
    /// code = rne((x − sub)·inv) + add, all in f32. No clamp is needed: x lies
    /// in its group's [min, max], so (x − sub)·inv stays within [0, maxc] (affine)
    /// or [−m, m] (symmetric) up to a few ulps of relative error, far from the
    /// ±0.5 that would change the rounded code (tests check every code fits).
    Linear { sub: f32, inv: f32, add: u8 },
    /// The same in f64 with a division, for groups whose scale is so small
    /// (subnormal) that 1/scale overflows f32.
    LinearWide {
        sub: f64,
        scale: f64,
        lo: f64,
        hi: f64,
        add: u8,
    },
    /// 1-bit symmetric: code = (x ≥ 0).
    Sign,
    /// code = #{thresholds ≤ x/absmax}.
    Companded {
        absmax: f32,
        thr: &'static [f32; 256],
        bits: u8,
    },
    /// Every element gets this code (all-zero companded group).
    Constant(u8),
}

/// Per-group parameters: what is stored plus how to encode.
#[derive(Clone, Copy)]
struct Params {
    scale: f32,
    offset: f32,
    enc: Enc,
}

impl Params {
    /// Placeholder for batch buffers; always overwritten before use.
    const UNSET: Params = Params {
        scale: 0.0,
        offset: 0.0,
        enc: Enc::Constant(0),
    };
}

/// Adding 1.5·2^23 to |y| < 2^22 leaves round-to-nearest-even(y) in the low
/// mantissa bits (two's complement for negative y): a rounding that vectorizes
/// to one add, unlike `f32::round` or a saturating `as` cast.
const RNE_MAGIC: f32 = 12_582_912.0;
const RNE_MAGIC_F64: f64 = 6_755_399_441_055_744.0;

#[inline(always)]
fn linear_code(x: f32, sub: f32, inv: f32, add: u8) -> u8 {
    let y = (x - sub) * inv;
    ((y + RNE_MAGIC).to_bits() as u8).wrapping_add(add)
}

#[inline(always)]
fn companded_code(u: f32, thr: &[f32; 256], bits: u8) -> u8 {
    // Branch-free lower bound over the 2^b − 1 sorted thresholds.
    let mut c = 0usize;
    let mut step = 1usize << (bits - 1);
    while step > 0 {
        c += if u >= thr[(c + step - 1) & 255] {
            step
        } else {
            0
        };
        step >>= 1;
    }
    c as u8
}

/// Codes of a slice of one group's elements.
#[inline(always)]
fn encode<T: Element>(p: &Params, x: &[T], out: &mut [u8]) {
    match p.enc {
        Enc::Linear { sub, inv, add } => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = linear_code(v.to_f32(), sub, inv, add);
            }
        }
        Enc::LinearWide {
            sub,
            scale,
            lo,
            hi,
            add,
        } => {
            for (o, v) in out.iter_mut().zip(x) {
                let y = ((v.to_f32() as f64 - sub) / scale).clamp(lo, hi);
                *o = ((y + RNE_MAGIC_F64).to_bits() as u8).wrapping_add(add);
            }
        }
        Enc::Sign => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = (v.to_f32() >= 0.0) as u8;
            }
        }
        Enc::Companded { absmax, thr, bits } => {
            for (o, v) in out.iter_mut().zip(x) {
                *o = companded_code(v.to_f32() / absmax, thr, bits);
            }
        }
        Enc::Constant(c) => out[..x.len()].fill(c),
    }
}

/// Group parameters from its ±0-normalised minimum and maximum, or None when
/// they are not finite or a stored parameter or a decoded value
/// `level·scale + offset` would overflow f32 (the decoder works in f32, so such
/// a range cannot be represented faithfully). Runs once per group on the hot
/// path, hence inline and free of formatting.
#[inline(always)]
fn params(spec: QuantSpec, lo: f32, hi: f32) -> Option<Params> {
    let absmax = lo.abs().max(hi.abs());
    let maxc = spec.max_code();
    // Linear schemes encode in f32 unless 1/scale overflows (subnormal scale).
    let linear = |sub: f32, scale: f32, lo_c: f32, hi_c: f32, add: u8| {
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        if inv.is_finite() {
            Enc::Linear { sub, inv, add }
        } else {
            Enc::LinearWide {
                sub: sub as f64,
                scale: scale as f64,
                lo: lo_c as f64,
                hi: hi_c as f64,
                add,
            }
        }
    };
    let p = match spec.scheme {
        Scheme::Affine => {
            // The exact range in f64, rounded once to f32.
            let scale = ((hi as f64 - lo as f64) / maxc as f64) as f32;
            Params {
                scale,
                offset: lo,
                enc: linear(lo, scale, 0.0, maxc as f32, 0),
            }
        }
        Scheme::Symmetric if spec.bits == 1 => Params {
            scale: 2.0 * absmax,
            offset: -absmax + 0.0,
            enc: Enc::Sign,
        },
        Scheme::Symmetric => {
            let half = 1u32 << (spec.bits - 1);
            let m = (half - 1) as f32;
            let scale = absmax / m;
            Params {
                scale,
                // −half·scale is exact (a power of two); + 0.0 turns −0 into +0.
                offset: -(half as f32) * scale + 0.0,
                enc: linear(0.0, scale, -m, m, half as u8),
            }
        }
        Scheme::Log | Scheme::Tanh => {
            let thr = thresholds(spec.scheme, spec.bits);
            let enc = if absmax > 0.0 {
                Enc::Companded {
                    absmax,
                    thr,
                    bits: spec.bits,
                }
            } else {
                Enc::Constant(companded_code(0.0, thr, spec.bits))
            };
            Params {
                scale: absmax,
                offset: 0.0,
                enc,
            }
        }
    };
    // Levels reach maxc (linear) or 1 (companded): the largest decoded product.
    let top_level = if spec.scheme.companded() {
        1.0
    } else {
        maxc as f32
    };
    let top = top_level * p.scale;
    (lo.is_finite()
        && hi.is_finite()
        && p.scale.is_finite()
        && p.offset.is_finite()
        && top.is_finite())
    .then_some(p)
}

/// The error for a group whose range [`params`] refused.
fn range_error(spec: QuantSpec, lo: f32, hi: f32, group: usize) -> Error {
    Error::Value(format!(
        "group {group}: value range [{lo:e}, {hi:e}] is too wide to decode in f32 at {} bits",
        spec.bits
    ))
}

/// Order-preserving map of f32 to i32: for finite values `a < b ⇔ key(a) < key(b)`
/// (and −0 < +0), so min/max become integer reductions, which the loop
/// vectorizer handles in plain loops (float min/max reductions it will not
/// vectorize without fast-math; hand-unrolled float lanes were measured to turn
/// into shuffle-heavy SLP code). NaN and ±Inf map beyond every finite key, so
/// any non-finite element shows up in the group's minimum or maximum: the
/// finiteness check costs nothing extra.
#[inline(always)]
fn key(v: f32) -> i32 {
    let i = v.to_bits() as i32;
    i ^ ((i >> 31) & 0x7FFF_FFFF)
}

/// Inverse of [`key`] (the map is an involution).
#[inline(always)]
fn unkey(k: i32) -> f32 {
    f32::from_bits((k ^ ((k >> 31) & 0x7FFF_FFFF)) as u32)
}

/// Minimum and maximum keys of a slice, in one vectorized pass.
#[inline(always)]
fn key_range<T: Element>(x: &[T]) -> (i32, i32) {
    let (mut lo, mut hi) = (i32::MAX, i32::MIN);
    for v in x {
        let k = key(v.to_f32());
        lo = lo.min(k);
        hi = hi.max(k);
    }
    (lo, hi)
}

/// Minimum and maximum of a non-empty group as floats, ±0 normalised to +0 so
/// the result does not depend on how the scan was split (the parallel and
/// scalar paths must store identical offsets). Either is non-finite when the
/// group holds a NaN or ±Inf.
#[inline(always)]
fn min_max<T: Element>(x: &[T]) -> (f32, f32) {
    let (lo, hi) = key_range(x);
    (unkey(lo) + 0.0, unkey(hi) + 0.0)
}

/// Minimum and maximum of one group, element by element, or the error the
/// scalar path reports for it (first non-finite element). `first` is the
/// group's first element index.
fn group_range_scalar<T: Element>(
    gx: &[T],
    first: usize,
) -> std::result::Result<(f32, f32), Error> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (i, v) in gx.iter().enumerate() {
        let v = v.to_f32();
        if !v.is_finite() {
            return Err(non_finite(&gx[i..], first + i));
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    Ok((lo + 0.0, hi + 0.0))
}

/// The first error in whole groups `x` starting at element `base`, found the
/// way the scalar twin finds it (slow; only run once something failed).
#[cold]
fn first_error<T: Element>(x: &[T], spec: QuantSpec, base: usize) -> (usize, Error) {
    let gl = spec.group_len;
    for (g, gx) in x.chunks_exact(gl).enumerate() {
        let first = base + g * gl;
        match group_range_scalar(gx, first) {
            Err(e) => return (first, e),
            Ok((lo, hi)) => {
                if params(spec, lo, hi).is_none() {
                    return (first, range_error(spec, lo, hi, first / gl));
                }
            }
        }
    }
    unreachable!("first_error called on groups without an error")
}

/// Error for the first non-finite element of `x`, which starts at element `base`.
fn non_finite<T: Element>(x: &[T], base: usize) -> Error {
    let i = x.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
    Error::NonFinite(format!(
        "element {} is {} (quantization needs finite values)",
        base + i,
        x[i].to_f32()
    ))
}

/// A first-error-wins result: the element index orders errors from parallel runs
/// so the reported one is the one the scalar twin reports.
type RunResult = std::result::Result<(), (usize, Error)>;

/// Codes pass through an L1-sized tile on their way into the packed output.
struct Packer<'a> {
    bits: u8,
    buf: [u8; TILE],
    fill: usize,
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> Packer<'a> {
    #[inline(always)]
    fn new(bits: u8, out: &'a mut [u8]) -> Self {
        Packer {
            bits,
            buf: [0u8; TILE],
            fill: 0,
            out,
            pos: 0,
        }
    }

    /// Encode `x` (elements of one group) and append their codes.
    #[inline(always)]
    fn push<T: Element>(&mut self, mut x: &[T], p: &Params) {
        while !x.is_empty() {
            let take = x.len().min(TILE - self.fill);
            encode(p, &x[..take], &mut self.buf[self.fill..self.fill + take]);
            self.fill += take;
            x = &x[take..];
            if self.fill == TILE {
                self.flush();
            }
        }
    }

    /// Pack the buffered codes. Only called with a full tile (a multiple of 8
    /// codes, so the next write stays byte-aligned) or at the very end.
    #[inline(always)]
    fn flush(&mut self) {
        let n = packed_len(self.fill, self.bits);
        pack_unchecked(
            &self.buf[..self.fill],
            self.bits,
            &mut self.out[self.pos..self.pos + n],
        );
        self.pos += n;
        self.fill = 0;
    }

    #[inline(always)]
    fn finish(mut self) {
        if self.fill > 0 {
            self.flush();
        }
        debug_assert_eq!(self.pos, self.out.len());
    }
}

/// Quantize whole groups `x` whose first element is `base` (a multiple of 8),
/// writing their scales, offsets and packed bytes.
#[inline(always)]
fn quantize_groups<T: Element>(
    x: &[T],
    spec: QuantSpec,
    base: usize,
    packed: &mut [u8],
    scale: &mut [f32],
    offset: &mut [f32],
) -> RunResult {
    let gl = spec.group_len;
    let mut packer = Packer::new(spec.bits, packed);
    // Groups are handled a batch at a time (about one tile of elements): all
    // min/max first, then all parameters, then all codes. The parameters of
    // different groups are independent, so their divisions overlap instead of
    // stalling each group's encoding behind its own (measured ~25% faster at
    // group 128 than group-at-a-time).
    let batch = (TILE / gl).clamp(1, BATCH);
    let mut ranges = [(0f32, 0f32); BATCH];
    let mut ps = [Params::UNSET; BATCH];
    for (b, bx) in x.chunks(batch * gl).enumerate() {
        let n = bx.len() / gl;
        for (r, gx) in ranges.iter_mut().zip(bx.chunks_exact(gl)) {
            *r = min_max(gx);
        }
        for (p, &(lo, hi)) in ps[..n].iter_mut().zip(&ranges[..n]) {
            // A NaN or ±Inf shows in lo/hi and is refused here.
            let Some(v) = params(spec, lo, hi) else {
                return Err(first_error(x, spec, base));
            };
            *p = v;
        }
        let g0 = b * batch;
        for (j, (p, gx)) in ps[..n].iter().zip(bx.chunks_exact(gl)).enumerate() {
            scale[g0 + j] = p.scale;
            offset[g0 + j] = p.offset;
            packer.push(gx, p);
        }
    }
    packer.finish();
    Ok(())
}

/// Most groups per batch in [`quantize_groups`].
const BATCH: usize = 32;

/// Encode elements [base, base + x.len()) of a tensor whose groups have
/// parameters `params_g` (large-group path; `base` is a multiple of 8).
#[inline(always)]
fn encode_span<T: Element>(
    x: &[T],
    base: usize,
    gl: usize,
    params_g: &[Params],
    bits: u8,
    out: &mut [u8],
) {
    let mut packer = Packer::new(bits, out);
    let mut e = base;
    while e < base + x.len() {
        let g = e / gl;
        let stop = ((g + 1) * gl).min(base + x.len());
        packer.push(&x[e - base..stop - base], &params_g[g]);
        e = stop;
    }
    packer.finish();
}

/// Min/max keys of a chunk (large-group path; see [`key`]).
#[inline(always)]
fn chunk_range<T: Element>(x: &[T]) -> (i32, i32) {
    key_range(x)
}

/// The hot loops compiled for AVX2/FMA/F16C. Each wrapper calls an
/// `#[inline(always)]` function, so its whole body is compiled with the
/// features. (Passing a closure to `simd::dispatch` was measured to leave the
/// closure body at baseline SSE2: the closure is not inlined into the wrapper.)
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_groups<T: Element>(
        x: &[T],
        spec: QuantSpec,
        base: usize,
        packed: &mut [u8],
        scale: &mut [f32],
        offset: &mut [f32],
    ) -> RunResult {
        super::quantize_groups(x, spec, base, packed, scale, offset)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn encode_span<T: Element>(
        x: &[T],
        base: usize,
        gl: usize,
        params_g: &[Params],
        bits: u8,
        out: &mut [u8],
    ) {
        super::encode_span(x, base, gl, params_g, bits, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn chunk_range<T: Element>(x: &[T]) -> (i32, i32) {
        super::chunk_range(x)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode_range(q: &QuantView, start: usize, out: &mut [f32]) {
        q.decode_range(start, out)
    }
}

/// True when the AVX2 wrappers may run (checked once per task, not per element).
#[inline(always)]
fn use_avx2() -> bool {
    cfg!(target_arch = "x86_64") && crate::simd::has_avx2()
}

fn run_groups<T: Element>(
    x: &[T],
    spec: QuantSpec,
    base: usize,
    packed: &mut [u8],
    scale: &mut [f32],
    offset: &mut [f32],
) -> RunResult {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU features were detected at run time.
        return unsafe { avx2::quantize_groups(x, spec, base, packed, scale, offset) };
    }
    quantize_groups(x, spec, base, packed, scale, offset)
}

fn run_encode_span<T: Element>(
    x: &[T],
    base: usize,
    gl: usize,
    params_g: &[Params],
    bits: u8,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU features were detected at run time.
        return unsafe { avx2::encode_span(x, base, gl, params_g, bits, out) };
    }
    encode_span(x, base, gl, params_g, bits, out)
}

fn run_chunk_range<T: Element>(x: &[T]) -> (i32, i32) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU features were detected at run time.
        return unsafe { avx2::chunk_range(x) };
    }
    chunk_range(x)
}

fn run_decode_range(q: &QuantView, start: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU features were detected at run time.
        return unsafe { avx2::decode_range(q, start, out) };
    }
    q.decode_range(start, out)
}

fn empty(spec: QuantSpec, numel: usize, groups: usize) -> Quantized {
    Quantized {
        codes: zeroed(packed_len(numel, spec.bits)),
        scale: zeroed(groups),
        offset: zeroed(groups),
        spec,
        numel,
    }
}

/// A zeroed vector for an output about to be written once. Large ones are
/// advised to use transparent huge pages on Linux: first-touch page faults of a
/// fresh 32 MB code buffer were measured at 10 ms (serialised across threads,
/// in a VM), as long as quantizing the 256 MB it encodes; with huge pages 2 ms.
fn zeroed<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    advise_huge_pages(&mut v);
    v
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn advise_huge_pages<T>(v: &mut [T]) {
    use std::ffi::{c_int, c_void};
    extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
    const MADV_HUGEPAGE: c_int = 14;
    const HUGE: usize = 2 << 20;
    let start = v.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(v);
    // Only whole 2 MB extents inside the buffer: nothing outside it is touched.
    let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    if b > a {
        // SAFETY: [a, b) lies inside memory this vector owns; MADV_HUGEPAGE is
        // advisory and never changes contents. A failure (THP disabled) is harmless.
        unsafe {
            madvise(a as *mut c_void, b - a, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn advise_huge_pages<T>(_v: &mut [T]) {}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Quantize `x` with `spec`, in parallel (rayon) over runs of whole groups.
///
/// Errors: as [`QuantSpec::check`]; `NonFinite` naming the first NaN/Inf
/// element; `Value` naming the group when a range needs a scale beyond f32.
/// Produces exactly the bytes (and errors) of [`quantize_scalar`].
pub fn quantize<T: Element>(x: &[T], spec: QuantSpec) -> Result<Quantized> {
    let groups = spec.check(x.len())?;
    let mut q = empty(spec, x.len(), groups);
    let res = if x.len() < PARALLEL_MIN {
        run_groups(x, spec, 0, &mut q.codes, &mut q.scale, &mut q.offset)
    } else if spec.group_len <= CHUNK {
        // Runs of k whole groups with k·group_len a multiple of 8, so every run
        // owns whole packed bytes and starts byte-aligned.
        let gl = spec.group_len;
        let align = 8 / gcd(gl, 8);
        let per_run = CHUNK.div_ceil(gl).div_ceil(align) * align;
        let elems = per_run * gl;
        let bytes = elems / 8 * spec.bits as usize;
        x.par_chunks(elems)
            .zip(q.codes.par_chunks_mut(bytes))
            .zip(q.scale.par_chunks_mut(per_run))
            .zip(q.offset.par_chunks_mut(per_run))
            .enumerate()
            .filter_map(|(r, (((xs, cs), ss), os))| {
                run_groups(xs, spec, r * elems, cs, ss, os).err()
            })
            // The lowest element index wins: the error the scalar twin reports.
            .min_by_key(|e| e.0)
            .map_or(Ok(()), Err)
    } else {
        quantize_large_groups(x, spec, &mut q)
    };
    res.map_err(|(_, e)| e)?;
    Ok(q)
}

/// Groups longer than a parallel chunk: each group's min/max in parallel, then
/// encoding in parallel over byte-aligned element chunks (two reads of the
/// input; a group this large does not stay in cache anyway).
fn quantize_large_groups<T: Element>(x: &[T], spec: QuantSpec, q: &mut Quantized) -> RunResult {
    let gl = spec.group_len;
    let mut params_g = Vec::with_capacity(q.scale.len());
    for (g, gx) in x.chunks_exact(gl).enumerate() {
        let first = g * gl;
        let (lo, hi) = gx
            .par_chunks(CHUNK)
            .map(run_chunk_range)
            .reduce(|| (i32::MAX, i32::MIN), |a, b| (a.0.min(b.0), a.1.max(b.1)));
        let Some(p) = params(spec, unkey(lo) + 0.0, unkey(hi) + 0.0) else {
            return Err(first_error(gx, spec, first));
        };
        q.scale[g] = p.scale;
        q.offset[g] = p.offset;
        params_g.push(p);
    }
    let bytes = CHUNK / 8 * spec.bits as usize;
    x.par_chunks(CHUNK)
        .zip(q.codes.par_chunks_mut(bytes))
        .enumerate()
        .for_each(|(c, (xs, out))| run_encode_span(xs, c * CHUNK, gl, &params_g, spec.bits, out));
    Ok(())
}

/// Single-threaded reference twin of [`quantize`]: group by group with plain
/// loops, codes collected in full and packed bit by bit. Identical bytes and
/// identical errors.
pub fn quantize_scalar<T: Element>(x: &[T], spec: QuantSpec) -> Result<Quantized> {
    let groups = spec.check(x.len())?;
    let mut q = empty(spec, x.len(), groups);
    let mut codes = vec![0u8; x.len()];
    let gl = spec.group_len;
    for g in 0..groups {
        let r = g * gl..(g + 1) * gl;
        let (lo, hi) = group_range_scalar(&x[r.clone()], r.start)?;
        let p = params(spec, lo, hi).ok_or_else(|| range_error(spec, lo, hi, g))?;
        q.scale[g] = p.scale;
        q.offset[g] = p.offset;
        for (c, v) in codes[r.clone()].iter_mut().zip(&x[r]) {
            encode(&p, std::slice::from_ref(v), std::slice::from_mut(c));
        }
    }
    pack_scalar(&codes, spec.bits, &mut q.codes)?;
    Ok(q)
}

/// Decode all of `q` into `out` (`numel` values), in parallel.
/// `out[i] = level[code_i]·scale_g + offset_g`; errors `Shape` on a wrong length.
pub fn dequantize(q: &QuantView, out: &mut [f32]) -> Result<()> {
    check_out(q, out.len())?;
    let run = |(c, o): (usize, &mut [f32])| run_decode_range(q, c * CHUNK, o);
    if out.len() < PARALLEL_MIN {
        out.chunks_mut(CHUNK).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(run);
    }
    Ok(())
}

/// Reference twin of [`dequantize`]: element by element, bit-identical.
pub fn dequantize_scalar(q: &QuantView, out: &mut [f32]) -> Result<()> {
    check_out(q, out.len())?;
    for (e, x) in out.iter_mut().enumerate() {
        let g = e / q.spec.group_len;
        let c = code_at(q.codes, q.spec.bits, e);
        *x = q.levels[c as usize] * q.scale[g] + q.offset[g];
    }
    Ok(())
}

fn check_out(q: &QuantView, n: usize) -> Result<()> {
    if n != q.numel {
        return Err(Error::Shape(format!(
            "output holds {n} values but the tensor has {}",
            q.numel
        )));
    }
    Ok(())
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
            let tol = s / 2.0 * (1.0 + 1e-6) + 1e-7 * amax;
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
