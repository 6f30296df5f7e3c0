//! robustpatch-core: pure-Rust kernels for robust weight signatures.
//!
//! Everything here works on plain slices and knows nothing of Python:
//! - [`project`]: the signature `Δr − (⟨Δr,d⟩/‖d‖²)·d` from three tensors in two passes;
//! - [`pack`] and [`quant`]: 1–8 bit codes, four schemes, three granularities;
//! - [`apply`]: fused `target += Σ αk·deq(codesk)` with an exact undo record;
//! - [`dot`]: inner products straight from packed codes;
//! - [`safetensors`]: a validating header reader for model and signature files.

pub mod apply;
pub mod arch;
pub mod args;
pub mod compact;
pub mod delta;
pub mod dot;
pub mod dtype;
pub mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gather;
pub mod hash;
pub mod pack;
pub mod par;
pub mod project;
pub mod quant;
pub mod safetensors;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
