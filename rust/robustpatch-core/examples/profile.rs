//! Times the core kernels on one large tensor, for profiling without Python:
//! `cargo run --release --example profile -p robustpatch-core [elements]`.

use half::{bf16, f16};
use robustpatch_core::apply::apply;
use robustpatch_core::delta::{Delta, Dense};
use robustpatch_core::quant::{quantize, QuantSpec, Scheme};
use robustpatch_core::Element;
use std::time::Instant;

fn best<F: FnMut()>(mut f: F) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64 << 20);
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    let d: Vec<f32> = (0..n)
        .map(|i| ((i * 104729 % 1000) as f32 - 500.0) * 1e-6)
        .collect();
    let spec = QuantSpec {
        bits: 4,
        scheme: Scheme::Affine,
        group_len: 128,
    };
    let mut dst = w.clone();
    let copy = best(|| dst.copy_from_slice(&w));
    println!("copy f32            {:7.1} ms", copy * 1e3);
    let q = quantize(&d, spec).unwrap();
    let quant = best(|| {
        quantize(&d, spec).unwrap();
    });
    println!(
        "quantize 4b g128    {:7.1} ms  {:.2}x copy",
        quant * 1e3,
        quant / copy
    );
    let deltas = [(Delta::Quant(q.view()), 1.0f32)];
    run::<f32>(&w, &deltas, copy, "f32");
    run::<f16>(&w, &deltas, copy / 2.0, "f16");
    run::<bf16>(&w, &deltas, copy / 2.0, "bf16");
    let dense = [(Delta::Dense(Dense::F32(&d)), 1.0f32)];
    run::<f32>(&w, &dense, copy, "f32 dense");
}

fn run<T: Element>(w: &[f32], deltas: &[(Delta, f32)], copy: f64, name: &str) {
    let mut t: Vec<T> = w.iter().map(|&x| T::from_f32(x)).collect();
    let rec = best(|| {
        apply(&mut t, deltas, true).unwrap();
    });
    let norec = best(|| {
        apply(&mut t, deltas, false).unwrap();
    });
    println!(
        "apply {name:10} record {:7.1} ms ({:.2}x copy)  no record {:7.1} ms ({:.2}x)",
        rec * 1e3,
        rec / copy,
        norec * 1e3,
        norec / copy
    );
}
