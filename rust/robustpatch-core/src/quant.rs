//! Quantization of signature tensors to 1–8 bit codes.
//!
//! A tensor is cut into contiguous groups of `group_len` elements (the caller
//! maps granularities: per tensor = numel, per output channel = numel/shape[0],
//! per group = G). Every scheme decodes the same way,
//! `deq = level[code] · scale_g + offset_g`, so one decoder serves all:
//! - affine: levels are the integers, scale = (max−min)/(2^b−1), offset = min;
//! - symmetric: zero is exact; levels are the integers, offset = −2^(b−1)·scale;
//! - log / tanh: the robust-weight-signature paper's companding; scale = absmax,
//!   offset = 0, levels follow the inverse companding curve on [−1, 1].

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::pack::{pack_unchecked, packed_len, unpack_unchecked};
use crate::par::{CHUNK, PARALLEL_MIN};
use rayon::prelude::*;

/// μ of the log (μ-law) companding.
pub const LOG_MU: f32 = 255.0;
/// Steepness k of the tanh companding.
pub const TANH_K: f32 = 2.0;

/// How codes map to values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Affine,
    Symmetric,
    Log,
    Tanh,
}

impl Scheme {
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Affine => "affine",
            Scheme::Symmetric => "symmetric",
            Scheme::Log => "log",
            Scheme::Tanh => "tanh",
        }
    }

    pub fn parse(s: &str) -> Option<Scheme> {
        match s {
            "affine" => Some(Scheme::Affine),
            "symmetric" => Some(Scheme::Symmetric),
            "log" => Some(Scheme::Log),
            "tanh" => Some(Scheme::Tanh),
            _ => None,
        }
    }

    fn companded(self) -> bool {
        matches!(self, Scheme::Log | Scheme::Tanh)
    }
}

/// Bits, scheme and group length of one quantized tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    pub bits: u8,
    pub scheme: Scheme,
    pub group_len: usize,
}

impl QuantSpec {
    fn max_code(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// Validate against a tensor of `numel` elements; returns the group count.
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
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
    pub spec: QuantSpec,
    pub numel: usize,
}

impl Quantized {
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

/// A borrowed, validated quantized tensor.
#[derive(Debug, Clone, Copy)]
pub struct QuantView<'a> {
    pub codes: &'a [u8],
    pub scale: &'a [f32],
    pub offset: &'a [f32],
    pub spec: QuantSpec,
    pub numel: usize,
    levels: &'static [f32; 256],
}

impl<'a> QuantView<'a> {
    /// Validate lengths and values (scales finite and ≥ 0, offsets finite).
    pub fn new(
        codes: &'a [u8],
        scale: &'a [f32],
        offset: &'a [f32],
        spec: QuantSpec,
        numel: usize,
    ) -> Result<Self> {
        let groups = spec.check(numel)?;
        if codes.len() != packed_len(numel, spec.bits) {
            return Err(Error::Shape(format!(
                "{numel} codes of {} bits need {} bytes, got {}",
                spec.bits,
                packed_len(numel, spec.bits),
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
        if let Some(g) = (0..groups).find(|&g| !(scale[g].is_finite() && offset[g].is_finite())) {
            return Err(Error::NonFinite(format!(
                "group {g} has scale {} and offset {}",
                scale[g], offset[g]
            )));
        }
        if let Some(g) = scale.iter().position(|&s| s < 0.0) {
            return Err(Error::Value(format!(
                "group {g} has a negative scale {}",
                scale[g]
            )));
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

    /// `acc[i] += (α·scale_g)·level[code] + α·offset_g` for elements
    /// [start, start + acc.len()). `start` must be a multiple of 8 and
    /// `scratch` at least `acc.len()` long.
    #[inline(always)]
    pub fn accumulate_range(&self, alpha: f32, start: usize, acc: &mut [f32], scratch: &mut [u8]) {
        let codes = &mut scratch[..acc.len()];
        unpack_unchecked(self.codes, self.spec.bits, start, codes);
        self.for_each_segment(start, acc.len(), |g, r| {
            let (a, b) = (alpha * self.scale[g], alpha * self.offset[g]);
            let (acc, codes) = (&mut acc[r.clone()], &codes[r]);
            if self.spec.scheme.companded() {
                for (x, &c) in acc.iter_mut().zip(codes) {
                    *x += self.levels[c as usize] * a + b;
                }
            } else {
                for (x, &c) in acc.iter_mut().zip(codes) {
                    *x += c as f32 * a + b;
                }
            }
        });
    }

    /// Element-by-element reference twin of [`QuantView::accumulate_range`].
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
        let mut e = start;
        while e < start + len {
            let g = e / gl;
            let end = ((g + 1) * gl).min(start + len);
            f(g, e - start..end - start);
            e = end;
        }
    }
}

fn code_at(packed: &[u8], bits: u8, e: usize) -> u8 {
    let mut c = 0u8;
    for k in 0..bits as usize {
        let j = e * bits as usize + k;
        c |= ((packed[j / 8] >> (j % 8)) & 1) << k;
    }
    c
}

/// The decoded value of each code before scale/offset (2^bits entries used),
/// from a table built once per process.
pub fn levels(spec: QuantSpec) -> &'static [f32; 256] {
    static TABLES: std::sync::OnceLock<Vec<[f32; 256]>> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let schemes = [Scheme::Affine, Scheme::Symmetric, Scheme::Log, Scheme::Tanh];
        schemes
            .iter()
            .flat_map(|&scheme| (1..=8u8).map(move |bits| level_table(scheme, bits)))
            .collect()
    });
    let s = match spec.scheme {
        Scheme::Affine => 0,
        Scheme::Symmetric => 1,
        Scheme::Log => 2,
        Scheme::Tanh => 3,
    };
    &tables[s * 8 + spec.bits.clamp(1, 8) as usize - 1]
}

fn level_table(scheme: Scheme, bits: u8) -> [f32; 256] {
    let mut t = [0f32; 256];
    let maxc = ((1u32 << bits) - 1) as f32;
    for (c, l) in t.iter_mut().enumerate().take(1 << bits) {
        *l = match scheme {
            Scheme::Affine | Scheme::Symmetric => c as f32,
            Scheme::Log | Scheme::Tanh => expand(scheme, 2.0 * c as f32 / maxc - 1.0),
        };
    }
    t
}

/// Companding curve: [−1, 1] → [−1, 1], finer steps near zero.
#[inline]
fn compress(scheme: Scheme, u: f32) -> f32 {
    match scheme {
        Scheme::Log => u.signum() * (LOG_MU * u.abs()).ln_1p() / LOG_MU.ln_1p(),
        Scheme::Tanh => (TANH_K * u).tanh() / TANH_K.tanh(),
        _ => u,
    }
}

/// Inverse of [`compress`].
fn expand(scheme: Scheme, y: f32) -> f32 {
    match scheme {
        Scheme::Log => y.signum() * ((y.abs() * LOG_MU.ln_1p()).exp_m1() / LOG_MU),
        Scheme::Tanh => ((y * TANH_K.tanh()).clamp(-1.0, 1.0)).atanh() / TANH_K,
        _ => y,
    }
}

/// Per-group parameters: stored scale/offset plus what encoding needs.
#[derive(Clone, Copy)]
struct Params {
    scale: f32,
    offset: f32,
    /// Multiplier taking (x − offset) to code units (or x to [−1, 1] when companded).
    inv: f32,
    lo_code: f32,
}

/// Min, max and an all-finite flag of a slice, vectorization-friendly.
#[inline]
#[allow(clippy::eq_op)] // v - v is the finiteness probe, see below
fn min_max<T: Element>(x: &[T]) -> (f32, f32, bool) {
    let (mut lo, mut hi, mut z) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8], [0f32; 8]);
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let v = c[l].to_f32();
            lo[l] = if v < lo[l] { v } else { lo[l] };
            hi[l] = if v > hi[l] { v } else { hi[l] };
            // v − v is 0 for finite v and NaN for NaN/Inf: one flag for both.
            z[l] += v - v;
        }
    }
    for (l, v) in tail.iter().enumerate() {
        let v = v.to_f32();
        lo[l] = if v < lo[l] { v } else { lo[l] };
        hi[l] = if v > hi[l] { v } else { hi[l] };
        z[l] += v - v;
    }
    let fold = |a: [f32; 8], f: fn(f32, f32) -> f32| a.into_iter().fold(a[0], f);
    (
        fold(lo, f32::min),
        fold(hi, f32::max),
        z.iter().all(|v| *v == 0.0),
    )
}

impl Params {
    /// Encoding parameters from a stored scale and offset: in every scheme the
    /// multiplier is 1/scale (companded schemes store scale = absmax).
    fn stored(spec: QuantSpec, scale: f32, offset: f32) -> Params {
        // Symmetric codes start at 1 so that 2^(b−1) is exactly zero.
        let symmetric = spec.scheme == Scheme::Symmetric && spec.bits > 1;
        Params {
            scale,
            offset,
            inv: if scale > 0.0 { 1.0 / scale } else { 0.0 },
            lo_code: if symmetric { 1.0 } else { 0.0 },
        }
    }
}

fn params(spec: QuantSpec, lo: f32, hi: f32) -> Result<Params> {
    let absmax = lo.abs().max(hi.abs());
    let (scale, offset) = match spec.scheme {
        Scheme::Affine => (
            ((hi as f64 - lo as f64) / spec.max_code() as f64) as f32,
            lo,
        ),
        Scheme::Symmetric if spec.bits == 1 => (2.0 * absmax, -absmax),
        Scheme::Symmetric => {
            let half = (1u32 << (spec.bits - 1)) as f32;
            let scale = absmax / (half - 1.0);
            (scale, -half * scale)
        }
        Scheme::Log | Scheme::Tanh => (absmax, 0.0),
    };
    let p = Params::stored(spec, scale, offset);
    if !p.scale.is_finite() || !p.offset.is_finite() {
        return Err(Error::Value(format!(
            "value range [{lo:e}, {hi:e}] is too wide for f32 quantization parameters"
        )));
    }
    Ok(p)
}

/// Codes of one group's elements.
#[inline]
fn encode<T: Element>(spec: QuantSpec, p: Params, x: &[T], codes: &mut [u8]) {
    let maxc = spec.max_code();
    if spec.scheme.companded() {
        let half_span = 0.5 * maxc;
        for (c, v) in codes.iter_mut().zip(x) {
            let y = compress(spec.scheme, (v.to_f32() * p.inv).clamp(-1.0, 1.0));
            *c = ((y + 1.0) * half_span + 0.5).clamp(0.0, maxc) as u8;
        }
    } else {
        for (c, v) in codes.iter_mut().zip(x) {
            let y = ((v.to_f32() - p.offset) * p.inv).clamp(p.lo_code, maxc);
            *c = (y + 0.5) as u8;
        }
    }
}

fn non_finite_error<T: Element>(x: &[T], base: usize) -> Error {
    let i = x.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
    Error::NonFinite(format!(
        "element {} is {} (quantization needs finite values)",
        base + i,
        x[i].to_f32()
    ))
}

fn group_params<T: Element>(spec: QuantSpec, x: &[T], base: usize) -> Result<Params> {
    let (lo, hi, finite) = min_max(x);
    if !finite {
        return Err(non_finite_error(x, base));
    }
    params(spec, lo, hi)
}

/// Quantize `x`, in parallel over runs of whole groups.
pub fn quantize<T: Element>(x: &[T], spec: QuantSpec) -> Result<Quantized> {
    let groups = spec.check(x.len())?;
    let mut q = empty(spec, x.len(), groups);
    if x.len() < PARALLEL_MIN {
        quantize_run(x, spec, 0, &mut q.codes, &mut q.scale, &mut q.offset)?;
    } else if spec.group_len <= CHUNK {
        // Runs of whole groups whose element count is a multiple of 8, so each
        // run's packed bytes start on a byte boundary.
        let align = 8 / gcd(spec.group_len, 8);
        let per_run = (CHUNK / spec.group_len).max(1).div_ceil(align) * align;
        let elems = per_run * spec.group_len;
        let bytes = elems * spec.bits as usize / 8;
        x.par_chunks(elems)
            .zip(q.codes.par_chunks_mut(bytes))
            .zip(q.scale.par_chunks_mut(per_run))
            .zip(q.offset.par_chunks_mut(per_run))
            .enumerate()
            .try_for_each(|(r, (((xs, cs), ss), os))| {
                quantize_run(xs, spec, r * elems, cs, ss, os)
            })?;
    } else {
        quantize_large_groups(x, spec, &mut q)?;
    }
    Ok(q)
}

/// Single-threaded reference twin of [`quantize`]: identical bytes.
pub fn quantize_scalar<T: Element>(x: &[T], spec: QuantSpec) -> Result<Quantized> {
    let groups = spec.check(x.len())?;
    let mut q = empty(spec, x.len(), groups);
    let mut codes = vec![0u8; x.len()];
    for g in 0..groups {
        let r = g * spec.group_len..(g + 1) * spec.group_len;
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for (i, v) in x[r.clone()].iter().enumerate() {
            let v = v.to_f32();
            if !v.is_finite() {
                return Err(non_finite_error(&x[r.start + i..], r.start + i));
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let p = params(spec, lo, hi)?;
        q.scale[g] = p.scale;
        q.offset[g] = p.offset;
        encode(spec, p, &x[r.clone()], &mut codes[r]);
    }
    crate::pack::pack_scalar(&codes, spec.bits, &mut q.codes)?;
    Ok(q)
}

fn empty(spec: QuantSpec, numel: usize, groups: usize) -> Quantized {
    Quantized {
        codes: vec![0u8; packed_len(numel, spec.bits)],
        scale: vec![0f32; groups],
        offset: vec![0f32; groups],
        spec,
        numel,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Quantize a run of whole groups starting at element `base` (a multiple of 8).
fn quantize_run<T: Element>(
    x: &[T],
    spec: QuantSpec,
    base: usize,
    packed: &mut [u8],
    scale: &mut [f32],
    offset: &mut [f32],
) -> Result<()> {
    let mut codes = vec![0u8; x.len().min(CHUNK.max(spec.group_len))];
    // Encode in slices of whole groups that fit the code buffer, packing as we go.
    let per = (codes.len() / spec.group_len).max(1);
    let mut done = 0;
    for (g0, xs) in x.chunks(per * spec.group_len).enumerate() {
        for (k, gx) in xs.chunks(spec.group_len).enumerate() {
            let g = g0 * per + k;
            let p = group_params(spec, gx, base + g * spec.group_len)?;
            scale[g] = p.scale;
            offset[g] = p.offset;
            encode(
                spec,
                p,
                gx,
                &mut codes[k * spec.group_len..(k + 1) * spec.group_len],
            );
        }
        pack_into(&codes[..xs.len()], spec.bits, packed, done)?;
        done += xs.len();
    }
    Ok(())
}

/// Pack codes of elements [done, done + codes.len()) of a run into its bytes.
fn pack_into(codes: &[u8], bits: u8, packed: &mut [u8], done: usize) -> Result<()> {
    if done % 8 != 0 {
        // Only reached when a group is not a multiple of 8 and spans slices: fall back
        // to bitwise writes, which are exact at any offset.
        for (i, &c) in codes.iter().enumerate() {
            for k in 0..bits as usize {
                let j = (done + i) * bits as usize + k;
                packed[j / 8] = (packed[j / 8] & !(1 << (j % 8))) | (((c >> k) & 1) << (j % 8));
            }
        }
        return Ok(());
    }
    let start = done * bits as usize / 8;
    let end = start + packed_len(codes.len(), bits);
    pack_unchecked(codes, bits, &mut packed[start..end]);
    Ok(())
}

/// Groups longer than a parallel chunk (per-tensor or per-channel of large
/// layers): statistics in parallel per group, then encoding in parallel over
/// byte-aligned element chunks.
fn quantize_large_groups<T: Element>(x: &[T], spec: QuantSpec, q: &mut Quantized) -> Result<()> {
    let gl = spec.group_len;
    for g in 0..q.scale.len() {
        let gx = &x[g * gl..(g + 1) * gl];
        let parts: Vec<(f32, f32, bool)> = gx.par_chunks(CHUNK).map(min_max).collect();
        let lo = parts.iter().map(|p| p.0).fold(f32::INFINITY, f32::min);
        let hi = parts.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
        if !parts.iter().all(|p| p.2) {
            return Err(non_finite_error(gx, g * gl));
        }
        let p = params(spec, lo, hi)?;
        q.scale[g] = p.scale;
        q.offset[g] = p.offset;
    }
    let bytes = CHUNK * spec.bits as usize / 8;
    let (scale, offset) = (&q.scale, &q.offset);
    x.par_chunks(CHUNK)
        .zip(q.codes.par_chunks_mut(bytes))
        .enumerate()
        .for_each(|(c, (xs, out))| {
            let base = c * CHUNK;
            let mut codes = vec![0u8; xs.len()];
            let mut e = base;
            while e < base + xs.len() {
                let g = e / gl;
                let end = ((g + 1) * gl).min(base + xs.len());
                let p = Params::stored(spec, scale[g], offset[g]);
                encode(
                    spec,
                    p,
                    &xs[e - base..end - base],
                    &mut codes[e - base..end - base],
                );
                e = end;
            }
            pack_unchecked(&codes, spec.bits, out);
        });
    Ok(())
}

/// Decode all of `q` into `out` (numel values), in parallel.
pub fn dequantize(q: &QuantView, out: &mut [f32]) -> Result<()> {
    check_out(q, out.len())?;
    let run = |(c, o): (usize, &mut [f32])| {
        let mut scratch = vec![0u8; o.len()];
        o.fill(-0.0);
        q.accumulate_range(1.0, c * CHUNK, o, &mut scratch);
    };
    if out.len() < PARALLEL_MIN {
        out.chunks_mut(CHUNK).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(run);
    }
    Ok(())
}

/// Reference twin of [`dequantize`].
pub fn dequantize_scalar(q: &QuantView, out: &mut [f32]) -> Result<()> {
    check_out(q, out.len())?;
    out.fill(-0.0);
    q.accumulate_range_scalar(1.0, 0, out, &mut []);
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

    const SCHEMES: [Scheme; 4] = [Scheme::Affine, Scheme::Symmetric, Scheme::Log, Scheme::Tanh];

    fn data(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    fn roundtrip(x: &[f32], spec: QuantSpec) -> (Quantized, Vec<f32>) {
        let q = quantize(x, spec).unwrap();
        let mut deq = vec![0f32; x.len()];
        dequantize(&q.view(), &mut deq).unwrap();
        (q, deq)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn error_is_at_most_half_a_step(
            bits in 1u8..=8, sym in any::<bool>(), groups in 1usize..30, gl in 1usize..400,
            seed in any::<u64>(), mag in 1e-6f32..1e4,
        ) {
            let scheme = if sym { Scheme::Symmetric } else { Scheme::Affine };
            let x = data(seed, groups * gl, mag);
            let (q, deq) = roundtrip(&x, QuantSpec { bits, scheme, group_len: gl });
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (a, b)) in x.iter().zip(&deq).enumerate() {
                let (s, o) = (q.scale[i / gl], q.offset[i / gl]);
                // Half a step, plus the float rounding of code·scale + offset.
                let tol = 4.0 * f32::EPSILON * (amax + o.abs());
                prop_assert!((a - b).abs() <= s / 2.0 * (1.0 + 1e-6) + tol,
                    "x={a} deq={b} scale={s}");
            }
        }

        #[test]
        fn parallel_equals_scalar_twin(
            bits in 1u8..=8, scheme in proptest::sample::select(SCHEMES.to_vec()),
            gl in proptest::sample::select(vec![1usize, 3, 27, 128, 576, 70_000, 300_000]),
            groups in 1usize..4, seed in any::<u64>(),
        ) {
            // Sizes above PARALLEL_MIN exercise both parallel paths.
            let n = (gl * groups).max(1);
            let n = if n < 150_000 { n * (150_000 / n + 1) } else { n };
            let x = data(seed, n, 0.1);
            let spec = QuantSpec { bits, scheme, group_len: gl };
            let fast = quantize(&x, spec).unwrap();
            let slow = quantize_scalar(&x, spec).unwrap();
            prop_assert_eq!(&fast, &slow);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            dequantize(&fast.view(), &mut a).unwrap();
            dequantize_scalar(&fast.view(), &mut b).unwrap();
            prop_assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
            // accumulate_range == its twin on an aligned window, with alpha.
            let start = (n / 3) / 8 * 8;
            let len = (n - start).min(5000);
            let (mut acc1, mut acc2) = (vec![0.5f32; len], vec![0.5f32; len]);
            let mut scratch = vec![0u8; len];
            fast.view().accumulate_range(-0.75, start, &mut acc1, &mut scratch);
            fast.view().accumulate_range_scalar(-0.75, start, &mut acc2, &mut scratch);
            prop_assert!(acc1.iter().zip(&acc2).all(|(x, y)| x.to_bits() == y.to_bits()));
        }

        #[test]
        fn half_inputs_quantize_like_their_f32_values(bits in 1u8..=8, seed in any::<u64>()) {
            let x = data(seed, 1024, 1.0);
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let spec = QuantSpec { bits, scheme: Scheme::Affine, group_len: 128 };
            let hf: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
            let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            prop_assert_eq!(quantize(&h, spec).unwrap(), quantize(&hf, spec).unwrap());
            prop_assert_eq!(quantize(&b, spec).unwrap(), quantize(&bf, spec).unwrap());
        }
    }

    #[test]
    fn companding_is_finer_near_zero_and_bounded() {
        for scheme in [Scheme::Log, Scheme::Tanh] {
            let x = data(9, 1 << 14, 1.0);
            let (q, deq) = roundtrip(
                &x,
                QuantSpec {
                    bits: 4,
                    scheme,
                    group_len: 1 << 14,
                },
            );
            let a = q.scale[0];
            let err = |keep: fn(f32) -> bool| {
                x.iter()
                    .zip(&deq)
                    .filter(|(v, _)| keep(v.abs() / 0.9999))
                    .map(|(v, d)| (v - d).abs())
                    .fold(0f32, f32::max)
            };
            let near = err(|u| u < 0.05);
            let far = err(|u| u > 0.8);
            assert!(
                near < far,
                "{scheme:?}: near-zero error {near} vs far {far}"
            );
            assert!(far <= 0.25 * a, "{scheme:?}: max error {far} of absmax {a}");
        }
    }

    #[test]
    fn symmetric_represents_zero_exactly() {
        let mut x = data(3, 256, 1.0);
        x[17] = 0.0;
        for bits in 2..=8 {
            let (_, deq) = roundtrip(
                &x,
                QuantSpec {
                    bits,
                    scheme: Scheme::Symmetric,
                    group_len: 128,
                },
            );
            assert_eq!(deq[17], 0.0, "bits={bits}");
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let x = data(1, 12, 1.0);
        let spec = |bits, group_len| QuantSpec {
            bits,
            scheme: Scheme::Affine,
            group_len,
        };
        assert!(matches!(quantize(&x, spec(0, 4)), Err(Error::Value(_))));
        assert!(matches!(quantize(&x, spec(9, 4)), Err(Error::Value(_))));
        assert!(matches!(quantize(&x, spec(4, 5)), Err(Error::Shape(_))));
        assert!(matches!(quantize(&x, spec(4, 0)), Err(Error::Shape(_))));
        let mut bad = x.clone();
        bad[7] = f32::NAN;
        let err = quantize(&bad, spec(4, 4)).unwrap_err();
        assert!(err.to_string().contains("element 7"), "{err}");
        bad[7] = f32::INFINITY;
        assert!(quantize_scalar(&bad, spec(4, 12)).is_err());
        let q = quantize(&x, spec(4, 4)).unwrap();
        assert!(QuantView::new(&q.codes[1..], &q.scale, &q.offset, q.spec, 12).is_err());
        assert!(QuantView::new(&q.codes, &q.scale[1..], &q.offset, q.spec, 12).is_err());
        let nan_scale = [f32::NAN, 1.0, 1.0];
        assert!(matches!(
            QuantView::new(&q.codes, &nan_scale, &q.offset, q.spec, 12),
            Err(Error::NonFinite(_))
        ));
        // Constant groups decode exactly.
        let c = vec![0.25f32; 64];
        let (_, deq) = roundtrip(&c, spec(3, 16));
        assert!(deq.iter().all(|&v| v == 0.25));
    }
}
