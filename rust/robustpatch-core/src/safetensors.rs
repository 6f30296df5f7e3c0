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

/// One tensor's place in the data buffer.
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

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub metadata: Vec<(String, String)>,
    /// Tensors in file order (by offset).
    pub tensors: Vec<TensorInfo>,
    /// File offset where the data buffer starts (8 + N).
    pub data_start: usize,
}

/// Bytes per element of a safetensors dtype name, or None if unknown.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
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
    let mut f = File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut prefix = [0u8; 8];
    f.read_exact(&mut prefix).map_err(|_| {
        Error::Format(format!(
            "file of {file_len} bytes is too short for a header"
        ))
    })?;
    let n = header_len(&prefix, file_len)?;
    let mut json = vec![0u8; n];
    f.read_exact(&mut json)?;
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

/// JSON object entries in file order, keeping duplicates so they can be refused.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_json(json: &[u8], data_len: u64, data_start: usize) -> Result<Header> {
    let text = std::str::from_utf8(json)
        .map_err(|e| Error::Format(format!("header is not UTF-8: {e}")))?;
    let Entries(entries) = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| Error::Format(format!("header is not a JSON object: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    let mut metadata = Vec::new();
    let mut tensors = Vec::new();
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(Error::Format(format!("duplicate entry {name:?} in header")));
        }
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
        } else {
            tensors.push(parse_tensor(name, &value, data_len)?);
        }
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    check_overlaps(&tensors)?;
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

fn parse_metadata(value: Value) -> Result<Vec<(String, String)>> {
    let Value::Object(map) = value else {
        return Err(Error::Format(
            "__metadata__ must be an object of strings".into(),
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(Error::Format(format!(
                "__metadata__ value {k:?} is not a string"
            ))),
        })
        .collect()
}

fn parse_tensor(name: String, v: &Value, data_len: u64) -> Result<TensorInfo> {
    let bad = |what: &str| Error::Format(format!("tensor {name:?}: {what}"));
    let obj = v.as_object().ok_or_else(|| bad("entry is not an object"))?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing dtype"))?;
    let size = dtype_size(dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype:?}")))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing shape"))?
        .iter()
        .map(|d| d.as_u64().ok_or_else(|| bad("shape holds a non-integer")))
        .collect::<Result<Vec<u64>>>()?;
    let offsets = obj
        .get("data_offsets")
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
    Ok(TensorInfo {
        name,
        dtype: dtype.to_string(),
        shape: shape.iter().map(|&d| d as usize).collect(),
        begin: begin as usize,
        end: end as usize,
    })
}

fn check_overlaps(sorted: &[TensorInfo]) -> Result<()> {
    for w in sorted.windows(2) {
        if w[1].begin < w[0].end {
            return Err(Error::Format(format!(
                "tensors {:?} and {:?} overlap in the data buffer",
                w[0].name, w[1].name
            )));
        }
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
        assert_eq!(hdr.tensors[0].name, "a");
        assert_eq!(hdr.tensors[1].begin, 8);
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
        ];
        for (h, want) in cases {
            let err = parse_file(&file(h, 12)).unwrap_err().to_string();
            assert!(err.contains(want), "{h}: {err}");
        }
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
        assert_eq!(
            parse_file(&file(h, 0)).unwrap().tensors[0].shape,
            vec![0, 3]
        );
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
        assert_eq!(hdr.tensors, tensors);
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
                for t in &h.tensors {
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
                let t = &hdr.tensors[0];
                let numel: usize = t.shape.iter().product();
                proptest::prop_assert_eq!(numel * dtype_size(&t.dtype).unwrap(), t.end - t.begin);
                proptest::prop_assert!(t.end <= data);
            }
        }
    }
}
