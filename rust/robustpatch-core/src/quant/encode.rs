//! Encoding: per-group parameters, codes and packing (the `quantize` path).

use super::tables::thresholds;
use super::{QuantSpec, Quantized, Scheme};
use crate::arch::{self, Simd};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::pack::{pack_scalar, pack_unchecked, packed_len};
use crate::par::{CHUNK, PARALLEL_MIN, TILE};
use rayon::prelude::*;

/// How one group's elements become codes.
#[derive(Clone, Copy)]
pub(super) enum Enc {
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
pub(super) struct Params {
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
pub(super) const RNE_MAGIC: f32 = 12_582_912.0;
pub(super) const RNE_MAGIC_F64: f64 = 6_755_399_441_055_744.0;

#[inline(always)]
pub(super) fn linear_code(x: f32, sub: f32, inv: f32, add: u8) -> u8 {
    let y = (x - sub) * inv;
    ((y + RNE_MAGIC).to_bits() as u8).wrapping_add(add)
}

#[inline(always)]
pub(super) fn companded_code(u: f32, thr: &[f32; 256], bits: u8) -> u8 {
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
pub(super) fn encode<T: Element>(p: &Params, x: &[T], out: &mut [u8]) {
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
pub(super) fn params(spec: QuantSpec, lo: f32, hi: f32) -> Option<Params> {
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
    // Affine codes come from x − lo, and decode to level·scale + offset: both must stay
    // in range too (past f32, the largest element got code 0, or decoded to Inf).
    let affine_ok =
        spec.scheme != Scheme::Affine || ((hi - lo).is_finite() && (top + p.offset).is_finite());
    (lo.is_finite()
        && hi.is_finite()
        && p.scale.is_finite()
        && p.offset.is_finite()
        && top.is_finite()
        && affine_ok)
        .then_some(p)
}

/// The error for a group whose range [`params`] refused.
pub(super) fn range_error(spec: QuantSpec, lo: f32, hi: f32, group: usize) -> Error {
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
pub(super) fn key(v: f32) -> i32 {
    let i = v.to_bits() as i32;
    i ^ ((i >> 31) & 0x7FFF_FFFF)
}

/// Inverse of [`key`] (the map is an involution).
#[inline(always)]
pub(super) fn unkey(k: i32) -> f32 {
    f32::from_bits((k ^ ((k >> 31) & 0x7FFF_FFFF)) as u32)
}

/// Minimum and maximum keys of a slice, in one vectorized pass.
#[inline(always)]
pub(super) fn key_range<T: Element>(x: &[T]) -> (i32, i32) {
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
pub(super) fn min_max<T: Element>(x: &[T]) -> (f32, f32) {
    let (lo, hi) = key_range(x);
    (unkey(lo) + 0.0, unkey(hi) + 0.0)
}

/// Minimum and maximum of one group, element by element, or the error the
/// scalar path reports for it (first non-finite element). `first` is the
/// group's first element index.
pub(super) fn group_range_scalar<T: Element>(
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
pub(super) fn first_error<T: Element>(x: &[T], spec: QuantSpec, base: usize) -> (usize, Error) {
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
pub(super) fn non_finite<T: Element>(x: &[T], base: usize) -> Error {
    let i = x.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
    Error::NonFinite(format!(
        "element {} is {} (quantization needs finite values)",
        base + i,
        x[i].to_f32()
    ))
}

/// A first-error-wins result: the element index orders errors from parallel runs
/// so the reported one is the one the scalar twin reports.
pub(super) type RunResult = std::result::Result<(), (usize, Error)>;

/// Codes pass through an L1-sized tile on their way into the packed output.
pub(super) struct Packer<'a> {
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
pub(super) fn quantize_groups<T: Element>(
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
pub(super) const BATCH: usize = 32;

/// Encode elements [base, base + x.len()) of a tensor whose groups have
/// parameters `params_g` (large-group path; `base` is a multiple of 8).
#[inline(always)]
pub(super) fn encode_span<T: Element>(
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

pub(super) fn empty(spec: QuantSpec, numel: usize, groups: usize) -> Quantized {
    Quantized {
        codes: vec![0; packed_len(numel, spec.bits)],
        scale: vec![0.0; groups],
        offset: vec![0.0; groups],
        spec,
        numel,
    }
}

pub(super) fn gcd(a: usize, b: usize) -> usize {
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
    quantize_with(arch::selected()?, x, spec)
}

/// [`quantize`] on a given SIMD path (every path gives the same bytes).
pub fn quantize_with<T: Element>(simd: Simd, x: &[T], spec: QuantSpec) -> Result<Quantized> {
    let groups = spec.check(x.len())?;
    let mut q = empty(spec, x.len(), groups);
    let res = if x.len() < PARALLEL_MIN {
        let (codes, scale, offset) = (&mut q.codes, &mut q.scale, &mut q.offset);
        simd.run(
            #[inline(always)]
            || quantize_groups(x, spec, 0, codes, scale, offset),
        )
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
                simd.run(
                    #[inline(always)]
                    || quantize_groups(xs, spec, r * elems, cs, ss, os),
                )
                .err()
            })
            // The lowest element index wins: the error the scalar twin reports.
            .min_by_key(|e| e.0)
            .map_or(Ok(()), Err)
    } else {
        quantize_large_groups(simd, x, spec, &mut q)
    };
    res.map_err(|(_, e)| e)?;
    Ok(q)
}

/// Groups longer than a parallel chunk: each group's min/max in parallel, then
/// encoding in parallel over byte-aligned element chunks (two reads of the
/// input; a group this large does not stay in cache anyway).
pub(super) fn quantize_large_groups<T: Element>(
    simd: Simd,
    x: &[T],
    spec: QuantSpec,
    q: &mut Quantized,
) -> RunResult {
    let gl = spec.group_len;
    let mut params_g = Vec::with_capacity(q.scale.len());
    for (g, gx) in x.chunks_exact(gl).enumerate() {
        let first = g * gl;
        let (lo, hi) = gx
            .par_chunks(CHUNK)
            .map(|c| {
                simd.run(
                    #[inline(always)]
                    || key_range(c),
                )
            })
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
        .for_each(|(c, (xs, out))| {
            simd.run(
                #[inline(always)]
                || encode_span(xs, c * CHUNK, gl, &params_g, spec.bits, out),
            )
        });
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
