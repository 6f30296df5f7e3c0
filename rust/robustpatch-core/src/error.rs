//! The one error type of the core. The Python bindings map each variant to an
//! exception class in a single place (`robustpatch-py/src/errors.rs`).

use std::fmt;

/// Everything that can go wrong in the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A dtype the kernel does not support, or two inputs whose dtypes disagree.
    DType(String),
    /// Shapes or lengths that do not fit together.
    Shape(String),
    /// A parameter outside its allowed range (bits, group size, alpha, ...).
    Value(String),
    /// NaN or Inf where finite data is required.
    NonFinite(String),
    /// A file or buffer whose bytes are not a valid container.
    Format(String),
    /// An operating-system I/O failure.
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DType(m) => write!(f, "dtype error: {m}"),
            Error::Shape(m) => write!(f, "shape error: {m}"),
            Error::Value(m) => write!(f, "invalid value: {m}"),
            Error::NonFinite(m) => write!(f, "non-finite data: {m}"),
            Error::Format(m) => write!(f, "invalid file: {m}"),
            Error::Io(m) => write!(f, "I/O error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// Result alias used across the core.
pub type Result<T> = std::result::Result<T, Error>;
