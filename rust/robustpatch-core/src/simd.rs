//! Runtime CPU feature dispatch. The kernels are written once as plain
//! `chunks_exact` loops; [`dispatch`] runs them inside a function compiled
//! with AVX2/FMA/F16C when the CPU has those, so the same source vectorizes
//! to 256-bit instructions there and to SSE2 elsewhere. Results are bit
//! identical either way: Rust never contracts `a * b + c` into an FMA.

/// True when the AVX2 + FMA + F16C code path can run on this CPU.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Run `f`, compiled for AVX2 when available. `f` and everything it calls on
/// the hot path must be `#[inline(always)]` so it is compiled into the wrapper
/// — the closure included: write `dispatch(#[inline(always)] || kernel(..))`.
/// Without the attribute LLVM keeps a large closure body out of line, compiled
/// for the baseline target, and the wrapper only calls it (SSE2 code, no gain).
#[inline(always)]
pub fn dispatch<R, F: FnOnce() -> R>(f: F) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<R, F: FnOnce() -> R>(f: F) -> R {
            f()
        }
        if has_avx2() {
            // SAFETY: the features were detected on this CPU just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}
