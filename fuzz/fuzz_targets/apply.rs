//! Arbitrary codes, scales and spec through validation, unpack, dequantize
//! and fused apply + remove: no panic, and remove restores the target exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use robustpatch_core::apply::{apply, remove};
use robustpatch_core::delta::Delta;
use robustpatch_core::quant::{dequantize, QuantSpec, QuantView, Scheme};

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let bits = data[0];
    let scheme = [Scheme::Affine, Scheme::Symmetric, Scheme::Log, Scheme::Tanh][data[1] as usize % 4];
    let numel = u16::from_le_bytes([data[2], data[3]]) as usize;
    let group_len = u16::from_le_bytes([data[4], data[5]]) as usize;
    let split = (data[6] as usize * data.len() / 256).max(8);
    let spec = QuantSpec { bits, scheme, group_len };
    let groups = if group_len > 0 { numel / group_len } else { 0 };
    let params = f32s(&data[8.min(split)..split]);
    let codes = &data[split..];
    let (scale, offset) = params.split_at((params.len() / 2).min(groups).min(params.len()));
    let offset = &offset[..offset.len().min(scale.len())];
    let Ok(view) = QuantView::new(codes, scale, offset, spec, numel) else {
        return;
    };
    let mut out = vec![0f32; numel];
    dequantize(&view, &mut out).unwrap();
    let mut target: Vec<f32> = (0..numel).map(|i| i as f32 * 0.01 - 1.0).collect();
    let original = target.clone();
    let deltas = [(Delta::Quant(view), 0.5f32)];
    let undo = apply(&mut target, &deltas, true).unwrap().unwrap();
    remove(&mut target, &deltas, Some(&undo)).unwrap();
    let same = target.iter().zip(&original).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "remove did not restore the target");
});
