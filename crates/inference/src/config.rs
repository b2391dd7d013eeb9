//! Per-model configuration: `<repository>/<model>/config.toml`.
//!
//! Field names follow Triton's model configuration (`max_batch_size`, `input`, `output`,
//! `dynamic_batching`, `instance_group`, `version_policy`) so operators coming from
//! Triton recognise them; the file format is TOML. Dims exclude the batch dimension
//! when `max_batch_size > 0`, exactly as in Triton.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::tensor::DataType;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Defaults to the model's directory name.
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_platform")]
    pub platform: String,
    /// 0 disables batching: inputs are passed with exactly the dims given.
    #[serde(default)]
    pub max_batch_size: usize,
    pub input: Vec<TensorConfig>,
    pub output: Vec<TensorConfig>,
    #[serde(default)]
    pub dynamic_batching: Option<DynamicBatching>,
    #[serde(default)]
    pub instance_group: InstanceGroup,
    /// How ONNX Runtime runs the instances: thread spinning, memory arena, graph
    /// optimisation. The defaults favour low idle CPU and memory.
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Raw text in, tokenized tensors to the model (e.g. a sentence encoder).
    #[serde(default)]
    pub text: Option<TextPipelineConfig>,
    /// Mean pooling over a token-level output, producing a sentence embedding.
    #[serde(default)]
    pub pooling: Option<PoolingConfig>,
    /// Which output holds probabilities, for confidence and entropy signals.
    #[serde(default)]
    pub quality: Option<QualityConfig>,
    /// Input features whose distribution is watched for drift.
    #[serde(default)]
    pub drift: Option<DriftConfig>,
    /// Stateful sequences with implicit state (Triton's sequence batcher).
    #[serde(default)]
    pub sequence_batching: Option<crate::sequence::SequenceBatching>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProbabilityKind {
    /// Each item is a probability vector over classes (softmax already applied).
    Probabilities,
    /// Each item is one probability of the positive class (sigmoid output).
    Binary,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    pub output: String,
    pub kind: ProbabilityKind,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// Inputs to summarise per item: numeric ones as `<input>:mean` and `<input>:std`,
    /// `BYTES` ones as `<input>:length`.
    pub inputs: Vec<String>,
    /// JSON object `{feature: [reference values]}` relative to the model directory;
    /// without it the first `reference_size` items become the reference.
    #[serde(default)]
    pub reference_file: Option<String>,
    #[serde(default = "default_drift_n")]
    pub reference_size: usize,
    /// Recent items compared against the reference.
    #[serde(default = "default_drift_n")]
    pub window: usize,
}

fn default_drift_n() -> usize {
    500
}

fn default_platform() -> String {
    "onnxruntime_onnx".to_string()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorConfig {
    pub name: String,
    pub data_type: String,
    pub dims: Vec<i64>,
    /// An optional input may be omitted by the request.
    #[serde(default)]
    pub optional: bool,
    /// For an optional input: fill it with zeros shaped like the first input when
    /// absent (BERT's `token_type_ids`).
    #[serde(default)]
    pub zeros_if_absent: bool,
    /// Value every element gets in the warm-up request (default 0); for inputs
    /// where zero is not valid, such as a sample rate.
    #[serde(default)]
    pub warmup_fill: Option<f64>,
    /// For an integer input: the only values the model accepts (Silero's sample
    /// rate), so a wrong one is the caller's mistake named as such, not an engine
    /// failure.
    #[serde(default)]
    pub allowed_values: Option<Vec<i64>>,
}

impl TensorConfig {
    pub fn dtype(&self) -> DataType {
        DataType::parse(&self.data_type).expect("validated at load")
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatching {
    #[serde(default)]
    pub preferred_batch_size: Vec<usize>,
    /// How long the first request of a batch may wait for company.
    #[serde(default)]
    pub max_queue_delay_microseconds: u64,
    /// Bounded queue: a request arriving at a full queue is rejected (429).
    #[serde(default = "default_queue_size")]
    pub max_queue_size: usize,
    /// Applied when a request carries no `timeout` of its own; 0 means none.
    #[serde(default)]
    pub default_timeout_microseconds: u64,
}

fn default_queue_size() -> usize {
    1024
}

impl Default for DynamicBatching {
    fn default() -> Self {
        DynamicBatching {
            preferred_batch_size: Vec::new(),
            max_queue_delay_microseconds: 0,
            max_queue_size: default_queue_size(),
            default_timeout_microseconds: 0,
        }
    }
}

impl DynamicBatching {
    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_micros(self.max_queue_delay_microseconds)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceGroup {
    /// Engine sessions serving this model in parallel, each on its own thread.
    #[serde(default = "one")]
    pub count: usize,
    /// ONNX Runtime intra-op threads per instance.
    #[serde(default = "one")]
    pub intra_op_threads: usize,
}

fn one() -> usize {
    1
}

/// ONNX Runtime session options, per model. Triton's ONNX Runtime backend takes the
/// same choices as `parameters` and `optimization.graph.level`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Let ONNX Runtime's intra- and inter-op pool threads spin while they wait for
    /// work. Spinning shaves a few microseconds off each parallel section but burns a
    /// core between requests (at one request at a time, minilm with 2 intra-op
    /// threads spent ~1.8x its compute in CPU), which a shared node pays for and a
    /// CPU-based autoscaler misreads as load. Off unless a model asks for it.
    #[serde(default)]
    pub allow_spinning: bool,
    /// ONNX Runtime's CPU memory arena: it keeps the peak of every buffer a run
    /// needed, per session, for the session's life. Off, buffers come from the
    /// process allocator, whose freed pages can go back to the OS.
    #[serde(default = "yes")]
    pub cpu_arena: bool,
    /// Graph optimisation: `disabled`, `basic`, `extended` or `all`. `basic` and up
    /// constant-fold, which turns weight-only int8 (a Cast and a Mul before each
    /// MatMul) into fp32 initializers: four times the memory, and faster runs.
    #[serde(default)]
    pub optimization_level: OptimizationLevel,
    /// Pre-packed weight layouts for the CPU kernels (a second copy of some weights,
    /// in exchange for faster GEMMs).
    #[serde(default = "yes")]
    pub prepacking: bool,
}

fn yes() -> bool {
    true
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            allow_spinning: false,
            cpu_arena: true,
            optimization_level: OptimizationLevel::default(),
            prepacking: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizationLevel {
    Disabled,
    Basic,
    Extended,
    #[default]
    All,
}

impl Default for InstanceGroup {
    fn default() -> Self {
        InstanceGroup {
            count: 1,
            intra_op_threads: 1,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    /// Serve the N highest versions.
    Latest {
        num_versions: usize,
    },
    All {},
    Specific {
        versions: Vec<i64>,
    },
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest { num_versions: 1 }
    }
}

impl VersionPolicy {
    /// Picks the versions to serve from those present on disk.
    pub fn select(&self, mut available: Vec<i64>) -> Vec<i64> {
        available.sort_unstable();
        match self {
            VersionPolicy::Latest { num_versions } => {
                let skip = available.len().saturating_sub(*num_versions);
                available.into_iter().skip(skip).collect()
            }
            VersionPolicy::All {} => available,
            VersionPolicy::Specific { versions } => available.into_iter().filter(|v| versions.contains(v)).collect(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TextPipelineConfig {
    /// The `BYTES` input that carries UTF-8 text, one string per batch item.
    pub input: String,
    /// A Hugging Face `tokenizer.json`, relative to the model directory.
    pub tokenizer: String,
    /// Truncation length in tokens; batches are padded to their longest item.
    #[serde(default = "default_max_tokens")]
    pub max_length: usize,
    /// Model input names the tokenizer fills.
    #[serde(default = "default_ids")]
    pub input_ids: String,
    #[serde(default = "default_mask")]
    pub attention_mask: String,
    #[serde(default)]
    pub token_type_ids: Option<String>,
    /// Longest token sequence the model takes (its position embeddings), for
    /// requests that send token tensors themselves.
    #[serde(default = "default_max_positions")]
    pub max_positions: usize,
}

fn default_max_tokens() -> usize {
    128
}
fn default_max_positions() -> usize {
    512
}
fn default_ids() -> String {
    "input_ids".to_string()
}
fn default_mask() -> String {
    "attention_mask".to_string()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolingConfig {
    /// Name of the pooled output this adds to the model's outputs.
    pub output: String,
    /// Token-level FP32 output `[batch, tokens, hidden]` to pool.
    pub source: String,
    /// The mask input that says which tokens are real.
    pub mask: String,
    /// L2-normalise the pooled vector (sentence-transformers' `Normalize`).
    #[serde(default)]
    pub normalize: bool,
}

/// Why a model's config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: std::path::PathBuf,
        source: toml::de::Error,
    },
    /// A field is out of range, or names something the config does not declare.
    #[error("{0}")]
    Invalid(String),
}

/// Reads and validates a model's config file.
pub fn load(dir: &Path) -> Result<ModelConfig, ConfigError> {
    let path = dir.join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let mut cfg: ModelConfig = match toml::from_str(&text) {
        Ok(cfg) => cfg,
        Err(source) => return Err(ConfigError::Parse { path, source }),
    };
    if cfg.name.is_empty() {
        cfg.name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    cfg.validate()?;
    Ok(cfg)
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for t in self.input.iter().chain(&self.output) {
            if DataType::parse(&t.data_type).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "tensor '{}': unknown data_type '{}'",
                    t.name, t.data_type
                )));
            }
            if t.dims.iter().any(|&d| d < -1 || d == 0) {
                return Err(ConfigError::Invalid(format!(
                    "tensor '{}': dims must be positive or -1",
                    t.name
                )));
            }
        }
        if self.instance_group.count == 0 || self.instance_group.intra_op_threads == 0 {
            return Err(ConfigError::Invalid(
                "instance_group.count and intra_op_threads must be >= 1".to_string(),
            ));
        }
        if let Some(db) = &self.dynamic_batching {
            if db.max_queue_size == 0 {
                return Err(ConfigError::Invalid(
                    "dynamic_batching.max_queue_size must be >= 1".to_string(),
                ));
            }
        }
        if let Some(s) = &self.sequence_batching {
            s.validate(self)?;
        }
        if let Some(q) = &self.quality {
            let out = self.output_by_name(&q.output);
            if out.is_none_or(|o| DataType::parse(&o.data_type) != Some(DataType::F32)) {
                return Err(ConfigError::Invalid(format!(
                    "quality.output '{}' must be a declared FP32 output",
                    q.output
                )));
            }
        }
        if let Some(d) = &self.drift {
            if let Some(i) = d.inputs.iter().find(|i| self.input_by_name(i).is_none()) {
                return Err(ConfigError::Invalid(format!(
                    "drift input '{i}' is not a declared input"
                )));
            }
            if d.window == 0 || d.reference_size == 0 {
                return Err(ConfigError::Invalid(
                    "drift window and reference_size must be >= 1".to_string(),
                ));
            }
        }
        if let Some(text) = &self.text {
            let ok = self
                .input
                .iter()
                .any(|i| i.name == text.input && DataType::parse(&i.data_type) == Some(DataType::Bytes));
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "text.input '{}' must be a declared BYTES input",
                    text.input
                )));
            }
        }
        Ok(())
    }

    /// The most items the dynamic batcher puts in one batch: the largest preferred
    /// size (Triton's meaning), else max_batch_size; at least 1. A single request may
    /// still carry up to max_batch_size items.
    pub fn dynamic_batch_cap(&self) -> usize {
        let max = self.max_batch_size.max(1);
        self.queue()
            .preferred_batch_size
            .iter()
            .copied()
            .max()
            .unwrap_or(max)
            .clamp(1, max)
    }

    /// Queue settings in force: the configured ones, or an unbatched bounded queue.
    pub fn queue(&self) -> DynamicBatching {
        self.dynamic_batching.clone().unwrap_or_default()
    }

    pub fn input_by_name(&self, name: &str) -> Option<&TensorConfig> {
        self.input.iter().find(|i| i.name == name)
    }

    pub fn output_by_name(&self, name: &str) -> Option<&TensorConfig> {
        self.output.iter().find(|o| o.name == name)
    }

    /// The full shape a tensor has on the wire, with -1 for the batch dimension.
    pub fn wire_shape(&self, t: &TensorConfig) -> Vec<i64> {
        if self.max_batch_size > 0 {
            std::iter::once(-1).chain(t.dims.iter().copied()).collect()
        } else {
            t.dims.clone()
        }
    }
}

/// Parses a version directory name; non-numeric entries are not versions.
pub fn parse_version(name: &str) -> Option<i64> {
    name.parse::<i64>().ok().filter(|v| *v > 0)
}

pub type Parameters = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policy_selects() {
        let avail = vec![3, 1, 2];
        assert_eq!(VersionPolicy::default().select(avail.clone()), vec![3]);
        assert_eq!(
            VersionPolicy::Latest { num_versions: 2 }.select(avail.clone()),
            vec![2, 3]
        );
        assert_eq!(VersionPolicy::All {}.select(avail.clone()), vec![1, 2, 3]);
        assert_eq!(VersionPolicy::Specific { versions: vec![1, 7] }.select(avail), vec![1]);
    }

    #[test]
    fn engine_defaults_to_no_spinning_and_rejects_unknown_options() {
        let base = "input = []\noutput = []\n";
        let cfg: ModelConfig = toml::from_str(base).unwrap();
        assert_eq!(cfg.engine, EngineConfig::default());
        assert!(!cfg.engine.allow_spinning, "pool threads sleep unless a model asks");
        assert!(cfg.engine.cpu_arena && cfg.engine.prepacking);
        assert_eq!(cfg.engine.optimization_level, OptimizationLevel::All);
        let cfg: ModelConfig = toml::from_str(&format!(
            "{base}[engine]\nallow_spinning = true\ncpu_arena = false\noptimization_level = \"disabled\"\n"
        ))
        .unwrap();
        assert!(cfg.engine.allow_spinning && !cfg.engine.cpu_arena && cfg.engine.prepacking);
        assert_eq!(cfg.engine.optimization_level, OptimizationLevel::Disabled);
        for bad in ["spin = true", "optimization_level = \"max\"", "cpu_arena = 1"] {
            let r: Result<ModelConfig, _> = toml::from_str(&format!("{base}[engine]\n{bad}\n"));
            assert!(r.is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn parses_triton_style_toml() {
        let cfg: ModelConfig = toml::from_str(
            r#"
            max_batch_size = 8
            [[input]]
            name = "x"
            data_type = "TYPE_FP32"
            dims = [4]
            [[output]]
            name = "y"
            data_type = "FP32"
            dims = [-1]
            [dynamic_batching]
            preferred_batch_size = [4]
            max_queue_delay_microseconds = 100
            [version_policy.latest]
            num_versions = 2
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.wire_shape(&cfg.input[0]), vec![-1, 4]);
        assert_eq!(cfg.queue().max_queue_size, 1024);
        assert_eq!(cfg.version_policy, VersionPolicy::Latest { num_versions: 2 });
    }

    #[test]
    fn rejects_unknown_fields_and_types() {
        assert!(toml::from_str::<ModelConfig>("max_batch = 1\ninput=[]\noutput=[]").is_err());
        let cfg: ModelConfig = toml::from_str("input=[{name='x', data_type='FLOAT', dims=[1]}]\noutput=[]").unwrap();
        assert!(cfg.validate().is_err());
    }
}
