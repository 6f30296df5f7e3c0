//! The safetensors header codec (the container of model files, signature files
//! and undo records): a validating reader and the writer. Nothing from a file is
//! trusted: lengths, offsets, shapes and dtypes are checked before any byte is
//! used, and no allocation exceeds what the file itself holds.
//!
//! Layout: 8 bytes little-endian header length N, N bytes of a UTF-8 JSON
//! object, then the data buffer. Each JSON entry is
//! `name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}`
//! with offsets relative to the data buffer; `__metadata__` maps strings to strings.

use crate::error::{Error, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Largest header accepted (as in the safetensors reference: 100 MB).
pub const MAX_HEADER: u64 = 100_000_000;
/// Most dimensions a tensor may have: numpy's limit, which every tool that reads the
/// tensor as an array meets (more would parse here and fail there).
pub const MAX_DIMS: usize = 64;

/// One tensor's place in the data buffer, owned (what [`encode`] writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// safetensors dtype name, e.g. `F32`, `BF16`, `U8`.
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range inside the data buffer.
    pub begin: usize,
    pub end: usize,
}

/// One tensor of a parsed [`Header`], borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    /// safetensors dtype name, one of [`DTYPES`].
    pub dtype: &'static str,
    pub shape: &'a [usize],
    /// Byte range inside the data buffer.
    pub begin: usize,
    pub end: usize,
}

impl TensorRef<'_> {
    pub fn to_info(&self) -> TensorInfo {
        TensorInfo {
            name: self.name.into(),
            dtype: self.dtype.into(),
            shape: self.shape.to_vec(),
            begin: self.begin,
            end: self.end,
        }
    }
}

/// A tensor's entry in the header table: ranges into the shared name and
/// dimension arrays, so a tensor costs 40 bytes and no allocation of its own
/// (1.4 M tiny tensors took 3 allocations each, more than the header's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    name: (u32, u32),
    shape: (u32, u32),
    begin: usize,
    end: usize,
    dtype: u8,
}

/// A parsed, validated header. Every offset into `names` and `dims` fits a
/// u32: both are smaller than the header, at most [`MAX_HEADER`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub metadata: Vec<(String, String)>,
    /// File offset where the data buffer starts (8 + N).
    pub data_start: usize,
    /// Tensors in file order (by offset).
    slots: Vec<Slot>,
    names: String,
    dims: Vec<usize>,
}

impl Header {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The `i`-th tensor in file order (panics when out of range, like indexing).
    pub fn tensor(&self, i: usize) -> TensorRef<'_> {
        self.view(&self.slots[i])
    }

    /// The tensors in file order (by offset).
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = TensorRef<'_>> + '_ {
        self.slots.iter().map(|s| self.view(s))
    }

    fn view(&self, s: &Slot) -> TensorRef<'_> {
        TensorRef {
            name: &self.names[s.name.0 as usize..s.name.1 as usize],
            dtype: DTYPES[s.dtype as usize].0,
            shape: &self.dims[s.shape.0 as usize..s.shape.1 as usize],
            begin: s.begin,
            end: s.end,
        }
    }

    fn push(&mut self, name: &str, dtype: u8, shape: &[u64], begin: usize, end: usize) {
        let name_start = self.names.len() as u32;
        self.names.push_str(name);
        let shape_start = self.dims.len() as u32;
        // Bounded by the file size (checked), so the casts cannot truncate.
        self.dims.extend(shape.iter().map(|&d| d as usize));
        self.slots.push(Slot {
            name: (name_start, self.names.len() as u32),
            shape: (shape_start, self.dims.len() as u32),
            begin,
            end,
            dtype,
        });
    }
}

/// Every dtype name safetensors defines, with its bytes per element.
pub const DTYPES: [(&str, usize); 15] = [
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("U16", 2),
    ("I16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("U32", 4),
    ("I32", 4),
    ("F32", 4),
    ("U64", 8),
    ("I64", 8),
    ("F64", 8),
];

/// Position of a dtype name in [`DTYPES`], or None if unknown.
pub fn dtype_index(dtype: &str) -> Option<usize> {
    DTYPES.iter().position(|(n, _)| *n == dtype)
}

/// Bytes per element of a safetensors dtype name, or None if unknown.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    dtype_index(dtype).map(|i| DTYPES[i].1)
}

/// Read and validate the header length prefix against the file size.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<usize> {
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            Error::Format(format!(
                "file of {file_len} bytes is too short for a header"
            ))
        })?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER {
        return Err(Error::Format(format!(
            "header length {n} exceeds the {MAX_HEADER}-byte limit"
        )));
    }
    if n.saturating_add(8) > file_len {
        return Err(Error::Format(format!(
            "header length {n} runs past the end of a {file_len}-byte file"
        )));
    }
    Ok(n as usize)
}

/// Parse a whole safetensors buffer prefix: `buf` holds at least the 8-byte
/// length and the header; `file_len` is the size of the whole file.
pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
    let n = header_len(buf, file_len)?;
    let json = buf
        .get(8..8 + n)
        .ok_or_else(|| Error::Format("buffer shorter than its declared header".into()))?;
    parse_json(json, file_len - 8 - n as u64, 8 + n)
}

/// Read and validate the header of a file on disk (reads only the header).
pub fn read(path: &Path) -> Result<Header> {
    let mut f = File::open(path).map_err(|e| Error::io_at(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io_at(path, e))?.len();
    let mut prefix = [0u8; 8];
    f.read_exact(&mut prefix).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Format(format!(
            "file of {file_len} bytes is too short for a header"
        )),
        _ => Error::io_at(path, e),
    })?;
    let n = header_len(&prefix, file_len)?;
    let mut json = vec![0u8; n];
    f.read_exact(&mut json).map_err(|e| Error::io_at(path, e))?;
    parse_json(&json, file_len - 8 - n as u64, 8 + n)
}

/// Encode a header: the 8-byte length, then the JSON object (`__metadata__`
/// first when not empty, then the tensors in the given order), padded with
/// spaces to a multiple of 8 bytes so that the data buffer starts aligned.
///
/// The JSON is compact and escapes as Python's `json.dumps` does by default
/// (`ensure_ascii`), so headers are byte-identical to those written before the
/// encoder moved here. Offsets are written as given: the caller lays them out.
pub fn encode(metadata: &[(String, String)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            push_json_str(&mut json, k);
            json.push(':');
            push_json_str(&mut json, v);
        }
        json.push('}');
    }
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        push_json_str(&mut json, &t.name);
        json.push_str(":{\"dtype\":");
        push_json_str(&mut json, &t.dtype);
        let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        json.push_str(&format!(
            ",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            dims.join(","),
            t.begin,
            t.end
        ));
    }
    json.push('}');
    let pad = (8 - json.len() % 8) % 8;
    let mut out = Vec::with_capacity(8 + json.len() + pad);
    out.extend_from_slice(&((json.len() + pad) as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + pad, b' ');
    out
}

/// A JSON string literal, ASCII only (`\uXXXX`, surrogate pairs beyond the BMP).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// What the header's top-level JSON object holds, read in one pass straight into
/// the final structures: no JSON tree is built (a tree of 1.4 M tiny entries took
/// 20× the header's size), so memory stays near the header's own size.
#[derive(Default)]
struct Entries {
    metadata: Option<Vec<(String, String)>>,
    /// The tensors read so far (its metadata is filled in at the end).
    header: Header,
    /// The last entry name read, to say which entry a JSON error is in.
    current: Option<String>,
    /// A refusal found while reading (the JSON itself was fine).
    refused: Option<Error>,
}

/// Reads the top-level object into [`Entries`]; a refusal stops the read.
struct TopVisitor<'a> {
    out: &'a mut Entries,
    data_len: u64,
}

impl<'de> Visitor<'de> for TopVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<(), A::Error> {
        while let Some(name) = m.next_key::<String>()? {
            self.out.current = Some(name.clone());
            let entry = if name == "__metadata__" {
                let meta = m.next_value::<MetadataEntry>()?;
                match self.out.metadata {
                    Some(_) => Err(Error::Format(
                        "duplicate entry \"__metadata__\" in header".into(),
                    )),
                    None => parse_metadata(meta).map(|meta| self.out.metadata = Some(meta)),
                }
            } else {
                let raw = m.next_value::<RawTensor>()?;
                parse_tensor(&name, raw, self.data_len, &mut self.out.header)
            };
            if let Err(e) = entry {
                self.out.refused = Some(e);
                return Err(serde::de::Error::custom("refused"));
            }
        }
        self.out.current = None;
        Ok(())
    }
}

/// `__metadata__`, keys in file order (duplicates kept so they can be refused).
struct MetadataEntry(Option<Vec<(String, Value)>>);

impl<'de> Deserialize<'de> for MetadataEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(MetadataVisitor)
    }
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = MetadataEntry;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut m: A,
    ) -> std::result::Result<MetadataEntry, A::Error> {
        let mut v = Vec::new();
        while let Some(entry) = m.next_entry::<String, Value>()? {
            v.push(entry);
        }
        Ok(MetadataEntry(Some(v)))
    }
    // Anything else is refused with our own message (parse_metadata).
    fn visit_bool<E>(self, _: bool) -> std::result::Result<MetadataEntry, E> {
        Ok(MetadataEntry(None))
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<MetadataEntry, E> {
        Ok(MetadataEntry(None))
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<MetadataEntry, E> {
        Ok(MetadataEntry(None))
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<MetadataEntry, E> {
        Ok(MetadataEntry(None))
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<MetadataEntry, E> {
        Ok(MetadataEntry(None))
    }
    fn visit_unit<E>(self) -> std::result::Result<MetadataEntry, E> {
        Ok(MetadataEntry(None))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut s: A,
    ) -> std::result::Result<MetadataEntry, A::Error> {
        while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(MetadataEntry(None))
    }
}

/// One tensor entry as written: each field at most once (as the safetensors
/// package requires), unknown fields ignored (as it does). Numbers stay JSON
/// numbers so that their validation gives our own messages.
#[derive(Default)]
struct RawTensor {
    /// None: the entry is not an object.
    fields: Option<RawFields>,
}

#[derive(Default)]
struct RawFields {
    dtype: Option<Value>,
    shape: Option<Value>,
    data_offsets: Option<Value>,
    /// A field given twice (the first such name).
    duplicate: Option<&'static str>,
}

impl<'de> Deserialize<'de> for RawTensor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(RawTensorVisitor)
    }
}

struct RawTensorVisitor;

impl RawTensorVisitor {
    fn not_an_object() -> RawTensor {
        RawTensor { fields: None }
    }
}

impl<'de> Visitor<'de> for RawTensorVisitor {
    type Value = RawTensor;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tensor entry")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<RawTensor, A::Error> {
        let mut f = RawFields::default();
        while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            let (slot, name) = match key.as_ref() {
                "dtype" => (&mut f.dtype, "dtype"),
                "shape" => (&mut f.shape, "shape"),
                "data_offsets" => (&mut f.data_offsets, "data_offsets"),
                _ => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                f.duplicate.get_or_insert(name);
            }
            *slot = Some(m.next_value::<Value>()?);
        }
        Ok(RawTensor { fields: Some(f) })
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<RawTensor, E> {
        Ok(Self::not_an_object())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<RawTensor, E> {
        Ok(Self::not_an_object())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<RawTensor, E> {
        Ok(Self::not_an_object())
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<RawTensor, E> {
        Ok(Self::not_an_object())
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<RawTensor, E> {
        Ok(Self::not_an_object())
    }
    fn visit_unit<E>(self) -> std::result::Result<RawTensor, E> {
        Ok(Self::not_an_object())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut s: A,
    ) -> std::result::Result<RawTensor, A::Error> {
        while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Self::not_an_object())
    }
}

fn parse_json(json: &[u8], data_len: u64, data_start: usize) -> Result<Header> {
    let text = std::str::from_utf8(json)
        .map_err(|e| Error::Format(format!("header is not UTF-8: {e}")))?;
    // As the safetensors package: the object starts at the first byte.
    if !text.starts_with('{') {
        return Err(Error::Format(
            "header is not a JSON object: it does not start with '{'".into(),
        ));
    }
    let mut entries = Entries::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let read = serde::Deserializer::deserialize_map(
        &mut de,
        TopVisitor {
            out: &mut entries,
            data_len,
        },
    )
    .and_then(|()| de.end());
    if let Some(e) = entries.refused {
        return Err(e);
    }
    read.map_err(|e| match (&entries.current, e.classify()) {
        (Some(name), serde_json::error::Category::Data) => {
            Error::Format(format!("entry {name:?}: {e}"))
        }
        _ => Error::Format(format!("header is not a JSON object: {e}")),
    })?;
    let mut header = entries.header;
    check_unique_names(&header)?;
    header.slots.sort_unstable_by_key(|s| (s.begin, s.end));
    check_coverage(&header, data_len)?;
    header.metadata = entries.metadata.unwrap_or_default();
    header.data_start = data_start;
    Ok(header)
}

/// Refuse a tensor name given twice (JSON would silently keep the last one).
fn check_unique_names(header: &Header) -> Result<()> {
    // Sorting references, not a hash set of copies: 1.4 M names cost 22 MB here.
    let mut names: Vec<&str> = header.tensors().map(|t| t.name).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(Error::Format(format!(
            "duplicate entry {:?} in header",
            w[0]
        ))),
        None => Ok(()),
    }
}

fn parse_metadata(meta: MetadataEntry) -> Result<Vec<(String, String)>> {
    let Some(pairs) = meta.0 else {
        return Err(Error::Format(
            "__metadata__ must be an object of strings".into(),
        ));
    };
    let mut seen = std::collections::HashSet::new();
    pairs
        .into_iter()
        .map(|(k, v)| {
            if !seen.insert(k.clone()) {
                return Err(Error::Format(format!(
                    "__metadata__ has the key {k:?} twice"
                )));
            }
            match v {
                Value::String(s) => Ok((k, s)),
                _ => Err(Error::Format(format!(
                    "__metadata__ value {k:?} is not a string"
                ))),
            }
        })
        .collect()
}

/// Validate one entry and add it to `out`.
fn parse_tensor(name: &str, raw: RawTensor, data_len: u64, out: &mut Header) -> Result<()> {
    let bad = |what: &str| Error::Format(format!("tensor {name:?}: {what}"));
    let f = raw.fields.ok_or_else(|| bad("entry is not an object"))?;
    if let Some(field) = f.duplicate {
        return Err(bad(&format!("{field:?} is given twice")));
    }
    let dtype = f
        .dtype
        .as_ref()
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing dtype"))?;
    let index = dtype_index(dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype:?}")))?;
    let size = DTYPES[index].1;
    let shape = f
        .shape
        .as_ref()
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing shape"))?
        .iter()
        .map(|d| d.as_u64().ok_or_else(|| bad("shape holds a non-integer")))
        .collect::<Result<Vec<u64>>>()?;
    if shape.len() > MAX_DIMS {
        return Err(bad(&format!(
            "shape has {} dimensions; at most {MAX_DIMS} are supported",
            shape.len()
        )));
    }
    let offsets = f
        .data_offsets
        .as_ref()
        .and_then(Value::as_array)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("data_offsets must be [begin, end]"))?;
    let (begin, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
        (Some(b), Some(e)) => (b, e),
        _ => return Err(bad("data_offsets are not integers")),
    };
    if begin > end || end > data_len {
        return Err(bad(&format!(
            "data_offsets [{begin}, {end}] outside a data buffer of {data_len} bytes"
        )));
    }
    let nbytes = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape product overflows"))?;
    if nbytes != end - begin {
        return Err(bad(&format!(
            "{dtype} {shape:?} needs {nbytes} bytes but data_offsets span {}",
            end - begin
        )));
    }
    // Every value is now bounded by the file size, so the casts cannot truncate.
    out.push(name, index as u8, &shape, begin as usize, end as usize);
    Ok(())
}

/// The tensors, sorted by offset, tile the data buffer exactly: no overlap, no
/// gap, no trailing byte (as the safetensors package requires: bytes no tensor
/// owns would be copied into every output unseen).
fn check_coverage(sorted: &Header, data_len: u64) -> Result<()> {
    let mut covered = 0usize;
    let mut last: Option<TensorRef> = None;
    for t in sorted.tensors() {
        if t.begin < covered {
            let prev = last.map_or("", |p| p.name);
            return Err(Error::Format(format!(
                "tensors {prev:?} and {:?} overlap in the data buffer",
                t.name
            )));
        }
        if t.begin > covered {
            return Err(Error::Format(format!(
                "bytes [{covered}, {}) of the data buffer belong to no tensor (before {:?})",
                t.begin, t.name
            )));
        }
        covered = t.end;
        last = Some(t);
    }
    if (covered as u64) < data_len {
        return Err(Error::Format(format!(
            "{} trailing bytes after the last tensor belong to no tensor",
            data_len - covered as u64
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    fn parse_file(v: &[u8]) -> Result<Header> {
        parse(v, v.len() as u64)
    }

    #[test]
    fn parses_a_valid_header() {
        let h = r#"{"__metadata__":{"k":"v"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let hdr = parse_file(&file(h, 12)).unwrap();
        assert_eq!(hdr.metadata, vec![("k".into(), "v".into())]);
        assert_eq!(hdr.tensor(0).name, "a");
        assert_eq!(hdr.tensor(1).begin, 8);
        assert_eq!(hdr.data_start, 8 + h.len());
    }

    #[test]
    fn refuses_malformed_headers() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                "duplicate",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                "needs 12 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                "outside",
            ),
            (
                r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
                "overflows",
            ),
            (r#"[1,2]"#, "not a JSON object"),
            (r#"{"__metadata__":{"k":1}}"#, "not a string"),
            (
                &format!(
                    r#"{{"a":{{"dtype":"F32","shape":[{}],"data_offsets":[0,4]}}}}"#,
                    vec!["1"; MAX_DIMS + 1].join(",")
                ),
                "65 dimensions",
            ),
        ];
        for (h, want) in cases {
            let err = parse_file(&file(h, 12)).unwrap_err().to_string();
            assert!(err.contains(want), "{h}: {err}");
        }
    }

    /// What the safetensors package refuses, refused too (issue 17, finding 8).
    #[test]
    fn refuses_what_safetensors_refuses() {
        let a = r#""a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
        let cases = [
            (
                r#"{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#
                    .to_string(),
                4,
                "\"dtype\" is given twice",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}"#.to_string(),
                4,
                "\"shape\" is given twice",
            ),
            (
                format!(r#"{{{a},"b":{{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}}}"#),
                12,
                "bytes [4, 8) of the data buffer belong to no tensor",
            ),
            (format!("{{{a}}}"), 5, "1 trailing bytes"),
            (r#"{}"#.to_string(), 3, "3 trailing bytes"),
            (
                r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#.to_string(),
                8,
                "bytes [0, 4)",
            ),
            (format!(" {{{a}}}"), 4, "does not start with '{'"),
            (
                format!(r#"{{"__metadata__":{{}},{a},"__metadata__":{{}}}}"#),
                4,
                "duplicate entry \"__metadata__\"",
            ),
            (
                r#"{"__metadata__":{"k":"v","k":"w"}}"#.to_string(),
                0,
                "the key \"k\" twice",
            ),
        ];
        for (h, data, want) in cases {
            let err = parse_file(&file(&h, data)).unwrap_err().to_string();
            assert!(err.contains(want), "{h}: {err}");
        }
    }

    #[test]
    fn unknown_fields_and_trailing_whitespace_are_accepted() {
        let h =
            "{\"a\":{\"dtype\":\"U8\",\"extra\":[1,{}],\"shape\":[2],\"data_offsets\":[0,2]}} \n\t";
        assert_eq!(parse_file(&file(h, 2)).unwrap().tensor(0).end, 2);
    }

    #[test]
    fn refuses_bad_lengths() {
        assert!(parse(&[1, 2, 3], 3)
            .unwrap_err()
            .to_string()
            .contains("too short"));
        let mut v = 1000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(parse_file(&v)
            .unwrap_err()
            .to_string()
            .contains("past the end"));
        let v = (MAX_HEADER + 1).to_le_bytes();
        assert!(parse(&v, u64::MAX)
            .unwrap_err()
            .to_string()
            .contains("limit"));
        let mut v = 2u64.to_le_bytes().to_vec();
        v.extend_from_slice(&[0xff, 0xfe]);
        assert!(parse_file(&v).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn zero_length_tensors_are_valid() {
        let h = r#"{"a":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}}"#;
        assert_eq!(parse_file(&file(h, 0)).unwrap().tensor(0).shape, [0, 3]);
    }

    fn info(name: &str, dtype: &str, shape: Vec<usize>, begin: usize, end: usize) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype: dtype.into(),
            shape,
            begin,
            end,
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let meta = vec![(
            "k\u{e9}y".to_string(),
            "v \"q\" \\ \n \u{1f600}".to_string(),
        )];
        let tensors = vec![
            info("a", "F32", vec![2], 0, 8),
            info("b\u{3b1}", "F16", vec![1, 2], 8, 12),
            info("e", "U8", vec![0], 12, 12),
        ];
        let head = encode(&meta, &tensors);
        assert_eq!(head.len() % 8, 0);
        assert!(head[8..].is_ascii());
        let mut v = head.clone();
        v.resize(head.len() + 12, 0);
        let hdr = parse_file(&v).unwrap();
        assert_eq!(hdr.metadata, meta);
        let parsed: Vec<TensorInfo> = hdr.tensors().map(|t| t.to_info()).collect();
        assert_eq!(parsed, tensors);
        assert_eq!(hdr.data_start, head.len());
    }

    #[test]
    fn encode_matches_python_json_dumps() {
        // json.dumps({"__metadata__": {"m": "\u00e9"}, "t": {...}}, separators=(",", ":"))
        let head = encode(
            &[("m".into(), "\u{e9}".into())],
            &[info("t", "F32", vec![1], 0, 4)],
        );
        let want = r#"{"__metadata__":{"m":"\u00e9"},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert_eq!(std::str::from_utf8(&head[8..]).unwrap().trim_end(), want);
        assert_eq!(
            encode(&[], &[]),
            [8, 0, 0, 0, 0, 0, 0, 0, b'{', b'}', 32, 32, 32, 32, 32, 32]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic; whatever is accepted stays inside the file.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), n in 0u64..400) {
            let mut v = n.to_le_bytes().to_vec();
            v.extend_from_slice(&body);
            if let Ok(h) = parse_file(&v) {
                for t in h.tensors() {
                    proptest::prop_assert!(h.data_start + t.end <= v.len());
                }
            }
        }

        /// Structured near-valid headers: offsets and shapes drawn at random.
        #[test]
        fn random_entries_are_validated(
            begin in 0u64..64, len in 0u64..64, dims in proptest::collection::vec(0u64..9, 0..4),
            dtype in proptest::sample::select(vec!["F32", "F16", "U8", "I64", "X"]), data in 0usize..96,
        ) {
            let h = format!(
                r#"{{"t":{{"dtype":"{dtype}","shape":{dims:?},"data_offsets":[{begin},{}]}}}}"#,
                begin + len
            );
            let v = file(&h, data);
            if let Ok(hdr) = parse_file(&v) {
                let t = hdr.tensor(0);
                let numel: usize = t.shape.iter().product();
                proptest::prop_assert_eq!(numel * dtype_size(t.dtype).unwrap(), t.end - t.begin);
                proptest::prop_assert!(t.end <= data);
            }
        }
    }
}
