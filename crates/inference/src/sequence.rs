//! Stateful sequences: Triton's sequence batcher with implicit state, for models whose
//! recurrent state goes out as one output and comes back as one input (Silero VAD's
//! `stateN` -> `state`).
//!
//! A request that carries `sequence_id` (with `sequence_start` on its first request
//! and `sequence_end` on its last) sends only its other inputs; the server feeds each
//! state input from the previous request's state output, starting from the configured
//! initial value. Strategy: Triton's **oldest** (`max_candidate_sequences`), with the
//! state kept per sequence here rather than per batch slot: each request is scheduled
//! as any other (the model's instances and queue are shared), and the requests of one
//! sequence run one after another, in arrival order. Past `max_candidate_sequences`
//! live sequences a new one is refused (429 / RESOURCE_EXHAUSTED) instead of waiting in
//! Triton's backlog, so memory stays bounded: at most that many sequences, each
//! holding exactly its declared state (fixed dims, bounded at load).
//!
//! A sequence idle for `max_sequence_idle_microseconds` is forgotten (its next request
//! without START gets Triton's START error), which frees its place.

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::{
    config::{ConfigError, ModelConfig},
    error::InferError,
    repository::echo,
    tensor::{element_count, DataType, Tensor},
};

/// Most bytes of state one sequence may hold (all its state tensors).
pub const MAX_STATE_BYTES: usize = 1 << 20;
/// Most live sequences a model may allow.
pub const MAX_CANDIDATE_SEQUENCES: usize = 65_536;
/// Longest string sequence ID accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Triton's idle limit when the config leaves it at 0.
const DEFAULT_IDLE: Duration = Duration::from_secs(1);

/// `[sequence_batching]` of `config.toml`, in Triton's field names.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SequenceBatching {
    /// 0 means Triton's default, 1 s.
    #[serde(default)]
    pub max_sequence_idle_microseconds: u64,
    /// Live sequences at most (Triton's `oldest.max_candidate_sequences`).
    pub max_candidate_sequences: usize,
    #[serde(default)]
    pub state: Vec<StateConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The model input the state is fed into (declared in `[[input]]` too, so a
    /// client without a sequence can still send it itself).
    pub input_name: String,
    /// The model output the next state comes from.
    pub output_name: String,
    pub data_type: String,
    /// Without the batch dimension; every dim fixed.
    pub dims: Vec<i64>,
    /// At most one entry; only `zero_data` is supported. Without one the state
    /// starts as zeros as well.
    #[serde(default)]
    pub initial_state: Vec<InitialState>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitialState {
    pub name: String,
    pub data_type: String,
    pub dims: Vec<i64>,
    #[serde(default)]
    pub zero_data: bool,
    #[serde(default)]
    pub data_file: Option<String>,
}

impl SequenceBatching {
    pub fn idle(&self) -> Duration {
        match self.max_sequence_idle_microseconds {
            0 => DEFAULT_IDLE,
            us => Duration::from_micros(us),
        }
    }

    /// Checked at load: every state names a declared input and output of its type
    /// and dims, with fixed dims and a bounded size.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), ConfigError> {
        if !(1..=MAX_CANDIDATE_SEQUENCES).contains(&self.max_candidate_sequences) {
            return Err(ConfigError::Invalid(format!(
                "sequence_batching.max_candidate_sequences must be 1..={MAX_CANDIDATE_SEQUENCES}"
            )));
        }
        let mut total = 0usize;
        for s in &self.state {
            let dtype = DataType::parse(&s.data_type).ok_or_else(|| {
                ConfigError::Invalid(format!("state '{}': unknown data_type '{}'", s.input_name, s.data_type))
            })?;
            if dtype == DataType::Bytes || s.dims.iter().any(|&d| d < 1) {
                return Err(ConfigError::Invalid(format!(
                    "state '{}': a fixed-size numeric type with every dim >= 1",
                    s.input_name
                )));
            }
            for (what, t) in [
                ("input", cfg.input_by_name(&s.input_name)),
                ("output", cfg.output_by_name(&s.output_name)),
            ] {
                let name = if what == "input" { &s.input_name } else { &s.output_name };
                match t {
                    Some(t) if DataType::parse(&t.data_type) == Some(dtype) && t.dims == s.dims => {}
                    _ => {
                        return Err(ConfigError::Invalid(format!(
                            "state {what} '{name}' must be a declared {what} of the same data_type and dims"
                        )))
                    }
                }
            }
            if s.initial_state.len() > 1 {
                return Err(ConfigError::Invalid(format!(
                    "initial_state field for state input '{}' must contain exactly one or zero element. Found '{}' elements.",
                    s.input_name,
                    s.initial_state.len()
                )));
            }
            if let Some(i) = s.initial_state.first() {
                if !i.zero_data
                    || i.data_file.is_some()
                    || DataType::parse(&i.data_type) != Some(dtype)
                    || i.dims != s.dims
                {
                    return Err(ConfigError::Invalid(format!(
                        "initial_state of '{}': only zero_data = true is supported, with the state's data_type and dims",
                        s.input_name
                    )));
                }
            }
            let bytes = element_count(&s.dims)
                .and_then(|n| n.checked_mul(dtype.size().unwrap_or(1)))
                .ok_or_else(|| ConfigError::Invalid(format!("state '{}' is too large", s.input_name)))?;
            total = total.saturating_add(bytes);
        }
        if total > MAX_STATE_BYTES {
            return Err(ConfigError::Invalid(format!(
                "sequence state is {total} bytes, above {MAX_STATE_BYTES}"
            )));
        }
        Ok(())
    }
}

/// A correlation ID: Triton's uint64 or string form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SequenceId {
    Int(u64),
    Str(String),
}

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SequenceId::Int(v) => write!(f, "{v}"),
            SequenceId::Str(s) => write!(f, "{}", echo(s)),
        }
    }
}

/// The sequence parameters of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceControl {
    pub id: SequenceId,
    pub start: bool,
    pub end: bool,
}

struct Slot {
    /// Held for the whole of one request, so a sequence's requests run in order.
    state: Arc<tokio::sync::Mutex<SlotState>>,
    last_used: Instant,
}

struct SlotState {
    values: Vec<Tensor>,
    /// Forgotten (ended or idle) while a request waited for it.
    gone: bool,
}

/// The live sequences of one model version.
pub struct SequenceStore {
    model: String,
    cfg: SequenceBatching,
    /// Shape of each state tensor as the engine sees it (with a batch of 1 when the
    /// model batches).
    shapes: Vec<Vec<i64>>,
    dtypes: Vec<DataType>,
    batching: bool,
    live: Mutex<HashMap<SequenceId, Slot>>,
}

/// One request's hold on its sequence: the state it feeds the model, released (and
/// the state left as it was) if the request fails or is dropped.
pub struct SequenceGuard<'a> {
    store: &'a SequenceStore,
    id: SequenceId,
    end: bool,
    slot: tokio::sync::OwnedMutexGuard<SlotState>,
    /// State outputs the client did not ask for, removed from the answer.
    strip: Vec<String>,
}

impl SequenceStore {
    pub fn new(cfg: &ModelConfig, seq: &SequenceBatching) -> SequenceStore {
        let batch = cfg.max_batch_size > 0;
        SequenceStore {
            model: cfg.name.clone(),
            shapes: seq
                .state
                .iter()
                .map(|s| {
                    if batch {
                        std::iter::once(1).chain(s.dims.iter().copied()).collect()
                    } else {
                        s.dims.clone()
                    }
                })
                .collect(),
            dtypes: seq
                .state
                .iter()
                .map(|s| DataType::parse(&s.data_type).expect("validated at load"))
                .collect(),
            cfg: seq.clone(),
            batching: batch,
            live: Mutex::new(HashMap::new()),
        }
    }

    pub fn live(&self) -> usize {
        self.live.lock().len()
    }

    fn initial(&self) -> Vec<Tensor> {
        self.shapes
            .iter()
            .zip(&self.dtypes)
            .map(|(shape, d)| {
                let n = element_count(shape).unwrap_or(0) * d.size().unwrap_or(1);
                Tensor::raw(*d, shape.clone(), Bytes::from(vec![0u8; n]))
            })
            .collect()
    }

    fn start_error(&self, id: &SequenceId) -> InferError {
        InferError::InvalidInput(format!(
            "inference request for sequence {id} to model '{}' must specify the START flag on the first request of the sequence",
            echo(&self.model)
        ))
    }

    /// Forgets sequences idle past the limit that no request holds.
    fn reap(&self, live: &mut HashMap<SequenceId, Slot>, now: Instant) {
        let idle = self.cfg.idle();
        live.retain(|_, s| {
            if now.saturating_duration_since(s.last_used) < idle {
                return true;
            }
            match s.state.try_lock() {
                Ok(mut st) => {
                    st.gone = true;
                    false
                }
                Err(_) => true,
            }
        });
    }

    /// Takes the sequence for one request: checks the ID and flags, adds the state
    /// inputs to `inputs` and the state outputs to `outputs`, and waits until the
    /// sequence's previous request is done.
    pub async fn acquire(
        &self,
        ctrl: SequenceControl,
        inputs: &mut Vec<(String, Tensor)>,
        outputs: &mut Vec<String>,
    ) -> Result<SequenceGuard<'_>, InferError> {
        let invalid = |m: String| Err(InferError::InvalidInput(m));
        if matches!(&ctrl.id, SequenceId::Int(0)) || matches!(&ctrl.id, SequenceId::Str(s) if s.is_empty()) {
            return invalid(format!(
                "inference request to model '{}' must specify a non-zero or non-empty correlation ID",
                echo(&self.model)
            ));
        }
        if matches!(&ctrl.id, SequenceId::Str(s) if s.len() > MAX_ID_BYTES) {
            return invalid(format!("sequence_id is longer than {MAX_ID_BYTES} bytes"));
        }
        for s in &self.cfg.state {
            if inputs.iter().any(|(n, _)| *n == s.input_name) {
                return invalid(format!(
                    "input '{}' of model '{}' is the sequence's state, carried by the server between the requests of a sequence: do not send it with a sequence_id",
                    s.input_name,
                    echo(&self.model)
                ));
            }
        }
        if self.batching && inputs.iter().any(|(_, t)| t.shape.first().is_some_and(|&b| b != 1)) {
            {
                return invalid(format!(
                    "inference request to model '{}' must specify batch-size 1 due to requirements of sequence batcher",
                    echo(&self.model)
                ));
            }
        }
        let state = {
            let now = Instant::now();
            let mut live = self.live.lock();
            self.reap(&mut live, now);
            if ctrl.start {
                // START on a live ID restarts it, as in Triton.
                if !live.contains_key(&ctrl.id) && live.len() >= self.cfg.max_candidate_sequences {
                    return Err(InferError::SequencesFull {
                        model: self.model.clone(),
                        limit: self.cfg.max_candidate_sequences,
                        retry_after: self.cfg.idle(),
                    });
                }
                let state = Arc::new(tokio::sync::Mutex::new(SlotState {
                    values: self.initial(),
                    gone: false,
                }));
                if let Some(old) = live.insert(
                    ctrl.id.clone(),
                    Slot {
                        state: state.clone(),
                        last_used: now,
                    },
                ) {
                    if let Ok(mut st) = old.state.try_lock() {
                        st.gone = true;
                    }
                }
                state
            } else {
                let slot = live.get_mut(&ctrl.id).ok_or_else(|| self.start_error(&ctrl.id))?;
                slot.last_used = now;
                slot.state.clone()
            }
        };
        let slot = state.lock_owned().await;
        if slot.gone {
            return Err(self.start_error(&ctrl.id));
        }
        inputs.extend(
            self.cfg
                .state
                .iter()
                .zip(&slot.values)
                .map(|(s, v)| (s.input_name.clone(), v.clone())),
        );
        let mut strip = Vec::new();
        if !outputs.is_empty() {
            for s in &self.cfg.state {
                if !outputs.contains(&s.output_name) {
                    outputs.push(s.output_name.clone());
                    strip.push(s.output_name.clone());
                }
            }
        }
        Ok(SequenceGuard {
            store: self,
            id: ctrl.id,
            end: ctrl.end,
            slot,
            strip,
        })
    }
}

impl SequenceGuard<'_> {
    /// Keeps the state outputs of a successful answer for the next request (and
    /// removes those the client did not ask for); on END forgets the sequence.
    pub fn commit(mut self, outputs: &mut Vec<(String, Tensor)>) -> Result<(), InferError> {
        let mut next = Vec::with_capacity(self.store.cfg.state.len());
        for ((s, shape), dtype) in self
            .store
            .cfg
            .state
            .iter()
            .zip(&self.store.shapes)
            .zip(&self.store.dtypes)
        {
            let t = outputs
                .iter()
                .find(|(n, _)| *n == s.output_name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| InferError::Backend(format!("state output '{}' is missing", s.output_name)))?;
            // Only exactly the declared state is kept: memory per sequence is fixed.
            if t.dtype != *dtype || t.shape != *shape || t.check_consistent().is_err() {
                return Err(InferError::Backend(format!(
                    "state output '{}' has shape {:?}, the config declares {shape:?}",
                    s.output_name, t.shape
                )));
            }
            next.push(t);
        }
        outputs.retain(|(n, _)| !self.strip.contains(n));
        self.slot.values = next;
        Ok(())
    }
}

impl Drop for SequenceGuard<'_> {
    /// END forgets the sequence whether or not its last request succeeded, as
    /// Triton drops the ID once the END request is queued.
    fn drop(&mut self) {
        if self.end {
            self.slot.gone = true;
            let mut live = self.store.live.lock();
            let mine = tokio::sync::OwnedMutexGuard::mutex(&self.slot);
            if live.get(&self.id).is_some_and(|s| Arc::ptr_eq(&s.state, mine)) {
                live.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ModelConfig {
        let mut c: ModelConfig = toml::from_str(&format!(
            r#"
            name = "m"
            [[input]]
            name = "x"
            data_type = "FP32"
            dims = [1]
            [[input]]
            name = "s"
            data_type = "FP32"
            dims = [2]
            [[output]]
            name = "sN"
            data_type = "FP32"
            dims = [2]
            [sequence_batching]
            max_candidate_sequences = 2
            {extra}
            [[sequence_batching.state]]
            input_name = "s"
            output_name = "sN"
            data_type = "FP32"
            dims = [2]
            "#
        ))
        .unwrap();
        c.name = "m".into();
        c
    }

    fn ctrl(id: u64, start: bool, end: bool) -> SequenceControl {
        SequenceControl {
            id: SequenceId::Int(id),
            start,
            end,
        }
    }

    #[test]
    fn states_must_match_declared_tensors() {
        assert!(config("").validate().is_ok());
        let mut c = config("");
        c.sequence_batching.as_mut().unwrap().state[0].dims = vec![3];
        assert!(c.validate().is_err());
        let mut c = config("");
        c.sequence_batching.as_mut().unwrap().max_candidate_sequences = 0;
        assert!(c.validate().is_err());
        let mut c = config("");
        c.sequence_batching.as_mut().unwrap().state[0].output_name = "nope".into();
        assert!(c.validate().is_err());
    }

    #[tokio::test]
    async fn state_flows_and_sequences_are_bounded() {
        let c = config("max_sequence_idle_microseconds = 3600000000");
        let store = SequenceStore::new(&c, c.sequence_batching.as_ref().unwrap());
        let (mut inputs, mut outputs) = (Vec::new(), vec!["sN".to_string()]);
        // Unknown without START, and ID 0.
        assert!(store
            .acquire(ctrl(1, false, false), &mut inputs, &mut outputs)
            .await
            .is_err());
        assert!(store
            .acquire(ctrl(0, true, false), &mut inputs, &mut outputs)
            .await
            .is_err());
        let g = store
            .acquire(ctrl(1, true, false), &mut inputs, &mut outputs)
            .await
            .unwrap();
        assert_eq!(inputs[0].1.to_f32_vec().unwrap(), vec![0.0, 0.0]);
        let mut answer = vec![("sN".to_string(), Tensor::from_f32(vec![2], &[1.0, 2.0]))];
        g.commit(&mut answer).unwrap();
        let mut inputs = Vec::new();
        let g = store
            .acquire(ctrl(1, false, false), &mut inputs, &mut outputs)
            .await
            .unwrap();
        assert_eq!(inputs[0].1.to_f32_vec().unwrap(), vec![1.0, 2.0]);
        // A failed request (dropped guard) leaves the state as it was.
        drop(g);
        let _g2 = store
            .acquire(ctrl(2, true, false), &mut Vec::new(), &mut outputs)
            .await
            .unwrap();
        let full = store.acquire(ctrl(3, true, false), &mut Vec::new(), &mut outputs).await;
        assert!(matches!(full, Err(InferError::SequencesFull { limit: 2, .. })));
        // A wrong-shaped state output is not kept.
        let g = store
            .acquire(ctrl(1, false, true), &mut Vec::new(), &mut outputs)
            .await
            .unwrap();
        let mut bad = vec![("sN".to_string(), Tensor::from_f32(vec![3], &[0.0; 3]))];
        assert!(g.commit(&mut bad).is_err());
        // END forgot sequence 1 even though its last request failed.
        assert_eq!(store.live(), 1);
        assert!(store
            .acquire(ctrl(1, false, false), &mut Vec::new(), &mut outputs)
            .await
            .is_err());
    }
}
