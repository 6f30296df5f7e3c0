//! The one error type of the core. The Python bindings map each variant to an
//! exception class in a single place (`robustpatch-py/src/errors.rs`).

use std::fmt;
use std::io::ErrorKind;
use std::path::Path;

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
    /// An operating-system I/O failure. The kind and OS error number are kept so
    /// that a missing file becomes `FileNotFoundError` in Python, not a bare OSError.
    Io {
        kind: ErrorKind,
        errno: Option<i32>,
        message: String,
        /// The file concerned, when known.
        path: Option<String>,
    },
}

impl Error {
    /// An I/O error on `path`, naming it in the message.
    pub fn io_at(path: &Path, e: std::io::Error) -> Self {
        let mut err = Error::from(e);
        if let Error::Io { path: p, .. } = &mut err {
            *p = Some(path.display().to_string());
        }
        err
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DType(m) => write!(f, "dtype error: {m}"),
            Error::Shape(m) => write!(f, "shape error: {m}"),
            Error::Value(m) => write!(f, "invalid value: {m}"),
            Error::NonFinite(m) => write!(f, "non-finite data: {m}"),
            Error::Format(m) => write!(f, "invalid file: {m}"),
            Error::Io {
                message,
                path: Some(p),
                ..
            } => write!(f, "I/O error: {message}: {p}"),
            Error::Io { message, .. } => write!(f, "I/O error: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let errno = e.raw_os_error();
        // The OS text alone ("No such file or directory"), without Rust's " (os error 2)".
        let message = match errno {
            Some(_) => e
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or("")
                .to_string(),
            None => e.to_string(),
        };
        Error::Io {
            kind: e.kind(),
            errno,
            message,
            path: None,
        }
    }
}

/// Result alias used across the core.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_keeps_its_kind_and_errno_and_names_the_path() {
        let e = std::fs::File::open("/no/such/robustpatch/file").unwrap_err();
        let err = Error::io_at(Path::new("/no/such/robustpatch/file"), e);
        let Error::Io {
            kind,
            errno,
            message,
            path,
        } = &err
        else {
            panic!("not an I/O error: {err:?}");
        };
        assert_eq!(*kind, ErrorKind::NotFound);
        assert_eq!(*errno, Some(2));
        assert_eq!(message, "No such file or directory");
        assert_eq!(path.as_deref(), Some("/no/such/robustpatch/file"));
        assert_eq!(
            err.to_string(),
            "I/O error: No such file or directory: /no/such/robustpatch/file"
        );
    }

    #[test]
    fn an_io_error_without_errno_keeps_its_kind() {
        let err = Error::from(std::io::Error::new(ErrorKind::UnexpectedEof, "short read"));
        assert_eq!(
            err,
            Error::Io {
                kind: ErrorKind::UnexpectedEof,
                errno: None,
                message: "short read".into(),
                path: None,
            }
        );
    }
}
