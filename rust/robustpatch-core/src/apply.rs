//! Fused apply with an exact undo record, and its inverse.
//!
//! `apply` adds `Σk αk·deltak` to a target in one pass, rounding once to the
//! target dtype. In the same pass it checks, per element, whether subtracting
//! the same sum would give back the original bits; only the elements where it
//! would not are recorded (position, original bits). `remove` subtracts and then
//! writes those records back, which restores the target bit for bit.

use crate::delta::{check_deltas, Delta};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::par::{CHUNK, PARALLEL_MIN, TILE};
use rayon::prelude::*;

/// The elements `apply` changed in a way plain subtraction cannot undo.
#[derive(Debug, Clone, PartialEq)]
pub struct Undo<B> {
    /// Element indices, strictly increasing.
    pub positions: Vec<u32>,
    /// The original bit patterns at those indices.
    pub values: Vec<B>,
}

impl<B> Default for Undo<B> {
    fn default() -> Self {
        Undo {
            positions: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<B> Undo<B> {
    /// Bytes the record occupies (positions + values).
    pub fn nbytes(&self) -> usize {
        self.positions.len() * (4 + std::mem::size_of::<B>())
    }
}

/// What `remove` found: with a record the result is exact; without one,
/// `inconsistent` counts elements that are certainly not the original
/// (re-adding the delta does not give the patched value back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoveReport {
    pub corrected: usize,
    pub inconsistent: usize,
}

/// `target += Σ αk·deltak` in place. With `record`, also returns the undo record.
pub fn apply<T: Element>(
    target: &mut [T],
    deltas: &[(Delta, f32)],
    record: bool,
) -> Result<Option<Undo<T::Bits>>> {
    check_target(target.len(), deltas)?;
    let run = |base: usize, chunk: &mut [T]| {
        crate::simd::dispatch(|| apply_chunk(chunk, base, deltas, record))
    };
    let parts = for_each_chunk(target, run);
    Ok(record.then(|| concat_undo(parts)))
}

/// Inverse of [`apply`] with the same deltas and alphas. With `undo` the
/// original is restored bit for bit; without it the result is approximate.
pub fn remove<T: Element>(
    target: &mut [T],
    deltas: &[(Delta, f32)],
    undo: Option<&Undo<T::Bits>>,
) -> Result<RemoveReport> {
    check_target(target.len(), deltas)?;
    if let Some(u) = undo {
        check_undo(u, target.len())?;
    }
    let run = |base: usize, chunk: &mut [T]| {
        crate::simd::dispatch(|| subtract_chunk(chunk, base, deltas))
    };
    let inconsistent = for_each_chunk(target, run).into_iter().sum();
    let corrected = undo.map_or(0, |u| write_back(target, u));
    Ok(RemoveReport {
        corrected,
        inconsistent,
    })
}

/// Reference twin of [`apply`]: one thread, element by element.
pub fn apply_scalar<T: Element>(
    target: &mut [T],
    deltas: &[(Delta, f32)],
    record: bool,
) -> Result<Option<Undo<T::Bits>>> {
    check_target(target.len(), deltas)?;
    let mut undo = Undo::default();
    let (mut acc, mut scratch) = (vec![0f32; TILE], vec![0u8; TILE]);
    for (ti, tile) in target.chunks_mut(TILE).enumerate() {
        let start = ti * TILE;
        sum_deltas_scalar(deltas, start, &mut acc[..tile.len()], &mut scratch);
        for (i, (w, &d)) in tile.iter_mut().zip(&acc).enumerate() {
            let new = T::from_f32(w.to_f32() + d);
            let back = T::from_f32(new.to_f32() - d);
            if record && back.to_bits() != w.to_bits() {
                undo.positions.push((start + i) as u32);
                undo.values.push(w.to_bits());
            }
            *w = new;
        }
    }
    Ok(record.then_some(undo))
}

/// Reference twin of [`remove`].
pub fn remove_scalar<T: Element>(
    target: &mut [T],
    deltas: &[(Delta, f32)],
    undo: Option<&Undo<T::Bits>>,
) -> Result<RemoveReport> {
    check_target(target.len(), deltas)?;
    if let Some(u) = undo {
        check_undo(u, target.len())?;
    }
    let mut inconsistent = 0;
    let (mut acc, mut scratch) = (vec![0f32; TILE], vec![0u8; TILE]);
    for (ti, tile) in target.chunks_mut(TILE).enumerate() {
        sum_deltas_scalar(deltas, ti * TILE, &mut acc[..tile.len()], &mut scratch);
        for (w, &d) in tile.iter_mut().zip(&acc) {
            let old = T::from_f32(w.to_f32() - d);
            inconsistent += (T::from_f32(old.to_f32() + d).to_bits() != w.to_bits()) as usize;
            *w = old;
        }
    }
    let corrected = undo.map_or(0, |u| write_back(target, u));
    Ok(RemoveReport {
        corrected,
        inconsistent,
    })
}

fn check_target(numel: usize, deltas: &[(Delta, f32)]) -> Result<()> {
    if numel > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "tensor of {numel} elements exceeds the undo record's 2^32 limit"
        )));
    }
    check_deltas(deltas, numel)
}

fn check_undo<B>(u: &Undo<B>, numel: usize) -> Result<()> {
    if u.positions.len() != u.values.len() {
        return Err(Error::Shape(format!(
            "undo record has {} positions but {} values",
            u.positions.len(),
            u.values.len()
        )));
    }
    if let Some(&p) = u.positions.iter().find(|&&p| p as usize >= numel) {
        return Err(Error::Value(format!(
            "undo record position {p} is outside a tensor of {numel} elements"
        )));
    }
    Ok(())
}

/// Run `f(base, chunk)` over CHUNK-sized pieces, in parallel when large,
/// returning the results in order.
fn for_each_chunk<T: Element, R: Send>(
    target: &mut [T],
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    if target.len() < PARALLEL_MIN {
        return target
            .chunks_mut(CHUNK)
            .enumerate()
            .map(|(c, chunk)| f(c * CHUNK, chunk))
            .collect();
    }
    target
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, chunk)| f(c * CHUNK, chunk))
        .collect()
}

/// acc = Σ αk·deltak over one tile.
#[inline(always)]
fn sum_deltas(deltas: &[(Delta, f32)], start: usize, acc: &mut [f32], scratch: &mut [u8]) {
    // -0.0 is the additive identity of IEEE floats (+0.0 would turn -0.0 weights into +0.0).
    acc.fill(-0.0);
    for (d, alpha) in deltas {
        d.accumulate(*alpha, start, acc, &mut scratch[..acc.len()]);
    }
}

fn sum_deltas_scalar(deltas: &[(Delta, f32)], start: usize, acc: &mut [f32], scratch: &mut [u8]) {
    // -0.0 is the additive identity of IEEE floats (+0.0 would turn -0.0 weights into +0.0).
    acc.fill(-0.0);
    for (d, alpha) in deltas {
        d.accumulate_scalar(*alpha, start, acc, &mut scratch[..acc.len()]);
    }
}

#[inline(always)]
fn apply_chunk<T: Element>(
    chunk: &mut [T],
    base: usize,
    deltas: &[(Delta, f32)],
    record: bool,
) -> Undo<T::Bits> {
    let mut undo = Undo::default();
    let (mut acc, mut scratch) = ([0f32; TILE], [0u8; TILE]);
    let (mut wide, mut new) = ([0f32; TILE], [T::from_f32(0.0); TILE]);
    let mut back = [T::from_f32(0.0); TILE];
    for (ti, tile) in chunk.chunks_mut(TILE).enumerate() {
        let start = base + ti * TILE;
        let n = tile.len();
        sum_deltas(deltas, start, &mut acc[..n], &mut scratch);
        let (acc, new, back) = (&acc[..n], &mut new[..n], &mut back[..n]);
        let bad = &mut scratch[..n];
        let flagged = if T::BULK {
            // Convert whole tiles, so half types use the hardware converter.
            T::widen(tile, &mut wide[..n]);
            add_into(&mut wide[..n], acc);
            T::narrow(&wide[..n], new);
            if record {
                // back = round(new − Σ): where it is not w, remove would fail.
                T::widen(new, &mut wide[..n]);
                sub_into(&mut wide[..n], acc);
                T::narrow(&wide[..n], back);
                flag_differences(tile, back, bad)
            } else {
                0
            }
        } else if record {
            add_and_check(tile, acc, new, bad)
        } else {
            add_elementwise(tile, acc, new);
            0
        };
        if flagged > 0 {
            collect_flagged(tile, bad, start, &mut undo);
        }
        tile.copy_from_slice(new);
    }
    undo
}

/// new = round(w + d), element by element.
#[inline(always)]
fn add_elementwise<T: Element>(tile: &[T], acc: &[f32], new: &mut [T]) {
    for ((w, &d), nw) in tile.iter().zip(acc).zip(new.iter_mut()) {
        *nw = T::from_f32(w.to_f32() + d);
    }
}

/// new = round(w + d), and bad = 1 where round(new − d) is not w; returns the count.
#[inline(always)]
fn add_and_check<T: Element>(tile: &[T], acc: &[f32], new: &mut [T], bad: &mut [u8]) -> u32 {
    let mut count = 0u32;
    for (((w, &d), nw), b) in tile.iter().zip(acc).zip(new.iter_mut()).zip(bad.iter_mut()) {
        let n = T::from_f32(w.to_f32() + d);
        let flag = (T::from_f32(n.to_f32() - d).to_bits() != w.to_bits()) as u8;
        *nw = n;
        *b = flag;
        count += flag as u32;
    }
    count
}

#[inline(always)]
fn add_into(x: &mut [f32], acc: &[f32]) {
    for (v, &d) in x.iter_mut().zip(acc) {
        *v += d;
    }
}

#[inline(always)]
fn sub_into(x: &mut [f32], acc: &[f32]) {
    for (v, &d) in x.iter_mut().zip(acc) {
        *v -= d;
    }
}

/// bad[i] = 1 where the bits of `a` and `b` differ; returns the count.
#[inline(always)]
fn flag_differences<T: Element>(a: &[T], b: &[T], bad: &mut [u8]) -> u32 {
    let mut count = 0u32;
    for ((x, y), f) in a.iter().zip(b).zip(bad.iter_mut()) {
        let d = (x.to_bits() != y.to_bits()) as u8;
        *f = d;
        count += d as u32;
    }
    count
}

/// Record (position, original bits) for each flagged element. Flags are
/// scanned eight at a time, since most words of eight are all clear.
#[inline(always)]
fn collect_flagged<T: Element>(tile: &[T], bad: &[u8], start: usize, undo: &mut Undo<T::Bits>) {
    for (k, word) in bad.chunks(8).enumerate() {
        let mut bytes = [0u8; 8];
        bytes[..word.len()].copy_from_slice(word);
        let mut m = u64::from_le_bytes(bytes);
        while m != 0 {
            let i = 8 * k + m.trailing_zeros() as usize / 8;
            undo.positions.push((start + i) as u32);
            undo.values.push(tile[i].to_bits());
            m &= m - 1;
        }
    }
}

#[inline(always)]
fn subtract_chunk<T: Element>(chunk: &mut [T], base: usize, deltas: &[(Delta, f32)]) -> usize {
    let (mut acc, mut scratch) = ([0f32; TILE], [0u8; TILE]);
    let (mut wide, mut old) = ([0f32; TILE], [T::from_f32(0.0); TILE]);
    let mut again = [T::from_f32(0.0); TILE];
    let mut inconsistent = 0usize;
    for (ti, tile) in chunk.chunks_mut(TILE).enumerate() {
        let n = tile.len();
        sum_deltas(deltas, base + ti * TILE, &mut acc[..n], &mut scratch);
        let (acc, old, again) = (&acc[..n], &mut old[..n], &mut again[..n]);
        if T::BULK {
            T::widen(tile, &mut wide[..n]);
            sub_into(&mut wide[..n], acc);
            T::narrow(&wide[..n], old);
            // Re-adding the delta must give the patched value back; count where not.
            T::widen(old, &mut wide[..n]);
            add_into(&mut wide[..n], acc);
            T::narrow(&wide[..n], again);
        } else {
            for (((w, &d), o), a) in tile
                .iter()
                .zip(acc)
                .zip(old.iter_mut())
                .zip(again.iter_mut())
            {
                *o = T::from_f32(w.to_f32() - d);
                *a = T::from_f32(o.to_f32() + d);
            }
        }
        inconsistent += flag_differences(tile, again, &mut scratch[..n]) as usize;
        tile.copy_from_slice(old);
    }
    inconsistent
}

fn concat_undo<B: Copy>(parts: Vec<Undo<B>>) -> Undo<B> {
    let total = parts.iter().map(|p| p.positions.len()).sum();
    let mut undo = Undo {
        positions: Vec::with_capacity(total),
        values: Vec::with_capacity(total),
    };
    for p in parts {
        undo.positions.extend_from_slice(&p.positions);
        undo.values.extend_from_slice(&p.values);
    }
    undo
}

fn write_back<T: Element>(target: &mut [T], undo: &Undo<T::Bits>) -> usize {
    for (&p, &v) in undo.positions.iter().zip(&undo.values) {
        target[p as usize] = T::from_bits(v);
    }
    undo.positions.len()
}
