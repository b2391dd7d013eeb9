//! Parameters of a model load request (`POST v2/repository/models/{m}/load` and
//! `RepositoryModelLoad`), read the same way on both protocols.
//!
//! `config` is Triton's JSON model config. `file:<version>/model.onnx` carries a
//! model's bytes (base64 in REST JSON, `bytes_param` on gRPC, as Triton takes
//! them); only that exact form of key is accepted (a positive version and the one
//! file name the server reads), so no key can name a path.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use bytes::Bytes;
use lattice_inference::{config_override::MAX_OVERRIDE_BYTES, repository::echo};
use lattice_proto::inference::{model_repository_parameter::ParameterChoice, ModelRepositoryParameter};
use serde_json::Value;

use crate::error::ApiError;

/// Most versions one load request may carry.
pub const MAX_FILE_VERSIONS: usize = 4;

#[derive(Debug, Default, PartialEq)]
pub struct LoadParams {
    /// The `config` override, as JSON text.
    pub config: Option<String>,
    /// `model.onnx` bytes by version; empty means "load from the repository".
    pub files: BTreeMap<i64, Bytes>,
}

fn invalid(m: String) -> ApiError {
    ApiError::Infer(lattice_inference::InferError::InvalidInput(m))
}

/// The version a `file:` key names: exactly `file:<positive int>/model.onnx`.
fn file_version(key: &str) -> Result<i64, ApiError> {
    let refuse = || {
        invalid(format!(
            "load parameter '{}': only 'file:<version>/model.onnx' is accepted, with <version> a positive integer",
            echo(key)
        ))
    };
    let rest = key.strip_prefix("file:").ok_or_else(refuse)?;
    let (v, file) = rest.split_once('/').ok_or_else(refuse)?;
    if file != "model.onnx"
        || v.is_empty()
        || v.len() > 18
        || !v.bytes().all(|b| b.is_ascii_digit())
        || v.starts_with('0')
    {
        return Err(refuse());
    }
    v.parse().map_err(|_| refuse())
}

/// Collects parameters one at a time, bounding what they add up to.
struct Builder {
    out: LoadParams,
    total: usize,
    max_bytes: usize,
}

impl Builder {
    fn new(max_bytes: usize) -> Builder {
        Builder {
            out: LoadParams::default(),
            total: 0,
            max_bytes,
        }
    }

    fn config(&mut self, text: String) -> Result<(), ApiError> {
        if text.len() > MAX_OVERRIDE_BYTES {
            return Err(invalid(format!(
                "load parameter 'config' is {} bytes, above the limit of {MAX_OVERRIDE_BYTES}",
                text.len()
            )));
        }
        self.out.config = Some(text);
        Ok(())
    }

    fn file(&mut self, version: i64, bytes: Bytes) -> Result<(), ApiError> {
        if bytes.is_empty() {
            return Err(invalid(format!("load parameter 'file:{version}/model.onnx' is empty")));
        }
        self.total = self.total.saturating_add(bytes.len());
        if self.total > self.max_bytes {
            return Err(ApiError::PayloadTooLarge { limit: self.max_bytes });
        }
        self.out.files.insert(version, bytes);
        if self.out.files.len() > MAX_FILE_VERSIONS {
            return Err(invalid(format!(
                "a load request may carry at most {MAX_FILE_VERSIONS} model versions"
            )));
        }
        Ok(())
    }
}

/// A REST load body: empty, or `{"parameters": {"config": "<json>", "file:1/model.onnx": "<base64>"}}`.
/// `max_bytes` bounds the decoded model bytes together (`--max-body-bytes`).
pub fn from_json(body: &[u8], max_bytes: usize) -> Result<LoadParams, ApiError> {
    if body.is_empty() {
        return Ok(LoadParams::default());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::Malformed(format!("malformed JSON: {e}")))?;
    let Value::Object(mut top) = v else {
        return Err(ApiError::Malformed("a load request body must be a JSON object".into()));
    };
    let mut b = Builder::new(max_bytes);
    match top.remove("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(params)) => {
            for (k, v) in params {
                let is_file = k.starts_with("file:");
                if k != "config" && !is_file {
                    return Err(invalid(format!("unrecognized load parameter '{}'.", echo(&k))));
                }
                let version = if is_file { Some(file_version(&k)?) } else { None };
                let Value::String(text) = v else {
                    return Err(invalid(format!(
                        "load parameter '{}' must be a string ({})",
                        echo(&k),
                        if is_file { "base64 of the file" } else { "JSON text" }
                    )));
                };
                match version {
                    None => b.config(text)?,
                    Some(version) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(text.as_bytes())
                            .map_err(|e| invalid(format!("load parameter '{}' is not base64: {e}", echo(&k))))?;
                        b.file(version, Bytes::from(bytes))?;
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::Malformed("'parameters' must be a JSON object".into())),
    }
    Ok(b.out)
}

/// A gRPC load request's parameters.
pub fn from_grpc(params: HashMap<String, ModelRepositoryParameter>, max_bytes: usize) -> Result<LoadParams, ApiError> {
    let mut b = Builder::new(max_bytes);
    for (k, v) in params {
        if k == "config" {
            match v.parameter_choice {
                Some(ParameterChoice::StringParam(text)) => b.config(text)?,
                _ => {
                    return Err(invalid(
                        "invalid value type for load parameter 'config', expected string_param.".into(),
                    ))
                }
            }
        } else if k.starts_with("file:") {
            let version = file_version(&k)?;
            match v.parameter_choice {
                Some(ParameterChoice::BytesParam(bytes)) => b.file(version, Bytes::from(bytes))?,
                _ => {
                    return Err(invalid(format!(
                        "invalid value type for load parameter '{}', expected bytes_param.",
                        echo(&k)
                    )))
                }
            }
        } else {
            return Err(invalid(format!("unrecognized load parameter '{}'.", echo(&k))));
        }
    }
    Ok(b.out)
}

/// Runs the load the parameters ask for: from the request's bytes when it carries
/// files, otherwise from the repository (with the `config` override, if any).
pub async fn load(
    repo: &lattice_inference::repository::ModelRepository,
    name: &str,
    p: LoadParams,
) -> Result<(), ApiError> {
    if p.files.is_empty() {
        repo.load_with(name, p.config.as_deref()).await?;
    } else {
        repo.load_from_bytes(name, p.config.as_deref(), p.files).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1024;

    #[test]
    fn rest_bodies() {
        assert_eq!(from_json(b"", LIMIT).unwrap(), LoadParams::default());
        assert_eq!(from_json(b"{}", LIMIT).unwrap(), LoadParams::default());
        assert_eq!(
            from_json(br#"{"parameters":{"config":"{\"max_batch_size\":16}"}}"#, LIMIT)
                .unwrap()
                .config
                .as_deref(),
            Some(r#"{"max_batch_size":16}"#)
        );
        let p = from_json(br#"{"parameters":{"config":"{}","file:2/model.onnx":"AAEC"}}"#, LIMIT).unwrap();
        assert_eq!(p.files.get(&2).map(|b| b.as_ref()), Some(&[0u8, 1, 2][..]));
        for bad in [
            &br#"{"parameters":{"config":{"max_batch_size":16}}}"#[..],
            br#"{"parameters":{"colour":"red"}}"#,
            br#"{"parameters":[]}"#,
            b"[",
            br#"{"parameters":{"file:1/model.onnx":"not base64!"}}"#,
            br#"{"parameters":{"file:1/model.onnx":""}}"#,
            br#"{"parameters":{"file:1/model.onnx":7}}"#,
        ] {
            assert!(from_json(bad, LIMIT).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn file_keys_name_a_version_and_model_onnx_only() {
        assert_eq!(file_version("file:1/model.onnx").unwrap(), 1);
        assert_eq!(file_version("file:12/model.onnx").unwrap(), 12);
        for bad in [
            "file:0/model.onnx",
            "file:01/model.onnx",
            "file:-1/model.onnx",
            "file:+1/model.onnx",
            "file:1/../model.onnx",
            "file:../1/model.onnx",
            "file:1/model.onnx/x",
            "file:1/config.pbtxt",
            "file:1//model.onnx",
            "file:/1/model.onnx",
            "file:model.onnx",
            "file:99999999999999999999/model.onnx",
            "file:1/model.onnx ",
        ] {
            assert!(file_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes_and_versions_are_bounded() {
        let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; LIMIT + 1]);
        let body = format!(r#"{{"parameters":{{"file:1/model.onnx":"{big}"}}}}"#);
        assert!(matches!(
            from_json(body.as_bytes(), LIMIT),
            Err(ApiError::PayloadTooLarge { .. })
        ));
        let many: Vec<String> = (1..=MAX_FILE_VERSIONS + 1)
            .map(|v| format!(r#""file:{v}/model.onnx":"AA==""#))
            .collect();
        let body = format!(r#"{{"parameters":{{{}}}}}"#, many.join(","));
        assert!(from_json(body.as_bytes(), LIMIT).is_err());
        let mut grpc = HashMap::new();
        grpc.insert(
            "file:1/model.onnx".to_string(),
            ModelRepositoryParameter {
                parameter_choice: Some(ParameterChoice::StringParam("AA==".into())),
            },
        );
        assert!(from_grpc(grpc, LIMIT).is_err());
    }
}
