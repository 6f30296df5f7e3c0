//! Property tests of the fused kernels: parallel == scalar twin bit for bit,
//! apply then remove restores the original bytes, projection is orthogonal.

use half::{bf16, f16};
use proptest::prelude::*;
use robustpatch_core::apply::{apply, apply_scalar, remove, remove_scalar};
use robustpatch_core::delta::{Delta, Dense};
use robustpatch_core::dot::{cosine, dot};
use robustpatch_core::project::{project, project_scalar};
use robustpatch_core::quant::{quantize, QuantSpec, Scheme};
use robustpatch_core::Element;

mod common;

/// Values that break naive add/subtract round trips.
const SPECIAL: [f32; 10] = [
    0.0,
    -0.0,
    1e-40,  // f32 subnormal
    -3e-39, // f32 subnormal
    6e-8,   // f16 subnormal
    1e-45,  // smallest f32 subnormal
    f32::INFINITY,
    f32::NEG_INFINITY,
    65504.0, // f16 max
    0.99999994,
];

/// A target mixing random weights with the special values.
fn target_values(seed: u64, n: usize) -> Vec<f32> {
    common::mixed_values(seed, n, (17, 0), &SPECIAL, 0.1)
}

fn delta_values(seed: u64, n: usize, magnitude: f32) -> Vec<f32> {
    target_values(seed.wrapping_mul(31).wrapping_add(7), n)
        .iter()
        .map(|v| {
            if v.is_finite() {
                (v * 10.0).clamp(-1.0, 1.0) * magnitude
            } else {
                magnitude
            }
        })
        .collect()
}

fn convert<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn bits<T: Element>(v: &[T]) -> Vec<T::Bits> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Apply `deltas` with and without the parallel kernel, check both agree, then
/// remove with the record and check the original bits come back.
fn roundtrip<T: Element>(target: &[f32], deltas: &[(Delta, f32)]) -> (usize, usize) {
    let original: Vec<T> = convert(target);
    let mut fast = original.clone();
    let mut slow = original.clone();
    let undo_fast = apply(&mut fast, deltas, true).unwrap().undo.unwrap();
    let undo_slow = apply_scalar(&mut slow, deltas, true).unwrap().undo.unwrap();
    assert_eq!(
        bits(&fast),
        bits(&slow),
        "parallel apply differs from the scalar twin"
    );
    assert_eq!(undo_fast, undo_slow);
    let mut slow_back = slow.clone();
    remove(&mut fast, deltas, Some(&undo_fast)).unwrap();
    remove_scalar(&mut slow_back, deltas, Some(&undo_slow)).unwrap();
    assert_eq!(
        bits(&fast),
        bits(&original),
        "remove did not restore the original"
    );
    assert_eq!(bits(&slow_back), bits(&original));
    (undo_fast.positions.len(), original.len())
}

/// Overflow count of [`apply`] (explicit SIMD, tails, parallel chunks) against
/// the scalar twin and against a count made here from the bits before and after.
fn overflow_count_matches<T: Element>(n: usize) {
    let big = match T::DTYPE {
        robustpatch_core::DType::F16 => 60000.0,
        _ => 3.0e38,
    };
    // Large weights, existing Inf and NaN (never counted), small ones.
    let target: Vec<T> = (0..n)
        .map(|i| match i % 7 {
            0 => T::from_f32(big),
            1 => T::from_f32(-big),
            2 => T::from_f32(f32::INFINITY),
            3 => T::from_f32(f32::NAN),
            _ => T::from_f32(i as f32 * 1e-3),
        })
        .collect();
    let d: Vec<f32> = (0..n)
        .map(|i| if i % 5 == 0 { -big } else { big })
        .collect();
    let deltas = [(Delta::Dense(Dense::F32(&d)), 2.0)];
    let finite = |x: T| x.to_f32().is_finite();
    for record in [true, false] {
        let (mut fast, mut slow) = (target.clone(), target.clone());
        let a = apply(&mut fast, &deltas, record).unwrap();
        let b = apply_scalar(&mut slow, &deltas, record).unwrap();
        let want = target
            .iter()
            .zip(&slow)
            .filter(|(&o, &w)| finite(o) && !finite(w))
            .count();
        assert!(want > 0, "the case overflows somewhere");
        assert_eq!(bits(&fast), bits(&slow));
        assert_eq!(
            (a.overflowed, b.overflowed),
            (want, want),
            "{:?} n={n} record={record}",
            T::DTYPE
        );
    }
}

#[test]
fn overflow_is_counted_on_every_dtype_and_path() {
    // A tail of five, several tiles, and enough for parallel chunks.
    for n in [37, 3 * 2048 + 5, (1 << 17) + 1001] {
        overflow_count_matches::<f32>(n);
        overflow_count_matches::<f16>(n);
        overflow_count_matches::<bf16>(n);
    }
}

#[test]
fn finite_results_count_no_overflow() {
    let mut t: Vec<f16> = convert(&[65504.0, -65504.0, 1.0, f32::INFINITY]);
    let d = [-1.0f32, 1.0, 2.0, 1.0];
    let a = apply(&mut t, &[(Delta::Dense(Dense::F32(&d)), 1.0)], false).unwrap();
    assert_eq!(a.overflowed, 0, "Inf in, Inf out is not an overflow");
}

fn check_all_dtypes(target: &[f32], deltas: &[(Delta, f32)]) {
    roundtrip::<f32>(target, deltas);
    roundtrip::<f16>(target, deltas);
    roundtrip::<bf16>(target, deltas);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dense_apply_then_remove_is_exact(
        seed in any::<u64>(), n in 0usize..5000, alpha in -2.0f32..2.0, mag in 1e-6f32..1.0,
    ) {
        let t = target_values(seed, n);
        let d = delta_values(seed, n, mag);
        let d16: Vec<bf16> = convert(&d);
        let deltas = [(Delta::Dense(Dense::F32(&d)), alpha), (Delta::Dense(Dense::BF16(&d16)), 0.5)];
        check_all_dtypes(&t, &deltas);
    }

    #[test]
    fn quantized_apply_then_remove_is_exact(
        seed in any::<u64>(), groups in 1usize..40, group_len in 1usize..300,
        bits_a in 1u8..=8, bits_b in 1u8..=8, alpha in -1.5f32..1.5,
    ) {
        let n = groups * group_len;
        let t = target_values(seed, n);
        let da = delta_values(seed, n, 0.01);
        let db = delta_values(seed ^ 0xabcd, n, 0.003);
        let qa = quantize(&da, QuantSpec { bits: bits_a, scheme: Scheme::Affine, group_len }).unwrap();
        let qb = quantize(&db, QuantSpec { bits: bits_b, scheme: Scheme::Log, group_len: n }).unwrap();
        let deltas = [(Delta::Quant(qa.view()), alpha), (Delta::Quant(qb.view()), 1.0)];
        check_all_dtypes(&t, &deltas);
    }

    #[test]
    fn projection_matches_twin_and_is_orthogonal(seed in any::<u64>(), n in 1usize..20000) {
        let pre = target_values(seed, n).iter().map(|v| if v.is_finite() { *v } else { 0.5 }).collect::<Vec<_>>();
        let clean: Vec<f32> = pre.iter().zip(delta_values(seed, n, 0.01)).map(|(p, d)| p + d).collect();
        let robust: Vec<f32> = pre.iter().zip(delta_values(seed ^ 99, n, 0.02)).map(|(p, d)| p + d).collect();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        let sa = project(&pre, &clean, &robust, &mut a).unwrap();
        let sb = project_scalar(&pre, &clean, &robust, &mut b).unwrap();
        prop_assert_eq!(bits(&a), bits(&b));
        prop_assert_eq!(sa, sb);
        // The signature is orthogonal to the clean delta d.
        let d: Vec<f64> = pre.iter().zip(&clean).map(|(p, c)| (c - p) as f64).collect();
        let sd: f64 = a.iter().zip(&d).map(|(s, d)| *s as f64 * d).sum();
        let scale = (sa.norm2_sig * sa.norm2_d).sqrt().max(1e-30);
        prop_assert!((sd / scale).abs() < 1e-4, "cos(sig, d) = {}", sd / scale);
        // ‖sig‖² = ‖Δr‖² − ⟨Δr,d⟩²/‖d‖² (Pythagoras).
        if sa.norm2_d > 0.0 {
            let expect = sa.norm2_r - sa.dot_rd * sa.dot_rd / sa.norm2_d;
            prop_assert!((sa.norm2_sig - expect).abs() <= 1e-4 * sa.norm2_r.max(1e-30));
        }
    }

    #[test]
    fn dot_from_codes_matches_dequantized(seed in any::<u64>(), groups in 1usize..20, bits in 1u8..=8) {
        let n = groups * 128;
        let a = delta_values(seed, n, 0.1);
        let b = delta_values(seed ^ 5, n, 0.1);
        let qa = quantize(&a, QuantSpec { bits, scheme: Scheme::Symmetric, group_len: 128 }).unwrap();
        let mut deq = vec![0f32; n];
        robustpatch_core::quant::dequantize(&qa.view(), &mut deq).unwrap();
        let want: f64 = deq.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let got = dot(&Delta::Quant(qa.view()), &Delta::Dense(Dense::F32(&b))).unwrap();
        prop_assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0));
    }
}

#[test]
fn parallel_path_matches_scalar_on_large_tensors() {
    // Above PARALLEL_MIN so rayon splits the work.
    let n = 128 * 4700 + 3;
    let t = target_values(42, n);
    let d = delta_values(42, n, 0.02);
    let q = quantize(
        &d[..n - 3],
        QuantSpec {
            bits: 4,
            scheme: Scheme::Affine,
            group_len: 128,
        },
    );
    assert!(q.is_ok());
    let dense = [(Delta::Dense(Dense::F32(&d)), 0.75)];
    check_all_dtypes(&t, &dense);
    let q = q.unwrap();
    let quant = [
        (Delta::Quant(q.view()), 1.0),
        (Delta::Quant(q.view()), -0.25),
    ];
    check_all_dtypes(&t[..n - 3], &quant);
}

#[test]
fn undo_record_is_a_small_share_of_the_tensor() {
    // Weights ~ N(0, 0.05), a delta 1% of their scale: the typical signature case.
    let n = 1 << 20;
    let t: Vec<f32> = target_values(7, n)
        .iter()
        .map(|v| if v.is_finite() { *v * 0.5 } else { 0.01 })
        .collect();
    let d = delta_values(8, n, 0.001);
    let deltas = [(Delta::Dense(Dense::F32(&d)), 1.0)];
    for (name, (fixes, total)) in [
        ("f32", roundtrip::<f32>(&t, &deltas)),
        ("f16", roundtrip::<f16>(&t, &deltas)),
        ("bf16", roundtrip::<bf16>(&t, &deltas)),
    ] {
        let share = fixes as f64 / total as f64;
        println!(
            "{name}: {fixes} of {total} elements need a record ({:.2}%)",
            100.0 * share
        );
        assert!(share < 0.10, "{name}: record share {share}");
    }
}

#[test]
fn cosine_of_a_delta_with_itself_is_one() {
    let a = delta_values(3, 1000, 0.5);
    let c = cosine(&Delta::Dense(Dense::F32(&a)), &Delta::Dense(Dense::F32(&a))).unwrap();
    assert!((c - 1.0).abs() < 1e-12);
    let z = vec![0f32; 1000];
    assert_eq!(
        cosine(&Delta::Dense(Dense::F32(&a)), &Delta::Dense(Dense::F32(&z))).unwrap(),
        0.0
    );
}

#[test]
fn mismatched_lengths_and_bad_alpha_are_refused() {
    let mut t = vec![0f32; 10];
    let d = vec![0f32; 9];
    assert!(apply(&mut t, &[(Delta::Dense(Dense::F32(&d)), 1.0)], true).is_err());
    let d = vec![0f32; 10];
    assert!(apply(&mut t, &[(Delta::Dense(Dense::F32(&d)), f32::NAN)], true).is_err());
    assert!(apply::<f32>(&mut t, &[], true).is_err());
    let mut out = vec![0f32; 3];
    assert!(project(&[0f32; 3], &[0f32; 2], &[0f32; 3], &mut out).is_err());
}
