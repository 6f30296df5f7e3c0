//! `QuantTensor`: a quantized tensor validated once, when built (by `quantize`
//! or from a file's arrays), then passed to apply, remove, dot and dequantize
//! with no further checks. It owns its codes, scales and offsets and is frozen,
//! so nothing can change them after validation: the arrays it hands out are
//! read-only views of its own memory that numpy refuses to make writeable.

use crate::arrays::slice_of;
use crate::errors::BindResult;
use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use robustpatch_core::args;
use robustpatch_core::quant::{QuantView, Quantized};
use robustpatch_core::Error;

/// Packed codes, one f32 scale and offset per group, and the spec that reads them.
#[pyclass(frozen, module = "robustpatch._core")]
pub struct QuantTensor {
    q: Quantized,
}

impl QuantTensor {
    pub fn from_quantized(q: Quantized) -> Self {
        QuantTensor { q }
    }

    /// The engine's view: already valid, so building it checks nothing.
    pub fn view(&self) -> QuantView<'_> {
        self.q.view()
    }

    /// Elements `start..stop` as a view of their own (validated: a small scan of
    /// the range's scales). The range must start on a group and a byte boundary
    /// and end on a group boundary or at the end, so packed codes and groups align.
    pub fn range(&self, start: i64, stop: i64) -> BindResult<QuantView<'_>> {
        let (start, stop) = (args::count("start", start)?, args::count("stop", stop)?);
        let (bits, glen, numel) = (
            self.q.spec.bits as usize,
            self.q.spec.group_len,
            self.q.numel,
        );
        let aligned = start % glen == 0 && start * bits % 8 == 0;
        if start > stop || stop > numel || !aligned || (stop % glen != 0 && stop != numel) {
            return Err(Error::Value(format!(
                "range {start}..{stop} of {numel} elements does not fall on groups of {glen} \
                 and whole bytes of {bits}-bit codes"
            ))
            .into());
        }
        let codes = &self.q.codes[start * bits / 8..(stop * bits).div_ceil(8)];
        let groups = start / glen..stop.div_ceil(glen);
        let (scale, offset) = (&self.q.scale[groups.clone()], &self.q.offset[groups]);
        let spec = self.q.spec;
        Ok(QuantView::new(codes, scale, offset, spec, stop - start)?)
    }
}

/// A read-only numpy array over memory `owner` keeps alive.
fn frozen_view<'py, T: numpy::Element>(
    owner: &Bound<'py, QuantTensor>,
    data: &[T],
) -> BindResult<Bound<'py, PyArray1<T>>> {
    // SAFETY: `data` belongs to `owner`, a frozen pyclass whose vectors are never
    // changed or moved; the array holds `owner` as its base, so it outlives the view.
    let arr =
        unsafe { PyArray1::borrow_from_array(&ArrayView1::from(data), owner.clone().into_any()) };
    arr.getattr("flags")?.setattr("writeable", false)?;
    Ok(arr)
}

#[pymethods]
impl QuantTensor {
    /// Validate and copy the parts (as read from a file). Errors: bits, scheme,
    /// group length or counts out of range (InvalidArgumentError), buffers whose
    /// lengths do not fit (MismatchError), NaN/Inf scales or offsets (NonFiniteError).
    #[new]
    #[pyo3(signature = (codes, scale, offset, bits, scheme, group_len, numel))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        codes: PyReadonlyArrayDyn<'_, u8>,
        scale: PyReadonlyArrayDyn<'_, f32>,
        offset: PyReadonlyArrayDyn<'_, f32>,
        bits: i64,
        scheme: &str,
        group_len: i64,
        numel: i64,
    ) -> BindResult<Self> {
        let spec = args::spec(bits, scheme, group_len)?;
        let numel = args::count("numel", numel)?;
        let (c, s, o) = (
            slice_of(&codes, "codes")?,
            slice_of(&scale, "scale")?,
            slice_of(&offset, "offset")?,
        );
        QuantView::new(c, s, o, spec, numel)?;
        Ok(QuantTensor::from_quantized(Quantized {
            codes: c.to_vec(),
            scale: s.to_vec(),
            offset: o.to_vec(),
            spec,
            numel,
        }))
    }

    /// Packed codes, `ceil(numel·bits/8)` bytes (read-only).
    #[getter]
    fn codes<'py>(slf: &Bound<'py, Self>) -> BindResult<Bound<'py, PyArray1<u8>>> {
        frozen_view(slf, &slf.get().q.codes)
    }

    /// One scale per group (read-only).
    #[getter]
    fn scale<'py>(slf: &Bound<'py, Self>) -> BindResult<Bound<'py, PyArray1<f32>>> {
        frozen_view(slf, &slf.get().q.scale)
    }

    /// One offset per group (read-only).
    #[getter]
    fn offset<'py>(slf: &Bound<'py, Self>) -> BindResult<Bound<'py, PyArray1<f32>>> {
        frozen_view(slf, &slf.get().q.offset)
    }

    #[getter]
    fn bits(&self) -> u8 {
        self.q.spec.bits
    }

    #[getter]
    fn scheme(&self) -> &'static str {
        self.q.spec.scheme.name()
    }

    #[getter]
    fn group_len(&self) -> usize {
        self.q.spec.group_len
    }

    #[getter]
    fn numel(&self) -> usize {
        self.q.numel
    }

    /// Bytes of codes, scales and offsets.
    #[getter]
    fn nbytes(&self) -> usize {
        self.q.codes.len() + 4 * (self.q.scale.len() + self.q.offset.len())
    }

    /// Pickled as its parts and validated again when unpickled (the bytes may
    /// come from anywhere).
    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> BindResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let q = &slf.get().q;
        let parts = (
            Self::codes(slf)?,
            Self::scale(slf)?,
            Self::offset(slf)?,
            q.spec.bits,
            q.spec.scheme.name(),
            q.spec.group_len,
            q.numel,
        );
        Ok((slf.get_type().into_any(), parts.into_pyobject(slf.py())?))
    }

    /// Immutable: a copy is the object itself.
    fn __copy__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __deepcopy__<'py>(slf: Bound<'py, Self>, _memo: &Bound<'py, PyAny>) -> Bound<'py, Self> {
        slf
    }

    fn __repr__(&self) -> String {
        format!(
            "QuantTensor({} elements, {} bits, {}, group_len {})",
            self.q.numel,
            self.q.spec.bits,
            self.q.spec.scheme.name(),
            self.q.spec.group_len
        )
    }
}
