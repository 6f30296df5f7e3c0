//! Invariants checked on arbitrary bytes, shared by the `cargo fuzz` targets
//! (fuzz/) and the corpus replay test that runs in CI. Each function panics
//! when an invariant breaks and returns quietly on input that is refused.

use crate::apply::{apply, remove};
use crate::delta::Delta;
use crate::quant::{dequantize, QuantSpec, QuantView, Scheme};
use crate::safetensors::{dtype_size, parse};

/// The header parser never panics, and what it accepts tiles the data buffer
/// exactly: in order, no gap, no overlap, nothing after the last tensor.
pub fn check_header(data: &[u8]) {
    if let Ok(h) = parse(data, data.len() as u64) {
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
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Arbitrary codes, scales and spec through validation, dequantize and fused
/// apply + remove: no panic, and remove restores the target bit for bit.
/// Layout: bits, scheme, numel (u16), group_len (u16), split, pad, params, codes.
pub fn check_apply(data: &[u8]) {
    if data.len() < 8 {
        return;
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
    let Ok(view) = QuantView::new(&data[split..], scale, offset, spec, numel) else {
        return;
    };
    let mut out = vec![0f32; numel];
    dequantize(&view, &mut out).expect("validated view decodes");
    let mut target: Vec<f32> = (0..numel).map(|i| i as f32 * 0.01 - 1.0).collect();
    let original = target.clone();
    let deltas = [(Delta::Quant(view), 0.5f32)];
    let undo = apply(&mut target, &deltas, true)
        .expect("validated apply")
        .undo
        .expect("record");
    remove(&mut target, &deltas, Some(&undo)).expect("validated remove");
    let same = target
        .iter()
        .zip(&original)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "remove did not restore the target");
}
