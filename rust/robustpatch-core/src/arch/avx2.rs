//! AVX2 apply kernel: eight lanes per step (add, round, record test), for
//! each element type. The whole per-element computation stays in registers;
//! the eight "remove would fail" flags come out of one compare + movemask.
//!
//! A step appends its flagged lanes without a branch: a table turns the
//! eight flags into the permutation that packs the flagged lanes to the
//! front, the step writes eight slots past the record's end and keeps as many
//! as were flagged. A branch on "any lane flagged" is mispredicted on about
//! half the steps at the typical 8% of flagged f32 elements (the record then
//! cost five times the apply).

use crate::apply::{add_and_record, add_in_place, Undo};
use crate::arch::record::Appender;
use crate::dtype::Element;
use crate::par::TILE;
use half::{bf16, f16};
use std::any::TypeId;
use std::arch::x86_64::*;

/// Eight elements of one type in a register, and their conversions.
/// Every method computes exactly what the scalar `Element` methods do.
trait Lanes: Element {
    /// Eight raw bit patterns.
    type Raw: Copy;
    /// Append the record after each tile ([`Held`]), not step by step: pays
    /// where few steps flag a lane, as for 16-bit targets (2% of f16 and bf16
    /// elements flag, in 15% of the steps; f32 targets flag 8%, in half of them).
    const HOLD: bool;
    unsafe fn load(p: *const Self) -> Self::Raw;
    unsafe fn store(p: *mut Self, x: Self::Raw);
    unsafe fn widen8(x: Self::Raw) -> __m256;
    /// Round to nearest even, as `Element::from_f32`.
    unsafe fn narrow8(x: __m256) -> Self::Raw;
    /// Bit i set where lane i of `a` and `b` differ.
    unsafe fn differ(a: Self::Raw, b: Self::Raw) -> u32;
    /// Per-lane counters at zero.
    unsafe fn zero() -> Self::Raw;
    /// Add one to the counter of each lane finite in `old`, not in `new`
    /// (exponent bits all ones = Inf or NaN, tested on the raw bits).
    unsafe fn tally(count: Self::Raw, old: Self::Raw, new: Self::Raw) -> Self::Raw;
    /// Sum of the lane counters.
    unsafe fn total(count: Self::Raw) -> usize;
    /// Store the lanes of `x` in the order `perm` gives (32-bit lane
    /// indices) to `p`: eight elements, of which the caller keeps the first few.
    unsafe fn store_permuted(p: *mut Self::Bits, perm: __m256i, x: Self::Raw);
}

impl Lanes for f32 {
    type Raw = __m256i;
    const HOLD: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: __m256i) {
        _mm256_storeu_si256(p as *mut __m256i, x)
    }
    #[inline(always)]
    unsafe fn widen8(x: __m256i) -> __m256 {
        _mm256_castsi256_ps(x)
    }
    #[inline(always)]
    unsafe fn narrow8(x: __m256) -> __m256i {
        _mm256_castps_si256(x)
    }
    #[inline(always)]
    unsafe fn differ(a: __m256i, b: __m256i) -> u32 {
        // Bitwise equality (a float compare would call −0 == +0 and NaN != NaN).
        let same = _mm256_cmpeq_epi32(a, b);
        !(_mm256_movemask_ps(_mm256_castsi256_ps(same)) as u32) & 0xFF
    }
    #[inline(always)]
    unsafe fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn tally(count: __m256i, old: __m256i, new: __m256i) -> __m256i {
        let exp = _mm256_set1_epi32(0x7F80_0000);
        let special = |x| _mm256_cmpeq_epi32(_mm256_and_si256(x, exp), exp);
        // A true lane is all ones, i.e. −1: subtracting it counts one.
        _mm256_sub_epi32(count, _mm256_andnot_si256(special(old), special(new)))
    }
    #[inline(always)]
    unsafe fn total(count: __m256i) -> usize {
        let lanes: [u32; 8] = std::mem::transmute(count);
        lanes.iter().map(|&c| c as usize).sum()
    }
    #[inline(always)]
    unsafe fn store_permuted(p: *mut u32, perm: __m256i, x: __m256i) {
        _mm256_storeu_si256(p as *mut __m256i, _mm256_permutevar8x32_epi32(x, perm))
    }
}

impl Lanes for f16 {
    type Raw = __m128i;
    const HOLD: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const f16) -> __m128i {
        _mm_loadu_si128(p as *const __m128i)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f16, x: __m128i) {
        _mm_storeu_si128(p as *mut __m128i, x)
    }
    #[inline(always)]
    unsafe fn widen8(x: __m128i) -> __m256 {
        _mm256_cvtph_ps(x)
    }
    #[inline(always)]
    unsafe fn narrow8(x: __m256) -> __m128i {
        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x)
    }
    #[inline(always)]
    unsafe fn differ(a: __m128i, b: __m128i) -> u32 {
        differ16(a, b)
    }
    #[inline(always)]
    unsafe fn zero() -> __m128i {
        _mm_setzero_si128()
    }
    #[inline(always)]
    unsafe fn tally(count: __m128i, old: __m128i, new: __m128i) -> __m128i {
        tally16::<0x7C00>(count, old, new)
    }
    #[inline(always)]
    unsafe fn total(count: __m128i) -> usize {
        total16(count)
    }
    #[inline(always)]
    unsafe fn store_permuted(p: *mut u16, perm: __m256i, x: __m128i) {
        store_permuted16(p, perm, x)
    }
}

impl Lanes for bf16 {
    type Raw = __m128i;
    const HOLD: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const bf16) -> __m128i {
        _mm_loadu_si128(p as *const __m128i)
    }
    #[inline(always)]
    unsafe fn store(p: *mut bf16, x: __m128i) {
        _mm_storeu_si128(p as *mut __m128i, x)
    }
    #[inline(always)]
    unsafe fn widen8(x: __m128i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(x)))
    }
    #[inline(always)]
    unsafe fn narrow8(x: __m256) -> __m128i {
        // As `f32_to_bf16_bits`: add 0x7FFF plus the lowest kept bit, keep
        // the top half; NaN keeps its top half with the quiet bit set.
        let b = _mm256_castps_si256(x);
        let top = _mm256_srli_epi32::<16>(b);
        let bias = _mm256_add_epi32(
            _mm256_and_si256(top, _mm256_set1_epi32(1)),
            _mm256_set1_epi32(0x7FFF),
        );
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
        let nan = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
        let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        pack16(_mm256_blendv_epi8(rounded, nan, is_nan))
    }
    #[inline(always)]
    unsafe fn differ(a: __m128i, b: __m128i) -> u32 {
        differ16(a, b)
    }
    #[inline(always)]
    unsafe fn zero() -> __m128i {
        _mm_setzero_si128()
    }
    #[inline(always)]
    unsafe fn tally(count: __m128i, old: __m128i, new: __m128i) -> __m128i {
        tally16::<0x7F80>(count, old, new)
    }
    #[inline(always)]
    unsafe fn total(count: __m128i) -> usize {
        total16(count)
    }
    #[inline(always)]
    unsafe fn store_permuted(p: *mut u16, perm: __m256i, x: __m128i) {
        store_permuted16(p, perm, x)
    }
}

/// Eight 32-bit lanes holding values below 2^16, as eight 16-bit lanes.
#[inline(always)]
unsafe fn pack16(x: __m256i) -> __m128i {
    // The saturating pack is exact for such lanes; it packs within 128-bit
    // halves, the permute joins the halves.
    let packed = _mm256_packus_epi32(x, x);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
}

/// [`Lanes::store_permuted`] for eight 16-bit lanes, through 32-bit lanes.
#[inline(always)]
unsafe fn store_permuted16(p: *mut u16, perm: __m256i, x: __m128i) {
    let wide = _mm256_permutevar8x32_epi32(_mm256_cvtepu16_epi32(x), perm);
    _mm_storeu_si128(p as *mut __m128i, pack16(wide))
}

/// [`Lanes::tally`] for eight 16-bit lanes whose exponent bits are `EXP`.
/// A lane counts at most TILE / 8 = 256 per tile, far below 2^16.
#[inline(always)]
unsafe fn tally16<const EXP: i16>(count: __m128i, old: __m128i, new: __m128i) -> __m128i {
    let exp = _mm_set1_epi16(EXP);
    let special = |x| _mm_cmpeq_epi16(_mm_and_si128(x, exp), exp);
    _mm_sub_epi16(count, _mm_andnot_si128(special(old), special(new)))
}

#[inline(always)]
unsafe fn total16(count: __m128i) -> usize {
    let lanes: [u16; 8] = std::mem::transmute(count);
    lanes.iter().map(|&c| c as usize).sum()
}

/// [`Lanes::differ`] for eight 16-bit lanes.
#[inline(always)]
unsafe fn differ16(a: __m128i, b: __m128i) -> u32 {
    let same = _mm_cmpeq_epi16(a, b);
    // Narrow each 16-bit lane mask to a byte, then one bit per lane.
    !(_mm_movemask_epi8(_mm_packs_epi16(same, same)) as u32) & 0xFF
}

/// For each set of eight flags, the indices of the flagged lanes in order,
/// then zeros: the permutation that packs the flagged lanes to the front.
static PACK_FLAGGED: [[u8; 8]; 256] = pack_flagged_table();

const fn pack_flagged_table() -> [[u8; 8]; 256] {
    let mut table = [[0u8; 8]; 256];
    let mut flags = 0;
    while flags < 256 {
        let (mut lane, mut kept) = (0, 0);
        while lane < 8 {
            if flags >> lane & 1 == 1 {
                table[flags][kept] = lane as u8;
                kept += 1;
            }
            lane += 1;
        }
        flags += 1;
    }
    table
}

/// Append (position, original bits) of the lanes of `w` flagged in `bad`
/// (eight flags): eight slots written past the record's end, `popcnt(bad)`
/// kept. The caller made [`Appender::room`] for this step.
#[inline(always)]
unsafe fn push<T: Lanes>(rec: &mut Appender<T::Bits>, bad: u32, w: T::Raw, first: usize) {
    debug_assert!(bad < 256);
    let idx = PACK_FLAGGED.get_unchecked(bad as usize);
    let perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(idx.as_ptr() as *const __m128i));
    // A flagged lane's position is `first` plus its index, which is what the
    // permutation holds. Positions are below 2^32 (checked by the caller).
    let pos = _mm256_add_epi32(_mm256_set1_epi32(first as u32 as i32), perm);
    let (pos_slots, val_slots) = rec.free_slots();
    _mm256_storeu_si256(pos_slots as *mut __m256i, pos);
    T::store_permuted(val_slots, perm, w);
    rec.advance(bad.count_ones() as usize);
}

/// A tile's record test results, appended after the tile by a loop over the
/// steps that flagged a lane alone (found 32 steps per vector test of the
/// flags), which skips the other steps' permutes and stores.
struct Held<T: Lanes> {
    flags: [u8; TILE / 8],
    lanes: [T::Raw; TILE / 8],
}

impl<T: Lanes> Held<T> {
    #[inline(always)]
    unsafe fn new() -> Self {
        // SAFETY: all-zero bits are valid integers and SIMD vectors.
        std::mem::zeroed()
    }

    #[inline(always)]
    unsafe fn keep(&mut self, k: usize, flags: u32, w: T::Raw) {
        *self.flags.get_unchecked_mut(k) = flags as u8;
        *self.lanes.get_unchecked_mut(k) = w;
    }

    /// Append the flagged lanes of the first `steps` steps, kept for the tile
    /// whose first element is `first`, in order. The caller made room for the tile.
    #[inline(always)]
    unsafe fn append_to(&self, rec: &mut Appender<T::Bits>, first: usize, steps: usize) {
        debug_assert!(steps <= TILE / 8);
        for word in (0..steps).step_by(32) {
            let flags = _mm256_loadu_si256(self.flags.as_ptr().add(word) as *const __m256i);
            let clear = _mm256_movemask_epi8(_mm256_cmpeq_epi8(flags, _mm256_setzero_si256()));
            let live = u32::MAX >> (32 - (steps - word).min(32));
            let mut bits = !(clear as u32) & live;
            while bits != 0 {
                let k = word + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let (flags, w) = (*self.flags.get_unchecked(k), *self.lanes.get_unchecked(k));
                push::<T>(rec, flags as u32, w, first + 8 * k);
            }
        }
    }
}

/// Apply `acc` to `tile` (and record into `undo` when given), returning
/// the overflow count; None, doing nothing, for an element type without
/// lanes. Safety: the CPU must have AVX2 and F16C (`Simd::has(Path::Avx2)`).
#[inline(always)]
pub unsafe fn add_tile<T: Element>(
    tile: &mut [T],
    acc: &[f32],
    start: usize,
    undo: Option<&mut Undo<T::Bits>>,
) -> Option<usize> {
    let ty = TypeId::of::<T>();
    // SAFETY: the caller checked AVX2/F16C; each branch reinterprets
    // T as the very type it was just found to be.
    if ty == TypeId::of::<f32>() {
        let u = undo.map(|u| cast_undo::<T, f32>(u));
        Some(add_tile_avx2::<f32>(cast(tile), acc, start, u))
    } else if ty == TypeId::of::<f16>() {
        let u = undo.map(|u| cast_undo::<T, f16>(u));
        Some(add_tile_avx2::<f16>(cast(tile), acc, start, u))
    } else if ty == TypeId::of::<bf16>() {
        let u = undo.map(|u| cast_undo::<T, bf16>(u));
        Some(add_tile_avx2::<bf16>(cast(tile), acc, start, u))
    } else {
        None
    }
}

/// Safety: `T` and `U` must be the same type.
#[inline(always)]
unsafe fn cast<T, U>(tile: &mut [T]) -> &mut [U] {
    std::slice::from_raw_parts_mut(tile.as_mut_ptr() as *mut U, tile.len())
}

/// Safety: `T` and `U` must be the same type (so their `Bits` are too).
#[inline(always)]
unsafe fn cast_undo<T: Element, U: Element>(u: &mut Undo<T::Bits>) -> &mut Undo<U::Bits> {
    &mut *(u as *mut Undo<T::Bits> as *mut Undo<U::Bits>)
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn add_tile_avx2<T: Lanes>(
    tile: &mut [T],
    acc: &[f32],
    start: usize,
    undo: Option<&mut Undo<T::Bits>>,
) -> usize {
    let n = tile.len().min(acc.len());
    let full = n / 8 * 8;
    let (t, a) = (tile.as_mut_ptr(), acc.as_ptr());
    let mut count = T::zero();
    let tail = match undo {
        None => {
            for i in (0..full).step_by(8) {
                let w = T::load(t.add(i));
                let d = _mm256_loadu_ps(a.add(i));
                let new = T::narrow8(_mm256_add_ps(T::widen8(w), d));
                count = T::tally(count, w, new);
                T::store(t.add(i), new);
            }
            add_in_place(&mut tile[full..n], &acc[full..n])
        }
        Some(undo) => {
            let mut rec = Appender::new(undo);
            rec.room(full);
            // back = round(new − Σ): where it is not w, remove would fail.
            if T::HOLD {
                assert!(full <= TILE, "a tile holds at most TILE elements");
                let mut held = Held::<T>::new();
                for (k, i) in (0..full).step_by(8).enumerate() {
                    let w = T::load(t.add(i));
                    let d = _mm256_loadu_ps(a.add(i));
                    let new = T::narrow8(_mm256_add_ps(T::widen8(w), d));
                    let back = T::narrow8(_mm256_sub_ps(T::widen8(new), d));
                    held.keep(k, T::differ(back, w), w);
                    count = T::tally(count, w, new);
                    T::store(t.add(i), new);
                }
                held.append_to(&mut rec, start, full / 8);
            } else {
                for i in (0..full).step_by(8) {
                    let w = T::load(t.add(i));
                    let d = _mm256_loadu_ps(a.add(i));
                    let new = T::narrow8(_mm256_add_ps(T::widen8(w), d));
                    let back = T::narrow8(_mm256_sub_ps(T::widen8(new), d));
                    push::<T>(&mut rec, T::differ(back, w), w, start + i);
                    count = T::tally(count, w, new);
                    T::store(t.add(i), new);
                }
            }
            drop(rec);
            add_and_record(&mut tile[full..n], &acc[full..n], start + full, undo)
        }
    };
    T::total(count) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each entry lists exactly the flagged lanes, ascending, then zeros.
    #[test]
    fn pack_table_lists_the_flagged_lanes_in_order() {
        for (flags, entry) in PACK_FLAGGED.iter().enumerate() {
            let lanes: Vec<u8> = (0..8).filter(|l| flags >> l & 1 == 1).collect();
            let k = lanes.len();
            assert_eq!(&entry[..k], &lanes[..], "flags {flags:#010b}");
            assert!(entry[k..].iter().all(|&x| x == 0), "flags {flags:#010b}");
        }
    }
}
