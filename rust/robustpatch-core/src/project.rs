//! The robust weight signature of one tensor:
//! `sig = Δr − (⟨Δr,d⟩/‖d‖²)·d` with `Δr = robust − pre` and `d = clean − pre`,
//! computed from the three tensors in two passes without materializing Δr or d.
//!
//! Sums are taken per fixed block of [`BLOCK`] elements (four f64 accumulators)
//! and the block sums are added in order, so the parallel kernel and its
//! scalar twin give the same bits on any number of threads.

use crate::arch::{self, Simd};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::hash::{block_digest, digest_of_blocks, DIGEST_BLOCK};
use crate::par::PARALLEL_MIN;
use rayon::prelude::*;

/// Elements per reduction block; fixed so results do not depend on threads. It
/// is also the tensor digest's block, so the first pass can hash `pre`.
pub const BLOCK: usize = DIGEST_BLOCK;

/// Everything layer selection needs besides the signature itself.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProjectionStats {
    /// ⟨Δr, d⟩
    pub dot_rd: f64,
    /// ‖d‖²
    pub norm2_d: f64,
    /// ‖Δr‖²
    pub norm2_r: f64,
    /// ‖robust‖² (the scale a difference `robust − clean` is judged against)
    pub norm2_robust: f64,
    /// ‖sig‖²
    pub norm2_sig: f64,
    /// ⟨Δr,d⟩/‖d‖², or 0 when d = 0 (then sig = Δr).
    pub coef: f64,
}

/// Compute the signature into `out` and return the statistics.
pub fn project<T: Element>(
    pre: &[T],
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
) -> Result<ProjectionStats> {
    project_with(arch::selected()?, pre, clean, robust, out)
}

/// [`project`] on a given SIMD path (every path gives the same bits).
pub fn project_with<T: Element>(
    simd: Simd,
    pre: &[T],
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
) -> Result<ProjectionStats> {
    Ok(run(simd, pre, clean, robust, out, false)?.0)
}

/// [`project`], also returning `pre`'s [`tensor_digest`](crate::hash::tensor_digest)
/// (the base model's fingerprint needs it). Each block is hashed in the first
/// pass, while it is in cache for the sums, so the hash costs no read of its own.
pub fn project_hashing<T: Element>(
    pre: &[T],
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
) -> Result<(ProjectionStats, [u8; 16])> {
    let (stats, digest) = run(arch::selected()?, pre, clean, robust, out, true)?;
    Ok((stats, digest.expect("hashing was asked for")))
}

type Moments = ([f64; 4], Option<[u8; 16]>);

fn run<T: Element>(
    simd: Simd,
    pre: &[T],
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
    hash: bool,
) -> Result<(ProjectionStats, Option<[u8; 16]>)> {
    check_lengths(pre.len(), clean.len(), robust.len(), out.len())?;
    if !hash && std::ptr::eq(pre, clean) {
        return Ok((difference(simd, clean, robust, out)?, None));
    }
    let parallel = pre.len() >= PARALLEL_MIN;
    let nblocks = pre.len().div_ceil(BLOCK);
    let blocks = |b: usize| -> Moments {
        let r = b * BLOCK..((b + 1) * BLOCK).min(pre.len());
        let (p, c, r) = (&pre[r.clone()], &clean[r.clone()], &robust[r]);
        let sums = simd.run(
            #[inline(always)]
            || moments(p, c, r),
        );
        (sums, hash.then(|| block_digest(bytes_of(p))))
    };
    let firsts: Vec<Moments> = if parallel {
        (0..nblocks).into_par_iter().map(blocks).collect()
    } else {
        (0..nblocks).map(blocks).collect()
    };
    let sums: Vec<[f64; 4]> = firsts.iter().map(|f| f.0).collect();
    let mut stats = combine(&sums)?;
    let digest = hash.then(|| {
        let blocks: Vec<[u8; 16]> = firsts.iter().filter_map(|f| f.1).collect();
        digest_of_blocks(&blocks)
    });
    let c = stats.coef as f32;
    if !c.is_finite() {
        stats.norm2_sig = residual_wide(pre, clean, robust, stats.coef, out);
        return Ok((stats, digest));
    }
    let write = |(b, o): (usize, &mut [f32])| {
        let r = b * BLOCK..b * BLOCK + o.len();
        let (p, cl, rb) = (&pre[r.clone()], &clean[r.clone()], &robust[r]);
        simd.run(
            #[inline(always)]
            || residual(p, cl, rb, c, o),
        )
    };
    let norms: Vec<f64> = if parallel {
        out.par_chunks_mut(BLOCK).enumerate().map(write).collect()
    } else {
        out.chunks_mut(BLOCK).enumerate().map(write).collect()
    };
    stats.norm2_sig = norms.iter().sum();
    Ok((stats, digest))
}

/// The projection when the pretrained tensor is the clean one (the difference
/// method): d = 0, so the coefficient is 0 and the signature is `robust − clean`.
/// One pass, where the general case needs a first one for its sums; the same
/// bits, and the same statistics, as that case gives.
fn difference<T: Element>(
    simd: Simd,
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
) -> Result<ProjectionStats> {
    let write = |(b, o): (usize, &mut [f32])| {
        let r = b * BLOCK..b * BLOCK + o.len();
        let (cl, rb) = (&clean[r.clone()], &robust[r]);
        simd.run(
            #[inline(always)]
            || difference_block(cl, rb, o),
        )
    };
    let sums: Vec<[f64; 2]> = if clean.len() >= PARALLEL_MIN {
        out.par_chunks_mut(BLOCK).enumerate().map(write).collect()
    } else {
        out.chunks_mut(BLOCK).enumerate().map(write).collect()
    };
    let (sig, rob) = sums
        .iter()
        .fold((0.0, 0.0), |(s, r), b| (s + b[0], r + b[1]));
    // A NaN or Inf in either input, or an overflowing difference, shows up in ‖out‖².
    combine(&[[0.0, 0.0, sig, rob]])?;
    Ok(ProjectionStats {
        norm2_r: sig,
        norm2_sig: sig,
        norm2_robust: rob,
        ..ProjectionStats::default()
    })
}

/// `out = robust − clean` for one block; returns [‖out‖², ‖robust‖²], four lanes
/// each, as [`residual`] and [`moments`] sum them.
#[inline(always)]
fn difference_block<T: Element>(clean: &[T], robust: &[T], out: &mut [f32]) -> [f64; 2] {
    let mut acc = [[0f64; LANES]; 2];
    let mut add = |c: &[T], r: &[T], o: &mut [f32]| {
        for l in 0..o.len() {
            let rv = r[l].to_f32();
            let s = rv - c[l].to_f32();
            o[l] = s;
            acc[0][l] += (s as f64) * (s as f64);
            acc[1][l] += (rv as f64) * (rv as f64);
        }
    };
    let (c4, r4) = (clean.chunks_exact(LANES), robust.chunks_exact(LANES));
    let (ct, rt) = (c4.remainder(), r4.remainder());
    let mut o4 = out.chunks_exact_mut(LANES);
    for ((c, r), o) in c4.zip(r4).zip(&mut o4) {
        add(as_lanes(c), as_lanes(r), o);
    }
    add(ct, rt, o4.into_remainder());
    acc.map(lanes_sum)
}

/// The residual `Δr − coef·d` in f64, rounded once to f32, and its squared norm: for a
/// coefficient past f32 (a clean change of subnormal size), where the f32 pass would
/// give `inf·0 = NaN`. One plain loop, shared by every path and the reference twin.
fn residual_wide<T: Element>(
    pre: &[T],
    clean: &[T],
    robust: &[T],
    coef: f64,
    out: &mut [f32],
) -> f64 {
    let mut norm2 = 0f64;
    for (k, o) in out.iter_mut().enumerate() {
        let p = pre[k].to_f32();
        let dr = (robust[k].to_f32() - p) as f64;
        let d = (clean[k].to_f32() - p) as f64;
        *o = (dr - coef * d) as f32;
        norm2 += (*o as f64) * (*o as f64);
    }
    norm2
}

/// The raw bytes of a slice of elements (f32, f16 or bf16: no padding).
fn bytes_of<T: Element>(x: &[T]) -> &[u8] {
    // SAFETY: Element types are plain numbers without padding; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// Reference twin of [`project`]: single thread, plain element loops.
pub fn project_scalar<T: Element>(
    pre: &[T],
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
) -> Result<ProjectionStats> {
    check_lengths(pre.len(), clean.len(), robust.len(), out.len())?;
    let mut sums = Vec::new();
    for b in 0..pre.len().div_ceil(BLOCK) {
        let r = b * BLOCK..((b + 1) * BLOCK).min(pre.len());
        let mut acc = [[0f64; 4]; 4];
        for (i, k) in r.enumerate() {
            let p = pre[k].to_f32();
            let dr = (robust[k].to_f32() - p) as f64;
            let d = (clean[k].to_f32() - p) as f64;
            acc[0][i % 4] += dr * d;
            acc[1][i % 4] += d * d;
            acc[2][i % 4] += dr * dr;
            let rv = robust[k].to_f32() as f64;
            acc[3][i % 4] += rv * rv;
        }
        sums.push(acc.map(lanes_sum));
    }
    let mut stats = combine(&sums)?;
    let c = stats.coef as f32;
    if !c.is_finite() {
        stats.norm2_sig = residual_wide(pre, clean, robust, stats.coef, out);
        return Ok(stats);
    }
    for b in 0..pre.len().div_ceil(BLOCK) {
        let mut acc = [0f64; 4];
        for (i, k) in (b * BLOCK..((b + 1) * BLOCK).min(pre.len())).enumerate() {
            let p = pre[k].to_f32();
            let s = (robust[k].to_f32() - p) - c * (clean[k].to_f32() - p);
            out[k] = s;
            acc[i % 4] += (s as f64) * (s as f64);
        }
        stats.norm2_sig += lanes_sum(acc);
    }
    Ok(stats)
}

fn check_lengths(pre: usize, clean: usize, robust: usize, out: usize) -> Result<()> {
    if pre != clean || pre != robust || pre != out {
        return Err(Error::Shape(format!(
            "projection needs equal lengths, got pretrained {pre}, clean {clean}, \
             robust {robust}, output {out}"
        )));
    }
    Ok(())
}

#[inline(always)]
fn lanes_sum(a: [f64; 4]) -> f64 {
    (a[0] + a[1]) + (a[2] + a[3])
}

/// The lanes every reduction uses: element i of a block goes to lane i % 4.
const LANES: usize = 4;

/// [⟨Δr,d⟩, ‖d‖², ‖Δr‖², ‖robust‖²] of one block, four lanes each. Written over
/// fixed-size lane arrays so that, under [`Simd::run`], each accumulator is one
/// 256-bit register of f64 and the loop carries no bounds checks.
#[inline(always)]
fn moments<T: Element>(pre: &[T], clean: &[T], robust: &[T]) -> [f64; 4] {
    let mut acc = [[0f64; LANES]; 4];
    let mut add = |p: &[T], c: &[T], r: &[T]| {
        for l in 0..p.len() {
            let pv = p[l].to_f32();
            let dr = (r[l].to_f32() - pv) as f64;
            let d = (c[l].to_f32() - pv) as f64;
            acc[0][l] += dr * d;
            acc[1][l] += d * d;
            acc[2][l] += dr * dr;
            let rv = r[l].to_f32() as f64;
            acc[3][l] += rv * rv;
        }
    };
    let (p4, c4, r4) = (
        pre.chunks_exact(LANES),
        clean.chunks_exact(LANES),
        robust.chunks_exact(LANES),
    );
    let (pt, ct, rt) = (p4.remainder(), c4.remainder(), r4.remainder());
    for ((p, c), r) in p4.zip(c4).zip(r4) {
        add(as_lanes(p), as_lanes(c), as_lanes(r));
    }
    add(pt, ct, rt);
    acc.map(lanes_sum)
}

/// Write `Δr − c·d` for one block and return its squared norm.
#[inline(always)]
fn residual<T: Element>(pre: &[T], clean: &[T], robust: &[T], c: f32, out: &mut [f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let (p4, c4, r4) = (
        pre.chunks_exact(LANES),
        clean.chunks_exact(LANES),
        robust.chunks_exact(LANES),
    );
    let (pt, ct, rt) = (p4.remainder(), c4.remainder(), r4.remainder());
    let mut o4 = out.chunks_exact_mut(LANES);
    for (((p, cl), r), o) in p4.zip(c4).zip(r4).zip(&mut o4) {
        let sq = write_residual(as_lanes(p), as_lanes(cl), as_lanes(r), c, o);
        for l in 0..LANES {
            acc[l] += sq[l];
        }
    }
    let sq = write_residual(pt, ct, rt, c, o4.into_remainder());
    for l in 0..pt.len() {
        acc[l] += sq[l];
    }
    lanes_sum(acc)
}

/// `o = Δr − c·d` for up to [`LANES`] elements; returns the squares in f64.
/// (Returning them, rather than adding into a captured accumulator, keeps the
/// accumulator in a register instead of a stack slot.)
#[inline(always)]
fn write_residual<T: Element>(p: &[T], cl: &[T], r: &[T], c: f32, o: &mut [f32]) -> [f64; LANES] {
    let mut sq = [0f64; LANES];
    for l in 0..o.len() {
        let pv = p[l].to_f32();
        let s = (r[l].to_f32() - pv) - c * (cl[l].to_f32() - pv);
        o[l] = s;
        sq[l] = (s as f64) * (s as f64);
    }
    sq
}

/// A `chunks_exact(LANES)` item as a fixed-size array, so indexing it is free.
#[inline(always)]
fn as_lanes<T>(x: &[T]) -> &[T; LANES] {
    x.try_into().expect("chunk of LANES")
}

/// Add the block sums in order; NaN or Inf anywhere in the inputs shows up
/// here, so non-finite data is refused without a pass of its own. So does a
/// difference of finite weights that overflows f32 (it is taken in f32).
fn combine(sums: &[[f64; 4]]) -> Result<ProjectionStats> {
    let mut s = ProjectionStats::default();
    for b in sums {
        s.dot_rd += b[0];
        s.norm2_d += b[1];
        s.norm2_r += b[2];
        s.norm2_robust += b[3];
    }
    if !(s.dot_rd.is_finite() && s.norm2_d.is_finite() && s.norm2_r.is_finite()) {
        return Err(Error::NonFinite(
            "pretrained, clean or robust weights hold NaN or Inf, or their differences \
             overflow float32"
                .into(),
        ));
    }
    s.coef = if s.norm2_d > 0.0 {
        s.dot_rd / s.norm2_d
    } else {
        0.0
    };
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coefficient_past_f32_gives_the_finite_residual() {
        // d = (1e-40, 0): coef = 1e40 overflows f32, and r − c·d was NaN
        let (pre, clean, robust) = ([0f32, 0.0], [1e-40f32, 0.0], [1f32, 1.0]);
        for simd in Simd::available() {
            let mut out = [f32::NAN; 2];
            let stats = project_with(simd, &pre, &clean, &robust, &mut out).unwrap();
            assert_eq!(out, [0.0, 1.0], "{:?}", simd.path());
            assert_eq!(stats.norm2_sig, 1.0);
        }
        let mut out = [f32::NAN; 2];
        project_scalar(&pre, &clean, &robust, &mut out).unwrap();
        assert_eq!(out, [0.0, 1.0]);
    }
    use half::{bf16, f16};

    fn check_hashing<T: Element>(n: usize) {
        let v = |k: usize, s: f32| T::from_f32(((k * 37 % 101) as f32 - 50.0) * s);
        let pre: Vec<T> = (0..n).map(|k| v(k, 0.01)).collect();
        let clean: Vec<T> = (0..n).map(|k| v(k + 3, 0.011)).collect();
        let robust: Vec<T> = (0..n).map(|k| v(k + 7, 0.012)).collect();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        let plain = project(&pre, &clean, &robust, &mut a).unwrap();
        let (stats, digest) = project_hashing(&pre, &clean, &robust, &mut b).unwrap();
        assert_eq!(plain, stats);
        assert_eq!(a, b);
        let want = crate::hash::tensor_digest(bytes_of(&pre), std::mem::size_of::<T>());
        assert_eq!(digest, want, "{n} elements");
    }

    #[test]
    fn the_difference_pass_gives_the_general_projections_bits() {
        // The scalar twin runs the general two passes even when pre is clean.
        for n in [0, 3, BLOCK + 5, PARALLEL_MIN + 9] {
            let clean: Vec<f32> = (0..n)
                .map(|k| ((k * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            let robust: Vec<f32> = (0..n)
                .map(|k| ((k * 53 % 97) as f32 - 48.0) * 0.012)
                .collect();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            let fast = project(&clean, &clean, &robust, &mut a).unwrap();
            let twin = project_scalar(&clean, &clean, &robust, &mut b).unwrap();
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(fast, twin, "{n} elements");
        }
        let (c, mut r) = (vec![1f32; 8], vec![2f32; 8]);
        r[5] = f32::NAN;
        let err = project(&c, &c, &r, &mut [0f32; 8]).unwrap_err();
        assert!(matches!(err, Error::NonFinite(_)));
    }

    #[test]
    fn the_fused_hash_is_the_tensor_digest_of_the_pretrained_bytes() {
        // Empty, one partial block, exactly one, several with a partial last, and
        // enough for the parallel path.
        for n in [0, 5, BLOCK, BLOCK + 1, 3 * BLOCK + 17, PARALLEL_MIN + 9] {
            check_hashing::<f32>(n);
            check_hashing::<f16>(n);
            check_hashing::<bf16>(n);
        }
    }
}
