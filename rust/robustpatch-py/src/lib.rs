//! `robustpatch._core`: thin PyO3 wrappers over `robustpatch-core`.
//! Each function converts arrays, releases the GIL around the kernel through
//! [`nogil`], and returns [`BindResult`], whose errors become Python exceptions
//! in `errors.rs` only. No logic lives here.

mod arrays;
mod errors;
mod hashing;
mod ints;
mod quant_tensor;

use arrays::{slice_mut_of, slice_of, typed, DenseMut, FloatIn, FloatInOut};
use errors::BindResult;
use ints::int_arg;
use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::marker::Ungil;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use quant_tensor::QuantTensor;
use robustpatch_core::apply::{self as core_apply, Applied, Undo};
use robustpatch_core::compact::{self as core_compact, Narrowest};
use robustpatch_core::delta::{Delta, Dense};
use robustpatch_core::quant;
use robustpatch_core::{args, dot as core_dot, pack as core_pack, project as core_project};
use robustpatch_core::{Element, Error};

/// Undo records and other kernel outputs are large, short-lived buffers handed
/// to numpy. With the system allocator each one is a fresh mapping: page faults
/// on first write and an unmap (a TLB shootdown across the worker threads) on
/// free cost as much as the kernel itself. mimalloc keeps freed segments for
/// reuse, as polars does with its own allocator; only this module's Rust
/// allocations use it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A 1-D numpy array for a kernel to fill, not zeroed: numpy's allocator backs
/// large arrays with huge pages (a Rust `Vec` of 256 MiB page-faults every 4 KiB
/// on first write, which measured more than the whole projection kernel), and
/// zeroing memory the kernel overwrites cost 7% of `extract`.
fn for_kernel<'py, T: numpy::Element>(py: Python<'py>, n: usize) -> Bound<'py, PyArray1<T>> {
    // SAFETY: every caller passes a plain number type (each bit pattern is a
    // value) and its kernel writes all `n` elements before Python can see the
    // array; on an error the array is dropped unseen.
    unsafe { PyArray1::new(py, n, false) }
}

/// Run heavy work with the GIL released: the one helper every kernel call uses.
fn nogil<T: Ungil, F: Ungil + FnOnce() -> T>(py: Python<'_>, f: F) -> T {
    py.allow_threads(f)
}

/// Quantize a float array into a validated `QuantTensor`.
#[pyfunction]
#[pyo3(signature = (x, bits, scheme, group_len))]
fn quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    bits: &Bound<'_, PyAny>,
    scheme: &str,
    group_len: &Bound<'_, PyAny>,
) -> BindResult<QuantTensor> {
    let x = FloatIn::extract(x, "x")?;
    let (bits, group_len) = (int_arg(bits, "bits")?, int_arg(group_len, "group_len")?);
    let spec = args::spec(bits, scheme, group_len)?;
    let dense = x.dense("x")?;
    let q = nogil(py, || match dense {
        Dense::F32(v) => quant::quantize(v, spec),
        Dense::F16(v) => quant::quantize(v, spec),
        Dense::BF16(v) => quant::quantize(v, spec),
    })?;
    Ok(QuantTensor::from_quantized(q))
}

/// Decode elements `start..stop` (default: all) to a flat float32 array.
#[pyfunction]
#[pyo3(signature = (q, start = None, stop = None))]
fn dequantize<'py>(
    py: Python<'py>,
    q: &Bound<'py, QuantTensor>,
    start: Option<&Bound<'py, PyAny>>,
    stop: Option<&Bound<'py, PyAny>>,
) -> BindResult<Bound<'py, PyArray1<f32>>> {
    let start = start.map(|s| int_arg(s, "start")).transpose()?.unwrap_or(0);
    let stop = stop.map(|s| int_arg(s, "stop")).transpose()?;
    let q = q.get();
    let numel = q.view().numel;
    let view = match stop {
        None if start == 0 => q.view(),
        _ => q.range(start, stop.unwrap_or(numel as i64))?,
    };
    let arr = for_kernel::<f32>(py, view.numel);
    let mut rw = arr.readwrite();
    let out = rw.as_slice_mut()?;
    nogil(py, || quant::dequantize(&view, out))?;
    drop(rw);
    Ok(arr)
}

/// Bit-pack codes (each < 2**bits) little-endian.
#[pyfunction]
fn pack<'py>(
    py: Python<'py>,
    codes: &Bound<'py, PyAny>,
    bits: &Bound<'py, PyAny>,
) -> BindResult<Bound<'py, PyArray1<u8>>> {
    let codes = typed::<u8>(codes, "codes", "uint8")?;
    let codes = slice_of(&codes, "codes")?;
    let bits = args::bits(int_arg(bits, "bits")?)?;
    let mut out = vec![0u8; core_pack::packed_len(codes.len(), bits)];
    nogil(py, || core_pack::pack(codes, bits, &mut out))?;
    Ok(out.into_pyarray(py))
}

/// Unpack `n` codes of `bits` bits each.
#[pyfunction]
fn unpack<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    bits: &Bound<'py, PyAny>,
    n: &Bound<'py, PyAny>,
) -> BindResult<Bound<'py, PyArray1<u8>>> {
    let packed = typed::<u8>(packed, "packed", "uint8")?;
    let packed = slice_of(&packed, "packed")?;
    let bits = args::bits(int_arg(bits, "bits")?)?;
    let n = args::count("n", int_arg(n, "n")?)?;
    if packed.len() != core_pack::packed_len(n, bits) {
        return Err(Error::Shape(format!(
            "{} packed bytes cannot hold exactly {n} codes of {bits} bits",
            packed.len()
        ))
        .into());
    }
    let arr = for_kernel::<u8>(py, n);
    let mut rw = arr.readwrite();
    let out = rw.as_slice_mut()?;
    nogil(py, || core_pack::unpack(packed, bits, 0, out))?;
    drop(rw);
    Ok(arr)
}

/// Signature of one tensor: returns (signature float32 with the input's shape, stats dict).
/// With `out` (a writeable float32 array of that shape, not sharing memory with
/// an input) the signature is written there and `out` is returned. With
/// `hash_pretrained`, stats also holds `pretrained_digest`: the pretrained tensor's
/// `tensor_digest` in hex, hashed in the same pass.
#[pyfunction]
#[pyo3(signature = (pretrained, clean, robust, out = None, hash_pretrained = false))]
fn project<'py>(
    py: Python<'py>,
    pretrained: &Bound<'py, PyAny>,
    clean: &Bound<'py, PyAny>,
    robust: &Bound<'py, PyAny>,
    out: Option<Bound<'py, PyArrayDyn<f32>>>,
    hash_pretrained: bool,
) -> BindResult<Bound<'py, PyTuple>> {
    let (p, c, r) = (
        FloatIn::extract(pretrained, "pretrained")?,
        FloatIn::extract(clean, "clean")?,
        FloatIn::extract(robust, "robust")?,
    );
    let shape = p.shape();
    if c.shape() != shape || r.shape() != shape {
        return Err(Error::Shape(format!(
            "shapes differ: pretrained {:?}, clean {:?}, robust {:?}",
            shape,
            c.shape(),
            r.shape()
        ))
        .into());
    }
    if c.dtype() != p.dtype() || r.dtype() != p.dtype() {
        return Err(Error::DType(format!(
            "dtypes differ: pretrained {}, clean {}, robust {}",
            p.dtype().name(),
            c.dtype().name(),
            r.dtype().name()
        ))
        .into());
    }
    let (pd, cd, rd) = (
        p.dense("pretrained")?,
        c.dense("clean")?,
        r.dense("robust")?,
    );
    let sig = match out {
        Some(o) if o.shape() != shape => {
            return Err(Error::Shape(format!(
                "out has shape {:?}, the inputs {:?}",
                o.shape(),
                shape
            ))
            .into())
        }
        Some(o) => o,
        None => for_kernel::<f32>(py, pd.len()).reshape(shape)?,
    };
    // The inputs are borrowed read-only, so an `out` sharing their memory is refused here.
    let mut rw = sig.try_readwrite().map_err(|_| {
        Error::Value("out must be writeable and not share memory with an input".into())
    })?;
    let out = slice_mut_of(&mut rw, "out")?;
    let (stats, digest) = nogil(py, || match (pd, cd, rd) {
        (Dense::F32(a), Dense::F32(b), Dense::F32(c)) => {
            project_dense(a, b, c, out, hash_pretrained)
        }
        (Dense::F16(a), Dense::F16(b), Dense::F16(c)) => {
            project_dense(a, b, c, out, hash_pretrained)
        }
        (Dense::BF16(a), Dense::BF16(b), Dense::BF16(c)) => {
            project_dense(a, b, c, out, hash_pretrained)
        }
        _ => unreachable!("dtypes checked above"),
    })?;
    drop(rw);
    let d = PyDict::new(py);
    if let Some(digest) = digest {
        d.set_item("pretrained_digest", robustpatch_core::hash::hex(&digest))?;
    }
    d.set_item("dot_rd", stats.dot_rd)?;
    d.set_item("norm2_d", stats.norm2_d)?;
    d.set_item("norm2_r", stats.norm2_r)?;
    d.set_item("norm2_robust", stats.norm2_robust)?;
    d.set_item("norm2_sig", stats.norm2_sig)?;
    d.set_item("coef", stats.coef)?;
    Ok(PyTuple::new(py, [sig.into_any(), d.into_any()])?)
}

/// The projection, with the pretrained tensor's digest when asked for.
fn project_dense<T: Element>(
    pre: &[T],
    clean: &[T],
    robust: &[T],
    out: &mut [f32],
    hash: bool,
) -> robustpatch_core::error::Result<(core_project::ProjectionStats, Option<[u8; 16]>)> {
    if hash {
        core_project::project_hashing(pre, clean, robust, out).map(|(s, d)| (s, Some(d)))
    } else {
        core_project::project(pre, clean, robust, out).map(|s| (s, None))
    }
}

/// The narrowest exact storage of a float32 array (C-contiguous): `("BF16", bits)` or
/// `("F16", bits)` with the 16-bit patterns as a flat uint16 array, or `("F32", None)`.
#[pyfunction]
fn compact<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
) -> BindResult<(&'static str, Option<Bound<'py, PyArray1<u16>>>)> {
    let values = typed::<f32>(values, "values", "float32")?;
    let values = slice_of(&values, "values")?;
    let arr = for_kernel::<u16>(py, values.len());
    let mut rw = arr.readwrite();
    let out = rw.as_slice_mut()?;
    let kind = nogil(py, || core_compact::compact(values, out));
    drop(rw);
    Ok(match kind {
        Narrowest::BF16 => ("BF16", Some(arr)),
        Narrowest::F16 => ("F16", Some(arr)),
        Narrowest::F32 => ("F32", None),
    })
}

/// A delta as passed from Python: a float array or a `QuantTensor`.
enum DeltaIn<'py> {
    Dense(FloatIn<'py>),
    Quant(Bound<'py, QuantTensor>),
}

impl<'py> DeltaIn<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> BindResult<Self> {
        if let Ok(q) = obj.downcast::<QuantTensor>() {
            return Ok(DeltaIn::Quant(q.clone()));
        }
        Ok(DeltaIn::Dense(FloatIn::extract(obj, "delta")?))
    }

    fn view(&self) -> BindResult<Delta<'_>> {
        Ok(match self {
            DeltaIn::Dense(a) => Delta::Dense(a.dense("delta")?),
            DeltaIn::Quant(q) => Delta::Quant(q.get().view()),
        })
    }
}

fn extract_deltas<'py>(
    deltas: &Bound<'py, PyAny>,
    alphas: Vec<f64>,
) -> BindResult<(Vec<DeltaIn<'py>>, Vec<f32>)> {
    let ins: Vec<DeltaIn> = deltas
        .try_iter()?
        .map(|d| DeltaIn::extract(&d?))
        .collect::<BindResult<_>>()?;
    let alphas = alphas
        .iter()
        .enumerate()
        .map(|(k, &a)| match a as f32 {
            // Taken as f64 so that 1e39 is named as what it is, not as "inf".
            x if a.is_finite() && !x.is_finite() => Err(Error::NonFinite(format!(
                "alpha {k} = {a:e} is past the float32 range"
            ))),
            x => Ok(x),
        })
        .collect::<Result<Vec<f32>, Error>>()?;
    if ins.len() != alphas.len() {
        return Err(
            Error::Shape(format!("{} deltas but {} alphas", ins.len(), alphas.len())).into(),
        );
    }
    Ok((ins, alphas))
}

fn views<'a>(ins: &'a [DeltaIn<'_>], alphas: &[f32]) -> BindResult<Vec<(Delta<'a>, f32)>> {
    ins.iter()
        .zip(alphas)
        .map(|(d, &a)| Ok((d.view()?, a)))
        .collect()
}

/// Dense deltas are checked for NaN/Inf before the target is touched, so a bad
/// delta never leaves a half-patched target. (Quantized ones are checked on load.)
fn check_finite(deltas: &[(Delta, f32)]) -> robustpatch_core::Result<()> {
    for (k, (d, _)) in deltas.iter().enumerate() {
        if let Delta::Dense(dense) = d {
            if let Some(i) = dense.first_non_finite() {
                return Err(Error::NonFinite(format!(
                    "delta {k} holds NaN or Inf at flat index {i}"
                )));
            }
        }
    }
    Ok(())
}

/// `(record or None, overflowed)`: the undo record as `(positions, values)` arrays.
fn applied_tuple<'py, B: numpy::Element>(
    py: Python<'py>,
    a: Applied<B>,
) -> PyResult<(Option<Bound<'py, PyTuple>>, usize)> {
    let record = a
        .undo
        .map(|u| {
            PyTuple::new(
                py,
                [
                    u.positions.into_pyarray(py).into_any(),
                    u.values.into_pyarray(py).into_any(),
                ],
            )
        })
        .transpose()?;
    Ok((record, a.overflowed))
}

/// In place: `target += Σ alphas[k]·deltas[k]`, rounding once to the target dtype.
/// Returns `(record, overflowed)`: with `record`, the undo record `(positions
/// uint32, original bits)`, else None; and the number of elements that were
/// finite and are now ±Inf or NaN (counted in the same pass; the caller decides).
#[pyfunction]
#[pyo3(signature = (target, deltas, alphas, record = true))]
fn apply<'py>(
    py: Python<'py>,
    target: &Bound<'py, PyAny>,
    deltas: &Bound<'py, PyAny>,
    alphas: Vec<f64>,
    record: bool,
) -> BindResult<(Option<Bound<'py, PyTuple>>, usize)> {
    let mut t = FloatInOut::extract(target, "target")?;
    let (ins, alphas) = extract_deltas(deltas, alphas)?;
    let ds = views(&ins, &alphas)?;
    Ok(match t.dense_mut("target")? {
        DenseMut::F32(x) => applied_tuple(py, nogil(py, || run_apply(x, &ds, record))?)?,
        DenseMut::F16(x) => applied_tuple(py, nogil(py, || run_apply(x, &ds, record))?)?,
        DenseMut::BF16(x) => applied_tuple(py, nogil(py, || run_apply(x, &ds, record))?)?,
    })
}

fn run_apply<T: Element>(
    x: &mut [T],
    ds: &[(Delta, f32)],
    record: bool,
) -> robustpatch_core::Result<Applied<T::Bits>> {
    check_finite(ds)?;
    core_apply::apply(x, ds, record)
}

/// Inverse of `apply` with the same deltas and alphas. With the undo record
/// (`positions`, `values`) the target is restored bit for bit. Returns
/// `(corrected, inconsistent)`: records written back, and elements certainly
/// wrong (only meaningful without a record).
#[pyfunction]
#[pyo3(signature = (target, deltas, alphas, positions = None, values = None))]
fn remove<'py>(
    py: Python<'py>,
    target: &Bound<'py, PyAny>,
    deltas: &Bound<'py, PyAny>,
    alphas: Vec<f64>,
    positions: Option<&Bound<'py, PyAny>>,
    values: Option<&Bound<'py, PyAny>>,
) -> BindResult<(usize, usize)> {
    let mut t = FloatInOut::extract(target, "target")?;
    let (ins, alphas) = extract_deltas(deltas, alphas)?;
    let ds = views(&ins, &alphas)?;
    nogil(py, || check_finite(&ds))?; // as apply: a NaN delta would wipe the target
    let positions = positions
        .map(|p| typed::<u32>(p, "positions", "uint32"))
        .transpose()?;
    let pos = positions
        .as_ref()
        .map(|p| slice_of(p, "positions"))
        .transpose()?;
    if pos.is_some() != values.is_some() {
        return Err(Error::Value(
            "positions and values come together: pass both or neither".into(),
        )
        .into());
    }
    let report = match t.dense_mut("target")? {
        DenseMut::F32(x) => {
            let u = undo_of::<u32>(pos, values)?;
            nogil(py, || core_apply::remove(x, &ds, u.as_ref()))
        }
        DenseMut::F16(x) => {
            let u = undo_of::<u16>(pos, values)?;
            nogil(py, || core_apply::remove(x, &ds, u.as_ref()))
        }
        DenseMut::BF16(x) => {
            let u = undo_of::<u16>(pos, values)?;
            nogil(py, || core_apply::remove(x, &ds, u.as_ref()))
        }
    }?;
    Ok((report.corrected, report.inconsistent))
}

fn undo_of<B: numpy::Element + Copy>(
    pos: Option<&[u32]>,
    values: Option<&Bound<'_, PyAny>>,
) -> BindResult<Option<Undo<B>>> {
    let (Some(pos), Some(values)) = (pos, values) else {
        return Ok(None);
    };
    let values = values.downcast::<PyArrayDyn<B>>().map_err(|_| {
        Error::DType(format!(
            "undo values must be {} for this target dtype",
            std::any::type_name::<B>()
        ))
    })?;
    let values = values
        .try_readonly()
        .map_err(|_| Error::Value("undo values share memory with the target".into()))?;
    Ok(Some(Undo {
        positions: pos.to_vec(),
        values: slice_of(&values, "values")?.to_vec(),
    }))
}

/// ⟨a, b⟩ of two deltas (arrays or quantized tuples), in float64.
#[pyfunction]
fn dot(py: Python<'_>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> BindResult<f64> {
    let (a, b) = (DeltaIn::extract(a)?, DeltaIn::extract(b)?);
    let (va, vb) = (a.view()?, b.view()?);
    Ok(nogil(py, || core_dot::dot(&va, &vb))?)
}

/// Cosine similarity of two deltas; 0 when either is all zeros.
#[pyfunction]
fn cosine(py: Python<'_>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> BindResult<f64> {
    let (a, b) = (DeltaIn::extract(a)?, DeltaIn::extract(b)?);
    let (va, vb) = (a.view()?, b.view()?);
    Ok(nogil(py, || core_dot::cosine(&va, &vb))?)
}

/// The header as columns, not one Python object per tensor (1.4 M tiny tensors
/// took 7.5× the header's size that way): names (a list of str), dtype codes
/// (u8 indices into dtype names), shape ends (u64: tensor k's dimensions are
/// dims[ends[k-1]..ends[k]]), dims (u64) and offsets (u64 begin, end pairs).
fn header_tuple<'py>(
    py: Python<'py>,
    h: robustpatch_core::safetensors::Header,
) -> PyResult<Bound<'py, PyTuple>> {
    use robustpatch_core::safetensors::{dtype_index, DTYPES};
    let meta = PyDict::new(py);
    for (k, v) in &h.metadata {
        meta.set_item(k, v)?;
    }
    let names = PyList::new(py, h.tensors().map(|t| t.name))?;
    let n = h.len();
    let (mut codes, mut ends, mut dims) = (Vec::with_capacity(n), Vec::with_capacity(n), vec![]);
    let mut offsets = Vec::with_capacity(2 * n);
    for t in h.tensors() {
        // Parsed dtypes are names from DTYPES, so the index exists.
        codes.push(dtype_index(t.dtype).unwrap_or_default() as u8);
        dims.extend(t.shape.iter().map(|&d| d as u64));
        ends.push(dims.len() as u64);
        offsets.extend([t.begin as u64, t.end as u64]);
    }
    let dtype_names = PyTuple::new(py, DTYPES.iter().map(|(name, _)| *name))?;
    let columns = (
        names,
        codes.into_pyarray(py),
        dtype_names,
        ends.into_pyarray(py),
        dims.into_pyarray(py),
        offsets.into_pyarray(py),
    );
    (meta, columns, h.data_start).into_pyobject(py)
}

/// Read and validate a safetensors header from a file. Returns
/// `(metadata, (names, dtype_codes, dtype_names, shape_ends, dims, offsets),
/// data_start)`, the tensors in file order (see `header_tuple`); offsets are
/// relative to `data_start`.
#[pyfunction]
fn read_header<'py>(py: Python<'py>, path: std::path::PathBuf) -> BindResult<Bound<'py, PyTuple>> {
    let h = nogil(py, || robustpatch_core::safetensors::read(&path))?;
    Ok(header_tuple(py, h)?)
}

/// Validate a safetensors header held in memory (`buf` starts at byte 0 of a
/// file of `file_len` bytes). Same return value as `read_header`.
#[pyfunction]
fn parse_header<'py>(
    py: Python<'py>,
    buf: &[u8],
    file_len: &Bound<'py, PyAny>,
) -> BindResult<Bound<'py, PyTuple>> {
    let file_len = args::count("file_len", int_arg(file_len, "file_len")?)? as u64;
    let h = nogil(py, || robustpatch_core::safetensors::parse(buf, file_len))?;
    Ok(header_tuple(py, h)?)
}

/// Encode a safetensors header (length prefix + JSON, space-padded to a multiple
/// of 8) from `metadata` and `[(name, dtype, shape, begin, end), ...]`, in order.
#[pyfunction]
fn encode_header<'py>(
    py: Python<'py>,
    metadata: Vec<(String, String)>,
    tensors: Vec<(String, String, Vec<usize>, usize, usize)>,
) -> Bound<'py, PyBytes> {
    let tensors: Vec<_> = tensors
        .into_iter()
        .map(
            |(name, dtype, shape, begin, end)| robustpatch_core::safetensors::TensorInfo {
                name,
                dtype,
                shape,
                begin,
                end,
            },
        )
        .collect();
    PyBytes::new(
        py,
        &robustpatch_core::safetensors::encode(&metadata, &tensors),
    )
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FormatError", m.py().get_type::<errors::FormatError>())?;
    m.add(
        "NonFiniteError",
        m.py().get_type::<errors::NonFiniteError>(),
    )?;
    m.add_class::<QuantTensor>()?;
    m.add_class::<hashing::Blake3>()?;
    m.add_function(wrap_pyfunction!(hashing::tensor_digest, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::crc32, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(project, m)?)?;
    m.add_function(wrap_pyfunction!(compact, m)?)?;
    m.add_function(wrap_pyfunction!(apply, m)?)?;
    m.add_function(wrap_pyfunction!(remove, m)?)?;
    m.add_function(wrap_pyfunction!(dot, m)?)?;
    m.add_function(wrap_pyfunction!(cosine, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(parse_header, m)?)?;
    m.add_function(wrap_pyfunction!(encode_header, m)?)?;
    Ok(())
}
