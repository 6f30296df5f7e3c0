//! The one place core errors become Python exceptions.

use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::{create_exception, PyErr};
use robustpatch_core::Error;

create_exception!(
    _core,
    FormatError,
    PyValueError,
    "A file or buffer is not a valid safetensors container or signature."
);
create_exception!(
    _core,
    NonFiniteError,
    PyValueError,
    "NaN or Inf where finite values are required."
);

/// Map a core error to its Python exception.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::DType(_) => PyTypeError::new_err(msg),
        Error::Shape(_) | Error::Value(_) => PyValueError::new_err(msg),
        Error::NonFinite(_) => NonFiniteError::new_err(msg),
        Error::Format(_) => FormatError::new_err(msg),
        Error::Io(_) => PyOSError::new_err(msg),
    }
}
