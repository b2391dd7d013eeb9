//! Parameters of a model load request (`POST v2/repository/models/{m}/load` and
//! `RepositoryModelLoad`), read the same way on both protocols.
//!
//! `config` (Triton's JSON model config, applied over `config.toml`) is served;
//! `file:<version>/<name>` (model bytes in the request) is refused with a clear
//! message: this server loads models only from its repository directory.

use std::collections::HashMap;

use lattice_inference::{config_override::MAX_OVERRIDE_BYTES, repository::echo};
use lattice_proto::inference::{model_repository_parameter::ParameterChoice, ModelRepositoryParameter};
use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Default, PartialEq)]
pub struct LoadParams {
    /// The `config` override, as JSON text.
    pub config: Option<String>,
}

fn invalid(m: String) -> ApiError {
    ApiError::Infer(lattice_inference::InferError::InvalidInput(m))
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.starts_with("file:") {
        return Err(invalid(format!(
            "load parameter '{}': model files in a load request are not supported; place the model in the repository and load it by name",
            echo(key)
        )));
    }
    Err(invalid(format!("unrecognized load parameter '{}'.", echo(key))))
}

fn bounded(config: String) -> Result<String, ApiError> {
    if config.len() > MAX_OVERRIDE_BYTES {
        return Err(invalid(format!(
            "load parameter 'config' is {} bytes, above the limit of {MAX_OVERRIDE_BYTES}",
            config.len()
        )));
    }
    Ok(config)
}

/// A REST load body: empty, or `{"parameters": {"config": "<json>"}}`.
pub fn from_json(body: &[u8]) -> Result<LoadParams, ApiError> {
    if body.is_empty() {
        return Ok(LoadParams::default());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::Malformed(format!("malformed JSON: {e}")))?;
    let Value::Object(mut top) = v else {
        return Err(ApiError::Malformed("a load request body must be a JSON object".into()));
    };
    let mut out = LoadParams::default();
    match top.remove("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(params)) => {
            for (k, v) in params {
                if k != "config" {
                    check_key(&k)?;
                }
                let Value::String(text) = v else {
                    return Err(invalid("load parameter 'config' must be a string holding JSON".into()));
                };
                out.config = Some(bounded(text)?);
            }
        }
        Some(_) => return Err(ApiError::Malformed("'parameters' must be a JSON object".into())),
    }
    Ok(out)
}

/// A gRPC load request's parameters.
pub fn from_grpc(params: HashMap<String, ModelRepositoryParameter>) -> Result<LoadParams, ApiError> {
    let mut out = LoadParams::default();
    for (k, v) in params {
        if k != "config" {
            check_key(&k)?;
        }
        match v.parameter_choice {
            Some(ParameterChoice::StringParam(text)) => out.config = Some(bounded(text)?),
            _ => {
                return Err(invalid(
                    "invalid value type for load parameter 'config', expected string_param.".into(),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_bodies() {
        assert_eq!(from_json(b"").unwrap(), LoadParams::default());
        assert_eq!(from_json(b"{}").unwrap(), LoadParams::default());
        assert_eq!(
            from_json(br#"{"parameters":{"config":"{\"max_batch_size\":16}"}}"#)
                .unwrap()
                .config
                .as_deref(),
            Some(r#"{"max_batch_size":16}"#)
        );
        for bad in [
            &br#"{"parameters":{"config":{"max_batch_size":16}}}"#[..],
            br#"{"parameters":{"file:1/model.onnx":"AAAA"}}"#,
            br#"{"parameters":{"colour":"red"}}"#,
            br#"{"parameters":[]}"#,
            b"[",
        ] {
            assert!(from_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
