//! The model repository: `<root>/<model>/config.toml` and `<root>/<model>/<version>/model.onnx`.
//!
//! Architecture Invariant: a model's served versions are replaced as one `Arc` under a
//! write lock, after the new versions are fully loaded and warmed. Requests that
//! already hold the old `Arc<ModelVersion>` finish on it; when the last one drops, its
//! scheduler closes and its instance threads release the engine sessions. A failed
//! load changes nothing that is serving.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lattice_observability::Metrics;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tracing::Instrument;

use crate::{
    backend::{
        onnx::{OnnxBackend, SessionOptions},
        Backend,
    },
    config::{self, ModelConfig},
    error::InferError,
    model_metrics::{ErrorType, InFlight, ModelLabels, ModelMetrics},
    pipeline::TextPipeline,
    scheduler::{InferRequest, InferResponse, ModelRuntime, Scheduler, DEFAULT_PRIORITY, PRIORITY_LEVELS},
    stats::Stats,
    tensor::{element_count, DataType, Tensor, TensorData},
};

#[derive(Clone, Debug)]
pub struct RepositoryOptions {
    pub root: PathBuf,
    pub ort_library: PathBuf,
}

/// One served version of a model.
pub struct ModelVersion {
    pub name: String,
    pub version: i64,
    pub scheduler: Scheduler,
    /// Live sequences, for a model with `[sequence_batching]`.
    pub sequences: Option<crate::sequence::SequenceStore>,
    /// Tells this loaded instance apart from a reload of the same version.
    id: u64,
}

impl ModelVersion {
    pub fn labels(&self) -> &ModelLabels {
        self.scheduler.runtime().recorder.labels()
    }
}

impl Drop for ModelVersion {
    fn drop(&mut self) {
        self.scheduler.close();
        self.scheduler
            .runtime()
            .recorder
            .set()
            .forget_model(self.labels(), self.id);
    }
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The versions of a model that are loaded together, swapped as a unit.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Ascending; the last entry is the default version.
    pub versions: BTreeMap<i64, Arc<ModelVersion>>,
    /// Drift reference values by feature, from the config's reference file.
    drift_reference: HashMap<String, Vec<f64>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
}

/// Request parameters the edge extracted, before validation.
pub struct RequestParts {
    pub id: String,
    pub inputs: Vec<(String, Tensor)>,
    /// Requested outputs; empty means all of them.
    pub outputs: Vec<String>,
    pub priority: Option<u8>,
    pub timeout: Option<Duration>,
    /// `sequence_id` / `sequence_start` / `sequence_end`; ignored by models without
    /// `[sequence_batching]`, as Triton ignores them.
    pub sequence: Option<crate::sequence::SequenceControl>,
}

struct Inner {
    root: PathBuf,
    metrics: Arc<Metrics>,
    /// The inference plane's metric set, registered in `metrics`.
    model_metrics: Arc<ModelMetrics>,
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// Why the last load of a model failed, for the repository index.
    failures: Mutex<HashMap<String, String>>,
    /// One load or unload at a time: loads are CPU-heavy and must not race a swap.
    admin: tokio::sync::Mutex<()>,
}

/// Cheap-to-clone handle to the repository.
#[derive(Clone)]
pub struct ModelRepository {
    inner: Arc<Inner>,
}

impl ModelRepository {
    /// Loads the ONNX Runtime library and checks the repository directory.
    pub fn open(opts: &RepositoryOptions, metrics: Arc<Metrics>) -> Result<ModelRepository, String> {
        if !opts.root.is_dir() {
            return Err(format!("model repository {} is not a directory", opts.root.display()));
        }
        crate::backend::onnx::init(&opts.ort_library)?;
        Ok(ModelRepository {
            inner: Arc::new(Inner {
                root: opts.root.clone(),
                model_metrics: metrics.set::<ModelMetrics>(),
                metrics,
                models: RwLock::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
                admin: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Model directories present in the repository (loaded or not).
    pub fn available(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.inner.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("config.toml").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Loads or reloads a model; on failure the previously served versions stay.
    pub async fn load(&self, name: &str) -> Result<(), InferError> {
        self.load_with(name, None).await
    }

    /// [`load`](Self::load) with a load request's `config` parameter (Triton's JSON
    /// field names) applied over the model's `config.toml`; a later load without
    /// one goes back to the file. A malformed override is the caller's mistake
    /// (`InvalidInput`) and changes nothing.
    pub async fn load_with(&self, name: &str, config_override: Option<&str>) -> Result<(), InferError> {
        let _admin = self.inner.admin.lock().await;
        if !is_safe_name(name) || !self.inner.root.join(name).join("config.toml").is_file() {
            return Err(InferError::LoadFailed {
                name: name.to_string(),
                reason: "failed to poll from model repository: it has no such model (no <name>/config.toml)".into(),
            });
        }
        let dir = self.inner.root.join(name);
        let cfg = match config_override {
            None => None,
            Some(text) => {
                let mut base = config::load(&dir).map_err(|reason| InferError::LoadFailed {
                    name: name.to_string(),
                    reason,
                })?;
                base.name = name.to_string();
                Some(crate::config_override::apply(&base, text).map_err(|e| InferError::InvalidInput(e.to_string()))?)
            }
        };
        self.install(name, Source::Dir(dir), cfg).await
    }

    /// Loads a model from model bytes given in the load request (Triton's
    /// `file:<version>/model.onnx` parameters), with `config_json` (required, as
    /// Triton requires it) as its whole configuration: the repository directory is
    /// not read, and only the versions given exist. The bytes are loaded from
    /// memory; nothing is written to disk. Every failure is the caller's to fix
    /// (`InvalidInput`) and changes nothing that is serving.
    pub async fn load_from_bytes(
        &self,
        name: &str,
        config_json: Option<&str>,
        files: BTreeMap<i64, Bytes>,
    ) -> Result<(), InferError> {
        let _admin = self.inner.admin.lock().await;
        let poll_failed = |why: &str| {
            InferError::InvalidInput(format!(
                "failed to load '{}', failed to poll from model repository: {why}",
                echo(name)
            ))
        };
        if !is_safe_name(name) {
            return Err(poll_failed("invalid model name"));
        }
        let Some(text) = config_json else {
            return Err(poll_failed(
                "load parameter 'config' must be specified for model file override",
            ));
        };
        if files.is_empty() {
            return Err(poll_failed("no model file given"));
        }
        let cfg = crate::config_override::apply(&blank_config(name), text)
            .map_err(|e| InferError::InvalidInput(e.to_string()))?;
        if cfg.input.is_empty() || cfg.output.is_empty() {
            return Err(InferError::InvalidInput(format!(
                "invalid config override: a model loaded from file parameters needs 'input' and 'output' in 'config' (model '{}')",
                echo(name)
            )));
        }
        let versions: Vec<i64> = files.keys().copied().collect();
        match self.install(name, Source::Bytes(files), Some(cfg)).await {
            // The bytes are the caller's: a model that does not parse or does not
            // match its config is their mistake, in Triton's wording.
            Err(InferError::LoadFailed { reason, .. }) => Err(InferError::InvalidInput(format!(
                "load failed for model '{}': version {} is at UNAVAILABLE state: {reason};",
                echo(name),
                versions.first().copied().unwrap_or(1)
            ))),
            other => other,
        }
    }

    /// Builds, warms and swaps in a model; on failure records why and changes
    /// nothing that is serving. The caller holds the admin lock.
    async fn install(&self, name: &str, src: Source, cfg: Option<ModelConfig>) -> Result<(), InferError> {
        let model_name = name.to_string();
        let metrics = self.inner.model_metrics.clone();
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || load_model(&src, &model_name, metrics, cfg))
            .await
            .map_err(|e| InferError::LoadFailed {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        match loaded {
            Ok(model) => {
                let model = Arc::new(model);
                warm_up(&model).await;
                // Cold start: sessions built and the warm-up answered.
                for v in model.versions.values() {
                    v.scheduler
                        .runtime()
                        .recorder
                        .load_duration
                        .observe(started.elapsed().as_secs_f64());
                    track(&model, v, &self.inner.model_metrics);
                }
                self.inner.models.write().insert(name.to_string(), model);
                self.inner.failures.lock().remove(name);
                // Parsing and optimising a graph frees far more heap than the
                // session keeps (the model proto, the unfolded initializers, the
                // optimiser's copies): glibc holds those pages until trimmed. On the
                // bundled repository this returns ~60 MB of idle RSS.
                let _ = tokio::task::spawn_blocking(crate::scheduler::trim_heap).await;
                tracing::info!(model = name, "model loaded");
                Ok(())
            }
            Err(reason) => {
                let _ = tokio::task::spawn_blocking(crate::scheduler::trim_heap).await;
                tracing::warn!(model = name, %reason, "model load failed");
                self.inner.failures.lock().insert(name.to_string(), reason.clone());
                Err(InferError::LoadFailed {
                    name: name.to_string(),
                    reason,
                })
            }
        }
    }

    /// Stops serving a model. Queued and running requests finish first; the engine
    /// sessions are released when the last of them completes.
    pub async fn unload(&self, name: &str) -> Result<(), InferError> {
        let _admin = self.inner.admin.lock().await;
        match self.inner.models.write().remove(name) {
            Some(_) => {
                tracing::info!(model = name, "model unloaded");
                Ok(())
            }
            None => Err(InferError::ModelNotFound(name.to_string())),
        }
    }

    /// Loads every model in the repository; returns the failures.
    pub async fn load_all(&self) -> Vec<InferError> {
        self.load_all_sharded(0, 1).await
    }

    /// Loads every model, replica `index` of `count` starting with its own shard
    /// (the models at positions `index`, `index + count`, ...): when a fleet starts
    /// together, each model becomes ready somewhere first instead of everywhere last.
    pub async fn load_all_sharded(&self, index: usize, count: usize) -> Vec<InferError> {
        let mut errors = Vec::new();
        for name in shard_order(self.available(), index, count) {
            if let Err(e) = self.load(&name).await {
                errors.push(e);
            }
        }
        errors
    }

    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>, InferError> {
        self.inner
            .models
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| InferError::ModelNotFound(name.to_string()))
    }

    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let mut v: Vec<_> = self.inner.models.read().values().cloned().collect();
        v.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        v
    }

    /// A served version; an empty `version` means the highest served one.
    pub fn version(&self, name: &str, version: &str) -> Result<Arc<ModelVersion>, InferError> {
        let model = self.model(name)?;
        let found = match crate::error::parse_requested_version(version)? {
            None => model.versions.values().next_back(),
            Some(v) => model.versions.get(&v),
        };
        found.cloned().ok_or_else(|| InferError::VersionNotFound {
            name: name.to_string(),
            version: version.to_string(),
        })
    }

    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let models = self.inner.models.read();
        let failures = self.inner.failures.lock();
        let mut out = Vec::new();
        // Models loaded from request bytes have no directory but are served.
        let mut names = self.available();
        names.extend(
            models
                .keys()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect::<Vec<_>>(),
        );
        names.sort();
        for name in names {
            if let Some(m) = models.get(&name) {
                for v in m.versions.keys() {
                    out.push(IndexEntry {
                        name: name.clone(),
                        version: v.to_string(),
                        state: "READY".into(),
                        reason: String::new(),
                    });
                }
            } else if !ready_only {
                out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: failures.get(&name).cloned().unwrap_or_else(|| "unloaded".into()),
                });
            }
        }
        out
    }

    /// Demand and capacity for autoscaling, over every served version of `model` (or
    /// of all models): demand is requests queued or computing; capacity is how many
    /// the instances compute at once (instances x the largest dynamic batch).
    pub fn load_signals(&self, model: Option<&str>) -> (usize, usize) {
        let models = self.inner.models.read();
        let mut demand = 0;
        let mut capacity = 0;
        for (name, m) in models.iter() {
            if model.is_some_and(|want| want != name) {
                continue;
            }
            let cfg = &m.config;
            let batch = cfg.dynamic_batch_cap();
            for v in m.versions.values() {
                demand += v.scheduler.pending() + v.scheduler.in_flight();
                capacity += cfg.instance_group.count * batch;
            }
        }
        (demand, capacity)
    }

    /// Engine instances over all served versions.
    pub fn instance_count(&self) -> usize {
        self.inner
            .models
            .read()
            .values()
            .map(|m| m.config.instance_group.count * m.versions.len())
            .sum()
    }

    /// Requests being computed, over all served versions.
    pub fn in_flight(&self) -> usize {
        let models = self.inner.models.read();
        models
            .values()
            .flat_map(|m| m.versions.values())
            .map(|v| v.scheduler.in_flight())
            .sum()
    }

    /// The process's metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The inference plane's metric set.
    pub fn model_metrics(&self) -> &Arc<ModelMetrics> {
        &self.inner.model_metrics
    }

    /// Validates and runs one request, and records it in the metrics.
    pub async fn infer(&self, name: &str, version: &str, parts: RequestParts) -> Result<InferResponse, InferError> {
        let mv = self.version(name, version)?;
        let rec = &mv.scheduler.runtime().recorder;
        if !rec.enabled() {
            return self.infer_on(&mv, parts).await;
        }
        let started = Instant::now();
        let _concurrent = InFlightGauge::new(&rec.concurrent);
        // The core's own span: a child of the edge's request span, so a trace shows
        // where the time went between protocol handling and the model.
        let span = if lattice_observability::telemetry::spans_enabled() {
            tracing::info_span!("inference", model_name = %name, model_version = mv.version)
        } else {
            tracing::Span::none()
        };
        let result = self.infer_on(&mv, parts).instrument(span).await;
        let (confidence, error) = match &result {
            Ok(r) => (r.confidence, ErrorType::None),
            Err(e) => (None, e.error_type()),
        };
        rec.observe_inference(
            started.elapsed(),
            confidence,
            error,
            lattice_observability::telemetry::current_trace_id(),
        );
        result
    }

    async fn infer_on(&self, mv: &Arc<ModelVersion>, mut parts: RequestParts) -> Result<InferResponse, InferError> {
        // A sequence's request waits here for the one before it, then carries its state.
        let sequence = match (&mv.sequences, parts.sequence.take()) {
            (Some(store), Some(ctrl)) => Some(store.acquire(ctrl, &mut parts.inputs, &mut parts.outputs).await?),
            _ => None,
        };
        let mut resp = self.run(mv, parts).await?;
        if let Some(seq) = sequence {
            seq.commit(&mut resp.outputs)?;
        }
        Ok(resp)
    }

    async fn run(&self, mv: &Arc<ModelVersion>, parts: RequestParts) -> Result<InferResponse, InferError> {
        let rt = mv.scheduler.runtime().clone();
        let mut req = prepare(&rt.config, rt.text.as_deref(), parts)?;
        if let Some(drift) = rt.config.drift.as_ref().filter(|_| rt.recorder.enabled()) {
            for item in crate::quality::item_features(drift, &req.inputs, rt.config.max_batch_size > 0) {
                rt.recorder.observe_features(&item);
            }
        }
        let deadline = req.deadline;
        mv.scheduler.check_room()?;
        let tokenized = tokenize(rt.text.as_ref(), &mut req);
        match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), tokenized)
                .await
                .map_err(|_| InferError::DeadlineExceeded)??,
            None => tokenized.await?,
        }
        let rx = mv.scheduler.submit(req)?;
        let reply = match deadline {
            // Answer at the deadline even if the request is still queued; dropping
            // the receiver makes the scheduler skip it.
            Some(d) => tokio::time::timeout_at(d.into(), rx)
                .await
                .map_err(|_| InferError::DeadlineExceeded)?,
            None => rx.await,
        };
        let mut resp = reply.map_err(|_| InferError::Backend("model instance stopped before answering".into()))??;
        resp.version = mv.version;
        // `mv` lived until here: a version outlives the requests queued on it.
        Ok(resp)
    }
}

/// Holds a model version's in-flight gauge up for as long as a request is being
/// served: a request cancelled by its client (its future dropped) or one that
/// unwinds gives it back too. The autoscaler reads this gauge.
struct InFlightGauge<'a>(&'a InFlight);

impl<'a> InFlightGauge<'a> {
    fn new(g: &'a InFlight) -> Self {
        g.inc();
        InFlightGauge(g)
    }
}

impl Drop for InFlightGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Replaces a request's text with token tensors, tokenized on the bounded pool.
async fn tokenize(text: Option<&Arc<TextPipeline>>, req: &mut InferRequest) -> Result<(), InferError> {
    let Some(text) = text else { return Ok(()) };
    let Some(pos) = req.inputs.iter().position(|(n, _)| n == text.input_name()) else {
        return Ok(());
    };
    let (_, t) = req.inputs.remove(pos);
    let TensorData::Strings(items) = t.data else {
        return Err(InferError::InvalidInput(format!(
            "input '{}' must be BYTES",
            text.input_name()
        )));
    };
    req.inputs.extend(text.tokenize(items).await?);
    Ok(())
}

/// `names` with replica `index`'s shard first, each part in its original order.
pub fn shard_order(names: Vec<String>, index: usize, count: usize) -> Vec<String> {
    let count = count.max(1);
    let (mine, rest): (Vec<_>, Vec<_>) = names
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % count == index % count);
    mine.into_iter().chain(rest).map(|(_, n)| n).collect()
}

/// A name from a request as it is echoed in an error: at most 128 characters, so a
/// long made-up name cannot inflate error bodies or gRPC status headers.
pub fn echo(name: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 128;
    match name.char_indices().nth(MAX) {
        None => name.into(),
        Some((cut, _)) => format!("{}...", &name[..cut]).into(),
    }
}

fn is_safe_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".."
}

/// Builds a request from edge parts, checking it against the model config.
pub fn prepare(
    cfg: &ModelConfig,
    text: Option<&TextPipeline>,
    parts: RequestParts,
) -> Result<InferRequest, InferError> {
    let invalid = |m: String| Err(InferError::InvalidInput(m));
    let text_input = text.map(|t| t.input_name());
    let batching = cfg.max_batch_size > 0;
    let mut inputs = parts.inputs;
    // Bounded before any per-input work: a request cannot name more inputs or
    // outputs than the model has without repeating one.
    if inputs.len() > cfg.input.len() {
        return invalid(format!(
            "{} inputs given, model '{}' has {}: an input is repeated or unknown",
            inputs.len(),
            echo(&cfg.name),
            cfg.input.len()
        ));
    }
    let mut batch: Option<i64> = None;
    for (name, t) in &inputs {
        let Some(decl) = cfg.input_by_name(name) else {
            let names: Vec<&str> = cfg.input.iter().map(|i| i.name.as_str()).collect();
            return invalid(format!(
                "unexpected input '{name}' for model '{}', expected one of {names:?}",
                cfg.name
            ));
        };
        if inputs.iter().filter(|(n, _)| n == name).count() > 1 {
            return invalid(format!("input '{name}' is given more than once"));
        }
        if t.dtype != decl.dtype() {
            return invalid(format!(
                "input '{name}' has datatype {}, model '{}' expects {}",
                t.dtype,
                cfg.name,
                decl.dtype()
            ));
        }
        t.check_consistent()
            .map_err(|m| InferError::InvalidInput(format!("input '{name}': {m}")))?;
        if t.shape.contains(&0) {
            return invalid(format!("input '{name}' has an empty dimension in shape {:?}", t.shape));
        }
        if let Some(allowed) = &decl.allowed_values {
            if let Some(bad) = t
                .to_i64_vec()
                .and_then(|v| v.into_iter().find(|x| !allowed.contains(x)))
            {
                return invalid(format!("input '{name}' must be one of {allowed:?}, got {bad}"));
            }
        }
        let is_text = Some(name.as_str()) == text_input;
        let expected = cfg.wire_shape(decl);
        let shape_ok = if is_text {
            // Text is one string per item: [n] or [n, 1].
            matches!(t.shape.as_slice(), [_] | [_, 1])
        } else {
            t.shape.len() == expected.len()
                && t.shape
                    .iter()
                    .zip(&expected)
                    .enumerate()
                    .all(|(i, (&got, &want))| (batching && i == 0) || want == -1 || got == want)
        };
        if !shape_ok {
            return invalid(format!(
                "input '{name}' has shape {:?}, model '{}' expects {expected:?}",
                t.shape, cfg.name
            ));
        }
        if batching {
            let n = t.shape[0];
            if n < 1 {
                return invalid(format!("input '{name}' has an empty batch dimension"));
            }
            if n as usize > cfg.max_batch_size {
                return Err(InferError::BatchTooLarge {
                    got: n as usize,
                    max: cfg.max_batch_size,
                });
            }
            match batch {
                Some(b) if b != n => {
                    return invalid(format!("inputs disagree on the batch size ({b} vs {n} for '{name}')"))
                }
                _ => batch = Some(n),
            }
        }
    }
    let has = |inputs: &[(String, Tensor)], n: &str| inputs.iter().any(|(x, _)| x == n);
    if let Some(text) = text_input {
        if has(&inputs, text) && inputs.len() > 1 {
            return invalid(format!(
                "input '{text}' (raw text) cannot be combined with token tensors"
            ));
        }
    }
    let text_given = text_input.is_some_and(|t| has(&inputs, t));
    // Checked per request: a bad item found only when its batch runs would fail
    // every request batched with it.
    if let Some(text) = text {
        text.check(&inputs).map_err(InferError::InvalidInput)?;
    }
    if !text_given {
        // Fill defaulted inputs, then require every non-optional one.
        if let Some((_, first)) = inputs.first() {
            let like = first.shape.clone();
            let fills: Vec<_> = cfg
                .input
                .iter()
                .filter(|i| i.zeros_if_absent && !has(&inputs, &i.name))
                .map(|i| {
                    let bytes = element_count(&like)
                        .and_then(|n| n.checked_mul(i.dtype().size().unwrap_or(1)))
                        .ok_or_else(|| InferError::InvalidInput(format!("shape {like:?} is too large")))?;
                    Ok((
                        i.name.clone(),
                        Tensor::raw(i.dtype(), like.clone(), Bytes::from(vec![0u8; bytes])),
                    ))
                })
                .collect::<Result<_, InferError>>()?;
            inputs.extend(fills);
        }
        let missing: Vec<&str> = cfg
            .input
            .iter()
            .filter(|i| !i.optional && !has(&inputs, &i.name))
            .map(|i| i.name.as_str())
            .collect();
        if !missing.is_empty() || inputs.is_empty() {
            return invalid(format!("model '{}' is missing inputs {missing:?}", cfg.name));
        }
    }
    let outputs = if parts.outputs.is_empty() {
        cfg.output.iter().map(|o| o.name.clone()).collect()
    } else {
        // Each output is written once per request: a repeated name would multiply
        // the response (and its memory) by the number of repeats.
        for (i, o) in parts.outputs.iter().enumerate() {
            if cfg.output_by_name(o).is_none() {
                return invalid(format!("unknown output '{}' for model '{}'", echo(o), cfg.name));
            }
            if parts.outputs[..i].contains(o) {
                return invalid(format!("output '{o}' is requested more than once"));
            }
        }
        parts.outputs
    };
    let priority = parts.priority.unwrap_or(DEFAULT_PRIORITY);
    if usize::from(priority) >= PRIORITY_LEVELS {
        return invalid(format!(
            "priority {priority} is out of range 0..={}",
            PRIORITY_LEVELS - 1
        ));
    }
    let timeout = parts.timeout.or_else(|| {
        let us = cfg.queue().default_timeout_microseconds;
        (us > 0).then(|| Duration::from_micros(us))
    });
    Ok(InferRequest {
        id: parts.id,
        inputs,
        outputs,
        priority,
        // A deadline too far to represent is no deadline.
        deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
    })
}

/// Where a model's files come from.
enum Source {
    /// `<repository>/<model>/`.
    Dir(PathBuf),
    /// `model.onnx` bytes by version, from a load request; no directory at all.
    Bytes(BTreeMap<i64, Bytes>),
}

/// The config a model loaded from bytes starts from: nothing but its name, so the
/// request's `config` is the whole configuration (Triton's override mode).
fn blank_config(name: &str) -> ModelConfig {
    let mut c: ModelConfig = toml::from_str("input = []\noutput = []").expect("a blank config parses");
    c.name = name.to_string();
    c
}

/// Loads every selected version of a model, with all its instances, or nothing.
fn load_model(
    src: &Source,
    name: &str,
    metrics: Arc<ModelMetrics>,
    cfg: Option<ModelConfig>,
) -> Result<LoadedModel, String> {
    let mut cfg = match (cfg, src) {
        (Some(cfg), _) => cfg,
        (None, Source::Dir(dir)) => config::load(dir)?,
        (None, Source::Bytes(_)) => return Err("a model loaded from bytes needs a config".into()),
    };
    cfg.name = name.to_string();
    let available: Vec<i64> = match src {
        Source::Dir(dir) => std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .filter(|e| e.path().join("model.onnx").is_file())
            .filter_map(|e| config::parse_version(&e.file_name().to_string_lossy()))
            .collect(),
        Source::Bytes(files) => files.keys().copied().collect(),
    };
    let selected = cfg.version_policy.select(available);
    if selected.is_empty() {
        return Err(match src {
            Source::Dir(dir) => format!("no version directory with a model.onnx under {}", dir.display()),
            Source::Bytes(_) => "the version policy selects none of the versions given".into(),
        });
    }
    let text = match src {
        Source::Dir(dir) => cfg
            .text
            .as_ref()
            .map(|t| TextPipeline::load(dir, t).map(Arc::new))
            .transpose()?,
        Source::Bytes(_) => None,
    };
    let pooled = cfg.pooling.as_ref().map(|p| p.output.clone());
    let mut engine_outputs: Vec<String> = cfg
        .output
        .iter()
        .map(|o| o.name.clone())
        .filter(|o| Some(o) != pooled.as_ref())
        .collect();
    if let Some(p) = &cfg.pooling {
        if !engine_outputs.contains(&p.source) {
            engine_outputs.push(p.source.clone());
        }
    }
    let text_inputs = text.as_ref().map(|t| t.input_name().to_string());
    let mut versions = BTreeMap::new();
    for v in selected {
        let backends = match src {
            Source::Dir(dir) => build_instances(&dir.join(v.to_string()).join("model.onnx"), &cfg)?,
            Source::Bytes(files) => {
                let model = files.get(&v).ok_or("selected version has no bytes")?;
                instances_from(model, &cfg).map_err(|e| format!("model.onnx of version {v}: {e}"))?
            }
        };
        check_signature(backends[0].as_ref(), &cfg, text_inputs.as_deref(), pooled.as_deref())?;
        let runtime = Arc::new(ModelRuntime {
            config: cfg.clone(),
            text: text.clone(),
            engine_outputs: engine_outputs.clone(),
            stats: Stats::default(),
            recorder: metrics.recorder(&ModelLabels {
                model_name: name.to_string(),
                model_version: v.to_string(),
            }),
        });
        versions.insert(
            v,
            Arc::new(ModelVersion {
                name: name.to_string(),
                version: v,
                sequences: cfg
                    .sequence_batching
                    .as_ref()
                    .map(|s| crate::sequence::SequenceStore::new(&cfg, s)),
                scheduler: Scheduler::start(runtime, backends),
                id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            }),
        );
    }
    // Read here, on the blocking load thread, not when the version starts serving.
    let dir = match src {
        Source::Dir(dir) => Some(dir),
        Source::Bytes(_) => None,
    };
    let drift_reference = cfg
        .drift
        .as_ref()
        .and_then(|d| d.reference_file.as_ref().zip(dir))
        .map(|(f, dir)| {
            let p = dir.join(f);
            std::fs::read(&p)
                .map_err(|e| format!("{}: {e}", p.display()))
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display())))
        })
        .transpose()?
        .unwrap_or_default();
    Ok(LoadedModel {
        config: cfg,
        versions,
        drift_reference,
    })
}

/// Registers a served version's queue depth and drift features with the metrics.
fn track(model: &LoadedModel, v: &ModelVersion, metrics: &ModelMetrics) {
    let cfg = &model.config;
    let scheduler = v.scheduler.clone();
    let pending: crate::model_metrics::GaugeSource = Box::new(move || scheduler.pending() as i64);
    let (features, reference_size, window) = match &cfg.drift {
        Some(d) => {
            let names = crate::quality::feature_names(cfg, d);
            let features = names
                .into_iter()
                .map(|n| {
                    let r = model.drift_reference.get(&n).cloned().unwrap_or_default();
                    (n, r)
                })
                .collect();
            (features, d.reference_size, d.window)
        }
        None => (Vec::new(), 1, 1),
    };
    metrics.track_model(
        &v.scheduler.runtime().recorder,
        v.id,
        pending,
        features,
        reference_size,
        window,
    );
}

/// Maps the model file once and builds every instance from the same mapping.
#[allow(unsafe_code)]
fn build_instances(path: &Path, cfg: &ModelConfig) -> Result<Vec<Box<dyn Backend>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: the mapping is read-only and lives only while the sessions are built;
    // the repository's files are not modified while a load of them runs.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))?;
    instances_from(&map, cfg).map_err(|e| format!("{}: {e}", path.display()))
}

fn instances_from(model: &[u8], cfg: &ModelConfig) -> Result<Vec<Box<dyn Backend>>, String> {
    let options = SessionOptions::new(cfg.instance_group.intra_op_threads, &cfg.engine);
    (0..cfg.instance_group.count)
        .map(|_| OnnxBackend::new(model, &options).map(|b| Box::new(b) as Box<dyn Backend>))
        .collect()
}

/// A config that disagrees with the model file is a load error, not a runtime one.
fn check_signature(b: &dyn Backend, cfg: &ModelConfig, text: Option<&str>, pooled: Option<&str>) -> Result<(), String> {
    let engine_in = b.inputs();
    for i in &cfg.input {
        if Some(i.name.as_str()) == text {
            continue;
        }
        match engine_in.iter().find(|(n, _)| *n == i.name) {
            None => return Err(format!("config input '{}' is not an input of the model", i.name)),
            Some((_, Some(d))) if *d != i.dtype() => {
                return Err(format!(
                    "config input '{}' is {}, the model says {d}",
                    i.name,
                    i.dtype()
                ))
            }
            _ => {}
        }
    }
    let engine_out = b.outputs();
    for o in &cfg.output {
        if Some(o.name.as_str()) == pooled {
            continue;
        }
        match engine_out.iter().find(|(n, _)| *n == o.name) {
            None => return Err(format!("config output '{}' is not an output of the model", o.name)),
            Some((_, Some(d))) if *d != o.dtype() => {
                return Err(format!(
                    "config output '{}' is {}, the model says {d}",
                    o.name,
                    o.dtype()
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs one request through each new version before it serves traffic, so the first
/// client does not pay for lazy engine initialisation. Failures are logged only: some
/// models reject all-zero input.
async fn warm_up(model: &LoadedModel) {
    let cfg = &model.config;
    let text = cfg.text.as_ref().map(|t| t.input.as_str());
    let inputs: Vec<(String, Tensor)> = match text {
        Some(t) => vec![(
            t.to_string(),
            Tensor::strings(vec![1], vec![Bytes::from_static(b"warm up")]),
        )],
        None => cfg
            .input
            .iter()
            .filter(|i| !i.optional)
            .map(|i| {
                let shape: Vec<i64> = cfg.wire_shape(i).into_iter().map(|d| d.max(1)).collect();
                let n = element_count(&shape).unwrap_or(0);
                let fill = i.warmup_fill.unwrap_or(0.0);
                let t = match i.dtype() {
                    DataType::Bytes => Tensor::strings(shape, vec![Bytes::new(); n]),
                    DataType::F32 => Tensor::from_f32(shape, &vec![fill as f32; n]),
                    DataType::I64 => Tensor::from_i64(shape, &vec![fill as i64; n]),
                    d => Tensor {
                        dtype: d,
                        shape,
                        data: TensorData::Raw(Bytes::from(vec![0u8; n * d.size().unwrap_or(1)])),
                    },
                };
                (i.name.clone(), t)
            })
            .collect(),
    };
    for v in model.versions.values() {
        let parts = RequestParts {
            id: crate::scheduler::WARM_UP_ID.into(),
            inputs: inputs.clone(),
            outputs: Vec::new(),
            priority: Some(0),
            timeout: None,
            sequence: None,
        };
        let pipeline = v.scheduler.runtime().text.as_deref();

        let result = async {
            let mut req = prepare(cfg, pipeline, parts)?;
            tokenize(v.scheduler.runtime().text.as_ref(), &mut req).await?;
            let rx = v.scheduler.submit(req)?;
            rx.await.unwrap_or(Err(InferError::Cancelled)).map(|_| ())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(model = %cfg.name, version = v.version, error = %e, "warm-up inference failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_replica_starts_with_its_own_shard() {
        let names: Vec<String> = ["a", "b", "c", "d", "e"].iter().map(|s| s.to_string()).collect();
        assert_eq!(super::shard_order(names.clone(), 0, 1), names);
        assert_eq!(super::shard_order(names.clone(), 1, 2), ["b", "d", "a", "c", "e"]);
        assert_eq!(super::shard_order(names.clone(), 2, 3), ["c", "a", "b", "d", "e"]);
        assert_eq!(super::shard_order(names, 7, 3), ["b", "e", "a", "c", "d"]);
    }
}
