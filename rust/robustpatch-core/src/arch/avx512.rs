//! AVX-512 apply kernels: sixteen lanes per step, the "would remove fail"
//! flags of a step as one mask register, so a step without a flagged lane
//! writes no record and takes one predictable branch.
//!
//! Two entry points: [`add_tile`] applies a precomputed f32 sum (any deltas),
//! [`apply_fused`] decodes 4-bit linear codes of up to [`MAX_FUSED`]
//! signatures in registers and applies them without a sum buffer. Both
//! compute, lane by lane, exactly what the scalar twins compute: the sum
//! starts at −0.0 and adds `code·(α·scale) + α·offset` per signature
//! (unfused), then `new = round(w + sum)` and the record test
//! `round(new − sum) ≠ w`.

use crate::apply::{add_and_record, add_in_place, Undo};
use crate::arch::record::Appender;
use crate::arch::{Path, Simd};
use crate::delta::Delta;
use crate::dtype::Element;
use crate::par::TILE;
use crate::quant::Scheme;
use half::{bf16, f16};
use std::any::TypeId;
use std::arch::x86_64::*;

/// Most signatures [`apply_fused`] keeps in registers at once.
pub const MAX_FUSED: usize = 8;

/// `Some($call)` with `$L` naming the concrete type that `$T` is (f32, f16 or
/// bf16), or None for a type without lanes. `$call` may reinterpret `$T` as
/// `$L`, the very type it was just found to be.
macro_rules! with_lanes {
    ($T:ty, $L:ident => $call:expr) => {{
        let ty = TypeId::of::<$T>();
        if ty == TypeId::of::<f32>() {
            type $L = f32;
            Some($call)
        } else if ty == TypeId::of::<f16>() {
            type $L = f16;
            Some($call)
        } else if ty == TypeId::of::<bf16>() {
            type $L = bf16;
            Some($call)
        } else {
            None
        }
    }};
}

/// Sixteen elements of one type in a register, and their conversions. Each
/// method computes exactly what the scalar `Element` methods do.
trait Lanes: Element {
    type Raw: Copy;
    /// Append the record after each tile ([`Held`]), not step by step: pays
    /// where few steps flag a lane, as for 16-bit targets (f32 targets flag
    /// lanes in most steps, and holding their originals cost more than it saved).
    const HOLD: bool;
    unsafe fn load(p: *const Self) -> Self::Raw;
    unsafe fn store(p: *mut Self, x: Self::Raw);
    unsafe fn widen16(x: Self::Raw) -> __m512;
    /// Round to nearest even, as `Element::from_f32`. `NE`: the CPU has
    /// AVX-512 BF16 and the caller enabled it (used by bf16 lanes only).
    unsafe fn narrow16<const NE: bool>(x: __m512) -> Self::Raw;
    /// Bit i set where lane i of `a` and `b` differ bitwise.
    unsafe fn differ(a: Self::Raw, b: Self::Raw) -> u16;
    /// Bit i set where lane i is Inf or NaN (exponent bits all ones).
    unsafe fn special(x: Self::Raw) -> u16;
    /// Bit i set where subtracting `d` from `new` does not give back `w`:
    /// the record test.
    #[inline(always)]
    unsafe fn unrestored<const NE: bool>(new: Self::Raw, d: __m512, w: Self::Raw) -> u16 {
        Self::differ(
            Self::narrow16::<NE>(_mm512_sub_ps(Self::widen16(new), d)),
            w,
        )
    }
    /// Store the lanes of `x` selected by `keep`, packed to the front of `p`;
    /// writes 16 elements (those past the kept ones are scratch). `VBMI2`:
    /// the CPU has AVX-512 VBMI2 (16-bit lanes compress directly).
    unsafe fn store_kept<const VBMI2: bool>(p: *mut Self::Bits, keep: u16, x: Self::Raw);
}

impl Lanes for f32 {
    type Raw = __m512i;
    const HOLD: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512i {
        _mm512_loadu_epi32(p as *const i32)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: __m512i) {
        _mm512_storeu_epi32(p as *mut i32, x)
    }
    #[inline(always)]
    unsafe fn widen16(x: __m512i) -> __m512 {
        _mm512_castsi512_ps(x)
    }
    #[inline(always)]
    unsafe fn narrow16<const NE: bool>(x: __m512) -> __m512i {
        _mm512_castps_si512(x)
    }
    #[inline(always)]
    unsafe fn differ(a: __m512i, b: __m512i) -> u16 {
        _mm512_cmpneq_epi32_mask(a, b)
    }
    #[inline(always)]
    unsafe fn special(x: __m512i) -> u16 {
        let exp = _mm512_set1_epi32(0x7F80_0000);
        _mm512_cmpeq_epi32_mask(_mm512_and_si512(x, exp), exp)
    }
    #[inline(always)]
    unsafe fn store_kept<const VBMI2: bool>(p: *mut u32, keep: u16, x: __m512i) {
        _mm512_storeu_epi32(p as *mut i32, _mm512_maskz_compress_epi32(keep, x))
    }
}

impl Lanes for f16 {
    type Raw = __m256i;
    const HOLD: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const f16) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f16, x: __m256i) {
        _mm256_storeu_si256(p as *mut __m256i, x)
    }
    #[inline(always)]
    unsafe fn widen16(x: __m256i) -> __m512 {
        _mm512_cvtph_ps(x)
    }
    #[inline(always)]
    unsafe fn narrow16<const NE: bool>(x: __m512) -> __m256i {
        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
    }
    #[inline(always)]
    unsafe fn differ(a: __m256i, b: __m256i) -> u16 {
        _mm256_cmpneq_epi16_mask(a, b)
    }
    #[inline(always)]
    unsafe fn special(x: __m256i) -> u16 {
        special16::<0x7C00>(x)
    }
    #[inline(always)]
    unsafe fn store_kept<const VBMI2: bool>(p: *mut u16, keep: u16, x: __m256i) {
        store_kept16::<VBMI2>(p, keep, x)
    }
}

impl Lanes for bf16 {
    type Raw = __m256i;
    const HOLD: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const bf16) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline(always)]
    unsafe fn store(p: *mut bf16, x: __m256i) {
        _mm256_storeu_si256(p as *mut __m256i, x)
    }
    #[inline(always)]
    unsafe fn widen16(x: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
    }
    #[inline(always)]
    unsafe fn narrow16<const NE: bool>(x: __m512) -> __m256i {
        if NE {
            bf16_convert_ne(x)
        } else {
            // Lanes hold values below 2^16: the truncating narrow is exact.
            _mm512_cvtepi32_epi16(bf16_bits32(x))
        }
    }
    #[inline(always)]
    unsafe fn differ(a: __m256i, b: __m256i) -> u16 {
        _mm256_cmpneq_epi16_mask(a, b)
    }
    #[inline(always)]
    unsafe fn special(x: __m256i) -> u16 {
        special16::<0x7F80>(x)
    }
    #[inline(always)]
    unsafe fn unrestored<const NE: bool>(new: __m256i, d: __m512, w: __m256i) -> u16 {
        let back = _mm512_sub_ps(Self::widen16(new), d);
        if NE {
            Self::differ(bf16_convert_ne(back), w)
        } else {
            // Compared in 32-bit lanes: no narrowing of the rounded lanes.
            _mm512_cmpneq_epi32_mask(bf16_bits32(back), _mm512_cvtepu16_epi32(w))
        }
    }
    #[inline(always)]
    unsafe fn store_kept<const VBMI2: bool>(p: *mut u16, keep: u16, x: __m256i) {
        store_kept16::<VBMI2>(p, keep, x)
    }
}

/// The bf16 bits of each lane of `x`, in the low half of 32-bit lanes, as
/// `f32_to_bf16_bits`: add 0x7FFF plus the lowest kept bit and keep the top
/// half; NaN keeps its top half with the quiet bit set.
#[inline(always)]
unsafe fn bf16_bits32(x: __m512) -> __m512i {
    let b = _mm512_castps_si512(x);
    let top = _mm512_srli_epi32::<16>(b);
    let bias = _mm512_add_epi32(
        _mm512_and_si512(top, _mm512_set1_epi32(1)),
        _mm512_set1_epi32(0x7FFF),
    );
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
    let nan = _mm512_or_si512(top, _mm512_set1_epi32(0x40));
    let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_blend_epi32(is_nan, rounded, nan)
}

/// Whether `T` is bf16 and this CPU converts f32 to bf16 in one instruction
/// (AVX-512 BF16, with DQ for the subnormal test): the `avx512vbmi2` path then
/// narrows with it. Detected once; no path needs it.
fn bf16_convert_applies<T: 'static>() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    TypeId::of::<T>() == TypeId::of::<bf16>()
        && *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512dq")
        })
}

/// [`bf16_bits32`] narrowed, in one `vcvtneps2bf16` (AVX-512 BF16): the same
/// round to nearest even and quiet NaN, except that the instruction flushes
/// subnormal inputs to zero; a vector holding one takes the integer path.
/// Callers must have enabled `avx512bf16` and `avx512dq`.
#[inline(always)]
unsafe fn bf16_convert_ne(x: __m512) -> __m256i {
    const SUBNORMAL: i32 = 0x20;
    if _mm512_fpclass_ps_mask::<SUBNORMAL>(x) != 0 {
        return _mm512_cvtepi32_epi16(bf16_bits32(x));
    }
    std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x))
}

#[inline(always)]
unsafe fn special16<const EXP: i16>(x: __m256i) -> u16 {
    let exp = _mm256_set1_epi16(EXP);
    _mm256_cmpeq_epi16_mask(_mm256_and_si256(x, exp), exp)
}

/// [`Lanes::store_kept`] for sixteen 16-bit lanes: one compress with VBMI2,
/// else through 32-bit lanes (widen, compress, narrow).
#[inline(always)]
unsafe fn store_kept16<const VBMI2: bool>(p: *mut u16, keep: u16, x: __m256i) {
    let kept = if VBMI2 {
        _mm256_maskz_compress_epi16(keep, x)
    } else {
        let wide = _mm512_maskz_compress_epi32(keep, _mm512_cvtepu16_epi32(x));
        _mm512_cvtepi32_epi16(wide)
    };
    _mm256_storeu_si256(p as *mut __m256i, kept)
}

/// One step: `t[0..16] = round(t + d)`, recording the lanes that subtraction
/// would not restore (when `RECORD`); returns the lanes that overflowed.
#[inline(always)]
unsafe fn step<T: Lanes, const RECORD: bool, const VBMI2: bool, const NE: bool>(
    t: *mut T,
    d: __m512,
    first: usize,
    rec: &mut Appender<T::Bits>,
) -> u32 {
    let w = T::load(t);
    let new = T::narrow16::<NE>(_mm512_add_ps(T::widen16(w), d));
    if RECORD {
        let bad = T::unrestored::<NE>(new, d, w);
        rec.push::<T, VBMI2>(bad, w, first);
    }
    T::store(t, new);
    (T::special(new) & !T::special(w)).count_ones()
}

/// [`step`] with the record's test, the step's flags and original lanes kept in
/// `held` (slot `k`) for [`Held::append_to`] after the tile.
#[inline(always)]
unsafe fn step_held<T: Lanes, const NE: bool>(
    t: *mut T,
    d: __m512,
    held: &mut Held<T>,
    k: usize,
) -> u32 {
    let w = T::load(t);
    let new = T::narrow16::<NE>(_mm512_add_ps(T::widen16(w), d));
    held.keep(k, T::unrestored::<NE>(new, d, w), w);
    T::store(t, new);
    (T::special(new) & !T::special(w)).count_ones()
}

/// A tile's record test results, appended in one pass after the tile: most
/// steps flag no lane (at 2% of elements flagged, 70% of the steps), and a
/// loop over the flagged steps alone (a bit scan, no per-step branch) skips
/// their compresses and their stores across cache lines. Which steps flagged a
/// lane is found after the tile from the flags, 32 steps per vector test: a bit
/// set per step in the loop chained every step through one word in memory.
struct Held<T: Lanes> {
    flags: [u16; TILE / 16],
    lanes: [T::Raw; TILE / 16],
}

impl<T: Lanes> Held<T> {
    #[inline(always)]
    unsafe fn new() -> Self {
        // SAFETY: all-zero bits are valid integers and SIMD vectors.
        std::mem::zeroed()
    }

    #[inline(always)]
    unsafe fn keep(&mut self, k: usize, flags: u16, w: T::Raw) {
        *self.flags.get_unchecked_mut(k) = flags;
        *self.lanes.get_unchecked_mut(k) = w;
    }

    /// Append the flagged lanes of the first `steps` steps, kept for the tile
    /// whose first element is `first`, in order. The caller made room for the tile.
    #[inline(always)]
    unsafe fn append_to<const VBMI2: bool>(
        &mut self,
        rec: &mut Appender<T::Bits>,
        first: usize,
        steps: usize,
    ) {
        debug_assert!(steps <= TILE / 16);
        for word in (0..steps).step_by(32) {
            let flags = _mm512_loadu_si512(self.flags.as_ptr().add(word) as *const __m512i);
            let live = u32::MAX >> (32 - (steps - word).min(32));
            let mut bits = _mm512_test_epi16_mask(flags, flags) & live;
            while bits != 0 {
                let k = word + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let (flags, w) = (*self.flags.get_unchecked(k), *self.lanes.get_unchecked(k));
                rec.push::<T, VBMI2>(flags, w, first + 16 * k);
            }
        }
    }
}

impl<B> Appender<'_, B> {
    /// Append (position, original bits) of the lanes of `w` flagged in `bad`:
    /// the kept lanes are compressed to the front of a register and sixteen
    /// slots written past the record's end, which then grows by the number
    /// kept. The caller made [`Appender::room`] for this step.
    #[inline(always)]
    unsafe fn push<T: Lanes<Bits = B>, const VBMI2: bool>(
        &mut self,
        bad: u16,
        w: T::Raw,
        first: usize,
    ) {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // Positions are below 2^32 (checked by the caller), so i32 lanes wrap as u32.
        let pos = _mm512_add_epi32(_mm512_set1_epi32(first as u32 as i32), lanes);
        let kept = _mm512_maskz_compress_epi32(bad, pos);
        let (pos_slots, val_slots) = self.free_slots();
        _mm512_storeu_epi32(pos_slots as *mut i32, kept);
        T::store_kept::<VBMI2>(val_slots, bad, w);
        self.advance(bad.count_ones() as usize);
    }
}

/// `tile = round(tile + acc)` with the record when `undo` is given; returns
/// the overflow count, or None (nothing done) for a type without lanes.
/// Safety: `simd` must have [`Path::Avx512`].
#[inline(always)]
pub unsafe fn add_tile<T: Element>(
    simd: Simd,
    tile: &mut [T],
    acc: &[f32],
    start: usize,
    undo: Option<&mut Undo<T::Bits>>,
) -> Option<usize> {
    with_lanes!(T, L => add_tile_on::<L>(
        simd,
        cast(tile),
        acc,
        start,
        undo.map(|u| cast_undo::<T, L>(u)),
    ))
}

/// [`add_tile_as`] compiled for `simd`'s features.
#[inline(always)]
unsafe fn add_tile_on<T: Lanes>(
    simd: Simd,
    tile: &mut [T],
    acc: &[f32],
    start: usize,
    undo: Option<&mut Undo<T::Bits>>,
) -> usize {
    #[target_feature(enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl")]
    unsafe fn plain<T: Lanes>(
        t: &mut [T],
        a: &[f32],
        s: usize,
        u: Option<&mut Undo<T::Bits>>,
    ) -> usize {
        add_tile_as::<T, false, false>(t, a, s, u)
    }
    #[target_feature(
        enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2"
    )]
    unsafe fn vbmi2<T: Lanes>(
        t: &mut [T],
        a: &[f32],
        s: usize,
        u: Option<&mut Undo<T::Bits>>,
    ) -> usize {
        add_tile_as::<T, true, false>(t, a, s, u)
    }
    #[target_feature(
        enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512dq,avx512bf16"
    )]
    unsafe fn vbmi2_ne<T: Lanes>(
        t: &mut [T],
        a: &[f32],
        s: usize,
        u: Option<&mut Undo<T::Bits>>,
    ) -> usize {
        add_tile_as::<T, true, true>(t, a, s, u)
    }
    if simd.has(Path::Avx512Vbmi2) && bf16_convert_applies::<T>() {
        vbmi2_ne(tile, acc, start, undo)
    } else if simd.has(Path::Avx512Vbmi2) {
        vbmi2(tile, acc, start, undo)
    } else {
        plain(tile, acc, start, undo)
    }
}

#[inline(always)]
unsafe fn add_tile_as<T: Lanes, const VBMI2: bool, const NE: bool>(
    tile: &mut [T],
    acc: &[f32],
    start: usize,
    undo: Option<&mut Undo<T::Bits>>,
) -> usize {
    let n = tile.len().min(acc.len());
    let full = n / 16 * 16;
    let (t, a) = (tile.as_mut_ptr(), acc.as_ptr());
    let mut over = 0u32;
    match undo {
        None => {
            let mut none = Undo::default();
            let mut rec = Appender::new(&mut none);
            for i in (0..full).step_by(16) {
                let d = _mm512_loadu_ps(a.add(i));
                over += step::<T, false, VBMI2, NE>(t.add(i), d, start + i, &mut rec);
            }
            over as usize + add_in_place(&mut tile[full..n], &acc[full..n])
        }
        Some(undo) => {
            let mut rec = Appender::new(undo);
            rec.room(full);
            if T::HOLD {
                assert!(full <= TILE, "a tile holds at most TILE elements");
                let mut held = Held::<T>::new();
                for (k, i) in (0..full).step_by(16).enumerate() {
                    let d = _mm512_loadu_ps(a.add(i));
                    over += step_held::<T, NE>(t.add(i), d, &mut held, k);
                }
                held.append_to::<VBMI2>(&mut rec, start, full / 16);
            } else {
                for i in (0..full).step_by(16) {
                    let d = _mm512_loadu_ps(a.add(i));
                    over += step::<T, true, VBMI2, NE>(t.add(i), d, start + i, &mut rec);
                }
            }
            drop(rec);
            over as usize + add_and_record(&mut tile[full..n], &acc[full..n], start + full, undo)
        }
    }
}

/// True when every delta is 4-bit integer-level codes in groups of whole
/// sixteens (a step never spans two groups) and there are at most
/// [`MAX_FUSED`] of them: what [`apply_fused`] handles.
pub fn fused_applies(deltas: &[(Delta, f32)]) -> bool {
    deltas.len() <= MAX_FUSED
        && deltas.iter().all(|(d, _)| match d {
            Delta::Quant(q) => {
                q.spec.bits == 4
                    && matches!(q.spec.scheme, Scheme::Affine | Scheme::Symmetric)
                    && q.spec.group_len.is_multiple_of(16)
            }
            Delta::Dense(_) => false,
        })
}

/// Apply the 4-bit deltas to `chunk` (elements [base, base + chunk.len()) of
/// the tensor, `base` a multiple of 16) in whole steps of sixteen, decoding
/// the codes in registers. Returns (elements done, overflow count), or None
/// (nothing done) for a type without lanes; the caller finishes the tail.
/// Safety: `simd` must have [`Path::Avx512`] and [`fused_applies`] must
/// hold for `deltas`, which cover the tensor.
#[inline(always)]
pub unsafe fn apply_fused<T: Element>(
    simd: Simd,
    chunk: &mut [T],
    base: usize,
    deltas: &[(Delta, f32)],
    undo: Option<&mut Undo<T::Bits>>,
) -> Option<(usize, usize)> {
    with_lanes!(T, L => fused_on::<L>(
        simd,
        cast(chunk),
        base,
        deltas,
        undo.map(|u| cast_undo::<T, L>(u)),
    ))
}

/// One signature's decoding state: its packed codes, group length, the
/// current group's sixteen decoded levels, and where that group ends.
#[derive(Clone, Copy)]
struct Sig<'a> {
    codes: &'a [u8],
    scale: &'a [f32],
    offset: &'a [f32],
    alpha: f32,
    group_len: usize,
    group: usize,
    end: usize,
    levels: __m512,
}

impl Sig<'_> {
    /// Load group `g`: its level of code c (lane c) is `c·(α·scale) + α·offset`,
    /// rounded after the product and after the sum exactly as the scalar
    /// decode rounds it per element.
    #[inline(always)]
    unsafe fn enter(&mut self, g: usize) {
        self.group = g;
        self.end = (g + 1) * self.group_len;
        let codes = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        let a = _mm512_set1_ps(self.alpha * self.scale[g]);
        let b = _mm512_set1_ps(self.alpha * self.offset[g]);
        self.levels = _mm512_add_ps(_mm512_mul_ps(codes, a), b);
    }

    /// The levels of elements e..e+16 (e even, inside the tensor, in the
    /// current group): one permute of the group's levels by the codes, in
    /// place of a convert, a multiply and an add per step. The permute reads
    /// the low four bits of each 32-bit index, so the nibbles need no mask.
    /// `MULTISHIFT`: spread the codes with AVX-512 VBMI.
    #[inline(always)]
    unsafe fn decode<const MULTISHIFT: bool>(&self, e: usize) -> __m512 {
        // Eight bytes hold the sixteen codes, low nibble first.
        let p = self.codes.as_ptr().add(e / 2);
        let c = if MULTISHIFT {
            // Every 64-bit lane holds all eight bytes; lane i's low byte takes
            // the eight bits from bit 4i of its half.
            let bytes = _mm512_set1_epi64((p as *const i64).read_unaligned());
            let shifts =
                _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
            _mm512_multishift_epi64_epi8(shifts, bytes)
        } else {
            // Each byte twice, widened to i32 lanes; odd lanes shifted down
            // to their high nibble.
            let x = _mm_loadl_epi64(p as *const __m128i);
            let twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(x, x));
            let shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
            _mm512_srlv_epi32(twice, shifts)
        };
        _mm512_permutexvar_ps(c, self.levels)
    }
}

/// [`fused_n`] compiled for `simd`'s features.
#[inline(always)]
unsafe fn fused_on<T: Lanes>(
    simd: Simd,
    chunk: &mut [T],
    base: usize,
    deltas: &[(Delta, f32)],
    undo: Option<&mut Undo<T::Bits>>,
) -> (usize, usize) {
    type Done = (usize, usize);
    #[target_feature(enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl")]
    unsafe fn plain<T: Lanes>(
        c: &mut [T],
        b: usize,
        d: &[(Delta, f32)],
        u: Option<&mut Undo<T::Bits>>,
    ) -> Done {
        fused_n::<T, false, false>(c, b, d, u)
    }
    #[target_feature(
        enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2"
    )]
    unsafe fn vbmi2<T: Lanes>(
        c: &mut [T],
        b: usize,
        d: &[(Delta, f32)],
        u: Option<&mut Undo<T::Bits>>,
    ) -> Done {
        fused_n::<T, true, false>(c, b, d, u)
    }
    #[target_feature(
        enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512dq,avx512bf16"
    )]
    unsafe fn vbmi2_ne<T: Lanes>(
        c: &mut [T],
        b: usize,
        d: &[(Delta, f32)],
        u: Option<&mut Undo<T::Bits>>,
    ) -> Done {
        fused_n::<T, true, true>(c, b, d, u)
    }
    if simd.has(Path::Avx512Vbmi2) && bf16_convert_applies::<T>() {
        vbmi2_ne(chunk, base, deltas, undo)
    } else if simd.has(Path::Avx512Vbmi2) {
        vbmi2(chunk, base, deltas, undo)
    } else {
        plain(chunk, base, deltas, undo)
    }
}

/// [`fused_as`] for the number of signatures given: a count known at
/// compile time keeps every signature's state in registers and unrolls the
/// loop over them (a run-time count kept them on the stack, with a branch
/// per signature and step).
#[inline(always)]
unsafe fn fused_n<T: Lanes, const VBMI2: bool, const NE: bool>(
    chunk: &mut [T],
    base: usize,
    deltas: &[(Delta, f32)],
    undo: Option<&mut Undo<T::Bits>>,
) -> (usize, usize) {
    let (c, b, d, u) = (chunk, base, deltas, undo);
    match deltas.len() {
        0 => fused_as::<T, VBMI2, NE, 0>(c, b, d, u),
        1 => fused_as::<T, VBMI2, NE, 1>(c, b, d, u),
        2 => fused_as::<T, VBMI2, NE, 2>(c, b, d, u),
        3 => fused_as::<T, VBMI2, NE, 3>(c, b, d, u),
        4 => fused_as::<T, VBMI2, NE, 4>(c, b, d, u),
        5 => fused_as::<T, VBMI2, NE, 5>(c, b, d, u),
        6 => fused_as::<T, VBMI2, NE, 6>(c, b, d, u),
        7 => fused_as::<T, VBMI2, NE, 7>(c, b, d, u),
        8 => fused_as::<T, VBMI2, NE, 8>(c, b, d, u),
        _ => unreachable!("fused_applies admits at most MAX_FUSED deltas"),
    }
}

/// The decoding state of `delta` (scaled by `alpha`) at element `base`,
/// checked to cover elements up to `base + full`.
#[inline(always)]
unsafe fn sig_at<'a>((delta, alpha): &(Delta<'a>, f32), base: usize, full: usize) -> Sig<'a> {
    let Delta::Quant(q) = delta else {
        unreachable!("fused_applies admits quantized deltas only")
    };
    // Every step reads 8 code bytes at e/2 with e + 16 <= numel.
    assert!(q.codes.len() * 2 >= q.numel && base + full <= q.numel);
    let mut sig = Sig {
        codes: q.codes,
        scale: q.scale,
        offset: q.offset,
        alpha: *alpha,
        group_len: q.spec.group_len,
        group: 0,
        end: 0,
        levels: _mm512_setzero_ps(),
    };
    sig.enter(base / q.spec.group_len);
    sig
}

/// Σ of the signatures' decoded deltas of elements e..e+16 (see
/// [`Sig::decode`] for `MULTISHIFT`). A function, not a closure: only
/// `#[inline(always)]` makes sure it is compiled with the caller's target
/// features (an out-of-line closure calls every intrinsic).
#[inline(always)]
unsafe fn sum_at<const MULTISHIFT: bool, const N: usize>(sigs: &mut [Sig; N], e: usize) -> __m512 {
    // −0.0 is the additive identity (+0.0 would turn −0.0 weights into +0.0).
    let mut acc = _mm512_set1_ps(-0.0);
    for s in sigs.iter_mut() {
        if e >= s.end {
            // Steps go in order and groups are whole sixteens: the next group
            // starts here (no division per group: it cost 10-20 cycles each).
            debug_assert_eq!(e, s.end);
            s.enter(s.group + 1);
        }
        acc = _mm512_add_ps(acc, s.decode::<MULTISHIFT>(e));
    }
    acc
}

#[inline(always)]
unsafe fn fused_as<T: Lanes, const VBMI2: bool, const NE: bool, const N: usize>(
    chunk: &mut [T],
    base: usize,
    deltas: &[(Delta, f32)],
    undo: Option<&mut Undo<T::Bits>>,
) -> (usize, usize) {
    let full = chunk.len() / 16 * 16;
    let mut sigs: [Sig; N] = std::array::from_fn(|k| sig_at(&deltas[k], base, full));
    let t = chunk.as_mut_ptr();
    let mut over = 0u32;
    match undo {
        None => {
            let mut none = Undo::default();
            let mut rec = Appender::new(&mut none);
            for i in (0..full).step_by(16) {
                let d = sum_at::<VBMI2, N>(&mut sigs, base + i);
                over += step::<T, false, VBMI2, NE>(t.add(i), d, base + i, &mut rec);
            }
        }
        Some(undo) => {
            let mut rec = Appender::new(undo);
            let mut held = Held::<T>::new();
            for tile in (0..full).step_by(TILE) {
                let end = (tile + TILE).min(full);
                rec.room(end - tile);
                if T::HOLD {
                    for (k, i) in (tile..end).step_by(16).enumerate() {
                        let d = sum_at::<VBMI2, N>(&mut sigs, base + i);
                        over += step_held::<T, NE>(t.add(i), d, &mut held, k);
                    }
                    held.append_to::<VBMI2>(&mut rec, base + tile, (end - tile) / 16);
                    continue;
                }
                for i in (tile..end).step_by(16) {
                    let d = sum_at::<VBMI2, N>(&mut sigs, base + i);
                    over += step::<T, true, VBMI2, NE>(t.add(i), d, base + i, &mut rec);
                }
            }
        }
    }
    (full, over as usize)
}

/// Safety: `T` and `U` must be the same type.
#[inline(always)]
unsafe fn cast<T, U>(x: &mut [T]) -> &mut [U] {
    std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut U, x.len())
}

/// Safety: `T` and `U` must be the same type (so their `Bits` are too).
#[inline(always)]
unsafe fn cast_undo<T: Element, U: Element>(u: &mut Undo<T::Bits>) -> &mut Undo<U::Bits> {
    &mut *(u as *mut Undo<T::Bits> as *mut Undo<U::Bits>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
    unsafe fn narrowed(x: &[f32; 16]) -> [u16; 16] {
        let mut out = [0u16; 16];
        let b = bf16_convert_ne(_mm512_loadu_ps(x.as_ptr()));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, b);
        out
    }

    /// The one-instruction bf16 narrowing rounds as the scalar twin, subnormals
    /// (which the instruction alone flushes to zero) included, alone in a
    /// vector or among normal lanes.
    #[test]
    fn bf16_convert_matches_scalar_rounding() {
        if !bf16_convert_applies::<bf16>() {
            return;
        }
        let specials = [
            0.0,
            -0.0,
            1e-40,
            -3e-39,
            f32::from_bits(1),
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xFFA0_0001),
            1.003_906_3,                 // a tie, to even (down)
            1.011_718_8,                 // a tie, to even (up)
            f32::from_bits(0x3F80_8001), // just above a tie
            3.389_531_4e38,              // rounds to infinity
        ];
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut vectors = vec![specials];
        for _ in 0..2000 {
            vectors.push(std::array::from_fn(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                f32::from_bits(s as u32)
            }));
        }
        let mut normals = [1.5f32; 16];
        normals[7] = 5e-39;
        vectors.push(normals);
        for x in &vectors {
            // SAFETY: the CPU was just checked to have these features.
            let got = unsafe { narrowed(x) };
            for (g, v) in got.iter().zip(x) {
                assert_eq!(
                    *g,
                    bf16::from_f32(*v).to_bits(),
                    "{v:e} ({:#x})",
                    v.to_bits()
                );
            }
        }
    }
}
