//! OIP v2 REST bodies: JSON tensors and the binary tensor data extension.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use lattice_inference::{
    scheduler::InferResponse,
    sequence::{SequenceControl, SequenceId},
    tensor::{element_count, parse_wire_strings},
    DataType, RequestParts, Tensor, TensorData,
};
use serde::{ser::SerializeSeq, Deserialize, Serialize, Serializer};
use serde_json::{value::RawValue, Map, Value};

use crate::{
    error::ApiError,
    shm::{Placed, Refs, TensorRef},
};

/// The header that says how many leading body bytes are JSON (binary extension).
pub const HEADER_LEN: &str = "inference-header-content-length";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A decoded REST inference request.
pub struct Decoded {
    pub parts: RequestParts,
    /// Per requested output (or all outputs when none were listed): binary or JSON.
    pub binary: BinaryOutputs,
    /// Inputs read from, and outputs written to, shared-memory regions.
    pub shm: Refs,
}

pub struct BinaryOutputs {
    pub default: bool,
    pub per_output: Vec<(String, bool)>,
}

impl BinaryOutputs {
    pub fn wants_binary(&self, name: &str) -> bool {
        self.per_output
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default, |(_, b)| *b)
    }
}

fn malformed(m: impl Into<String>) -> ApiError {
    ApiError::Malformed(m.into())
}

/// Triton's text for an input with none, or more than one, of its data fields.
pub fn content_fields(which: &str) -> String {
    format!("Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', 'shared_memory_region' in 'parameters'. But {which}")
}

/// `class_count` asks for the classification extension, which is not served: say so
/// rather than silently returning the whole tensor.
pub fn unsupported_classification(output: &str) -> ApiError {
    ApiError::Infer(lattice_inference::InferError::InvalidInput(format!(
        "output '{output}' asks for classification (class_count), which this server does not support; request the tensor itself"
    )))
}

/// Reads `priority` and `timeout` (microseconds) from request parameters, as the
/// schedule-policy extension names them.
pub fn schedule_params(
    priority: Option<i64>,
    timeout_us: Option<i64>,
) -> Result<(Option<u8>, Option<Duration>), ApiError> {
    let priority = priority
        .map(|p| u8::try_from(p).map_err(|_| malformed(format!("priority {p} is out of range 0..=5"))))
        .transpose()?;
    let timeout = timeout_us
        .map(|t| {
            u64::try_from(t)
                .map(Duration::from_micros)
                .map_err(|_| malformed(format!("timeout {t} must be a non-negative number of microseconds")))
        })
        .transpose()?;
    Ok((priority, timeout))
}

/// `shared_memory_region`, `shared_memory_offset`, `shared_memory_byte_size` of one
/// input's or output's parameters (a missing byte size is 0, which the input's size
/// check then names, as in Triton).
fn shm_ref(tensor: &str, p: &Map<String, Value>) -> Result<Option<TensorRef>, ApiError> {
    let num = |k: &str| -> Result<Option<u64>, ApiError> {
        p.get(k)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    malformed(format!(
                        "Unable to parse '{k}': attempt to access JSON non-unsigned-integer as unsigned-integer"
                    ))
                })
            })
            .transpose()
    };
    let (offset, byte_size) = (num("shared_memory_offset")?, num("shared_memory_byte_size")?);
    let region = match p.get("shared_memory_region") {
        None => {
            if let Some(k) = [("shared_memory_offset", offset), ("shared_memory_byte_size", byte_size)]
                .into_iter()
                .find_map(|(k, v)| v.map(|_| k))
            {
                return Err(malformed(format!(
                    "'{k}' can not be specified without 'shared_memory_region' parameter for tensor '{}'",
                    lattice_inference::repository::echo(tensor)
                )));
            }
            return Ok(None);
        }
        Some(Value::String(r)) => r.clone(),
        Some(_) => {
            return Err(malformed(
                "Unable to parse 'shared_memory_region': attempt to access JSON non-string as string",
            ))
        }
    };
    Ok(Some(TensorRef {
        region,
        offset: offset.unwrap_or(0),
        byte_size: byte_size.unwrap_or(0),
    }))
}

/// `sequence_id` (uint64 or string), `sequence_start`, `sequence_end` (bools), read
/// as Triton's REST frontend reads them, with its texts.
fn sequence_params(p: &Map<String, Value>) -> Result<Option<SequenceControl>, ApiError> {
    let flag = |k: &str| -> Result<bool, ApiError> {
        match p.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(malformed(format!(
                "Unable to parse '{k}': attempt to access JSON non-boolean as boolean"
            ))),
        }
    };
    let (start, end) = (flag("sequence_start")?, flag("sequence_end")?);
    let id = match p.get("sequence_id") {
        None => {
            if start || end {
                // Flags without an ID: the ID check names what is missing.
                SequenceId::Int(0)
            } else {
                return Ok(None);
            }
        }
        Some(Value::String(s)) => SequenceId::Str(s.clone()),
        Some(v) => SequenceId::Int(v.as_u64().ok_or_else(|| {
            malformed("Unable to parse 'sequence_id': attempt to access JSON non-string as string".to_string())
        })?),
    };
    Ok(Some(SequenceControl { id, start, end }))
}

pub fn decode_request(body: Bytes, header_len: Option<usize>) -> Result<Decoded, ApiError> {
    let (json, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(malformed(format!(
                "{HEADER_LEN} is {n} but the body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body, Bytes::new()),
    };
    let req: RequestJson =
        serde_json::from_slice(&json).map_err(|e| malformed(format!("malformed JSON request: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut shm = Refs::default();
    for inp in req.inputs {
        let dtype = DataType::parse(&inp.datatype)
            .filter(|_| !inp.datatype.starts_with("TYPE_"))
            .ok_or_else(|| malformed(format!("input '{}': unknown datatype '{}'", inp.name, inp.datatype)))?;
        let region = shm_ref(&inp.name, &inp.parameters)?;
        let binary_size = inp.parameters.get("binary_data_size");
        let set: Vec<&str> = [
            ("'data'", inp.data.is_some()),
            ("'binary_data_size'", binary_size.is_some()),
            ("'shared_memory_region'", region.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect();
        if set.len() > 1 {
            return Err(malformed(content_fields(&format!("set {}", set.join(" ")))));
        }
        if let Some(r) = region {
            element_count(&inp.shape)
                .ok_or_else(|| malformed(format!("input '{}': invalid shape {:?}", inp.name, inp.shape)))?;
            shm.inputs.push((inputs.len(), r));
            inputs.push((inp.name, Refs::pending_input(dtype, inp.shape)));
            continue;
        }
        let t = match (binary_size, inp.data) {
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .ok_or_else(|| malformed(format!("input '{}': binary_data_size must be a number", inp.name)))?
                    as usize;
                if size > binary.len() {
                    return Err(malformed(format!(
                        "input '{}': binary_data_size {size} exceeds the {} binary bytes left",
                        inp.name,
                        binary.len()
                    )));
                }
                let chunk = binary.split_to(size);
                let data = match dtype {
                    DataType::Bytes => TensorData::Strings(
                        parse_wire_strings(chunk).map_err(|e| malformed(format!("input '{}': {e}", inp.name)))?,
                    ),
                    _ => TensorData::Raw(chunk),
                };
                Tensor {
                    dtype,
                    shape: inp.shape,
                    data,
                }
            }
            (None, Some(data)) => from_json(&inp.name, dtype, inp.shape, &data)?,
            (Some(_), Some(_)) => return Err(malformed(content_fields("set 'data' 'binary_data_size'"))),
            (None, None) => return Err(malformed(content_fields("no field is set"))),
        };
        inputs.push((inp.name, t));
    }
    if !binary.is_empty() {
        return Err(malformed(format!(
            "{} binary bytes are not claimed by any input",
            binary.len()
        )));
    }
    let flag = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_bool);
    for o in &req.outputs {
        if let Some(r) = shm_ref(&o.name, &o.parameters)? {
            // `"binary_data": false` is accepted next to a region (tritonclient sends it).
            for k in ["binary_data", "classification"] {
                let conflict = match o.parameters.get(k) {
                    Some(Value::Bool(b)) => *b,
                    Some(_) => true,
                    None => false,
                };
                if conflict {
                    return Err(malformed(format!(
                        "Output can't set both 'shared_memory_region' and '{k}'"
                    )));
                }
            }
            shm.outputs.push((o.name.clone(), r));
        }
    }
    let binary = BinaryOutputs {
        default: flag(&req.parameters, "binary_data_output").unwrap_or(false),
        per_output: req
            .outputs
            .iter()
            .filter_map(|o| flag(&o.parameters, "binary_data").map(|b| (o.name.clone(), b)))
            .collect(),
    };
    let int = |k: &str| -> Result<Option<i64>, ApiError> {
        req.parameters
            .get(k)
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| malformed(format!("parameter '{k}' must be an integer")))
            })
            .transpose()
    };
    let (priority, timeout) = schedule_params(int("priority")?, int("timeout")?)?;
    let sequence = sequence_params(&req.parameters)?;
    Ok(Decoded {
        parts: RequestParts {
            id: req.id.unwrap_or_default(),
            inputs,
            outputs: req.outputs.into_iter().map(|o| o.name).collect(),
            priority,
            timeout,
            sequence,
        },
        binary,
        shm,
    })
}

/// Streams JSON `data` (flat or nested arrays, row-major) straight into the tensor's
/// little-endian buffer, checking each value against the datatype: no `Value` per
/// element, which on small-tensor models was the largest cost of a JSON request.
struct Elements<'a> {
    dtype: DataType,
    out: &'a mut BytesMut,
    strings: &'a mut Vec<Bytes>,
    count: &'a mut usize,
}

impl Elements<'_> {
    fn int<E: serde::de::Error>(self, v: i128) -> Result<(), E> {
        let bad = || E::custom(format_args!("{v} is not a valid {} value", self.dtype));
        macro_rules! put {
            ($t:ty) => {
                self.out
                    .put_slice(&<$t>::try_from(v).map_err(|_| bad())?.to_le_bytes())
            };
        }
        match self.dtype {
            DataType::U8 => put!(u8),
            DataType::U16 => put!(u16),
            DataType::U32 => put!(u32),
            DataType::U64 => put!(u64),
            DataType::I8 => put!(i8),
            DataType::I16 => put!(i16),
            DataType::I32 => put!(i32),
            DataType::I64 => put!(i64),
            DataType::F32 => self.out.put_f32_le(v as f32),
            DataType::F64 => self.out.put_f64_le(v as f64),
            _ => return Err(bad()),
        }
        *self.count += 1;
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an array of {} values", self.dtype)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Elements {
            dtype,
            out,
            strings,
            count,
        } = self;
        while seq
            .next_element_seed(Elements {
                dtype,
                out: &mut *out,
                strings: &mut *strings,
                count: &mut *count,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.int(i128::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.int(i128::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        match self.dtype {
            DataType::F32 => self.out.put_f32_le(v as f32),
            DataType::F64 => self.out.put_f64_le(v),
            d => return Err(E::custom(format_args!("{v} is not a valid {d} value"))),
        }
        *self.count += 1;
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        if self.dtype != DataType::Bool {
            return Err(E::custom(format_args!("{v} is not a valid {} value", self.dtype)));
        }
        self.out.put_u8(u8::from(v));
        *self.count += 1;
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.dtype != DataType::Bytes {
            return Err(E::custom(format_args!("\"{v}\" is not a valid {} value", self.dtype)));
        }
        self.strings.push(Bytes::copy_from_slice(v.as_bytes()));
        *self.count += 1;
        Ok(())
    }
}

/// Converts JSON `data` to a tensor of `dtype`.
fn from_json(name: &str, dtype: DataType, shape: Vec<i64>, data: &RawValue) -> Result<Tensor, ApiError> {
    if matches!(dtype, DataType::F16 | DataType::Bf16) {
        return Err(malformed(format!(
            "input '{name}': {dtype} can only be sent as binary data"
        )));
    }
    let n = element_count(&shape).ok_or_else(|| malformed(format!("input '{name}': invalid shape {shape:?}")))?;
    // The shape bounds the allocation only as far as the body's own size allows.
    let hint = n.min(data.get().len());
    let mut out = BytesMut::with_capacity(hint * dtype.size().unwrap_or(0));
    let mut strings = Vec::new();
    let mut count = 0;
    let mut de = serde_json::Deserializer::from_str(data.get());
    let seed = Elements {
        dtype,
        out: &mut out,
        strings: &mut strings,
        count: &mut count,
    };
    serde::de::DeserializeSeed::deserialize(seed, &mut de)
        .and_then(|()| de.end())
        .map_err(|e| malformed(format!("input '{name}': {e}")))?;
    if count != n {
        return Err(ApiError::Infer(lattice_inference::InferError::InvalidInput(format!(
            "input '{name}' has {count} elements, shape {shape:?} needs {n}"
        ))));
    }
    Ok(match dtype {
        DataType::Bytes => Tensor::strings(shape, strings),
        _ => Tensor::raw(dtype, shape, out.freeze()),
    })
}

/// Serialises tensor elements as a flat JSON array without building `Value`s.
struct JsonData<'a>(&'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let b = t.raw_bytes();
        macro_rules! seq {
            ($n:expr, $conv:expr) => {{
                let mut seq = s.serialize_seq(Some(b.len() / $n))?;
                for c in b.chunks_exact($n) {
                    seq.serialize_element(&$conv(c))?;
                }
                seq.end()
            }};
        }
        match t.dtype {
            DataType::Bool => seq!(1, |c: &[u8]| c[0] != 0),
            DataType::U8 => seq!(1, |c: &[u8]| c[0]),
            DataType::I8 => seq!(1, |c: &[u8]| c[0] as i8),
            DataType::U16 => seq!(2, |c: &[u8]| u16::from_le_bytes([c[0], c[1]])),
            DataType::I16 => seq!(2, |c: &[u8]| i16::from_le_bytes([c[0], c[1]])),
            DataType::U32 => seq!(4, |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::I32 => seq!(4, |c: &[u8]| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::F32 => seq!(4, |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DataType::U64 => seq!(8, |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            DataType::I64 => seq!(8, |c: &[u8]| i64::from_le_bytes(c.try_into().expect("8 bytes"))),
            DataType::F64 => seq!(8, |c: &[u8]| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
            DataType::F16 => seq!(2, |c: &[u8]| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            DataType::Bf16 => seq!(2, |c: &[u8]| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            // BYTES are written by `write_bytes_json`, as Triton writes them.
            DataType::Bytes => s.serialize_seq(Some(0))?.end(),
        }
    }
}

/// Longest JSON text of one element of `dtype`, with its separator: what ryu and
/// itoa write at most (`-2.2250738585072014e-308` for FP64).
fn json_chars(dtype: DataType) -> usize {
    1 + match dtype {
        DataType::Bool => 5,
        DataType::U8 => 3,
        DataType::I8 => 4,
        DataType::U16 => 5,
        DataType::I16 => 6,
        DataType::U32 => 10,
        DataType::I32 => 11,
        DataType::U64 | DataType::I64 => 20,
        DataType::F32 | DataType::F16 | DataType::Bf16 => 15,
        DataType::F64 => 24,
        // Counted per byte below.
        DataType::Bytes => 0,
    }
}

/// An upper bound of [`encode_response`]'s size, computed before anything is
/// encoded: exact for binary outputs, the longest text per element for JSON ones.
pub fn response_size_bound(resp: &InferResponse, binary: &BinaryOutputs, placed: &Placed) -> usize {
    // The id and names are written JSON-escaped: up to six characters a byte.
    resp.outputs
        .iter()
        .fold(512 + resp.id.len().saturating_mul(6), |acc, (name, t)| {
            let data = if let Some(p) = placed.get(name) {
                // The region's name (escaped) and two numbers.
                128usize.saturating_add(p.region.len().saturating_mul(6))
            } else if binary.wants_binary(name) {
                t.wire_len()
            } else {
                match &t.data {
                    // A byte may become a six-character escape.
                    TensorData::Strings(items) => items
                        .iter()
                        .map(|i| i.len().saturating_mul(6).saturating_add(3))
                        .fold(0, usize::saturating_add),
                    TensorData::Raw(b) => {
                        (b.len() / t.dtype.size().unwrap_or(1).max(1)).saturating_mul(json_chars(t.dtype))
                    }
                }
            };
            acc.saturating_add(128 + name.len().saturating_mul(6) + 21 * t.shape.len())
                .saturating_add(data)
        })
}

/// Writes BYTES elements as JSON strings the way Triton does (rapidjson without
/// encoding validation): the bytes themselves, with `"`, `\\` and control bytes
/// escaped. An element that is not UTF-8 stays as it is, so only clients that read
/// bytes can use it; the binary extension carries such elements exactly.
fn write_bytes_json(out: &mut Vec<u8>, items: &[Bytes]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        for &b in item.iter() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x09 => out.extend_from_slice(b"\\t"),
                0x0a => out.extend_from_slice(b"\\n"),
                0x0c => out.extend_from_slice(b"\\f"),
                0x0d => out.extend_from_slice(b"\\r"),
                c if c < 0x20 => {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(c >> 4)]);
                    out.push(HEX[usize::from(c & 0xf)]);
                }
                c => out.push(c),
            }
        }
        out.push(b'"');
    }
    out.push(b']');
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(out, v).expect("serialising plain data into memory cannot fail");
}

/// Encodes a response; returns the body and, with binary outputs, the JSON length for
/// the `Inference-Header-Content-Length` header.
pub fn encode_response(
    model: &str,
    resp: &InferResponse,
    binary: &BinaryOutputs,
    placed: &Placed,
) -> (Bytes, Option<usize>) {
    let mut tail: Vec<Bytes> = Vec::new();
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(b"{\"model_name\":");
    write_json(&mut body, model);
    body.extend_from_slice(b",\"model_version\":");
    write_json(&mut body, &resp.version.to_string());
    if !resp.id.is_empty() {
        body.extend_from_slice(b",\"id\":");
        write_json(&mut body, &resp.id);
    }
    body.extend_from_slice(b",\"outputs\":[");
    for (i, (name, t)) in resp.outputs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"name\":");
        write_json(&mut body, name);
        body.extend_from_slice(b",\"datatype\":");
        write_json(&mut body, t.dtype.as_str());
        body.extend_from_slice(b",\"shape\":");
        write_json(&mut body, &t.shape);
        if let Some(p) = placed.get(name) {
            // The data is in the region: say where, and how many bytes were written.
            body.extend_from_slice(b",\"parameters\":");
            write_json(
                &mut body,
                &serde_json::json!({
                    "shared_memory_region": p.region,
                    "shared_memory_offset": p.offset,
                    "shared_memory_byte_size": p.byte_size,
                }),
            );
        } else if binary.wants_binary(name) {
            let wire = t.to_wire_bytes();
            body.extend_from_slice(b",\"parameters\":");
            write_json(&mut body, &serde_json::json!({ "binary_data_size": wire.len() }));
            tail.push(wire);
        } else {
            body.extend_from_slice(b",\"data\":");
            match &t.data {
                TensorData::Strings(items) => write_bytes_json(&mut body, items),
                TensorData::Raw(_) => write_json(&mut body, &JsonData(t)),
            }
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    if tail.is_empty() {
        return (Bytes::from(body), None);
    }
    let json_len = body.len();
    for t in tail {
        body.extend_from_slice(&t);
    }
    (Bytes::from(body), Some(json_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_json_flattens_row_major() {
        let d = decode_request(
            Bytes::from(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"INT32","data":[[1,2],[3,4]]}]}"#),
            None,
        )
        .ok()
        .unwrap();
        let t = &d.parts.inputs[0].1;
        assert_eq!(t.to_i64_vec().unwrap(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn out_of_range_and_wrong_types_are_malformed() {
        for body in [
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FLOAT","data":[1]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":[1.0]}]}"#,
            r#"{"inputs": 3}"#,
        ] {
            let e = decode_request(Bytes::from(body), None).err().unwrap();
            assert!(matches!(e, ApiError::Malformed(_)), "{body}: {e:?}");
        }
    }

    #[test]
    fn bytes_outputs_are_written_as_triton_writes_them() {
        let resp = InferResponse {
            id: "r1".into(),
            version: 1,
            confidence: None,
            outputs: vec![(
                "s".into(),
                Tensor::strings(
                    vec![3],
                    vec![
                        Bytes::from_static(b"a\"\\"),
                        Bytes::from_static(b"\0\n\x1f"),
                        Bytes::from_static(b"\xff\xfe"),
                    ],
                ),
            )],
            timing: Default::default(),
        };
        let none = BinaryOutputs {
            default: false,
            per_output: vec![],
        };
        let (body, len) = encode_response("m", &resp, &none, &Placed::default());
        assert_eq!(len, None);
        let mut want = br#"{"model_name":"m","model_version":"1","id":"r1","outputs":[{"name":"s","datatype":"BYTES","shape":[3],"data":["a\"\\","\u0000\n\u001F",""#.to_vec();
        want.extend_from_slice(b"\xff\xfe\"]}]}");
        assert_eq!(&body[..], &want[..]);
        // Text elements, control bytes included, are JSON anyone can read.
        let text = InferResponse {
            outputs: vec![(
                "s".into(),
                Tensor::strings(vec![2], vec![Bytes::from_static(b"a\0b"), Bytes::from("é\"")]),
            )],
            ..resp
        };
        let (body, _) = encode_response("m", &text, &none, &Placed::default());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["outputs"][0]["data"], serde_json::json!(["a\u{0}b", "é\""]));
    }

    #[test]
    fn binary_inputs_are_split_in_order() {
        let json = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},{"name":"b","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(b"\x02\0\0\0hi");
        let d = decode_request(Bytes::from(body), Some(json.len())).ok().unwrap();
        assert_eq!(d.parts.inputs[0].1.to_f32_vec().unwrap(), vec![1.5]);
        assert_eq!(d.parts.inputs[1].1.data, TensorData::Strings(vec![Bytes::from("hi")]));
        assert!(d.binary.wants_binary("anything"));
    }
}
