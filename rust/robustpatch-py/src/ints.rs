//! Python ints in: taken as objects and converted here, so that an int past 64 bits
//! or a bool is refused naming its argument. (Typed `i64` parameters let PyO3 raise
//! a bare OverflowError that names none, and take `True` as 1.) The core then
//! range-checks the value (`robustpatch_core::args`).

use crate::errors::BindResult;
use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;
use pyo3::types::PyBool;
use robustpatch_core::Error;

/// The int `ob` passed as argument `what`, as i64: a Python int or anything with
/// `__index__` (a numpy integer), not a bool.
pub fn int_arg(ob: &Bound<'_, PyAny>, what: &str) -> BindResult<i64> {
    let not_int = || -> BindResult<i64> {
        let found = ob.get_type().name()?;
        Err(Error::DType(format!("{what} must be an int, got {found}")).into())
    };
    if ob.is_instance_of::<PyBool>() {
        return not_int(); // (numpy's bool has no __index__: refused below)
    }
    match ob.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(ob.py()) => {
            Err(Error::Value(format!("{what} must fit in 64 bits, got {ob}")).into())
        }
        Err(_) => not_int(),
    }
}
