//! Inner products between signature entries straight from their storage
//! (packed codes or dense), decoded one tile at a time, never materialized.

use crate::arch::{self, Simd};
use crate::delta::Delta;
use crate::error::{Error, Result};
use crate::par::{PARALLEL_MIN, TILE};
use rayon::prelude::*;

/// ⟨a, b⟩ in f64. Tile sums are added in order, so the result does not
/// depend on the number of threads.
pub fn dot(a: &Delta, b: &Delta) -> Result<f64> {
    dot_with(arch::selected()?, a, b)
}

/// [`dot`] on a given SIMD path (every path gives the same bits).
pub fn dot_with(simd: Simd, a: &Delta, b: &Delta) -> Result<f64> {
    let n = a.numel();
    if b.numel() != n {
        return Err(Error::Shape(format!(
            "dot of tensors with {n} and {} elements",
            b.numel()
        )));
    }
    let tile = |t: usize| {
        simd.run(
            #[inline(always)]
            || dot_tile(a, b, t * TILE, TILE.min(n - t * TILE)),
        )
    };
    let ntiles = n.div_ceil(TILE);
    let sums: Vec<f64> = if n >= PARALLEL_MIN {
        (0..ntiles).into_par_iter().map(tile).collect()
    } else {
        (0..ntiles).map(tile).collect()
    };
    Ok(sums.iter().sum())
}

/// Cosine similarity; 0 when either side is all zeros.
pub fn cosine(a: &Delta, b: &Delta) -> Result<f64> {
    let ab = dot(a, b)?;
    let denom = (dot(a, a)? * dot(b, b)?).sqrt();
    Ok(if denom > 0.0 { ab / denom } else { 0.0 })
}

#[inline(always)]
fn dot_tile(a: &Delta, b: &Delta, start: usize, len: usize) -> f64 {
    let (mut xa, mut xb, mut scratch) = ([0f32; TILE], [0f32; TILE], [0u8; TILE]);
    a.accumulate(1.0, start, &mut xa[..len], &mut scratch);
    b.accumulate(1.0, start, &mut xb[..len], &mut scratch);
    let mut acc = [0f64; 4];
    for (x, y) in xa[..len].chunks(4).zip(xb[..len].chunks(4)) {
        for l in 0..x.len() {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}
