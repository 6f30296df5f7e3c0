//! The one place errors become Python exceptions (polars' `error.rs` is the
//! model). Every binding returns [`BindResult`]: core errors and pyo3 errors
//! both convert into [`BindError`] with `?`, and [`BindError`] into `PyErr`
//! through one `From` impl. No exception is built anywhere else.

use pyo3::exceptions::{
    PyBlockingIOError, PyBrokenPipeError, PyConnectionAbortedError, PyConnectionRefusedError,
    PyConnectionResetError, PyFileExistsError, PyFileNotFoundError, PyInterruptedError, PyOSError,
    PyPermissionError, PyTimeoutError, PyTypeError, PyValueError,
};
use pyo3::{create_exception, import_exception, PyErr};
use robustpatch_core::Error;
use std::io::ErrorKind;

create_exception!(
    robustpatch._core,
    FormatError,
    PyValueError,
    "A file or buffer is not a valid safetensors container or signature."
);
create_exception!(
    robustpatch._core,
    NonFiniteError,
    PyValueError,
    "NaN or Inf where finite values are required."
);
// Defined in Python (robustpatch.errors), which imports this module first:
// looked up on first use, so the two never import each other at load time.
import_exception!(robustpatch.errors, InvalidArgumentError);
import_exception!(robustpatch.errors, MismatchError);

/// An error on its way out of a binding: from the core, or already a Python one.
pub enum BindError {
    Core(Error),
    Py(PyErr),
}

/// What every binding returns.
pub type BindResult<T> = Result<T, BindError>;

impl From<Error> for BindError {
    fn from(e: Error) -> Self {
        BindError::Core(e)
    }
}

impl From<PyErr> for BindError {
    fn from(e: PyErr) -> Self {
        BindError::Py(e)
    }
}

/// Only arrays the bindings allocate themselves are borrowed without a name,
/// and those are always contiguous.
impl From<numpy::NotContiguousError> for BindError {
    fn from(e: numpy::NotContiguousError) -> Self {
        BindError::Core(Error::Value(e.to_string()))
    }
}

impl From<BindError> for PyErr {
    fn from(e: BindError) -> Self {
        match e {
            BindError::Py(e) => e,
            BindError::Core(e) => core_to_py(e),
        }
    }
}

/// A wrong array dtype is a bug in the caller (TypeError); a value out of range
/// (InvalidArgumentError) or inputs that do not fit (MismatchError) come from
/// user input and are reported as one line.
fn core_to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::DType(_) => PyTypeError::new_err(msg),
        Error::Value(_) => InvalidArgumentError::new_err(msg),
        Error::Shape(_) => MismatchError::new_err(msg),
        Error::NonFinite(_) => NonFiniteError::new_err(msg),
        Error::Format(_) => FormatError::new_err(msg),
        Error::Io {
            kind,
            errno,
            message,
            path,
        } => io_to_py(kind, errno, message, path),
    }
}

/// The `OSError` subclass Python itself would raise for this kind, with
/// `errno`, `strerror` and `filename` set when known.
fn io_to_py(kind: ErrorKind, errno: Option<i32>, message: String, path: Option<String>) -> PyErr {
    macro_rules! raise {
        ($cls:ty) => {
            match (errno, path) {
                (Some(n), Some(p)) => <$cls>::new_err((n, message, p)),
                (Some(n), None) => <$cls>::new_err((n, message)),
                (None, Some(p)) => <$cls>::new_err(format!("{message}: {p}")),
                (None, None) => <$cls>::new_err(message),
            }
        };
    }
    match kind {
        ErrorKind::NotFound => raise!(PyFileNotFoundError),
        ErrorKind::PermissionDenied => raise!(PyPermissionError),
        ErrorKind::AlreadyExists => raise!(PyFileExistsError),
        ErrorKind::Interrupted => raise!(PyInterruptedError),
        ErrorKind::TimedOut => raise!(PyTimeoutError),
        ErrorKind::WouldBlock => raise!(PyBlockingIOError),
        ErrorKind::BrokenPipe => raise!(PyBrokenPipeError),
        ErrorKind::ConnectionRefused => raise!(PyConnectionRefusedError),
        ErrorKind::ConnectionReset => raise!(PyConnectionResetError),
        ErrorKind::ConnectionAborted => raise!(PyConnectionAbortedError),
        // Python picks the subclass from errno itself (IsADirectoryError, ...).
        _ => raise!(PyOSError),
    }
}
