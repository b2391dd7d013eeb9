//! Tensors as the protocols carry them: a datatype, a shape and little-endian bytes.
//!
//! Keeping the wire layout (row-major, little-endian, no padding) as the in-memory layout
//! means the binary-data HTTP path and gRPC `raw_*_contents` need no conversion at all;
//! only the JSON path and the engine boundary convert.

use std::fmt;

use bytes::{Bytes, BytesMut};

/// The OIP v2 datatypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    Bf16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::Bf16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The protocol name: `FP32`, `INT64`, `BYTES`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses the protocol name; also accepts the model-config spelling (`TYPE_FP32`,
    /// `TYPE_STRING`) so configs can be written either way.
    pub fn parse(s: &str) -> Option<DataType> {
        let s = s.strip_prefix("TYPE_").unwrap_or(s);
        if s == "STRING" {
            return Some(DataType::Bytes);
        }
        DataType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The model-config spelling, as Triton's `GET v2/models/{m}/config` shows it.
    pub fn config_name(self) -> String {
        match self {
            DataType::Bytes => "TYPE_STRING".to_string(),
            other => format!("TYPE_{}", other.as_str()),
        }
    }

    /// Bytes per element; `None` for variable-length `BYTES`.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::Bf16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Element storage. Fixed-size types stay as raw little-endian bytes; `BYTES` elements
/// are kept one buffer each.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    Raw(Bytes),
    Strings(Vec<Bytes>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Number of elements of a concrete shape, or `None` on a negative dim or overflow.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

impl Tensor {
    pub fn raw(dtype: DataType, shape: Vec<i64>, data: impl Into<Bytes>) -> Tensor {
        Tensor {
            dtype,
            shape,
            data: TensorData::Raw(data.into()),
        }
    }

    pub fn strings(shape: Vec<i64>, items: Vec<Bytes>) -> Tensor {
        Tensor {
            dtype: DataType::Bytes,
            shape,
            data: TensorData::Strings(items),
        }
    }

    pub fn from_f32(shape: Vec<i64>, values: &[f32]) -> Tensor {
        let mut buf = BytesMut::with_capacity(values.len() * 4);
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Tensor::raw(DataType::F32, shape, buf.freeze())
    }

    pub fn from_i64(shape: Vec<i64>, values: &[i64]) -> Tensor {
        let mut buf = BytesMut::with_capacity(values.len() * 8);
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Tensor::raw(DataType::I64, shape, buf.freeze())
    }

    /// Checks that the payload holds exactly the elements the shape promises.
    pub fn check_consistent(&self) -> Result<(), TensorError> {
        let n = element_count(&self.shape).ok_or_else(|| TensorError::InvalidShape(self.shape.clone()))?;
        match (&self.data, self.dtype.size()) {
            (TensorData::Raw(b), Some(sz)) => {
                // Checked: a shape like [1, 2^61 + 1] of 8-byte elements wraps to 8.
                let need = n.checked_mul(sz).ok_or_else(|| TensorError::TooLarge {
                    shape: self.shape.clone(),
                    dtype: self.dtype,
                })?;
                if b.len() != need {
                    return Err(TensorError::ByteCount {
                        shape: self.shape.clone(),
                        dtype: self.dtype,
                        need,
                        got: b.len(),
                    });
                }
            }
            (TensorData::Strings(items), None) => {
                if items.len() != n {
                    return Err(TensorError::ElementCount {
                        shape: self.shape.clone(),
                        need: n,
                        got: items.len(),
                    });
                }
            }
            _ => return Err(TensorError::PayloadKind(self.dtype)),
        }
        Ok(())
    }

    /// The raw bytes of a fixed-size tensor (empty for `BYTES`).
    pub fn raw_bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::Raw(b) => b,
            TensorData::Strings(_) => &[],
        }
    }

    /// Decodes FP32 elements; `None` if the tensor is not FP32.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        (self.dtype == DataType::F32).then(|| {
            self.raw_bytes()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// Decodes integer elements of any integer datatype as i64.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        let b = self.raw_bytes();
        Some(match self.dtype {
            DataType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
            DataType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("chunk of 4")) as i64)
                .collect(),
            _ => return None,
        })
    }

    /// Length of [`to_wire_bytes`](Self::to_wire_bytes), without building it.
    pub fn wire_len(&self) -> usize {
        match &self.data {
            TensorData::Raw(b) => b.len(),
            TensorData::Strings(items) => items.iter().map(|i| 4 + i.len()).fold(0, usize::saturating_add),
        }
    }

    /// Serialises `BYTES` elements as the binary extension lays them out: each
    /// element a little-endian u32 length followed by its bytes.
    pub fn to_wire_bytes(&self) -> Bytes {
        match &self.data {
            TensorData::Raw(b) => b.clone(),
            TensorData::Strings(items) => {
                let total: usize = items.iter().map(|i| 4 + i.len()).sum();
                let mut out = BytesMut::with_capacity(total);
                for i in items {
                    out.extend_from_slice(&(i.len() as u32).to_le_bytes());
                    out.extend_from_slice(i);
                }
                out.freeze()
            }
        }
    }
}

/// Why a tensor's payload does not fit its shape and datatype; every variant is the
/// sender's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("invalid shape {0:?}")]
    InvalidShape(Vec<i64>),
    #[error("shape {shape:?} of {dtype} is too large")]
    TooLarge { shape: Vec<i64>, dtype: DataType },
    #[error("shape {shape:?} of {dtype} needs {need} bytes, got {got}")]
    ByteCount {
        shape: Vec<i64>,
        dtype: DataType,
        need: usize,
        got: usize,
    },
    #[error("shape {shape:?} needs {need} BYTES elements, got {got}")]
    ElementCount { shape: Vec<i64>, need: usize, got: usize },
    #[error("payload does not match datatype {0}")]
    PayloadKind(DataType),
    #[error("truncated BYTES element length")]
    TruncatedLength,
    #[error("BYTES element of {len} bytes exceeds the {remaining} remaining")]
    ElementOverrun { len: usize, remaining: usize },
}

/// Splits a length-prefixed `BYTES` buffer (binary extension / gRPC raw contents).
pub fn parse_wire_strings(mut buf: Bytes) -> Result<Vec<Bytes>, TensorError> {
    let mut items = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err(TensorError::TruncatedLength);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let _ = buf.split_to(4);
        if buf.len() < len {
            return Err(TensorError::ElementOverrun {
                len,
                remaining: buf.len(),
            });
        }
        items.push(buf.split_to(len));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
            assert_eq!(DataType::parse(&d.config_name()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn wire_strings_round_trip() {
        let t = Tensor::strings(vec![2], vec![Bytes::from("ab"), Bytes::from("")]);
        let wire = t.to_wire_bytes();
        assert_eq!(&wire[..], b"\x02\0\0\0ab\0\0\0\0");
        assert_eq!(parse_wire_strings(wire).unwrap(), vec![Bytes::from("ab"), Bytes::new()]);
        assert!(parse_wire_strings(Bytes::from_static(b"\x05\0\0\0ab")).is_err());
    }

    #[test]
    fn consistency_checks_bytes_per_element() {
        let t = Tensor::raw(DataType::F32, vec![2, 2], vec![0u8; 16]);
        assert!(t.check_consistent().is_ok());
        let t = Tensor::raw(DataType::F32, vec![2, 3], vec![0u8; 16]);
        assert!(t.check_consistent().is_err());
    }
}
