//! OIP v2 over gRPC: `inference.GRPCInferenceService` with tonic.

use std::{collections::HashMap, pin::Pin, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use lattice_inference::{
    scheduler::InferResponse,
    sequence::{SequenceControl, SequenceId},
    tensor::{element_count, parse_wire_strings},
    DataType, RequestParts, Tensor, TensorData,
};
use lattice_proto::inference::{
    self as pb, grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor, InferParameter,
};
use tonic::{metadata::MetadataMap, Request, Response, Status};

use lattice_inference::repository::echo;

use crate::{
    error::ApiError,
    json::schedule_params,
    shm::{Placed, Refs, TensorRef},
    AppState,
};

/// Requests of one `ModelStreamInfer` stream computed concurrently; answers keep
/// request order.
const STREAM_CONCURRENCY: usize = 64;

pub struct InferenceService {
    pub state: AppState,
}

fn malformed(m: impl Into<String>) -> ApiError {
    ApiError::Malformed(m.into())
}

/// Parses a `grpc-timeout` header ("100m", "5S", ...): the client's deadline.
pub fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    // The gRPC spec allows at most 8 digits, which keeps every unit's product in range.
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn param_int(p: &InferParameter) -> Option<i64> {
    match p.parameter_choice.as_ref()? {
        ParameterChoice::Int64Param(v) => Some(*v),
        ParameterChoice::Uint64Param(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn typed_contents(inp: &InferInputTensor, dtype: DataType) -> Result<TensorData, ApiError> {
    let c = inp.contents.clone().unwrap_or_default();
    let name = &inp.name;
    let mut buf = BytesMut::new();
    macro_rules! narrow {
        ($src:expr, $t:ty) => {
            for &x in &$src {
                let v =
                    <$t>::try_from(x).map_err(|_| malformed(format!("input '{name}': {x} does not fit {dtype}")))?;
                buf.put_slice(&v.to_le_bytes());
            }
        };
    }
    match dtype {
        DataType::Bool => c.bool_contents.iter().for_each(|&b| buf.put_u8(b as u8)),
        DataType::I8 => narrow!(c.int_contents, i8),
        DataType::I16 => narrow!(c.int_contents, i16),
        DataType::I32 => c.int_contents.iter().for_each(|&x| buf.put_i32_le(x)),
        DataType::I64 => c.int64_contents.iter().for_each(|&x| buf.put_i64_le(x)),
        DataType::U8 => narrow!(c.uint_contents, u8),
        DataType::U16 => narrow!(c.uint_contents, u16),
        DataType::U32 => c.uint_contents.iter().for_each(|&x| buf.put_u32_le(x)),
        DataType::U64 => c.uint64_contents.iter().for_each(|&x| buf.put_u64_le(x)),
        DataType::F32 => c.fp32_contents.iter().for_each(|&x| buf.put_f32_le(x)),
        DataType::F64 => c.fp64_contents.iter().for_each(|&x| buf.put_f64_le(x)),
        DataType::Bytes => {
            return Ok(TensorData::Strings(
                c.bytes_contents.into_iter().map(Bytes::from).collect(),
            ));
        }
        DataType::F16 | DataType::Bf16 => {
            return Err(malformed(format!(
                "input '{name}': {dtype} must be sent in raw_input_contents"
            )))
        }
    }
    Ok(TensorData::Raw(buf.freeze()))
}

/// `sequence_id` (int64 or string), `sequence_start`, `sequence_end` (bools), with
/// the texts of Triton's gRPC frontend.
fn sequence_params(p: &HashMap<String, InferParameter>) -> Result<Option<SequenceControl>, ApiError> {
    let flag = |k: &str| -> Result<bool, ApiError> {
        match p.get(k).map(|v| v.parameter_choice.as_ref()) {
            None => Ok(false),
            Some(Some(ParameterChoice::BoolParam(b))) => Ok(*b),
            Some(_) => Err(malformed(format!(
                "invalid value type for '{k}' parameter, expected bool_param."
            ))),
        }
    };
    let (start, end) = (flag("sequence_start")?, flag("sequence_end")?);
    let id = match p.get("sequence_id").map(|v| v.parameter_choice.as_ref()) {
        None if !(start || end) => return Ok(None),
        None => SequenceId::Int(0),
        // Triton reads the int64 as the uint64 correlation ID it carries.
        Some(Some(ParameterChoice::Int64Param(v))) => SequenceId::Int(*v as u64),
        Some(Some(ParameterChoice::StringParam(s))) => SequenceId::Str(s.clone()),
        Some(_) => {
            return Err(malformed(
                "invalid value type for 'sequence_id' parameter, expected int64_param or string_param.",
            ))
        }
    };
    Ok(Some(SequenceControl { id, start, end }))
}

/// `shared_memory_region` (string), `shared_memory_offset` and
/// `shared_memory_byte_size` (int64) of one tensor, with Triton's gRPC texts.
fn shm_ref(tensor: &str, p: &HashMap<String, InferParameter>) -> Result<Option<TensorRef>, ApiError> {
    let tensor = echo(tensor);
    let int = |k: &str| -> Result<Option<u64>, ApiError> {
        match p.get(k).map(|v| v.parameter_choice.as_ref()) {
            None => Ok(None),
            Some(Some(ParameterChoice::Int64Param(v))) => u64::try_from(*v)
                .map(Some)
                .map_err(|_| malformed(format!("'{k}' for tensor '{tensor}' must not be negative, got {v}"))),
            Some(_) => Err(malformed(format!(
                "invalid value type for '{k}' parameter for tensor '{tensor}', expected int64_param."
            ))),
        }
    };
    let (offset, byte_size) = (int("shared_memory_offset")?, int("shared_memory_byte_size")?);
    let region = match p.get("shared_memory_region").map(|v| v.parameter_choice.as_ref()) {
        None => {
            for (k, v) in [("shared_memory_offset", offset), ("shared_memory_byte_size", byte_size)] {
                if v.is_some() {
                    return Err(malformed(format!(
                        "'{k}' can not be specified without 'shared_memory_region' parameter for tensor '{tensor}'"
                    )));
                }
            }
            return Ok(None);
        }
        Some(Some(ParameterChoice::StringParam(r))) => r.clone(),
        Some(_) => {
            return Err(malformed(format!(
                "invalid value type for 'shared_memory_region' parameter for tensor '{tensor}', expected string_param."
            )))
        }
    };
    let byte_size = byte_size.ok_or_else(|| {
        malformed(format!(
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for tensor '{tensor}'"
        ))
    })?;
    Ok(Some(TensorRef {
        region,
        offset: offset.unwrap_or(0),
        byte_size,
    }))
}

/// Converts a protobuf request into core request parts, and the shared-memory
/// regions its inputs and outputs name.
pub fn request_parts(req: pb::ModelInferRequest, deadline: Option<Duration>) -> Result<(RequestParts, Refs), ApiError> {
    let raw = req.raw_input_contents;
    let mut refs = Refs::default();
    let mut input_refs = Vec::with_capacity(req.inputs.len());
    for inp in &req.inputs {
        let r = shm_ref(&inp.name, &inp.parameters)?;
        if r.is_some() && inp.contents.is_some() {
            return Err(malformed(format!(
                "unexpected 'content' provided when using shared memory for input tensor '{}' for model '{}'",
                echo(&inp.name),
                echo(&req.model_name)
            )));
        }
        input_refs.push(r);
    }
    // Raw contents belong, in order, to the inputs that name no region (tritonclient
    // sends none for those).
    let raw_users = input_refs.iter().filter(|r| r.is_none()).count();
    if !raw.is_empty() {
        if raw.len() != raw_users {
            return Err(malformed(format!(
                "raw_input_contents has {} entries for {raw_users} inputs not in shared memory",
                raw.len(),
            )));
        }
        if let Some(i) = req.inputs.iter().find(|i| i.contents.is_some()) {
            // Triton's text, which clients match on.
            return Err(malformed(format!(
                "contents field must not be specified when using raw_input_contents for '{}' for model '{}'",
                echo(&i.name),
                echo(&req.model_name)
            )));
        }
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut next_raw = 0;
    for (inp, r) in req.inputs.iter().zip(input_refs) {
        let dtype = DataType::parse(&inp.datatype)
            .filter(|_| !inp.datatype.starts_with("TYPE_"))
            .ok_or_else(|| malformed(format!("input '{}': unknown datatype '{}'", inp.name, inp.datatype)))?;
        element_count(&inp.shape)
            .ok_or_else(|| malformed(format!("input '{}': invalid shape {:?}", inp.name, inp.shape)))?;
        if let Some(r) = r {
            refs.inputs.push((inputs.len(), r));
            inputs.push((inp.name.clone(), Refs::pending_input(dtype, inp.shape.clone())));
            continue;
        }
        let i = next_raw;
        next_raw += 1;
        let data = match raw.get(i) {
            Some(bytes) => {
                let bytes = Bytes::from(bytes.clone());
                match dtype {
                    DataType::Bytes => TensorData::Strings(
                        parse_wire_strings(bytes).map_err(|e| malformed(format!("input '{}': {e}", inp.name)))?,
                    ),
                    _ => TensorData::Raw(bytes),
                }
            }
            None => typed_contents(inp, dtype)?,
        };
        inputs.push((
            inp.name.clone(),
            Tensor {
                dtype,
                shape: inp.shape.clone(),
                data,
            },
        ));
    }
    for o in &req.outputs {
        if let Some(r) = shm_ref(&o.name, &o.parameters)? {
            if o.parameters.contains_key("classification") {
                return Err(malformed(
                    "output can't set both 'shared_memory_region' and 'classification'",
                ));
            }
            refs.outputs.push((o.name.clone(), r));
        }
    }
    if let Some(o) = req.outputs.iter().find(|o| o.parameters.contains_key("classification")) {
        return Err(crate::json::unsupported_classification(&o.name));
    }
    let int = |k: &str| -> Result<Option<i64>, ApiError> {
        req.parameters
            .get(k)
            .map(|p| param_int(p).ok_or_else(|| malformed(format!("parameter '{k}' must be an integer"))))
            .transpose()
    };
    let (priority, timeout) = schedule_params(int("priority")?, int("timeout")?)?;
    let sequence = sequence_params(&req.parameters)?;
    // The tighter of the in-band timeout and the transport deadline wins.
    let timeout = match (timeout, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let parts = RequestParts {
        id: req.id,
        inputs,
        outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        priority,
        timeout,
        sequence,
    };
    Ok((parts, refs))
}

pub fn response_proto(model: &str, resp: InferResponse, placed: &Placed) -> pb::ModelInferResponse {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for (name, t) in resp.outputs {
        let mut parameters = HashMap::new();
        match placed.get(&name) {
            // The data is in the region; an empty entry keeps raw contents aligned
            // with outputs, as Triton does.
            Some(p) => {
                raw.push(Vec::new());
                let param = |c| InferParameter {
                    parameter_choice: Some(c),
                };
                parameters.insert(
                    "shared_memory_region".to_string(),
                    param(ParameterChoice::StringParam(p.region.clone())),
                );
                for (k, v) in [
                    ("shared_memory_offset", p.offset),
                    ("shared_memory_byte_size", p.byte_size),
                ] {
                    let v = i64::try_from(v).unwrap_or(i64::MAX);
                    parameters.insert(k.to_string(), param(ParameterChoice::Int64Param(v)));
                }
            }
            None => raw.push(t.to_wire_bytes().to_vec()),
        }
        outputs.push(InferOutputTensor {
            name,
            datatype: t.dtype.as_str().to_string(),
            shape: t.shape,
            parameters,
            contents: None,
        });
    }
    pb::ModelInferResponse {
        model_name: model.to_string(),
        model_version: resp.version.to_string(),
        id: resp.id,
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    }
}

impl InferenceService {
    async fn infer_one(
        &self,
        req: pb::ModelInferRequest,
        deadline: Option<Duration>,
    ) -> Result<pb::ModelInferResponse, ApiError> {
        let state = &self.state;
        if !state.is_ready() {
            return Err(ApiError::NotReady);
        }
        let model = req.model_name.clone();
        let version = req.model_version.clone();
        let (mut parts, refs) = request_parts(req, deadline)?;
        let targets = state.shm.prepare(&model, &mut parts, refs, state.cfg.max_body_bytes)?;
        let resp = state.repo.infer(&model, &version, parts).await?;
        let placed = targets.write(&resp.outputs)?;
        let size = resp
            .outputs
            .iter()
            .map(|(n, t)| {
                let data = match placed.get(n) {
                    Some(p) => 128 + p.region.len(),
                    None => t.wire_len(),
                };
                (64 + n.len() + 11 * t.shape.len()).saturating_add(data)
            })
            .fold(256 + resp.id.len(), usize::saturating_add);
        if size > state.cfg.max_response_bytes {
            return Err(ApiError::ResponseTooLarge {
                size,
                limit: state.cfg.max_response_bytes,
            });
        }
        Ok(response_proto(&model, resp, &placed))
    }
}

fn tensor_meta(
    cfg: &lattice_inference::config::ModelConfig,
    ts: &[lattice_inference::config::TensorConfig],
) -> Vec<pb::model_metadata_response::TensorMetadata> {
    ts.iter()
        .map(|t| pb::model_metadata_response::TensorMetadata {
            name: t.name.clone(),
            datatype: t.dtype().as_str().to_string(),
            shape: cfg.wire_shape(t),
        })
        .collect()
}

fn duration(d: &lattice_inference::stats::Duration2) -> Option<pb::StatisticDuration> {
    Some(pb::StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

fn stats_proto(name: &str, version: i64, s: &lattice_inference::stats::Snapshot) -> pb::ModelStatistics {
    pb::ModelStatistics {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(pb::InferStatistics {
            success: duration(&s.success),
            fail: duration(&s.fail),
            queue: duration(&s.queue),
            compute_input: duration(&s.compute_input),
            compute_infer: duration(&s.compute_infer),
            compute_output: duration(&s.compute_output),
        }),
        batch_stats: s
            .batches
            .iter()
            .map(|(size, b)| pb::InferBatchStatistics {
                batch_size: *size,
                compute_input: duration(&b.compute_input),
                compute_infer: duration(&b.compute_infer),
                compute_output: duration(&b.compute_output),
            })
            .collect(),
    }
}

fn config_proto(cfg: &lattice_inference::config::ModelConfig) -> pb::ModelConfig {
    use lattice_inference::config::VersionPolicy;
    use pb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let dt = |t: &lattice_inference::config::TensorConfig| -> i32 {
        pb::DataType::from_str_name(&t.dtype().config_name()).unwrap_or(pb::DataType::TypeInvalid) as i32
    };
    pb::ModelConfig {
        name: cfg.name.clone(),
        platform: cfg.platform.clone(),
        backend: "onnxruntime".into(),
        max_batch_size: cfg.max_batch_size as i32,
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(match &cfg.version_policy {
                VersionPolicy::Latest { num_versions } => PolicyChoice::Latest(Latest {
                    num_versions: *num_versions as u32,
                }),
                VersionPolicy::All {} => PolicyChoice::All(All {}),
                VersionPolicy::Specific { versions } => PolicyChoice::Specific(Specific {
                    versions: versions.clone(),
                }),
            }),
        }),
        input: cfg
            .input
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: dt(t),
                dims: t.dims.clone(),
                optional: t.optional,
            })
            .collect(),
        output: cfg
            .output
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: dt(t),
                dims: t.dims.clone(),
                label_filename: String::new(),
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: format!("{}_0", cfg.name),
            count: cfg.instance_group.count as i32,
            kind: pb::model_instance_group::Kind::Cpu as i32,
        }],
        default_model_filename: "model.onnx".into(),
        dynamic_batching: cfg.dynamic_batching.as_ref().map(|db| pb::ModelDynamicBatching {
            preferred_batch_size: db.preferred_batch_size.iter().map(|&b| b as i32).collect(),
            max_queue_delay_microseconds: db.max_queue_delay_microseconds,
            preserve_ordering: false,
            priority_levels: lattice_inference::scheduler::PRIORITY_LEVELS as u64,
            default_priority_level: lattice_inference::scheduler::DEFAULT_PRIORITY as u64,
            default_queue_policy: Some(pb::ModelQueuePolicy {
                timeout_action: 0,
                default_timeout_microseconds: db.default_timeout_microseconds,
                allow_timeout_override: true,
                max_queue_size: db.max_queue_size as u32,
            }),
        }),
    }
}

type InferStream = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(&self, r: Request<pb::ModelReadyRequest>) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let ready = self.state.is_ready() && self.state.repo.version(&r.name, &r.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: crate::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: crate::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let repo = &self.state.repo;
        let mv = repo.version(&r.name, &r.version).map_err(ApiError::from)?;
        let m = repo.model(&r.name).map_err(ApiError::from)?;
        let versions = if r.version.is_empty() {
            m.versions.keys().map(|v| v.to_string()).collect()
        } else {
            vec![mv.version.to_string()]
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.config.name.clone(),
            versions,
            platform: m.config.platform.clone(),
            inputs: tensor_meta(&m.config, &m.config.input),
            outputs: tensor_meta(&m.config, &m.config.output),
        }))
    }

    async fn model_infer(&self, r: Request<pb::ModelInferRequest>) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.state.scaling.arrival();
        let deadline = grpc_timeout(r.metadata());
        let ctx = r.extensions().get::<crate::gateway::RequestContext>().cloned();
        let mut req = r.into_inner();
        req.model_version = self
            .state
            .gateway
            .route_version(&req.model_name, &req.model_version, ctx.as_ref());
        let resp = self.infer_one(req, deadline).await?;
        if let Some(c) = &ctx {
            c.note_model(&resp.model_name, &resp.model_version);
        }
        Ok(Response::new(resp))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        r: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        let tenant_name = tenant(r.metadata()).map(str::to_string);
        // The stream's caller and tag route every request on it, as a unary call's do.
        let ctx = r.extensions().get::<crate::gateway::RequestContext>().cloned();
        let incoming = r.into_inner();
        let out = incoming
            // A stream ends cleanly when the server starts draining.
            .take_until(shutdown.cancelled_owned())
            .map(move |msg| {
                let svc = InferenceService { state: state.clone() };
                let tenant_name = tenant_name.clone();
                let ctx = ctx.clone();
                async move {
                    let mut req = match msg {
                        Ok(req) => req,
                        Err(status) => return Err(status),
                    };
                    req.model_version =
                        svc.state
                            .gateway
                            .route_version(&req.model_name, &req.model_version, ctx.as_ref());
                    let id = req.id.clone();
                    let model = req.model_name.clone();
                    let version = req.model_version.clone();
                    svc.state.scaling.arrival();
                    let admitted = svc.state.admit(tenant_name.as_deref());
                    let answer = match admitted {
                        Ok(()) => svc.infer_one(req, None).await,
                        Err(e) => Err(e),
                    };
                    Ok(match answer {
                        Ok(resp) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(resp),
                        },
                        // Errors are in-band so one bad request does not end the stream;
                        // the id lets the client match it.
                        Err(e) => pb::ModelStreamInferResponse {
                            error_message: e.message(),
                            infer_response: Some(pb::ModelInferResponse {
                                model_name: model,
                                model_version: version,
                                id,
                                ..Default::default()
                            }),
                        },
                    })
                }
            })
            .buffered(STREAM_CONCURRENCY);
        Ok(Response::new(Box::pin(out)))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = r.into_inner();
        self.state.repo.version(&r.name, &r.version).map_err(ApiError::from)?;
        let m = self.state.repo.model(&r.name).map_err(ApiError::from)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config_proto(&m.config)),
        }))
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = r.into_inner();
        let repo = &self.state.repo;
        lattice_inference::error::parse_requested_version(&r.version).map_err(ApiError::from)?;
        let models = if r.name.is_empty() {
            repo.loaded()
        } else {
            vec![repo.model(&r.name).map_err(ApiError::from)?]
        };
        let mut model_stats = Vec::new();
        for m in models {
            for v in m.versions.values() {
                if r.version.is_empty() || r.version == v.version.to_string() {
                    model_stats.push(stats_proto(&v.name, v.version, &v.scheduler.runtime().stats.snapshot()));
                }
            }
        }
        if !r.name.is_empty() && !r.version.is_empty() && model_stats.is_empty() {
            return Err(ApiError::from(lattice_inference::InferError::VersionNotFound {
                name: r.name,
                version: r.version,
            })
            .into());
        }
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        r: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = self
            .state
            .repo
            .index(r.into_inner().ready)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state,
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        r: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let r = r.into_inner();
        let params = crate::load_params::from_grpc(r.parameters, self.state.cfg.max_body_bytes)?;
        crate::load_params::load(&self.state.repo, &r.model_name, params).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        r: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.state
            .repo
            .unload(&r.into_inner().model_name)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        r: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        let name = r.into_inner().name;
        let regions = self
            .state
            .shm
            .status((!name.is_empty()).then_some(name.as_str()))
            .map_err(ApiError::from)?
            .into_iter()
            .map(|s| {
                (
                    s.name.clone(),
                    pb::system_shared_memory_status_response::RegionStatus {
                        name: s.name,
                        key: s.key,
                        offset: s.offset,
                        byte_size: s.byte_size,
                    },
                )
            })
            .collect();
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse { regions }))
    }

    async fn system_shared_memory_register(
        &self,
        r: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let r = r.into_inner();
        self.state
            .shm
            .register(&r.name, &r.key, r.offset, r.byte_size)
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        r: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let name = r.into_inner().name;
        self.state
            .shm
            .unregister((!name.is_empty()).then_some(name.as_str()))
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::SystemSharedMemoryUnregisterResponse {}))
    }

    // CUDA shared memory needs a GPU (see `crate::http`): register is UNIMPLEMENTED,
    // status lists nothing, unregister has nothing to do.

    async fn cuda_shared_memory_status(
        &self,
        r: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        let name = r.into_inner().name;
        self.state
            .shm
            .cuda_status((!name.is_empty()).then_some(name.as_str()))
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CudaSharedMemoryStatusResponse::default()))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(ApiError::from(crate::shm::ShmError::CudaUnsupported).into())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        Ok(Response::new(pb::CudaSharedMemoryUnregisterResponse {}))
    }
}

fn tenant(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    md.get(crate::limit::TENANT_HEADER).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_units() {
        let mut md = MetadataMap::new();
        for (v, want) in [
            ("100m", Some(Duration::from_millis(100))),
            ("5S", Some(Duration::from_secs(5))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("250u", Some(Duration::from_micros(250))),
            ("7n", Some(Duration::from_nanos(7))),
            ("5x", None),
            ("m", None),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), want, "{v}");
        }
    }

    #[test]
    fn tighter_of_timeout_parameter_and_deadline_wins() {
        let mut req = pb::ModelInferRequest::default();
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(5_000_000)),
            },
        );
        let (parts, _) = request_parts(req.clone(), Some(Duration::from_millis(20)))
            .ok()
            .unwrap();
        assert_eq!(parts.timeout, Some(Duration::from_millis(20)));
        let (parts, _) = request_parts(req, None).ok().unwrap();
        assert_eq!(parts.timeout, Some(Duration::from_secs(5)));
    }
}
