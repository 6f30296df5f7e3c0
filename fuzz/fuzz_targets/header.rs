//! Any bytes given to the safetensors header parser: no panic, and anything
//! accepted lies inside the buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use robustpatch_core::safetensors::{dtype_size, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse(data, data.len() as u64) {
        for t in &h.tensors {
            assert!(h.data_start + t.end <= data.len());
            let numel: usize = t.shape.iter().product();
            assert_eq!(numel * dtype_size(&t.dtype).unwrap(), t.end - t.begin);
        }
    }
});
