//! Test data shared by the kernel property tests: deterministic values that
//! mix uniform weights with special values every `every`-th element.

/// `n` values: uniform in [-scale, scale), except every `every`-th one (from
/// element `offset`), which is one of `specials` picked by the generator.
pub fn mixed_values(
    seed: u64,
    n: usize,
    (every, offset): (usize, usize),
    specials: &[f32],
    scale: f32,
) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % every == offset {
                specials[(s % specials.len() as u64) as usize]
            } else {
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            }
        })
        .collect()
}
