//! Loading from disk or from request bytes: a model's config, its selected
//! versions' files, its text pipeline and drift reference, the engine instances
//! built through a [`BackendFactory`], and the check of the config against what the
//! engine reports. Runs on a blocking thread; nothing here serves.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
};

use bytes::Bytes;

use crate::{
    backend::{Backend, BackendError, BackendFactory},
    config::{self, ConfigError, ModelConfig},
    model_metrics::{ModelLabels, ModelMetrics},
    pipeline::{PipelineError, TextPipeline},
    repository::{LoadedModel, ModelVersion, NEXT_INSTANCE},
    scheduler::{ModelRuntime, Scheduler},
    stats::Stats,
};

/// Why a model did not load. Its text is the `reason` of
/// [`InferError::LoadFailed`](crate::InferError::LoadFailed) and of the index.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no version directory with a model.onnx under {}", .0.display())]
    NoVersionDir(PathBuf),
    #[error("the version policy selects none of the versions given")]
    NoVersionGiven,
    #[error("a model loaded from bytes needs a config")]
    NoConfig,
    #[error("selected version has no bytes")]
    NoBytes,
    /// The engine could not build an instance from the file.
    #[error("{what}: {source}")]
    Engine { what: String, source: BackendError },
    /// The config names a tensor the model does not have, or gives it another type.
    #[error("{0}")]
    Signature(String),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{}: {source}", path.display())]
    Reference { path: PathBuf, source: serde_json::Error },
}

/// Where a model's files come from.
pub(crate) enum Source {
    /// `<repository>/<model>/`.
    Dir(PathBuf),
    /// `model.onnx` bytes by version, from a load request; no directory at all.
    Bytes(BTreeMap<i64, Bytes>),
}

/// The config a model loaded from bytes starts from: nothing but its name, so the
/// request's `config` is the whole configuration (Triton's override mode).
pub(crate) fn blank_config(name: &str) -> ModelConfig {
    let mut c: ModelConfig = toml::from_str("input = []\noutput = []").expect("a blank config parses");
    c.name = name.to_string();
    c
}

/// Loads every selected version of a model, with all its instances, or nothing.
pub(crate) fn load_model(
    src: &Source,
    name: &str,
    factory: &dyn BackendFactory,
    metrics: Arc<ModelMetrics>,
    cfg: Option<ModelConfig>,
) -> Result<LoadedModel, LoadError> {
    let mut cfg = match (cfg, src) {
        (Some(cfg), _) => cfg,
        (None, Source::Dir(dir)) => config::load(dir)?,
        (None, Source::Bytes(_)) => return Err(LoadError::NoConfig),
    };
    cfg.name = name.to_string();
    let available: Vec<i64> = match src {
        Source::Dir(dir) => std::fs::read_dir(dir)
            .map_err(|source| LoadError::Io {
                path: dir.clone(),
                source,
            })?
            .flatten()
            .filter(|e| e.path().join("model.onnx").is_file())
            .filter_map(|e| config::parse_version(&e.file_name().to_string_lossy()))
            .collect(),
        Source::Bytes(files) => files.keys().copied().collect(),
    };
    let selected = cfg.version_policy.select(available);
    if selected.is_empty() {
        return Err(match src {
            Source::Dir(dir) => LoadError::NoVersionDir(dir.clone()),
            Source::Bytes(_) => LoadError::NoVersionGiven,
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
            Source::Dir(dir) => build_instances(factory, &dir.join(v.to_string()).join("model.onnx"), &cfg)?,
            Source::Bytes(files) => {
                let model = files.get(&v).ok_or(LoadError::NoBytes)?;
                factory.instances(model, &cfg).map_err(|source| LoadError::Engine {
                    what: format!("model.onnx of version {v}"),
                    source,
                })?
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
            let path = dir.join(f);
            std::fs::read(&path)
                .map_err(|source| LoadError::Io {
                    path: path.clone(),
                    source,
                })
                .and_then(|b| serde_json::from_slice(&b).map_err(|source| LoadError::Reference { path, source }))
        })
        .transpose()?
        .unwrap_or_default();
    Ok(LoadedModel {
        config: cfg,
        versions,
        drift_reference,
    })
}

/// Maps the model file once and builds every instance from the same mapping.
#[allow(unsafe_code)]
fn build_instances(
    factory: &dyn BackendFactory,
    path: &Path,
    cfg: &ModelConfig,
) -> Result<Vec<Box<dyn Backend>>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only and lives only while the sessions are built;
    // the repository's files are not modified while a load of them runs.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    factory.instances(&map, cfg).map_err(|source| LoadError::Engine {
        what: path.display().to_string(),
        source,
    })
}

/// A config that disagrees with the model file is a load error, not a runtime one.
fn check_signature(
    b: &dyn Backend,
    cfg: &ModelConfig,
    text: Option<&str>,
    pooled: Option<&str>,
) -> Result<(), LoadError> {
    let engine_in = b.inputs();
    for i in &cfg.input {
        if Some(i.name.as_str()) == text {
            continue;
        }
        match engine_in.iter().find(|(n, _)| *n == i.name) {
            None => {
                return Err(LoadError::Signature(format!(
                    "config input '{}' is not an input of the model",
                    i.name
                )))
            }
            Some((_, Some(d))) if *d != i.dtype() => {
                return Err(LoadError::Signature(format!(
                    "config input '{}' is {}, the model says {d}",
                    i.name,
                    i.dtype()
                )))
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
            None => {
                return Err(LoadError::Signature(format!(
                    "config output '{}' is not an output of the model",
                    o.name
                )))
            }
            Some((_, Some(d))) if *d != o.dtype() => {
                return Err(LoadError::Signature(format!(
                    "config output '{}' is {}, the model says {d}",
                    o.name,
                    o.dtype()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}
