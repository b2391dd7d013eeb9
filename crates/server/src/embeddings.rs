//! `POST /v1/embeddings` in OpenAI's shape, for text-embedding models (a model with a
//! text pipeline and a pooled sentence output, e.g. `minilm`'s `embedding`).
//!
//! Requests go through the same repository and scheduler as OIP requests: the texts
//! are tokenized on the model's pipeline here (which gives the token counts for
//! `usage`) and submitted as token tensors, so they batch with OIP requests for the
//! same model. Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`,
//! with the HTTP status of their kind in `crate::error`.

use axum::{
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    Json,
};
use base64::Engine as _;
use bytes::Bytes;
use lattice_inference::{repository::RequestParts, InferError};
use serde_json::{json, Value};

use crate::{body::Body, error::ApiError, AppState};

/// An error in OpenAI's shape; the status is its kind's, as everywhere else.
pub struct OpenAiError(ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<InferError> for OpenAiError {
    fn from(e: InferError) -> Self {
        OpenAiError(ApiError::Infer(e))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.0.kind().codes().0;
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let code = match &self.0 {
            ApiError::Infer(InferError::ModelNotFound(_) | InferError::VersionNotFound { .. }) => "model_not_found",
            _ => self.0.kind().name(),
        };
        // The rest of the answer (Retry-After on 429) is the plain error's.
        let mut resp = self.0.clone().into_response();
        let body = json!({"error": {"message": self.0.message(), "type": kind, "code": code}});
        *resp.body_mut() = axum::body::Body::from(body.to_string());
        resp.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
        resp
    }
}

fn invalid(m: impl Into<String>) -> OpenAiError {
    OpenAiError(ApiError::Infer(InferError::InvalidInput(m.into())))
}

/// The `input` field: one string or a list of strings, none of them empty.
fn texts(v: Option<&Value>) -> Result<Vec<Bytes>, OpenAiError> {
    let item = |v: &Value| match v {
        Value::String(s) if !s.is_empty() => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Value::String(_) => Err(invalid("'input' must not contain empty strings")),
        _ => Err(invalid(
            "'input' must be a string or a list of strings (token arrays are not accepted)",
        )),
    };
    match v {
        None => Err(invalid("'input' is required")),
        Some(Value::Array(items)) if items.is_empty() => Err(invalid("'input' must not be empty")),
        Some(Value::Array(items)) => items.iter().map(item).collect(),
        Some(v) => Ok(vec![item(v)?]),
    }
}

pub async fn embeddings(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, OpenAiError> {
    s.scaling.arrival();
    if !s.is_ready() {
        return Err(ApiError::NotReady.into());
    }
    s.admit(headers.get(crate::limit::TENANT_HEADER).and_then(|v| v.to_str().ok()))?;
    let body = crate::body::body_bytes(&s, body)?;
    let req: Value =
        serde_json::from_slice(&body).map_err(|e| OpenAiError(ApiError::Malformed(format!("malformed JSON: {e}"))))?;
    let Value::Object(req) = req else {
        return Err(OpenAiError(ApiError::Malformed(
            "the body must be a JSON object".into(),
        )));
    };
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("'model' is required and must be a string")),
    };
    let base64 = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err(invalid("'encoding_format' must be 'float' or 'base64'")),
    };
    let texts = texts(req.get("input"))?;
    let mv = s.repo.version(&model, "")?;
    let rt = mv.scheduler.runtime().clone();
    let cfg = &rt.config;
    let (Some(pipeline), Some(pooling)) = (rt.text.clone(), cfg.pooling.as_ref()) else {
        return Err(invalid(format!(
            "model '{}' is not a text-embedding model (it has no text input with a pooled output)",
            lattice_inference::repository::echo(&model)
        )));
    };
    if let Some(Value::Number(d)) = req.get("dimensions") {
        let want = cfg.output_by_name(&pooling.output).and_then(|o| o.dims.last().copied());
        if d.as_i64() != want {
            return Err(invalid(format!(
                "'dimensions' must be {} for model '{model}'",
                want.unwrap_or(-1)
            )));
        }
    }
    if cfg.max_batch_size == 0 || texts.len() > cfg.max_batch_size {
        return Err(InferError::BatchTooLarge {
            got: texts.len(),
            max: cfg.max_batch_size,
        }
        .into());
    }
    let n = texts.len();
    let tokens = pipeline.tokenize(texts).await?;
    // Tokens each text became (the attention mask's ones), special tokens included.
    let prompt_tokens: i64 = tokens
        .iter()
        .find(|(name, _)| *name == pipeline.attention_mask_name())
        .and_then(|(_, t)| t.to_i64_vec())
        .map_or(0, |m| m.into_iter().sum());
    let resp = s
        .repo
        .infer(
            &model,
            "",
            RequestParts {
                id: String::new(),
                inputs: tokens,
                outputs: vec![pooling.output.clone()],
                priority: None,
                timeout: None,
                sequence: None,
            },
        )
        .await?;
    let vectors = resp
        .outputs
        .iter()
        .find(|(name, _)| *name == pooling.output)
        .and_then(|(_, t)| t.to_f32_vec())
        .ok_or_else(|| InferError::Backend(format!("model '{model}' gave no '{}' output", pooling.output)))?;
    let dim = vectors.len() / n.max(1);
    let data: Vec<Value> = vectors
        .chunks_exact(dim.max(1))
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}
