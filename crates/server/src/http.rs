//! OIP v2 over REST (Triton dialect) with axum.

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use lattice_inference::{config::ModelConfig, stats::Snapshot};
use serde_json::{json, Value};
use tower_http::decompression::RequestDecompressionLayer;

use crate::{
    body::{body_bytes, Body},
    error::ApiError,
    json::{decode_request, encode_response, response_size_bound, HEADER_LEN},
    AppState,
};

pub fn router(state: AppState) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_config_v))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(model_stats_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/v2/systemsharedmemory/status", get(shm_status_all))
        .route("/v2/systemsharedmemory/region/{name}/status", get(shm_status))
        .route("/v2/systemsharedmemory/register", post(shm_register_unnamed))
        .route("/v2/systemsharedmemory/region/{name}/register", post(shm_register))
        .route("/v2/systemsharedmemory/unregister", post(shm_unregister_all))
        .route("/v2/systemsharedmemory/region/{name}/unregister", post(shm_unregister))
        .route("/v2/cudasharedmemory/status", get(cuda_status_all))
        .route("/v2/cudasharedmemory/region/{name}/status", get(cuda_status))
        .route("/v2/cudasharedmemory/register", post(cuda_register))
        .route("/v2/cudasharedmemory/region/{name}/register", post(cuda_register))
        .route("/v2/cudasharedmemory/unregister", post(cuda_unregister))
        .route("/v2/cudasharedmemory/region/{name}/unregister", post(cuda_unregister))
        .route("/v1/agents/tasks", post(crate::tasks::offer))
        .route("/v1/tools", get(crate::tools_api::list))
        .route("/v1/embeddings", post(crate::embeddings::embeddings))
        .route("/metrics", get(crate::exposition::render))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::observe::http,
        ))
        // Bodies above the limit are rejected while being read (never buffered whole);
        // the handlers turn the rejection into a JSON 413.
        .layer(DefaultBodyLimit::max(limit))
        // tritonclient's request_compression_algorithm / response_compression_algorithm.
        // The limit above applies to the decompressed body, so a small compressed
        // body cannot expand past it.
        .layer(RequestDecompressionLayer::new())
        // Outside the layers that answer on their own (an unknown Content-Encoding,
        // a body over the limit, a method the route lacks): every error is JSON.
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Gives an error answered without a JSON body (by a layer or an extractor rather
/// than a handler) the same `{"error": ...}` body as every other error.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let reason = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "request body exceeds the server's limit (--max-body-bytes), after decompression"
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported Content-Encoding: use gzip, deflate or identity",
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route",
        _ => status.canonical_reason().unwrap_or("request failed"),
    };
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(json!({ "error": reason }).to_string()))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): State<AppState>) -> StatusCode {
    if s.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": crate::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": crate::EXTENSIONS,
    }))
}

pub fn metadata_json(cfg: &ModelConfig, versions: Vec<String>) -> Value {
    let tensors = |ts: &[lattice_inference::config::TensorConfig]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.dtype().as_str(), "shape": cfg.wire_shape(t)}))
            .collect()
    };
    json!({
        "name": cfg.name,
        "versions": versions,
        "platform": cfg.platform,
        "inputs": tensors(&cfg.input),
        "outputs": tensors(&cfg.output),
    })
}

async fn model_metadata(s: State<AppState>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    metadata_for(s, model, String::new()).await
}

async fn model_metadata_v(
    s: State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    metadata_for(s, model, version).await
}

async fn metadata_for(State(s): State<AppState>, model: String, version: String) -> Result<Json<Value>, ApiError> {
    let mv = s.repo.version(&model, &version)?;
    let m = s.repo.model(&model)?;
    let versions = if version.is_empty() {
        m.versions.keys().map(|v| v.to_string()).collect()
    } else {
        vec![mv.version.to_string()]
    };
    Ok(Json(metadata_json(&m.config, versions)))
}

async fn model_ready(State(s): State<AppState>, Path(model): Path<String>) -> StatusCode {
    ready_status(s.is_ready() && s.repo.version(&model, "").is_ok())
}

async fn model_ready_v(State(s): State<AppState>, Path((model, version)): Path<(String, String)>) -> StatusCode {
    ready_status(s.is_ready() && s.repo.version(&model, &version).is_ok())
}

fn ready_status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

type Ctx = Option<axum::Extension<crate::gateway::RequestContext>>;

async fn infer(
    s: State<AppState>,
    Path(model): Path<String>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_for(s, model, String::new(), ctx, headers, body).await
}

async fn infer_v(
    s: State<AppState>,
    Path((model, version)): Path<(String, String)>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_for(s, model, version, ctx, headers, body).await
}

async fn infer_for(
    State(s): State<AppState>,
    model: String,
    version: String,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    s.scaling.arrival();
    if !s.is_ready() {
        return Err(ApiError::NotReady);
    }
    let ctx = ctx.map(|c| c.0);
    let version = s.gateway.route_version(&model, &version, ctx.as_ref());
    let body = body_bytes(&s, body)?;
    let header_len = headers
        .get(HEADER_LEN)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| ApiError::Malformed(format!("{HEADER_LEN} must be a byte count")))
        })
        .transpose()?;
    let mut decoded = decode_request(body, header_len)?;
    let shm = std::mem::take(&mut decoded.shm);
    let targets = s.shm.prepare(&model, &mut decoded.parts, shm, s.cfg.max_body_bytes)?;
    let resp = s.repo.infer(&model, &version, decoded.parts).await?;
    if let Some(c) = &ctx {
        c.note_model(&model, &resp.version.to_string());
    }
    let placed = targets.write(&resp.outputs)?;
    let size = response_size_bound(&resp, &decoded.binary, &placed);
    if size > s.cfg.max_response_bytes {
        return Err(ApiError::ResponseTooLarge {
            size,
            limit: s.cfg.max_response_bytes,
        });
    }
    let (body, json_len) = encode_response(&model, &resp, &decoded.binary, &placed);
    // Only a successful inference answer is compressed, as its request asks
    // (`crate::encoding`); every other answer goes out plain.
    let coding = crate::encoding::negotiate(&headers);
    let (body, coding) = match coding {
        Some(enc) => match crate::encoding::compress(body.clone(), enc).await {
            Some(z) => (z, Some(enc)),
            None => (body, None),
        },
        None => (body, None),
    };
    let mut r = body.into_response();
    if let Some(enc) = coding {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static(enc.as_str()));
    }
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    let h = r.headers_mut();
    match json_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LEN, HeaderValue::from(n));
        }
        None => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    // Per-request timing breakdown, as TEI reports it.
    h.insert(
        "x-queue-time-us",
        HeaderValue::from(resp.timing.queue.as_micros() as u64),
    );
    h.insert(
        "x-compute-time-us",
        HeaderValue::from(resp.timing.compute.as_micros() as u64),
    );
    Ok(r)
}

pub fn config_json(cfg: &ModelConfig) -> Value {
    let tensor = |t: &lattice_inference::config::TensorConfig| json!({"name": t.name, "data_type": t.dtype().config_name(), "dims": t.dims, "optional": t.optional});
    let policy = match &cfg.version_policy {
        lattice_inference::config::VersionPolicy::Latest { num_versions } => {
            json!({"latest": {"num_versions": num_versions}})
        }
        lattice_inference::config::VersionPolicy::All {} => json!({"all": {}}),
        lattice_inference::config::VersionPolicy::Specific { versions } => json!({"specific": {"versions": versions}}),
    };
    let mut v = json!({
        "name": cfg.name,
        "platform": cfg.platform,
        "backend": "onnxruntime",
        "max_batch_size": cfg.max_batch_size,
        "version_policy": policy,
        "input": cfg.input.iter().map(tensor).collect::<Vec<_>>(),
        "output": cfg.output.iter().map(tensor).collect::<Vec<_>>(),
        "instance_group": [{"name": format!("{}_0", cfg.name), "kind": "KIND_CPU", "count": cfg.instance_group.count}],
    });
    if let Some(sb) = &cfg.sequence_batching {
        v["sequence_batching"] = json!({
            "max_sequence_idle_microseconds": sb.idle().as_micros() as u64,
            "oldest": {"max_candidate_sequences": sb.max_candidate_sequences},
            "state": sb.state,
        });
    }
    if let Some(db) = &cfg.dynamic_batching {
        v["dynamic_batching"] = json!({
            "preferred_batch_size": db.preferred_batch_size,
            "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
            "priority_levels": lattice_inference::scheduler::PRIORITY_LEVELS,
            "default_queue_policy": {
                "max_queue_size": db.max_queue_size,
                "default_timeout_microseconds": db.default_timeout_microseconds,
                "allow_timeout_override": true,
            },
        });
    }
    v
}

async fn model_config(s: State<AppState>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    model_config_v(s, Path((model, String::new()))).await
}

async fn model_config_v(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    s.repo.version(&model, &version)?;
    Ok(Json(config_json(&s.repo.model(&model)?.config)))
}

fn duration_json(d: &lattice_inference::stats::Duration2) -> Value {
    json!({"count": d.count, "ns": d.ns})
}

pub fn stats_json(name: &str, version: i64, s: &Snapshot) -> Value {
    json!({
        "name": name,
        "version": version.to_string(),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": duration_json(&s.success),
            "fail": duration_json(&s.fail),
            "queue": duration_json(&s.queue),
            "compute_input": duration_json(&s.compute_input),
            "compute_infer": duration_json(&s.compute_infer),
            "compute_output": duration_json(&s.compute_output),
        },
        "batch_stats": s.batches.iter().map(|(size, b)| json!({
            "batch_size": size,
            "compute_input": duration_json(&b.compute_input),
            "compute_infer": duration_json(&b.compute_infer),
            "compute_output": duration_json(&b.compute_output),
        })).collect::<Vec<_>>(),
    })
}

async fn all_stats(State(s): State<AppState>) -> Json<Value> {
    let stats: Vec<Value> = s
        .repo
        .loaded()
        .iter()
        .flat_map(|m| {
            m.versions
                .values()
                .map(|v| stats_json(&v.name, v.version, &v.scheduler.runtime().stats.snapshot()))
        })
        .collect();
    Json(json!({ "model_stats": stats }))
}

async fn model_stats(s: State<AppState>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    stats_for(s, model, None).await
}

async fn model_stats_v(
    s: State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    stats_for(s, model, Some(version)).await
}

async fn stats_for(State(s): State<AppState>, model: String, version: Option<String>) -> Result<Json<Value>, ApiError> {
    let m = s.repo.model(&model)?;
    let stats: Vec<Value> = match version {
        Some(v) => {
            let mv = s.repo.version(&model, &v)?;
            vec![stats_json(&model, mv.version, &mv.scheduler.runtime().stats.snapshot())]
        }
        None => m
            .versions
            .values()
            .map(|v| stats_json(&model, v.version, &v.scheduler.runtime().stats.snapshot()))
            .collect(),
    };
    Ok(Json(json!({ "model_stats": stats })))
}

async fn repository_index(State(s): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&s, body)?;
    let ready_only = if body.is_empty() {
        false
    } else {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::Malformed(format!("malformed JSON: {e}")))?;
        v.get("ready").and_then(Value::as_bool).unwrap_or(false)
    };
    let entries: Vec<Value> = s
        .repo
        .index(ready_only)
        .into_iter()
        .map(|e| {
            let mut v = json!({"name": e.name, "state": e.state});
            if !e.version.is_empty() {
                v["version"] = json!(e.version);
            }
            if !e.reason.is_empty() {
                v["reason"] = json!(e.reason);
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(entries)))
}

fn check_admin_body(body: &Bytes) -> Result<(), ApiError> {
    if !body.is_empty() {
        serde_json::from_slice::<Value>(body).map_err(|e| ApiError::Malformed(format!("malformed JSON: {e}")))?;
    }
    Ok(())
}

async fn load(State(s): State<AppState>, Path(model): Path<String>, body: Body) -> Result<StatusCode, ApiError> {
    let params = crate::load_params::from_json(&body_bytes(&s, body)?, s.cfg.max_body_bytes)?;
    crate::load_params::load(&s.repo, &model, params).await?;
    Ok(StatusCode::OK)
}

async fn unload(State(s): State<AppState>, Path(model): Path<String>, body: Body) -> Result<StatusCode, ApiError> {
    check_admin_body(&body_bytes(&s, body)?)?;
    s.repo.unload(&model).await?;
    Ok(StatusCode::OK)
}

// === System shared memory (`crate::shm`) ===

fn shm_status_json(regions: Vec<crate::shm::Status>) -> Json<Value> {
    Json(Value::Array(
        regions
            .into_iter()
            .map(|r| json!({"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}))
            .collect(),
    ))
}

async fn shm_status_all(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(shm_status_json(s.shm.status(None)?))
}

async fn shm_status(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(shm_status_json(s.shm.status(Some(&name))?))
}

async fn shm_register_unnamed(State(s): State<AppState>) -> Result<StatusCode, ApiError> {
    // The registry names what is missing (or that registration is off).
    s.shm.register("", "", 0, 0)?;
    Ok(StatusCode::OK)
}

/// `{"key": str, "offset": uint (default 0), "byte_size": uint}`, Triton's body.
async fn shm_register(State(s): State<AppState>, Path(name): Path<String>, body: Body) -> Result<StatusCode, ApiError> {
    let body = body_bytes(&s, body)?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::Malformed(format!("malformed JSON: {e}")))?;
    let field = |k: &str| {
        v.get(k)
            .ok_or_else(|| ApiError::Malformed(format!("Shared memory register request has no '{k}' field")))
    };
    let key = field("key")?.as_str().ok_or_else(|| {
        ApiError::Malformed("Unable to parse 'key': attempt to access JSON non-string as string".into())
    })?;
    let uint = |k: &str, v: &Value| {
        v.as_u64().ok_or_else(|| {
            ApiError::Malformed(format!(
                "Unable to parse '{k}': attempt to access JSON non-unsigned-integer as unsigned-integer"
            ))
        })
    };
    let byte_size = uint("byte_size", field("byte_size")?)?;
    let offset = v.get("offset").map(|o| uint("offset", o)).transpose()?.unwrap_or(0);
    s.shm.register(&name, key, offset, byte_size)?;
    Ok(StatusCode::OK)
}

async fn shm_unregister_all(State(s): State<AppState>) -> Result<StatusCode, ApiError> {
    s.shm.unregister(None)?;
    Ok(StatusCode::OK)
}

async fn shm_unregister(State(s): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    s.shm.unregister(Some(&name))?;
    Ok(StatusCode::OK)
}

// CUDA shared memory needs a GPU: registering is 501; status lists no regions and
// unregistering has nothing to do, as on Triton's CPU build, so clients that clear
// both kinds before starting (Triton's examples do) work unchanged.

async fn cuda_status_all() -> Json<Value> {
    Json(json!([]))
}

async fn cuda_status(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    s.shm.cuda_status(Some(&name))?;
    Ok(Json(json!([])))
}

async fn cuda_register() -> Result<StatusCode, ApiError> {
    Err(crate::shm::ShmError::CudaUnsupported.into())
}

async fn cuda_unregister() -> StatusCode {
    StatusCode::OK
}
