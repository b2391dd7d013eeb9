//! The model repository: `<root>/<model>/config.toml` and `<root>/<model>/<version>/model.onnx`.
//! This module is the registry and its hot swap; loading is [`crate::loader`]
//! (engine instances through a [`BackendFactory`]), request validation
//! [`crate::validate`], and the warm-up before a version serves [`crate::warmup`].
//!
//! Architecture Invariant: a model's served versions are replaced as one `Arc` under a
//! write lock, after the new versions are fully loaded and warmed. Requests that
//! already hold the old `Arc<ModelVersion>` finish on it; when the last one drops, its
//! scheduler closes and its instance threads release the engine sessions. A failed
//! load changes nothing that is serving.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::Instant,
};

use lattice_observability::Metrics;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tracing::Instrument;

use crate::{
    backend::{onnx::OnnxFactory, BackendError, BackendFactory},
    config::{self, ModelConfig},
    error::InferError,
    loader::{blank_config, load_model, Source},
    model_metrics::{ErrorType, InFlight, ModelLabels, ModelMetrics},
    pipeline::TextPipeline,
    scheduler::{InferRequest, InferResponse, Scheduler},
    tensor::TensorData,
    validate::is_safe_name,
};

pub use crate::validate::{echo, prepare, RequestParts};

/// Why the repository could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("model repository {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The engine library could not be loaded.
    #[error(transparent)]
    Engine(#[from] BackendError),
}

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
    pub(crate) id: u64,
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

pub(crate) static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The versions of a model that are loaded together, swapped as a unit.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// Ascending; the last entry is the default version.
    pub versions: BTreeMap<i64, Arc<ModelVersion>>,
    /// Drift reference values by feature, from the config's reference file.
    pub(crate) drift_reference: HashMap<String, Vec<f64>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
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
    /// Builds the engine instances of a loaded version.
    factory: Arc<dyn BackendFactory>,
}

/// Cheap-to-clone handle to the repository.
#[derive(Clone)]
pub struct ModelRepository {
    inner: Arc<Inner>,
}

impl ModelRepository {
    /// Loads the ONNX Runtime library and checks the repository directory.
    pub fn open(opts: &RepositoryOptions, metrics: Arc<Metrics>) -> Result<ModelRepository, RepositoryError> {
        if !opts.root.is_dir() {
            return Err(RepositoryError::NotADirectory(opts.root.clone()));
        }
        crate::backend::onnx::init(&opts.ort_library)?;
        ModelRepository::with_factory(&opts.root, metrics, Arc::new(OnnxFactory))
    }

    /// A repository whose versions are built by `factory` (tests use a mock engine).
    pub fn with_factory(
        root: &std::path::Path,
        metrics: Arc<Metrics>,
        factory: Arc<dyn BackendFactory>,
    ) -> Result<ModelRepository, RepositoryError> {
        if !root.is_dir() {
            return Err(RepositoryError::NotADirectory(root.to_path_buf()));
        }
        Ok(ModelRepository {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                model_metrics: metrics.set::<ModelMetrics>(),
                metrics,
                models: RwLock::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
                admin: tokio::sync::Mutex::new(()),
                factory,
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
                let mut base = config::load(&dir).map_err(|e| InferError::LoadFailed {
                    name: name.to_string(),
                    reason: e.to_string(),
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
        let factory = self.inner.factory.clone();
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || load_model(&src, &model_name, factory.as_ref(), metrics, cfg))
            .await
            .map_err(|e| InferError::LoadFailed {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        match loaded {
            Ok(model) => {
                let model = Arc::new(model);
                crate::warmup::warm_up(&model).await;
                // Cold start: sessions built and the warm-up answered.
                for v in model.versions.values() {
                    v.scheduler.runtime().recorder.observe_load(started.elapsed());
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
            Err(e) => {
                let reason = e.to_string();
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
        let req = match mv.scheduler.run_here(req) {
            Ok(answer) => {
                let mut resp = answer?;
                resp.version = mv.version;
                return Ok(resp);
            }
            Err(req) => req,
        };
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
pub(crate) async fn tokenize(text: Option<&Arc<TextPipeline>>, req: &mut InferRequest) -> Result<(), InferError> {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{
        backend::Backend,
        tensor::{DataType, Tensor},
    };

    #[test]
    fn each_replica_starts_with_its_own_shard() {
        let names: Vec<String> = ["a", "b", "c", "d", "e"].iter().map(|s| s.to_string()).collect();
        assert_eq!(super::shard_order(names.clone(), 0, 1), names);
        assert_eq!(super::shard_order(names.clone(), 1, 2), ["b", "d", "a", "c", "e"]);
        assert_eq!(super::shard_order(names.clone(), 2, 3), ["c", "a", "b", "d", "e"]);
        assert_eq!(super::shard_order(names, 7, 3), ["b", "e", "a", "c", "d"]);
    }

    // === A repository on a mock engine ===

    /// Adds the number written in its "model file" to input `x`; counts every run.
    struct AddBackend {
        add: i64,
        runs: Arc<AtomicUsize>,
    }

    impl Backend for AddBackend {
        fn run(&mut self, inputs: Vec<(String, Tensor)>, outputs: &[String]) -> Result<Vec<Tensor>, BackendError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let x = inputs[0].1.to_i64_vec().expect("INT64");
            let y: Vec<i64> = x.iter().map(|v| v + self.add).collect();
            Ok(outputs
                .iter()
                .map(|_| Tensor::from_i64(inputs[0].1.shape.clone(), &y))
                .collect())
        }

        fn inputs(&self) -> Vec<(String, Option<DataType>)> {
            vec![("x".into(), Some(DataType::I64))]
        }

        fn outputs(&self) -> Vec<(String, Option<DataType>)> {
            vec![("y".into(), Some(DataType::I64))]
        }
    }

    /// Builds [`AddBackend`]s; a file that is not a number is a model the engine
    /// cannot load.
    #[derive(Default)]
    struct AddFactory {
        runs: Arc<AtomicUsize>,
    }

    impl BackendFactory for AddFactory {
        fn instances(&self, model: &[u8], cfg: &ModelConfig) -> Result<Vec<Box<dyn Backend>>, BackendError> {
            let add: i64 = std::str::from_utf8(model)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| BackendError::Engine("not a model".into()))?;
            Ok((0..cfg.instance_group.count)
                .map(|_| {
                    Box::new(AddBackend {
                        add,
                        runs: self.runs.clone(),
                    }) as Box<dyn Backend>
                })
                .collect())
        }
    }

    const CONFIG: &str = r#"
        max_batch_size = 4
        [[input]]
        name = "x"
        data_type = "INT64"
        dims = [1]
        [[output]]
        name = "y"
        data_type = "INT64"
        dims = [1]
    "#;

    fn write_model(root: &std::path::Path, model_file: &str) {
        let dir = root.join("add");
        std::fs::create_dir_all(dir.join("1")).unwrap();
        std::fs::write(dir.join("config.toml"), CONFIG).unwrap();
        std::fs::write(dir.join("1/model.onnx"), model_file).unwrap();
    }

    fn parts(x: i64) -> RequestParts {
        RequestParts {
            id: "r".into(),
            inputs: vec![("x".into(), Tensor::from_i64(vec![1, 1], &[x]))],
            outputs: Vec::new(),
            priority: None,
            timeout: None,
            sequence: None,
        }
    }

    async fn answer(repo: &ModelRepository, x: i64) -> i64 {
        let resp = repo.infer("add", "", parts(x)).await.expect("inference");
        resp.outputs[0].1.to_i64_vec().unwrap()[0]
    }

    fn mock_repo() -> (tempfile::TempDir, ModelRepository, Arc<Metrics>, Arc<AtomicUsize>) {
        let dir = tempfile::tempdir().unwrap();
        let factory = AddFactory::default();
        let runs = factory.runs.clone();
        let metrics = Arc::new(Metrics::new());
        let repo = ModelRepository::with_factory(dir.path(), metrics.clone(), Arc::new(factory)).unwrap();
        (dir, repo, metrics, runs)
    }

    #[tokio::test]
    async fn a_loaded_version_is_warmed_once_and_the_warm_up_is_not_recorded() {
        let (dir, repo, metrics, runs) = mock_repo();
        write_model(dir.path(), "7");
        repo.load("add").await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one warm-up run before serving");
        let text = metrics.encode();
        assert!(
            !text.contains("ai_inference_batch_size_count{model_name=\"add\",model_version=\"1\"} 1"),
            "the warm-up is kept out of the metrics: {text}"
        );
        assert_eq!(answer(&repo, 1).await, 8);
        assert!(metrics
            .encode()
            .contains("ai_inference_batch_size_count{model_name=\"add\",model_version=\"1\"} 1"));
        assert!(metrics.encode().contains("ai_model_load_duration_seconds_count"));
    }

    #[tokio::test]
    async fn a_reload_swaps_versions_and_requests_holding_the_old_one_finish_on_it() {
        let (dir, repo, _metrics, _runs) = mock_repo();
        write_model(dir.path(), "7");
        repo.load("add").await.unwrap();
        let old = repo.version("add", "").unwrap();
        write_model(dir.path(), "100");
        repo.load("add").await.unwrap();
        assert_eq!(answer(&repo, 1).await, 101, "new requests go to the new version");
        // The old instance still serves whoever holds it.
        let rt = old.scheduler.runtime().clone();
        let req = prepare(&rt.config, None, parts(1)).unwrap();
        let resp = old.scheduler.submit(req).unwrap().await.unwrap().unwrap();
        assert_eq!(resp.outputs[0].1.to_i64_vec().unwrap(), vec![8]);
    }

    #[tokio::test]
    async fn a_failed_reload_changes_nothing_that_serves() {
        let (dir, repo, _metrics, _runs) = mock_repo();
        write_model(dir.path(), "7");
        repo.load("add").await.unwrap();
        write_model(dir.path(), "not a number");
        let err = repo.load("add").await.unwrap_err();
        assert!(
            matches!(&err, InferError::LoadFailed { reason, .. } if reason.ends_with("not a model")),
            "{err}"
        );
        assert_eq!(answer(&repo, 1).await, 8, "the old version still serves");
        // A model that never loaded is listed with why.
        std::fs::create_dir_all(dir.path().join("broken/1")).unwrap();
        std::fs::write(dir.path().join("broken/config.toml"), "max_batch_size = \"x\"").unwrap();
        assert!(repo.load("broken").await.is_err());
        let index = repo.index(false);
        let broken = index.iter().find(|e| e.name == "broken").unwrap();
        assert_eq!(broken.state, "UNAVAILABLE");
        assert!(broken.reason.contains("config.toml"), "{}", broken.reason);
    }

    #[tokio::test]
    async fn an_unloaded_model_is_not_found() {
        let (dir, repo, metrics, _runs) = mock_repo();
        write_model(dir.path(), "7");
        repo.load("add").await.unwrap();
        assert!(metrics
            .encode()
            .contains("ai_inference_pending_requests{model_name=\"add\""));
        repo.unload("add").await.unwrap();
        assert!(matches!(
            repo.infer("add", "", parts(1)).await,
            Err(InferError::ModelNotFound(_))
        ));
        assert!(
            !metrics
                .encode()
                .contains("ai_inference_pending_requests{model_name=\"add\""),
            "an unloaded version's scrape-time series go with it"
        );
    }

    #[test]
    fn a_repository_that_is_not_a_directory_is_refused() {
        let metrics = Arc::new(Metrics::new());
        let err = ModelRepository::with_factory(
            std::path::Path::new("/nonexistent/models"),
            metrics,
            Arc::new(AddFactory::default()),
        )
        .err()
        .unwrap();
        assert!(matches!(err, RepositoryError::NotADirectory(_)));
    }
}
