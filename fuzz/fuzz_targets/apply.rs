//! Arbitrary quantized deltas through validation, dequantize, apply and remove.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    robustpatch_core::fuzzing::check_apply(data);
});
