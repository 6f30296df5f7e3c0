//! `Blake3`: the core's parallel content hash, fed from Python like hashlib's
//! objects (bytes or uint8 arrays), the GIL released while it hashes; and
//! `tensor_digest`, the per-tensor digest of base-model fingerprints.

use crate::arrays::{slice_of, typed};
use crate::errors::BindResult;
use crate::ints::int_arg;
use crate::nogil;
use numpy::PyReadonlyArrayDyn;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use robustpatch_core::hash::{self, Hasher};
use robustpatch_core::{args, DType, Error};

/// An incremental BLAKE3 hash (`update(data)`, then `hexdigest()`).
#[pyclass(module = "robustpatch._core")]
#[derive(Default)]
pub struct Blake3(Hasher);

#[pymethods]
impl Blake3 {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Add `data`: bytes, or a C-contiguous uint8 array (`arr.view(numpy.uint8)`).
    fn update(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> BindResult<()> {
        if let Ok(b) = data.downcast::<PyBytes>() {
            let bytes = b.as_bytes();
            nogil(py, || self.0.update(bytes));
            return Ok(());
        }
        let arr = typed::<u8>(data, "data", "uint8 (or bytes)")?;
        let bytes = slice_of(&arr, "data")?;
        nogil(py, || self.0.update(bytes));
        Ok(())
    }

    /// Add the float32 form of `data` (raw bytes, C-contiguous uint8, of elements
    /// labelled `label`: "F32", "F16" or "BF16"), widened by the engine; returns whether
    /// every value is finite.
    fn update_widened(
        &mut self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        label: &str,
    ) -> BindResult<bool> {
        let data = typed::<u8>(data, "data", "uint8")?;
        let (bytes, dtype) = float_bytes(&data, label)?;
        Ok(nogil(py, || self.0.update_widened(bytes, dtype)))
    }

    /// Add `data` as stored (raw bytes, C-contiguous uint8, of elements labelled
    /// `label`: "F32", "F16" or "BF16"); returns whether every value is finite.
    fn update_finite(
        &mut self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        label: &str,
    ) -> BindResult<bool> {
        let data = typed::<u8>(data, "data", "uint8")?;
        let (bytes, dtype) = float_bytes(&data, label)?;
        Ok(nogil(py, || self.0.update_finite(bytes, dtype)))
    }

    /// The digest as 64 hex digits.
    fn hexdigest(&self) -> String {
        self.0.hex()
    }
}

/// The bytes of `data`, whole elements of the float dtype `label` names.
fn float_bytes<'a>(
    data: &'a PyReadonlyArrayDyn<'_, u8>,
    label: &str,
) -> BindResult<(&'a [u8], DType)> {
    let dtype = DType::parse(label)
        .ok_or_else(|| Error::Value(format!("label must be F32, F16 or BF16, got {label:?}")))?;
    let bytes = slice_of(data, "data")?;
    args::itemsize(dtype.size() as i64, bytes.len())?;
    Ok((bytes, dtype))
}

/// The fingerprint digest (hex) of a tensor's bytes (`data`, C-contiguous uint8) as
/// elements of `itemsize` bytes: XXH3-128 over the XXH3-128 of each block of 4096
/// elements.
#[pyfunction]
pub fn tensor_digest(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    itemsize: &Bound<'_, PyAny>,
) -> BindResult<String> {
    let data = typed::<u8>(data, "data", "uint8")?;
    let bytes = slice_of(&data, "data")?;
    let size = args::itemsize(int_arg(itemsize, "itemsize")?, bytes.len())?;
    Ok(hash::hex(&nogil(py, || hash::tensor_digest(bytes, size))))
}

/// CRC-32 of `data` (bytes, or a C-contiguous uint8 array), zlib's: `zlib.crc32(data)`,
/// with the CPU's carry-less multiply and the GIL released.
#[pyfunction]
pub fn crc32(py: Python<'_>, data: &Bound<'_, PyAny>) -> BindResult<u32> {
    if let Ok(b) = data.downcast::<PyBytes>() {
        let bytes = b.as_bytes();
        return Ok(nogil(py, || hash::crc32(bytes)));
    }
    let arr = typed::<u8>(data, "data", "uint8 (or bytes)")?;
    let bytes = slice_of(&arr, "data")?;
    Ok(nogil(py, || hash::crc32(bytes)))
}
