//! Decoding: accumulate into f32 and dequantize (the apply / dot path).

use super::QuantView;
use crate::arch::{self, Simd};
use crate::error::{Error, Result};
use crate::pack::unpack_unchecked;
use crate::par::{CHUNK, PARALLEL_MIN, TILE};
use rayon::prelude::*;

impl QuantView<'_> {
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
        debug_assert!(
            start.is_multiple_of(8),
            "start {start} is not a multiple of 8"
        );
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
pub(super) fn code_at(packed: &[u8], bits: u8, e: usize) -> u8 {
    let b = bits as usize;
    let mut c = 0u8;
    for k in 0..b {
        let j = e * b + k;
        c |= ((packed[j / 8] >> (j % 8)) & 1) << k;
    }
    c
}

/// Decode all of `q` into `out` (`numel` values), in parallel.
/// `out[i] = level[code_i]·scale_g + offset_g`; errors `Shape` on a wrong length.
pub fn dequantize(q: &QuantView, out: &mut [f32]) -> Result<()> {
    dequantize_with(arch::selected()?, q, out)
}

/// [`dequantize`] on a given SIMD path (every path gives the same bits).
pub fn dequantize_with(simd: Simd, q: &QuantView, out: &mut [f32]) -> Result<()> {
    check_out(q, out.len())?;
    let run = |(c, o): (usize, &mut [f32])| {
        simd.run(
            #[inline(always)]
            || q.decode_range(c * CHUNK, o),
        )
    };
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

pub(super) fn check_out(q: &QuantView, n: usize) -> Result<()> {
    if n != q.numel {
        return Err(Error::Shape(format!(
            "output holds {n} values but the tensor has {}",
            q.numel
        )));
    }
    Ok(())
}
