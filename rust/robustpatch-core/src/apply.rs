//! Fused apply with an exact undo record, and its inverse.
//!
//! `apply` adds `Σk αk·deltak` to a target in one pass, rounding once to the
//! target dtype. In the same pass it checks, per element, whether subtracting
//! the same sum would give back the original bits; only the elements where it
//! would not are recorded (position, original bits). `remove` subtracts and then
//! writes those records back, which restores the target bit for bit.
//!
//! The same pass counts the elements that overflowed: finite before, ±Inf or
//! NaN after (a large α or delta in a narrow dtype). Callers refuse such a
//! result unless asked not to; counting here costs no second pass.

use crate::arch::{self, Path, Simd};
use crate::delta::{check_deltas, Delta};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::gather;
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

/// What `apply` did: the undo record (when asked for) and the overflow count.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied<B> {
    pub undo: Option<Undo<B>>,
    /// Elements that were finite before and are not after.
    pub overflowed: usize,
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
) -> Result<Applied<T::Bits>> {
    apply_with(arch::selected()?, target, deltas, record)
}

/// [`apply`] on a given SIMD path (every path gives the same bits).
pub fn apply_with<T: Element>(
    simd: Simd,
    target: &mut [T],
    deltas: &[(Delta, f32)],
    record: bool,
) -> Result<Applied<T::Bits>> {
    check_target(target.len(), deltas)?;
    let run = |base: usize, chunk: &mut [T], undo: Option<&mut Undo<T::Bits>>| {
        simd.run(
            #[inline(always)]
            || apply_chunk(simd, chunk, base, deltas, undo),
        )
    };
    if !record {
        let counts = for_each_chunk(target, |base, chunk| run(base, chunk, None));
        return Ok(Applied {
            undo: None,
            overflowed: counts.into_iter().sum(),
        });
    }
    let (undo, overflowed) = if target.len() < PARALLEL_MIN {
        let mut undo = Undo::default();
        let mut overflowed = 0;
        for (c, chunk) in target.chunks_mut(CHUNK).enumerate() {
            overflowed += run(c * CHUNK, chunk, Some(&mut undo));
        }
        (undo, overflowed)
    } else {
        // Room for a typical record (a few % of the elements) up front.
        let expected = target.len() / 8;
        gather::in_order(target, expected, |base, chunk, part| {
            run(base, chunk, Some(part))
        })
    };
    Ok(Applied {
        undo: Some(undo),
        overflowed,
    })
}

/// Inverse of [`apply`] with the same deltas and alphas. With `undo` the
/// original is restored bit for bit; without it the result is approximate.
pub fn remove<T: Element>(
    target: &mut [T],
    deltas: &[(Delta, f32)],
    undo: Option<&Undo<T::Bits>>,
) -> Result<RemoveReport> {
    remove_with(arch::selected()?, target, deltas, undo)
}

/// [`remove`] on a given SIMD path (every path gives the same bits).
pub fn remove_with<T: Element>(
    simd: Simd,
    target: &mut [T],
    deltas: &[(Delta, f32)],
    undo: Option<&Undo<T::Bits>>,
) -> Result<RemoveReport> {
    check_target(target.len(), deltas)?;
    if let Some(u) = undo {
        check_undo(u, target.len())?;
    }
    let run = |base: usize, chunk: &mut [T]| {
        simd.run(
            #[inline(always)]
            || subtract_chunk(chunk, base, deltas),
        )
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
) -> Result<Applied<T::Bits>> {
    check_target(target.len(), deltas)?;
    let mut undo = Undo::default();
    let mut overflowed = 0;
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
            overflowed += overflows(*w, new) as usize;
            *w = new;
        }
    }
    Ok(Applied {
        undo: record.then_some(undo),
        overflowed,
    })
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

/// Finite before, not after: what the overflow count counts.
#[inline(always)]
fn overflows<T: Element>(old: T, new: T) -> bool {
    old.to_f32().is_finite() && !new.to_f32().is_finite()
}

/// Apply to one chunk, appending its records to `undo` when given; returns
/// the overflow count.
#[inline(always)]
fn apply_chunk<T: Element>(
    simd: Simd,
    chunk: &mut [T],
    base: usize,
    deltas: &[(Delta, f32)],
    mut undo: Option<&mut Undo<T::Bits>>,
) -> usize {
    let mut overflowed = 0;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd.has(Path::Avx512) && arch::avx512::fused_applies(deltas) {
        // SAFETY: `simd` was checked to run AVX-512 on this CPU, the deltas
        // were just checked, and `check_target` checked they cover the tensor.
        let fused =
            unsafe { arch::avx512::apply_fused(simd, chunk, base, deltas, undo.as_deref_mut()) };
        (done, overflowed) = fused.unwrap_or((0, 0));
    }
    let (mut acc, mut scratch) = ([0f32; TILE], [0u8; TILE]);
    for (ti, tile) in chunk[done..].chunks_mut(TILE).enumerate() {
        let start = base + done + ti * TILE;
        let n = tile.len();
        sum_deltas(deltas, start, &mut acc[..n], &mut scratch);
        let acc = &acc[..n];
        #[cfg(target_arch = "x86_64")]
        if simd.has(Path::Avx2) {
            let u = undo.as_deref_mut();
            // SAFETY: `simd` was checked to run these paths' features on this CPU.
            let done = unsafe {
                if simd.has(Path::Avx512) {
                    arch::avx512::add_tile(simd, tile, acc, start, u)
                } else {
                    arch::avx2::add_tile(tile, acc, start, u)
                }
            };
            if let Some(n) = done {
                overflowed += n;
                continue;
            }
        }
        overflowed += match undo.as_deref_mut() {
            Some(u) => add_and_record(tile, acc, start, u),
            None => add_in_place(tile, acc),
        };
    }
    overflowed
}

/// w = round(w + d), element by element; returns the overflow count.
#[inline(always)]
pub(crate) fn add_in_place<T: Element>(tile: &mut [T], acc: &[f32]) -> usize {
    let mut overflowed = 0;
    for (w, &d) in tile.iter_mut().zip(acc) {
        let new = T::from_f32(w.to_f32() + d);
        overflowed += overflows(*w, new) as usize;
        *w = new;
    }
    overflowed
}

/// w = round(w + d), recording (position, w) where round(new − d) is not w;
/// returns the overflow count.
#[inline(always)]
pub(crate) fn add_and_record<T: Element>(
    tile: &mut [T],
    acc: &[f32],
    start: usize,
    undo: &mut Undo<T::Bits>,
) -> usize {
    let mut overflowed = 0;
    for (i, (w, &d)) in tile.iter_mut().zip(acc).enumerate() {
        let new = T::from_f32(w.to_f32() + d);
        if T::from_f32(new.to_f32() - d).to_bits() != w.to_bits() {
            undo.positions.push((start + i) as u32);
            undo.values.push(w.to_bits());
        }
        overflowed += overflows(*w, new) as usize;
        *w = new;
    }
    overflowed
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

/// Number of elements whose bits differ between `a` and `b`.
#[inline(always)]
fn count_differences<T: Element>(a: &[T], b: &[T]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.to_bits() != y.to_bits()) as usize)
        .sum()
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
        inconsistent += count_differences(tile, again);
        tile.copy_from_slice(old);
    }
    inconsistent
}

fn write_back<T: Element>(target: &mut [T], undo: &Undo<T::Bits>) -> usize {
    for (&p, &v) in undo.positions.iter().zip(&undo.values) {
        target[p as usize] = T::from_bits(v);
    }
    undo.positions.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::Dense;
    use half::{bf16, f16};

    /// NaN payloads, infinities and signed zeros in the target go through the
    /// explicit-SIMD conversions exactly as through the scalar ones.
    fn special_targets_match_scalar_twin<T: Element>() {
        let specials = [
            f32::from_bits(0x7FC0_0001),
            f32::from_bits(0xFF80_4321),
            f32::from_bits(0x7F81_0000),
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
            65504.0,
            3.0e38,
        ];
        // 37 elements: four full groups of eight and a tail.
        let target: Vec<T> = (0..37)
            .map(|i| T::from_f32(specials[i % specials.len()] * if i % 3 == 0 { 1.0 } else { 0.5 }))
            .collect();
        let d: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 1e-3).collect();
        let deltas = [(Delta::Dense(Dense::F32(&d)), 1.5)];
        for record in [true, false] {
            let (mut fast, mut slow) = (target.clone(), target.clone());
            let a = apply(&mut fast, &deltas, record).unwrap();
            let b = apply_scalar(&mut slow, &deltas, record).unwrap();
            assert_eq!(
                b.overflowed,
                0,
                "{:?}: no finite element overflows",
                T::DTYPE
            );
            let bits = |v: &[T]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{:?} record={record}", T::DTYPE);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn special_values_match_scalar_twin() {
        special_targets_match_scalar_twin::<f32>();
        special_targets_match_scalar_twin::<f16>();
        special_targets_match_scalar_twin::<bf16>();
    }
}
