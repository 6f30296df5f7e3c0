//! numpy arrays in, borrowed slices out: the one dtype switch of the bindings.
//! bf16 travels as uint16 (numpy has no bf16), so a uint16 array means bf16.

use crate::errors::BindResult;
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use robustpatch_core::delta::Dense;
use robustpatch_core::{DType, Error};

/// A read-only float array of one of the supported dtypes.
pub enum FloatIn<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    BF16(PyReadonlyArrayDyn<'py, u16>),
}

/// A writable float array of one of the supported dtypes.
pub enum FloatInOut<'py> {
    F32(PyReadwriteArrayDyn<'py, f32>),
    F16(PyReadwriteArrayDyn<'py, f16>),
    BF16(PyReadwriteArrayDyn<'py, u16>),
}

fn dtype_error(what: &str, obj: &Bound<'_, PyAny>) -> Error {
    let found = obj
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| obj.get_type().to_string());
    Error::DType(format!(
        "{what}: expected a numpy array of float32, float16 or uint16 (bf16 bits), got {found}"
    ))
}

pub fn contiguous_error(what: &str) -> Error {
    Error::Value(format!(
        "{what}: array is not C-contiguous (use numpy.ascontiguousarray)"
    ))
}

impl<'py> FloatIn<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> BindResult<Self> {
        // Borrowed after the arrays a call writes: one of those is refused, not a panic.
        let shared = |_| {
            Error::Value(format!(
                "{what}: shares memory with an array this call writes (a delta cannot be the \
                 tensor it patches); pass a copy"
            ))
        };
        let arr = if let Ok(a) = obj.downcast::<PyArrayDyn<f32>>() {
            FloatIn::F32(a.try_readonly().map_err(shared)?)
        } else if let Ok(a) = obj.downcast::<PyArrayDyn<f16>>() {
            FloatIn::F16(a.try_readonly().map_err(shared)?)
        } else if let Ok(a) = obj.downcast::<PyArrayDyn<u16>>() {
            FloatIn::BF16(a.try_readonly().map_err(shared)?)
        } else {
            return Err(dtype_error(what, obj).into());
        };
        arr.dense(what)?;
        Ok(arr)
    }

    pub fn dtype(&self) -> DType {
        match self {
            FloatIn::F32(_) => DType::F32,
            FloatIn::F16(_) => DType::F16,
            FloatIn::BF16(_) => DType::BF16,
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            FloatIn::F32(a) => a.shape().to_vec(),
            FloatIn::F16(a) => a.shape().to_vec(),
            FloatIn::BF16(a) => a.shape().to_vec(),
        }
    }

    /// Borrow the data as a core dense view (fails for arrays not in C order).
    pub fn dense(&self, what: &str) -> BindResult<Dense<'_>> {
        Ok(match self {
            FloatIn::F32(a) => Dense::F32(slice_of(a, what)?),
            FloatIn::F16(a) => Dense::F16(slice_of(a, what)?),
            FloatIn::BF16(a) => Dense::BF16(slice_of(a, what)?.reinterpret_cast()),
        })
    }
}

/// A mutable core view of a writable array.
pub enum DenseMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl<'py> FloatInOut<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> BindResult<Self> {
        let not_writeable = |_| {
            Error::Value(format!(
                "{what}: array is read-only; pass a writeable array"
            ))
        };
        if let Ok(a) = obj.downcast::<PyArrayDyn<f32>>() {
            Ok(FloatInOut::F32(a.try_readwrite().map_err(not_writeable)?))
        } else if let Ok(a) = obj.downcast::<PyArrayDyn<f16>>() {
            Ok(FloatInOut::F16(a.try_readwrite().map_err(not_writeable)?))
        } else if let Ok(a) = obj.downcast::<PyArrayDyn<u16>>() {
            Ok(FloatInOut::BF16(a.try_readwrite().map_err(not_writeable)?))
        } else {
            Err(dtype_error(what, obj).into())
        }
    }

    pub fn dense_mut(&mut self, what: &str) -> BindResult<DenseMut<'_>> {
        Ok(match self {
            FloatInOut::F32(a) => DenseMut::F32(slice_mut_of(a, what)?),
            FloatInOut::F16(a) => DenseMut::F16(slice_mut_of(a, what)?),
            FloatInOut::BF16(a) => DenseMut::BF16(slice_mut_of(a, what)?.reinterpret_cast_mut()),
        })
    }
}

/// `ob` as a read-only numpy array of element type `T` (`dtype` names it): a TypeError
/// naming the argument and the dtype it needs, or a refusal when it shares memory with
/// an array this call writes (borrowed after those).
pub fn typed<'py, T: numpy::Element>(
    ob: &Bound<'py, PyAny>,
    what: &str,
    dtype: &str,
) -> BindResult<PyReadonlyArrayDyn<'py, T>> {
    let arr = ob.downcast::<PyArrayDyn<T>>().map_err(|_| {
        let found = ob
            .getattr("dtype")
            .map(|d| format!("an array of {d}"))
            .unwrap_or_else(|_| ob.get_type().to_string());
        Error::DType(format!(
            "{what}: expected a numpy array of {dtype}, got {found}"
        ))
    })?;
    Ok(arr.try_readonly().map_err(|_| {
        Error::Value(format!(
            "{what}: shares memory with an array this call writes; pass a copy"
        ))
    })?)
}

/// Borrow a read-only array of a fixed element type as a slice in C order. numpy's
/// `as_slice` also takes a Fortran-ordered array, whose memory order would read a 2-D
/// tensor transposed: refused instead.
pub fn slice_of<'a, T: numpy::Element>(
    a: &'a PyReadonlyArrayDyn<'_, T>,
    what: &str,
) -> BindResult<&'a [T]> {
    if !a.is_c_contiguous() {
        return Err(contiguous_error(what).into());
    }
    Ok(a.as_slice().map_err(|_| contiguous_error(what))?)
}

/// [`slice_of`] for a writable array.
pub fn slice_mut_of<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
    what: &str,
) -> BindResult<&'a mut [T]> {
    if !a.is_c_contiguous() {
        return Err(contiguous_error(what).into());
    }
    Ok(a.as_slice_mut().map_err(|_| contiguous_error(what))?)
}
