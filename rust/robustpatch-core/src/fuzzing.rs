//! Invariants checked on arbitrary bytes, shared by the `cargo fuzz` targets
//! (fuzz/) and the corpus replay test that runs in CI. Each function panics
//! when an invariant breaks and returns quietly on input that is refused.

use crate::apply::{apply, remove};
use crate::delta::Delta;
use crate::quant::{dequantize, QuantSpec, QuantView, Scheme};
use crate::safetensors::{dtype_size, parse};
use crate::Element;
use half::{bf16, f16};

/// The header parser never panics, and what it accepts tiles the data buffer
/// exactly: in order, no gap, no overlap, nothing after the last tensor.
/// Returns whether the parser accepted the input.
pub fn check_header(data: &[u8]) -> bool {
    let parsed = parse(data, data.len() as u64);
    if let Ok(h) = &parsed {
        let mut covered = 0;
        for t in h.tensors() {
            assert_eq!(t.begin, covered, "gap or overlap accepted");
            covered = t.end;
            let numel: usize = t.shape.iter().product();
            let size = dtype_size(t.dtype).expect("accepted dtype has a size");
            assert_eq!(numel * size, t.end - t.begin, "size mismatch accepted");
        }
        assert_eq!(
            h.data_start + covered,
            data.len(),
            "uncovered bytes accepted"
        );
    }
    parsed.is_ok()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Arbitrary codes, scales and spec through validation, dequantize and fused
/// apply + remove: no panic, and remove restores the target bit for bit.
/// Layout: bits, scheme, numel (u16), group_len (u16), split, kind, params, codes;
/// `kind` picks the target dtype (f32, f16, bf16: `kind % 3`) and how many times the
/// delta is applied at once (1 to 3, at α 0.5, −1, 2: the fused multi-delta paths).
/// Returns the number of elements round-tripped, None for a refused input (the
/// corpus replay counts how many inputs reach the kernels, and how large).
pub fn check_apply(data: &[u8]) -> Option<usize> {
    if data.len() < 8 {
        return None;
    }
    let schemes = [Scheme::Affine, Scheme::Symmetric, Scheme::Log, Scheme::Tanh];
    let spec = QuantSpec {
        bits: data[0],
        scheme: schemes[data[1] as usize % 4],
        group_len: u16::from_le_bytes([data[4], data[5]]) as usize,
    };
    let numel = u16::from_le_bytes([data[2], data[3]]) as usize;
    let split = (data[6] as usize * data.len() / 256).max(8);
    let params = f32s(&data[8..split]);
    let groups = numel.checked_div(spec.group_len).unwrap_or(0);
    let (scale, rest) = params.split_at(groups.min(params.len()));
    let offset = &rest[..groups.min(rest.len())];
    let view = QuantView::new(&data[split..], scale, offset, spec, numel).ok()?;
    let mut out = vec![0f32; numel];
    dequantize(&view, &mut out).expect("validated view decodes");
    let count = 1 + (data[7] as usize / 3) % 3;
    let deltas: Vec<(Delta, f32)> = [0.5f32, -1.0, 2.0][..count]
        .iter()
        .map(|&a| (Delta::Quant(view), a))
        .collect();
    match data[7] % 3 {
        0 => round_trip::<f32>(numel, &deltas),
        1 => round_trip::<f16>(numel, &deltas),
        _ => round_trip::<bf16>(numel, &deltas),
    }
    Some(numel)
}

/// Apply `deltas` with the undo record to a target of `numel` elements of `T`, remove
/// them with it, and require the original bits back.
fn round_trip<T: Element>(numel: usize, deltas: &[(Delta, f32)]) {
    let original: Vec<T> = (0..numel)
        .map(|i| T::from_f32(i as f32 * 0.01 - 1.0))
        .collect();
    let mut target = original.clone();
    let undo = apply(&mut target, deltas, true)
        .expect("validated apply")
        .undo
        .expect("record");
    remove(&mut target, deltas, Some(&undo)).expect("validated remove");
    let same = target
        .iter()
        .zip(&original)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "remove did not restore the {:?} target", T::DTYPE);
}
