//! The one place that chooses a SIMD code path.
//!
//! Kernels are written once as `#[inline(always)]` loops (plus a few explicit
//! intrinsic paths); [`Simd::run`] compiles them into a wrapper with the
//! path's target features, so the same source becomes AVX-512, AVX2 or
//! baseline (SSE2) code. The path is detected once per process and cached;
//! `ROBUSTPATCH_SIMD=scalar|avx2|avx512|avx512vbmi2` forces one (a path this CPU lacks is
//! refused with an error, never run). Every path gives the bits of the
//! kernels' scalar reference twins: Rust never contracts `a * b + c` into an
//! FMA, and the explicit paths compute the same roundings lane by lane.

use crate::error::{Error, Result};
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
mod record;

/// Environment variable that forces a path.
pub const ENV: &str = "ROBUSTPATCH_SIMD";

/// A code path, from the most portable to the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// Baseline target only (SSE2 on x86-64): the compiler's own vectorization.
    Scalar,
    /// AVX2 + FMA + F16C + POPCNT (FMA is enabled but never contracted into).
    Avx2,
    /// AVX-512 F/BW/VL on top of AVX2 + FMA + F16C.
    Avx512,
    /// AVX-512 with VBMI and VBMI2: the apply kernels compress 16-bit lanes
    /// directly instead of through 32-bit lanes.
    Avx512Vbmi2,
}

impl Path {
    /// Every path, narrowest first.
    pub const ALL: [Path; 4] = [Path::Scalar, Path::Avx2, Path::Avx512, Path::Avx512Vbmi2];

    /// Name as accepted by [`ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
            Path::Avx512Vbmi2 => "avx512vbmi2",
        }
    }

    /// Inverse of [`Path::name`], ignoring ASCII case.
    pub fn parse(s: &str) -> Option<Path> {
        Path::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The CPU features this path needs that this CPU lacks (empty: it can run).
    pub fn missing_features(self) -> Vec<&'static str> {
        let needed: &[&'static str] = match self {
            Path::Scalar => &[],
            Path::Avx2 => &["avx2", "fma", "f16c", "popcnt"],
            Path::Avx512 => &[
                "avx2", "fma", "f16c", "popcnt", "avx512f", "avx512bw", "avx512vl",
            ],
            Path::Avx512Vbmi2 => &[
                "avx2",
                "fma",
                "f16c",
                "popcnt",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512vbmi",
                "avx512vbmi2",
            ],
        };
        needed.iter().copied().filter(|f| !cpu_has(f)).collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> bool {
    match feature {
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512vbmi" => std::arch::is_x86_feature_detected!("avx512vbmi"),
        "avx512vbmi2" => std::arch::is_x86_feature_detected!("avx512vbmi2"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> bool {
    false
}

/// A path this CPU has been checked to run. The private field makes a value
/// impossible to build without that check, which is what makes
/// [`Simd::run`] sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simd(Path);

impl Simd {
    /// The portable path, available everywhere.
    pub const SCALAR: Simd = Simd(Path::Scalar);

    /// `path`, or a `Value` error naming the features this CPU lacks.
    pub fn force(path: Path) -> Result<Simd> {
        let missing = path.missing_features();
        if missing.is_empty() {
            Ok(Simd(path))
        } else {
            Err(Error::Value(format!(
                "SIMD path {} needs CPU features this CPU lacks: {}",
                path.name(),
                missing.join(", ")
            )))
        }
    }

    /// The widest path this CPU runs.
    pub fn detect() -> Simd {
        Path::ALL
            .into_iter()
            .rev()
            .find_map(|p| Simd::force(p).ok())
            .unwrap_or(Simd::SCALAR)
    }

    /// The paths this CPU runs, narrowest first (for tests and benchmarks).
    pub fn available() -> Vec<Simd> {
        Path::ALL
            .into_iter()
            .filter_map(|p| Simd::force(p).ok())
            .collect()
    }

    pub fn path(self) -> Path {
        self.0
    }

    /// True when this path includes `p`'s features.
    #[inline(always)]
    pub fn has(self, p: Path) -> bool {
        self.0 >= p
    }

    /// Run `f` compiled with this path's target features. `f` and what it
    /// calls on the hot path must be `#[inline(always)]`, the closure too
    /// (`simd.run(#[inline(always)] || kernel(..))`): LLVM otherwise keeps the
    /// body out of line, compiled for the baseline target.
    #[inline(always)]
    pub fn run<R, F: FnOnce() -> R>(self, f: F) -> R {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma,f16c,popcnt")]
            unsafe fn avx2<R, F: FnOnce() -> R>(f: F) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl")]
            unsafe fn avx512<R, F: FnOnce() -> R>(f: F) -> R {
                f()
            }
            match self.0 {
                // SAFETY: a `Simd` exists only for a path whose features were
                // detected on this CPU (`Simd::force`).
                Path::Avx512 | Path::Avx512Vbmi2 => return unsafe { avx512(f) },
                // SAFETY: as above.
                Path::Avx2 => return unsafe { avx2(f) },
                Path::Scalar => {}
            }
        }
        f()
    }
}

/// The path the kernels use: [`ENV`] when set, else [`Simd::detect`]. Decided
/// once per process; an unknown name or a path this CPU lacks is an error on
/// every call (the kernels refuse to run rather than silently pick another).
pub fn selected() -> Result<Simd> {
    static SELECTED: OnceLock<Result<Simd>> = OnceLock::new();
    SELECTED
        .get_or_init(|| from_env(std::env::var(ENV).ok().as_deref()))
        .clone()
}

/// The selected path, or the portable one when [`selected`] is an error. For
/// helpers below a kernel's entry point, which has already returned the error.
#[inline]
pub fn selected_or_scalar() -> Simd {
    selected().unwrap_or(Simd::SCALAR)
}

/// The path an [`ENV`] value asks for (`None`: unset, detect).
fn from_env(value: Option<&str>) -> Result<Simd> {
    match value {
        None | Some("") => Ok(Simd::detect()),
        Some(v) => match Path::parse(v) {
            Some(p) => Simd::force(p).map_err(|e| match e {
                Error::Value(m) => Error::Value(format!("{ENV}={v}: {m}")),
                other => other,
            }),
            None => Err(Error::Value(format!(
                "{ENV}={v} is not a SIMD path (scalar, avx2, avx512 or avx512vbmi2)"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_select_or_refuse() {
        assert_eq!(from_env(None).unwrap(), Simd::detect());
        assert_eq!(from_env(Some("")).unwrap(), Simd::detect());
        assert_eq!(from_env(Some("SCALAR")).unwrap().path(), Path::Scalar);
        let err = from_env(Some("avx1024")).unwrap_err().to_string();
        assert!(err.contains("ROBUSTPATCH_SIMD=avx1024") && err.contains("avx512"));
        for p in Path::ALL {
            let got = from_env(Some(p.name()));
            assert_eq!(got.is_ok(), p.missing_features().is_empty(), "{p:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("lacks"), "{e}");
            }
        }
    }

    #[test]
    fn detected_path_is_the_widest_available() {
        let avail = Simd::available();
        assert_eq!(avail.first(), Some(&Simd::SCALAR));
        assert_eq!(avail.last(), Some(&Simd::detect()));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Simd::detect().has(Path::Avx512),
            std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512f")
        );
    }

    #[test]
    fn run_computes_the_same_on_every_path() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 11.0).collect();
        let sums: Vec<u32> = Simd::available()
            .into_iter()
            .map(|s| {
                s.run(
                    #[inline(always)]
                    || x.iter().fold(0f32, |a, &v| a + v * 1.5 + 0.25).to_bits(),
                )
            })
            .collect();
        assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
    }
}
