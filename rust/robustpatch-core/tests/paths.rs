//! Every SIMD path this CPU runs, forced in turn, against the scalar reference
//! twins: identical bits for apply (target, undo record, overflow count),
//! remove, quantize, dequantize, projection and dot, and apply → remove
//! restoring the original bytes. Paths the CPU lacks are skipped (and
//! `Simd::force` refuses them, which `forcing_a_missing_path_is_refused` checks).

use half::{bf16, f16};
use proptest::prelude::*;
use robustpatch_core::apply::{apply_scalar, apply_with, remove_scalar, remove_with};
use robustpatch_core::arch::{Path, Simd};
use robustpatch_core::delta::{Delta, Dense};
use robustpatch_core::dot::dot_with;
use robustpatch_core::par::{CHUNK, TILE};
use robustpatch_core::project::{project_scalar, project_with};
use robustpatch_core::quant::{
    dequantize_scalar, dequantize_with, quantize, quantize_scalar, quantize_with, QuantSpec,
    Quantized, Scheme,
};
use robustpatch_core::Element;

mod common;

const CASES: u32 = 1000;

/// Deterministic values: mostly small weights, some specials that stress
/// rounding (subnormals, signed zeros, f16 max, infinities, a NaN payload).
fn values(seed: u64, n: usize, mag: f32) -> Vec<f32> {
    const SPECIAL: [f32; 9] = [
        0.0,
        -0.0,
        1e-40,
        6e-8,
        65504.0,
        0.99999994,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x7FC0_1234),
    ];
    common::mixed_values(seed, n, (23, 5), &SPECIAL, mag)
}

/// Finite deltas (quantization refuses NaN/Inf).
fn finite(seed: u64, n: usize, mag: f32) -> Vec<f32> {
    values(seed, n, mag)
        .into_iter()
        .map(|v| {
            if v.is_finite() {
                v.clamp(-mag, mag)
            } else {
                0.5 * mag
            }
        })
        .collect()
}

fn bits<T: Element>(v: &[T]) -> Vec<T::Bits> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn convert<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Group lengths that divide `n`, favouring the fused path's multiples of 16.
fn group_for(n: usize, pick: usize) -> usize {
    let cands = [128, 16, 32, 64, 8, 24, 3, n];
    let fits: Vec<usize> = cands
        .into_iter()
        .filter(|&g| g > 0 && n.is_multiple_of(g))
        .collect();
    fits[pick % fits.len()]
}

/// Apply and remove on `simd` agree with the twins bit for bit, and the
/// record restores the original.
fn apply_matches_twin<T: Element>(simd: Simd, target: &[f32], deltas: &[(Delta, f32)]) {
    let orig: Vec<T> = convert(target);
    for record in [true, false] {
        let (mut fast, mut slow) = (orig.clone(), orig.clone());
        let a = apply_with(simd, &mut fast, deltas, record).unwrap();
        let b = apply_scalar(&mut slow, deltas, record).unwrap();
        let what = format!("{:?} {:?} record={record}", simd.path(), T::DTYPE);
        assert_eq!(bits(&fast), bits(&slow), "apply target, {what}");
        assert_eq!(a, b, "apply record/overflow, {what}");
        if let Some(undo) = &a.undo {
            let (mut f2, mut s2) = (fast.clone(), slow);
            let r1 = remove_with(simd, &mut f2, deltas, Some(undo)).unwrap();
            let r2 = remove_scalar(&mut s2, deltas, Some(undo)).unwrap();
            assert_eq!(r1, r2, "remove report, {what}");
            assert_eq!(bits(&f2), bits(&orig), "apply -> remove restores, {what}");
            let (mut f3, mut s3) = (fast, s2);
            s3.copy_from_slice(&f3);
            let r3 = remove_with(simd, &mut f3, deltas, None).unwrap();
            let r4 = remove_scalar(&mut s3, deltas, None).unwrap();
            assert_eq!(r3, r4, "remove without record, {what}");
            assert_eq!(bits(&f3), bits(&s3), "remove without record, {what}");
        }
    }
}

fn apply_all<T: Element>(target: &[f32], deltas: &[(Delta, f32)]) {
    for simd in Simd::available() {
        apply_matches_twin::<T>(simd, target, deltas);
    }
}

/// Signatures for one case: `k` quantized deltas (4-bit linear most of the
/// time, the fused path's input), the odd one another width or scheme.
fn signatures(seed: u64, n: usize, k: usize, pick: usize, mag: f32) -> Vec<Quantized> {
    (0..k)
        .map(|j| {
            let (bits, scheme) = match (pick + j) % 7 {
                5 => (3, Scheme::Affine),
                6 => (4, Scheme::Log),
                3 => (4, Scheme::Symmetric),
                _ => (4, Scheme::Affine),
            };
            let spec = QuantSpec {
                bits,
                scheme,
                group_len: group_for(n, pick / 3 + j),
            };
            quantize(&finite(seed ^ ((j as u64 + 1) * 0x9E37), n, mag), spec).unwrap()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Quantized signatures (1..=10 of them, so both the fused path and its
    /// fallback beyond eight run), every dtype, every path.
    #[test]
    fn quantized_apply_is_identical_on_every_path(
        seed in any::<u64>(),
        n16 in 1usize..120,
        tail in 0usize..16,
        k in 1usize..=10,
        pick in any::<usize>(),
        big in any::<bool>(),
    ) {
        let n = n16 * 16 + if pick % 4 == 0 { tail } else { 0 };
        // Large α overflows f16 (and makes the record non-trivial).
        let mag = if big { 3e4 } else { 0.05 };
        let qs = signatures(seed, n, k, pick, mag);
        let deltas: Vec<(Delta, f32)> = qs
            .iter()
            .enumerate()
            .map(|(j, q)| (Delta::Quant(q.view()), 0.75 - 0.5 * j as f32))
            .collect();
        let target = values(seed.rotate_left(17), n, 1.0);
        apply_all::<f32>(&target, &deltas);
        apply_all::<f16>(&target, &deltas);
        apply_all::<bf16>(&target, &deltas);
    }

    /// Dense deltas of every dtype (the tile path), every target dtype and path.
    #[test]
    fn dense_apply_is_identical_on_every_path(
        seed in any::<u64>(),
        n in 1usize..3000,
        alpha in -4.0f32..4.0,
    ) {
        let d = finite(seed ^ 0xABCD, n, 0.1);
        let (d16, db16): (Vec<f16>, Vec<bf16>) = (convert(&d), convert(&d));
        let deltas = [
            (Delta::Dense(Dense::F32(&d)), alpha),
            (Delta::Dense(Dense::F16(&d16)), -0.5),
            (Delta::Dense(Dense::BF16(&db16)), 0.25),
        ];
        let target = values(seed, n, 1.0);
        for k in [1, 3] {
            apply_all::<f32>(&target, &deltas[..k]);
            apply_all::<f16>(&target, &deltas[..k]);
            apply_all::<bf16>(&target, &deltas[..k]);
        }
    }

    #[test]
    fn quantize_and_dequantize_are_identical_on_every_path(
        seed in any::<u64>(),
        n8 in 1usize..400,
        width in 1u8..=8,
        scheme in 0usize..4,
        pick in any::<usize>(),
    ) {
        let n = n8 * 8;
        let spec = QuantSpec { bits: width, scheme: Scheme::ALL[scheme], group_len: group_for(n, pick) };
        let x = finite(seed, n, 2.0);
        let (x16, xb16): (Vec<f16>, Vec<bf16>) = (convert(&x), convert(&x));
        for simd in Simd::available() {
            let q = quantize_with(simd, &x, spec).unwrap();
            prop_assert_eq!(&q, &quantize_scalar(&x, spec).unwrap(), "f32 {:?}", simd.path());
            prop_assert_eq!(
                quantize_with(simd, &x16, spec).unwrap(),
                quantize_scalar(&x16, spec).unwrap(),
                "f16 {:?}", simd.path()
            );
            prop_assert_eq!(
                quantize_with(simd, &xb16, spec).unwrap(),
                quantize_scalar(&xb16, spec).unwrap(),
                "bf16 {:?}", simd.path()
            );
            let (mut fast, mut slow) = (vec![0f32; n], vec![0f32; n]);
            dequantize_with(simd, &q.view(), &mut fast).unwrap();
            dequantize_scalar(&q.view(), &mut slow).unwrap();
            prop_assert_eq!(bits(&fast), bits(&slow), "dequantize {:?}", simd.path());
        }
    }

    #[test]
    fn projection_and_dot_are_identical_on_every_path(
        seed in any::<u64>(),
        n in 1usize..5000,
    ) {
        let pre = finite(seed, n, 1.0);
        let clean: Vec<f32> = pre.iter().zip(finite(seed ^ 1, n, 0.01)).map(|(a, b)| a + b).collect();
        let robust: Vec<f32> = pre.iter().zip(finite(seed ^ 2, n, 0.01)).map(|(a, b)| a + b).collect();
        fn check<T: Element>(pre: &[f32], clean: &[f32], robust: &[f32]) {
            let (p, c, r): (Vec<T>, Vec<T>, Vec<T>) = (convert(pre), convert(clean), convert(robust));
            let mut slow = vec![0f32; p.len()];
            let want = project_scalar(&p, &c, &r, &mut slow).unwrap();
            for simd in Simd::available() {
                let mut fast = vec![0f32; p.len()];
                let got = project_with(simd, &p, &c, &r, &mut fast).unwrap();
                assert_eq!(got, want, "{:?} {:?}", simd.path(), T::DTYPE);
                assert_eq!(bits(&fast), bits(&slow), "{:?} {:?}", simd.path(), T::DTYPE);
            }
        }
        check::<f32>(&pre, &clean, &robust);
        check::<f16>(&pre, &clean, &robust);
        check::<bf16>(&pre, &clean, &robust);
        let q = quantize(&clean, QuantSpec { bits: 4, scheme: Scheme::Affine, group_len: n }).unwrap();
        let (a, b) = (Delta::Quant(q.view()), Delta::Dense(Dense::F32(&robust)));
        let want = dot_with(Simd::SCALAR, &a, &b).unwrap();
        for simd in Simd::available() {
            prop_assert_eq!(dot_with(simd, &a, &b).unwrap().to_bits(), want.to_bits());
        }
    }
}

/// Large tensors take the parallel chunks (and the fused path's chunk joins);
/// the fourth signature's groups of 8 send that case down the tile path. The
/// last chunk is one full tile and seven steps, so a tile follows one whose
/// record state it must not reuse.
#[test]
fn large_tensors_are_identical_on_every_path() {
    let n = 4 * CHUNK + TILE + 16 * 7;
    let specs = [
        (Scheme::Affine, 16),
        (Scheme::Symmetric, 16),
        (Scheme::Affine, n),
        (Scheme::Affine, 8),
    ];
    let qs: Vec<Quantized> = specs
        .iter()
        .enumerate()
        .map(|(j, &(scheme, group_len))| {
            let spec = QuantSpec {
                bits: 4,
                scheme,
                group_len,
            };
            quantize(&finite(j as u64 + 9, n, 0.05), spec).unwrap()
        })
        .collect();
    let target = values(77, n, 1.0);
    for k in [1, 3, 4] {
        let deltas: Vec<(Delta, f32)> = qs[..k]
            .iter()
            .map(|q| (Delta::Quant(q.view()), 1.0))
            .collect();
        apply_all::<f32>(&target, &deltas);
        apply_all::<f16>(&target, &deltas);
        apply_all::<bf16>(&target, &deltas);
    }
}

#[test]
fn forcing_a_missing_path_is_refused() {
    for p in Path::ALL {
        let missing = p.missing_features();
        match Simd::force(p) {
            Ok(s) => assert!(missing.is_empty() && s.path() == p),
            Err(e) => {
                let msg = e.to_string();
                assert!(!missing.is_empty());
                assert!(missing.iter().all(|f| msg.contains(f)), "{msg}");
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512vbmi2")
    {
        assert_eq!(Simd::available().len(), 4, "this CPU runs every path");
    }
}
