//! Request validation: the edge's parts checked against a model's config and turned
//! into a scheduler request. Pure: no engine, no I/O.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{
    config::ModelConfig,
    error::InferError,
    pipeline::TextPipeline,
    scheduler::{InferRequest, DEFAULT_PRIORITY, PRIORITY_LEVELS},
    tensor::{element_count, Tensor},
};

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

/// A name from a request as it is echoed in an error: at most 128 characters, so a
/// long made-up name cannot inflate error bodies or gRPC status headers.
pub fn echo(name: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 128;
    match name.char_indices().nth(MAX) {
        None => name.into(),
        Some((cut, _)) => format!("{}...", &name[..cut]).into(),
    }
}

pub(crate) fn is_safe_name(name: &str) -> bool {
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
        text.check(&inputs)
            .map_err(|e| InferError::InvalidInput(e.to_string()))?;
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
        warm_up: false,
    })
}
