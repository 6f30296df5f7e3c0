//! Times the core kernels on one large tensor, for profiling without Python:
//! `cargo run --release --example profile -p robustpatch-core [elements] [filter] [runs]`,
//! where `filter` keeps only the kernels whose name contains it (for `perf`).
//! Every time is the best of `runs` (default five) and is also given as a ratio to a plain
//! copy of the target measured in the same run (the memory-bandwidth floor);
//! an apply is compared with a copy of its own target (f16/bf16: half size).

use half::{bf16, f16};
use rayon::prelude::*;
use robustpatch_core::apply::apply;
use robustpatch_core::delta::{Delta, Dense};
use robustpatch_core::project::project;
use robustpatch_core::quant::{dequantize, quantize, QuantSpec, Scheme};
use robustpatch_core::Element;
use std::time::Instant;

/// The Python module's allocator: records and outputs reuse freed memory as they do there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn best<F: FnMut()>(mut f: F) -> f64 {
    best_of(|| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    })
}

/// Best of `runs` runs of `timed`, which returns the seconds it measured.
fn best_of<F: FnMut() -> f64>(timed: F) -> f64 {
    let runs = std::env::args().nth(3).and_then(|a| a.parse().ok());
    std::iter::repeat_with(timed)
        .take(runs.unwrap_or(5))
        .fold(f64::INFINITY, f64::min)
}

/// Deterministic pseudo-random values, roughly normal with standard deviation
/// `sd` (a sum of four uniforms), as the Python benchmark's weights and deltas:
/// weights near zero are what make the undo record non-empty.
fn values(n: usize, seed: u64, sd: f32) -> Vec<f32> {
    let mut s = seed | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    // Four uniforms on [0, 1) sum to mean 2 and variance 1/3.
    (0..n)
        .map(|_| (uniform() + uniform() + uniform() + uniform() - 2.0) * 3f32.sqrt() * sd)
        .collect()
}

fn report(name: &str, t: f64, copy: f64) {
    println!("{name:28} {:9.3} ms  {:5.2}x copy", t * 1e3, t / copy);
}

/// Whether the kernel called `name` was selected on the command line.
fn selected(name: &str) -> bool {
    std::env::args().nth(2).is_none_or(|f| name.contains(&f))
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64 << 20);
    let w = values(n, 1, 0.05);
    let spec = QuantSpec {
        bits: 4,
        scheme: Scheme::Affine,
        group_len: 128,
    };
    let sigs: Vec<Vec<f32>> = (0..4).map(|k| values(n, 10 + k, 1e-3)).collect();
    let mut dst = w.clone();
    let copy = best(|| dst.copy_from_slice(&w));
    report("copy f32", copy, copy);
    // The floor for an in-place kernel: read and write the target once, on all threads.
    let rmw = best(|| {
        dst.par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|x| *x += 1.0))
    });
    report("in-place add (all threads)", rmw, copy);
    if selected("quantize") {
        let t = best(|| {
            quantize(&sigs[0], spec).unwrap();
        });
        report("quantize 4b g128", t, copy);
    }
    let qs: Vec<_> = sigs.iter().map(|s| quantize(s, spec).unwrap()).collect();
    if selected("dequantize") {
        let t = best(|| dequantize(&qs[0].view(), &mut dst).unwrap());
        report("dequantize 4b g128", t, copy);
    }
    if selected("project") {
        let (clean, robust) = (values(n, 2, 0.05), values(n, 3, 0.05));
        let t = best(|| {
            project(&w, &clean, &robust, &mut dst).unwrap();
        });
        report("project f32", t, copy);
    }
    let one = [(Delta::Quant(qs[0].view()), 1.0f32)];
    let four: Vec<_> = qs
        .iter()
        .map(|q| (Delta::Quant(q.view()), 0.5f32))
        .collect();
    let dense = [(Delta::Dense(Dense::F32(&sigs[0])), 1.0f32)];
    run::<f32>(&w, &one, "1 sig f32");
    run::<f32>(&w, &four, "4 sigs f32");
    run::<f16>(&w, &one, "1 sig f16");
    run::<bf16>(&w, &one, "1 sig bf16");
    run::<f32>(&w, &dense, "dense f32");
    // A task vector between bf16 checkpoints, stored as bf16, into a bf16 model.
    let delta16: Vec<bf16> = sigs[0].iter().map(|&x| bf16::from_f32(x)).collect();
    let dense16 = [(Delta::Dense(Dense::BF16(&delta16)), 1.0f32)];
    run::<bf16>(&w, &dense16, "dense bf16");
}

/// Apply with and without a record, against a copy of the same tensor (for
/// f16/bf16 half the bytes of the f32 copy) timed just before. Each timed
/// apply starts from the original weights (applied again and again, the
/// target drifts and the record with it).
fn run<T: Element>(w: &[f32], deltas: &[(Delta, f32)], name: &str) {
    if !selected(&format!("apply {name}")) {
        return;
    }
    let orig: Vec<T> = w.iter().map(|&x| T::from_f32(x)).collect();
    let mut t = orig.clone();
    let copy = best(|| t.copy_from_slice(&orig));
    let mut flagged = 0;
    let mut time_apply = |record: bool| {
        best_of(|| {
            t.copy_from_slice(&orig);
            let start = Instant::now();
            let done = apply(&mut t, deltas, record).unwrap();
            let secs = start.elapsed().as_secs_f64();
            flagged = done.undo.map_or(flagged, |u| u.positions.len());
            secs
        })
    };
    let rec = time_apply(true);
    let norec = time_apply(false);
    report(&format!("apply {name} record"), rec, copy);
    report(&format!("apply {name} no record"), norec, copy);
    println!(
        "{:28} {flagged} flagged ({:.1}%)",
        "",
        100.0 * flagged as f64 / w.len() as f64
    );
}
