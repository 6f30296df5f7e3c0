//! `QuantTensor`: a quantized tensor validated once, when built (by `quantize`
//! or from a file's arrays), then passed to apply, remove, dot and dequantize
//! with no further checks. It is frozen and nothing in this process can change
//! its parts: it owns copies of them, or, when the arrays it is built from view a
//! buffer no Python code can write (a signature file's read-only `mmap.mmap`, or
//! `bytes`), it holds those arrays instead of copying them. The arrays it hands
//! out are read-only views of its parts that numpy refuses to make writeable.
//!
//! A map is still the file: another process that rewrites the signature file in
//! place while it is open changes the values (decoded as they now are; no read
//! goes out of bounds, codes index a 256-entry table), and one that truncates it
//! ends this process with SIGBUS, as with any memory-mapped reader (safetensors'
//! too). Signature files are replaced by rename, never rewritten in place.

use crate::arrays::{slice_of, typed};
use crate::errors::BindResult;
use crate::ints::int_arg;
use numpy::ndarray::ArrayView1;
use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{PyArray1, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView, PyTuple};
use robustpatch_core::args;
use robustpatch_core::quant::{QuantView, Quantized};
use robustpatch_core::Error;

/// Where a `QuantTensor`'s codes, scales and offsets live.
enum Parts {
    /// Its own copies (quantized here, or copied from arrays that could change).
    Owned(Quantized),
    /// A view validated when built, over the memory of `_arrays` (codes, scale,
    /// offset), which view an immutable buffer: holding them keeps that memory
    /// alive and unchanged, so `'static` stands for "as long as `_arrays`", and
    /// the view is only lent out for as long as `&self`.
    Held {
        view: QuantView<'static>,
        _arrays: [Py<PyAny>; 3],
    },
}

/// Packed codes, one f32 scale and offset per group, and the spec that reads them.
#[pyclass(frozen, module = "robustpatch._core")]
pub struct QuantTensor {
    parts: Parts,
}

impl QuantTensor {
    pub fn from_quantized(q: Quantized) -> Self {
        QuantTensor {
            parts: Parts::Owned(q),
        }
    }

    /// The engine's view: already valid, so building it checks nothing.
    pub fn view(&self) -> QuantView<'_> {
        match &self.parts {
            Parts::Owned(q) => q.view(),
            Parts::Held { view, .. } => *view,
        }
    }

    /// Elements `start..stop` as a view of their own (validated: a small scan of
    /// the range's scales). The range must start on a group and a byte boundary
    /// and end on a group boundary or at the end, so packed codes and groups align.
    pub fn range(&self, start: i64, stop: i64) -> BindResult<QuantView<'_>> {
        let (start, stop) = (args::count("start", start)?, args::count("stop", stop)?);
        let q = self.view();
        let (bits, glen, numel) = (q.spec.bits as usize, q.spec.group_len, q.numel);
        let aligned = start % glen == 0 && start * bits % 8 == 0;
        if start > stop || stop > numel || !aligned || (stop % glen != 0 && stop != numel) {
            return Err(Error::Value(format!(
                "range {start}..{stop} of {numel} elements does not fall on groups of {glen} \
                 and whole bytes of {bits}-bit codes"
            ))
            .into());
        }
        let codes = &q.codes[start * bits / 8..(stop * bits).div_ceil(8)];
        let groups = start / glen..stop.div_ceil(glen);
        let (scale, offset) = (&q.scale[groups.clone()], &q.offset[groups]);
        Ok(QuantView::new(codes, scale, offset, q.spec, stop - start)?)
    }
}

/// A read-only numpy array over memory `owner` keeps alive.
fn frozen_view<'py, T: numpy::Element>(
    owner: &Bound<'py, QuantTensor>,
    data: &[T],
) -> BindResult<Bound<'py, PyArray1<T>>> {
    // SAFETY: `data` belongs to `owner`, a frozen pyclass whose parts are never
    // changed or moved; the array holds `owner` as its base, so it outlives the view.
    let arr =
        unsafe { PyArray1::borrow_from_array(&ArrayView1::from(data), owner.clone().into_any()) };
    arr.getattr("flags")?.setattr("writeable", false)?;
    Ok(arr)
}

/// Whether nothing in this process can change the memory `arr` views while it lives
/// (see the module docs for another process rewriting a mapped file): it is
/// not writeable and, through its chain of bases, views exactly `bytes` or
/// exactly an `mmap.mmap` opened read-only (the memoryview numpy puts between
/// may itself be read-only over a bytearray: the object below it is what counts).
fn views_immutable(arr: &Bound<'_, PyUntypedArray>) -> PyResult<bool> {
    // SAFETY: `arr` is a live array object; its flags are read, not changed.
    if unsafe { (*arr.as_array_ptr()).flags } & NPY_ARRAY_WRITEABLE != 0 {
        return Ok(false);
    }
    let mut obj = arr.clone().into_any();
    while let Ok(a) = obj.downcast::<PyUntypedArray>() {
        // The C-level base: a subclass's Python `base` property could lie.
        // SAFETY: a borrowed reference owned by `a`, which is alive here.
        let base = unsafe { Bound::from_borrowed_ptr_or_opt(a.py(), (*a.as_array_ptr()).base) };
        match base {
            Some(b) => obj = b,
            None => return Ok(false), // owns its memory, which can be made writeable
        }
    }
    if let Ok(view) = obj.downcast::<PyMemoryView>() {
        obj = view.getattr("obj")?;
    }
    let mmap = obj.py().import("mmap")?.getattr("mmap")?;
    if obj.is_exact_instance(&mmap) {
        // A read-only map exports read-only buffers; a writeable one does not.
        return PyMemoryView::from(&obj)?.getattr("readonly")?.is_truthy();
    }
    Ok(obj.is_exact_instance_of::<PyBytes>())
}

/// `slice` with the lifetime of whatever keeps its memory alive and unchanged.
///
/// # Safety
/// The caller keeps the owner of that memory, which nothing may change, for as
/// long as the result is used.
unsafe fn unbounded<T>(slice: &[T]) -> &'static [T] {
    std::slice::from_raw_parts(slice.as_ptr(), slice.len())
}

#[pymethods]
impl QuantTensor {
    /// Validate the parts (as read from a file) and copy them, unless all three
    /// view an immutable buffer (a read-only map of the file): then hold them.
    /// Errors: bits, scheme, group length or counts out of range
    /// (InvalidArgumentError), buffers whose lengths do not fit (MismatchError),
    /// NaN/Inf scales or offsets (NonFiniteError).
    #[new]
    #[pyo3(signature = (codes, scale, offset, bits, scheme, group_len, numel))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        codes: &Bound<'_, PyAny>,
        scale: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        bits: &Bound<'_, PyAny>,
        scheme: &str,
        group_len: &Bound<'_, PyAny>,
        numel: &Bound<'_, PyAny>,
    ) -> BindResult<Self> {
        let (bits, group_len) = (int_arg(bits, "bits")?, int_arg(group_len, "group_len")?);
        let spec = args::spec(bits, scheme, group_len)?;
        let numel = args::count("numel", int_arg(numel, "numel")?)?;
        let codes = typed::<u8>(codes, "codes", "uint8")?;
        let scale = typed::<f32>(scale, "scale", "float32")?;
        let offset = typed::<f32>(offset, "offset", "float32")?;
        let (c, s, o) = (
            slice_of(&codes, "codes")?,
            slice_of(&scale, "scale")?,
            slice_of(&offset, "offset")?,
        );
        let arrays = [codes.as_untyped(), scale.as_untyped(), offset.as_untyped()];
        if arrays
            .iter()
            .try_fold(true, |all, a| Ok::<_, PyErr>(all && views_immutable(a)?))?
        {
            // SAFETY: the arrays, kept beside the view, view memory nothing can change.
            let (c, s, o) = unsafe { (unbounded(c), unbounded(s), unbounded(o)) };
            let view = QuantView::new(c, s, o, spec, numel)?;
            let _arrays = arrays.map(|a| a.clone().into_any().unbind());
            return Ok(QuantTensor {
                parts: Parts::Held { view, _arrays },
            });
        }
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
        frozen_view(slf, slf.get().view().codes)
    }

    /// One scale per group (read-only).
    #[getter]
    fn scale<'py>(slf: &Bound<'py, Self>) -> BindResult<Bound<'py, PyArray1<f32>>> {
        frozen_view(slf, slf.get().view().scale)
    }

    /// One offset per group (read-only).
    #[getter]
    fn offset<'py>(slf: &Bound<'py, Self>) -> BindResult<Bound<'py, PyArray1<f32>>> {
        frozen_view(slf, slf.get().view().offset)
    }

    #[getter]
    fn bits(&self) -> u8 {
        self.view().spec.bits
    }

    #[getter]
    fn scheme(&self) -> &'static str {
        self.view().spec.scheme.name()
    }

    #[getter]
    fn group_len(&self) -> usize {
        self.view().spec.group_len
    }

    #[getter]
    fn numel(&self) -> usize {
        self.view().numel
    }

    /// Whether it holds the arrays it was built from (views of an immutable
    /// buffer) rather than copies of them.
    #[getter]
    fn is_view(&self) -> bool {
        matches!(self.parts, Parts::Held { .. })
    }

    /// Bytes of codes, scales and offsets.
    #[getter]
    fn nbytes(&self) -> usize {
        let q = self.view();
        q.codes.len() + 4 * (q.scale.len() + q.offset.len())
    }

    /// Pickled as its parts and validated again when unpickled (the bytes may
    /// come from anywhere).
    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> BindResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let q = slf.get().view();
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
        let q = self.view();
        format!(
            "QuantTensor({} elements, {} bits, {}, group_len {})",
            q.numel,
            q.spec.bits,
            q.spec.scheme.name(),
            q.spec.group_len
        )
    }
}
