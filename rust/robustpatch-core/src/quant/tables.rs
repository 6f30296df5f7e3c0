//! Per-process level and threshold tables of every (scheme, bits) pair.

use super::{QuantSpec, Scheme};
use std::sync::OnceLock;

/// μ of the log (μ-law) companding: y = sign(u)·ln(1+μ|u|)/ln(1+μ).
pub const LOG_MU: f32 = 255.0;
/// Steepness k of the tanh companding: y = tanh(k·u)/tanh(k).
pub const TANH_K: f32 = 2.0;

/// Index of a (scheme, bits) pair in the per-process tables.
pub(super) fn table_index(scheme: Scheme, bits: u8) -> usize {
    let s = Scheme::ALL.iter().position(|&k| k == scheme).unwrap_or(0);
    s * 8 + bits.clamp(1, 8) as usize - 1
}

/// The value of each code before scale and offset: entries 0..2^bits are used,
/// the rest are zero. Integers for affine/symmetric, the inverse companding
/// curve sampled at y_c = 2c/(2^b−1) − 1 for log/tanh (computed in f64, then
/// rounded). Built once per process; `bits` outside 1..=8 is clamped.
pub fn levels(spec: QuantSpec) -> &'static [f32; 256] {
    static TABLES: OnceLock<Vec<[f32; 256]>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let mut v = Vec::with_capacity(32);
        for scheme in Scheme::ALL {
            for bits in 1..=8u8 {
                let maxc = ((1u32 << bits) - 1) as f64;
                let mut t = [0f32; 256];
                for (c, l) in t.iter_mut().enumerate().take(1 << bits) {
                    *l = match scheme {
                        Scheme::Affine | Scheme::Symmetric => c as f32,
                        _ => expand(scheme, 2.0 * c as f64 / maxc - 1.0) as f32,
                    };
                }
                v.push(t);
            }
        }
        v
    });
    &tables[table_index(spec.scheme, spec.bits)]
}

/// Decision thresholds of the companded schemes in the u = x/absmax domain:
/// entry c is the pre-image of the midpoint between companded levels c and c+1,
/// so "code = number of thresholds ≤ u" is exactly "nearest level in the
/// companded domain, ties upward" without evaluating ln/tanh per element.
/// Entries past 2^b − 2 are +∞ (never counted).
pub(super) fn thresholds(scheme: Scheme, bits: u8) -> &'static [f32; 256] {
    static TABLES: OnceLock<Vec<[f32; 256]>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let mut v = Vec::with_capacity(32);
        for scheme in Scheme::ALL {
            for bits in 1..=8u8 {
                let maxc = ((1u32 << bits) - 1) as usize;
                let mut t = [f32::INFINITY; 256];
                for (c, th) in t.iter_mut().enumerate().take(maxc) {
                    let y = (2 * c + 1) as f64 / maxc as f64 - 1.0;
                    *th = expand(scheme, y) as f32;
                }
                v.push(t);
            }
        }
        v
    });
    &tables[table_index(scheme, bits)]
}

/// Inverse companding curve: y ∈ [−1, 1] → u ∈ [−1, 1].
pub(super) fn expand(scheme: Scheme, y: f64) -> f64 {
    match scheme {
        Scheme::Log => {
            let mu = LOG_MU as f64;
            y.signum() * ((y.abs() * mu.ln_1p()).exp_m1() / mu)
        }
        Scheme::Tanh => {
            let k = TANH_K as f64;
            (y * k.tanh()).clamp(-1.0, 1.0).atanh() / k
        }
        Scheme::Affine | Scheme::Symmetric => y,
    }
}

/// Companding curve u → y (the scheme's definition; used by tests to check the
/// threshold tables).
#[cfg(test)]
pub(super) fn compress(scheme: Scheme, u: f64) -> f64 {
    match scheme {
        Scheme::Log => {
            let mu = LOG_MU as f64;
            u.signum() * (mu * u.abs()).ln_1p() / mu.ln_1p()
        }
        Scheme::Tanh => {
            let k = TANH_K as f64;
            (k * u).tanh() / k.tanh()
        }
        Scheme::Affine | Scheme::Symmetric => u,
    }
}
