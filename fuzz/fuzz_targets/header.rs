//! Any bytes given to the safetensors header parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    robustpatch_core::fuzzing::check_header(data);
});
