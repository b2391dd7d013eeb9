//! Work around the engine call: text tokenization before it, pooling after it.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::Semaphore;

use crate::{
    config::{PoolingConfig, TextPipelineConfig},
    error::InferError,
    tensor::{DataType, Tensor, TensorData},
};

/// Bytes of text read per token the model keeps, at most. WordPiece turns a word of up
/// to 100 characters into one token and a longer one into `[UNK]`, so `max_length`
/// tokens never need more than about `max_length x 101` bytes of ASCII; 128 leaves
/// room for multi-byte characters. Text past that is never tokenized: a model that
/// keeps 128 tokens has no use for a megabyte of characters, and reading them would
/// stall it.
pub const TEXT_BYTES_PER_TOKEN: usize = 128;
/// Requests with at most this much text are tokenized on the calling (async) thread:
/// a few hundred tokens at most, tens of microseconds, so a runtime worker is never
/// held up for long.
pub const INLINE_TEXT_BYTES: usize = 1024;

/// Prefixes tried before the longest one, in bytes per kept token: ordinary text
/// needs about 5, so the first try almost always has enough tokens.
const PREFIX_STEPS: [usize; 2] = [8, 32];

pub struct TextPipeline {
    cfg: TextPipelineConfig,
    tokenizer: Tokenizer,
    /// Tokenization runs on the blocking pool, never on an instance thread (where it
    /// would hold every other request of the model) nor on the async runtime; this
    /// bounds how many batches of text are tokenized at once.
    permits: Arc<Semaphore>,
}

/// Why text could not be tokenized or pooled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    /// The tokenizer file could not be read or set up: a load error.
    #[error("{0}")]
    Tokenizer(String),
    /// An item the caller sent cannot be tokenized: the caller can fix it.
    #[error("{0}")]
    Input(String),
    /// The engine's outputs do not fit the pooling config: the model's fault.
    #[error("{0}")]
    Pooling(String),
}

impl TextPipeline {
    pub fn load(model_dir: &Path, cfg: &TextPipelineConfig) -> Result<TextPipeline, PipelineError> {
        let path = model_dir.join(&cfg.tokenizer);
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| PipelineError::Tokenizer(format!("tokenizer {}: {e}", path.display())))?;
        // The shipped tokenizer.json pads every item to 128 tokens; padding a batch to
        // its longest item instead costs ~4x less compute for short sentences.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: cfg.max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| PipelineError::Tokenizer(format!("tokenizer truncation: {e}")))?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(TextPipeline {
            cfg: cfg.clone(),
            tokenizer,
            permits: Arc::new(Semaphore::new(threads)),
        })
    }

    pub fn input_name(&self) -> &str {
        &self.cfg.input
    }

    /// The attention mask input: its ones count the tokens each item became.
    pub fn attention_mask_name(&self) -> &str {
        &self.cfg.attention_mask
    }

    /// The token tensors: their sequence axis is padded when requests share a batch.
    pub fn is_token_input(&self, name: &str) -> bool {
        name == self.cfg.input_ids
            || name == self.cfg.attention_mask
            || self.cfg.token_type_ids.as_deref() == Some(name)
    }

    /// Bytes of one item that are tokenized at most.
    pub fn max_text_bytes(&self) -> usize {
        self.cfg.max_length.saturating_mul(TEXT_BYTES_PER_TOKEN)
    }

    /// Rejects what the model would fail on when a request sends token tensors
    /// itself: ids without a mask (or the reverse), tensors of different shapes, a
    /// sequence longer than the model's positions, and ids outside the vocabulary.
    pub fn check(&self, inputs: &[(String, Tensor)]) -> Result<(), PipelineError> {
        let find = |n: &str| inputs.iter().find(|(x, _)| x == n).map(|(_, t)| t);
        let (ids, mask) = (find(&self.cfg.input_ids), find(&self.cfg.attention_mask));
        let (ids, mask) = match (ids, mask) {
            (None, None) => return Ok(()),
            (Some(ids), Some(mask)) => (ids, mask),
            (Some(_), None) | (None, Some(_)) => {
                return Err(PipelineError::Input(format!(
                    "inputs '{}' and '{}' go together: send both, or the text as '{}'",
                    self.cfg.input_ids, self.cfg.attention_mask, self.cfg.input
                )))
            }
        };
        let types = self.cfg.token_type_ids.as_deref().and_then(|n| find(n).map(|t| (n, t)));
        for (name, t) in [(self.cfg.attention_mask.as_str(), mask)].into_iter().chain(types) {
            if t.shape != ids.shape {
                return Err(PipelineError::Input(format!(
                    "input '{name}' has shape {:?}, but '{}' has {:?}: token tensors must agree",
                    t.shape, self.cfg.input_ids, ids.shape
                )));
            }
        }
        if let Some(&len) = ids.shape.last() {
            if len < 1 || len as u64 > self.cfg.max_positions as u64 {
                return Err(PipelineError::Input(format!(
                    "input '{}' has {len} tokens per item, the model takes 1..={}",
                    self.cfg.input_ids, self.cfg.max_positions
                )));
            }
        }
        let vocab = self.tokenizer.get_vocab_size(true) as i64;
        if let Some(id) = ids
            .to_i64_vec()
            .and_then(|ids| ids.into_iter().find(|&id| id < 0 || id >= vocab))
        {
            return Err(PipelineError::Input(format!(
                "input '{}' has token id {id} outside the vocabulary 0..{vocab}",
                self.cfg.input_ids
            )));
        }
        Ok(())
    }

    /// Tokenizes a request's texts on the blocking pool, at most as many requests at
    /// once as there are cores; waits for a permit otherwise.
    ///
    /// A short request (at most [`INLINE_TEXT_BYTES`] in all) is tokenized on the
    /// calling thread instead: it takes tens of microseconds, less than the two thread
    /// wake-ups a hand-off to the blocking pool and back costs.
    pub async fn tokenize(self: &Arc<Self>, texts: Vec<Bytes>) -> Result<Vec<(String, Tensor)>, InferError> {
        if texts.iter().map(Bytes::len).sum::<usize>() <= INLINE_TEXT_BYTES {
            return self.encode(&texts).map_err(|e| InferError::InvalidInput(e.to_string()));
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| InferError::Backend("tokenizer pool closed".into()))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            me.encode(&texts)
        })
        .await
        .map_err(|e| InferError::Backend(format!("tokenizer task failed: {e}")))?
        .map_err(|e| InferError::InvalidInput(e.to_string()))
    }

    /// Tokenizes a batch of texts into the model's integer inputs, padded to the
    /// longest item. Only the first [`max_text_bytes`](Self::max_text_bytes) of each
    /// item are read.
    pub fn encode(&self, texts: &[Bytes]) -> Result<Vec<(String, Tensor)>, PipelineError> {
        let strs = texts
            .iter()
            .enumerate()
            .map(|(i, t)| self.kept_text(t, i))
            .collect::<Result<Vec<&str>, _>>()?;
        // `encode_batch` hands even a single item to the rayon pool and blocks until a
        // pool thread has done it (whose threads then spin idle): one item is encoded
        // here.
        let encodings = match strs.as_slice() {
            [one] => self.tokenizer.encode(*one, true).map(|e| vec![e]),
            _ => self.tokenizer.encode_batch(strs, true),
        }
        .map_err(|e| PipelineError::Input(format!("tokenization failed: {e}")))?;
        let n = encodings.len();
        let len = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        let mut types = Vec::with_capacity(n * len);
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&x| x as i64));
            mask.extend(e.get_attention_mask().iter().map(|&x| x as i64));
            types.extend(e.get_type_ids().iter().map(|&x| x as i64));
        }
        let shape = vec![n as i64, len as i64];
        let mut out = vec![
            (self.cfg.input_ids.clone(), Tensor::from_i64(shape.clone(), &ids)),
            (self.cfg.attention_mask.clone(), Tensor::from_i64(shape.clone(), &mask)),
        ];
        if let Some(tt) = &self.cfg.token_type_ids {
            out.push((tt.clone(), Tensor::from_i64(shape, &types)));
        }
        Ok(out)
    }
}

impl TextPipeline {
    /// The part of an item the tokenizer reads: the shortest prefix, cut at a
    /// whitespace so no word is split, that already gives more tokens than the model
    /// keeps (so its first `max_length` tokens are the whole text's), else the text up
    /// to [`max_text_bytes`](Self::max_text_bytes).
    fn kept_text<'a>(&self, text: &'a [u8], item: usize) -> Result<&'a str, PipelineError> {
        let invalid = || PipelineError::Input(format!("input '{}' item {item} is not valid UTF-8", self.cfg.input));
        for per_token in PREFIX_STEPS {
            let cap = self.cfg.max_length.saturating_mul(per_token);
            if text.len() <= cap {
                break;
            }
            let head = utf8_prefix(text, cap).ok_or_else(invalid)?;
            let Some(cut) = head.rfind(char::is_whitespace) else {
                continue;
            };
            let head = &head[..cut];
            let enough = self
                .tokenizer
                .encode(head, true)
                .is_ok_and(|e| !e.get_overflowing().is_empty());
            if enough {
                return Ok(head);
            }
        }
        utf8_prefix(text, self.max_text_bytes()).ok_or_else(invalid)
    }
}

/// The first `cap` bytes of `text` as UTF-8, cut back to a character boundary; `None`
/// when the bytes kept are not UTF-8.
fn utf8_prefix(text: &[u8], cap: usize) -> Option<&str> {
    let head = &text[..text.len().min(cap)];
    match std::str::from_utf8(head) {
        Ok(s) => Some(s),
        // Only a character cut by the cap itself is forgiven.
        Err(e) if e.error_len().is_none() && head.len() < text.len() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

/// Pads `[n, len]` integer token tensors to `[n, to]` with zeros (the pad id, an
/// attention mask of 0 and token type 0), so requests of different lengths can share
/// a batch.
pub fn pad_tokens(t: &Tensor, to: i64) -> Tensor {
    let (Some(&n), Some(&len)) = (t.shape.first(), t.shape.get(1)) else {
        return t.clone();
    };
    let Some(size) = t.dtype.size() else { return t.clone() };
    if len >= to || t.shape.len() != 2 {
        return t.clone();
    }
    let (row, padded_row) = (len as usize * size, to as usize * size);
    let mut out = Vec::with_capacity(n as usize * padded_row);
    for r in t.raw_bytes().chunks_exact(row.max(1)) {
        out.extend_from_slice(r);
        out.resize(out.len() + padded_row - row, 0);
    }
    Tensor {
        dtype: t.dtype,
        shape: vec![n, to],
        data: TensorData::Raw(out.into()),
    }
}

/// Mean pooling of token states over the attention mask, optionally L2-normalised:
/// what sentence-transformers' Pooling + Normalize modules compute.
pub fn mean_pool(cfg: &PoolingConfig, states: &Tensor, mask: &Tensor) -> Result<Tensor, PipelineError> {
    if states.dtype != DataType::F32 || states.shape.len() != 3 {
        return Err(PipelineError::Pooling(format!(
            "pooling source '{}' must be FP32 [batch, tokens, hidden]",
            cfg.source
        )));
    }
    let (b, t, h) = (
        states.shape[0] as usize,
        states.shape[1] as usize,
        states.shape[2] as usize,
    );
    let mask = mask
        .to_i64_vec()
        .ok_or_else(|| PipelineError::Pooling(format!("pooling mask '{}' must be integer", cfg.mask)))?;
    if mask.len() != b * t {
        return Err(PipelineError::Pooling(format!(
            "pooling mask '{}' does not match the token states",
            cfg.mask
        )));
    }
    let states = states.to_f32_vec().expect("checked FP32");
    let mut out = vec![0f32; b * h];
    for i in 0..b {
        let row = &mut out[i * h..(i + 1) * h];
        let mut count = 0f32;
        for j in 0..t {
            if mask[i * t + j] != 0 {
                count += 1.0;
                let s = &states[(i * t + j) * h..(i * t + j + 1) * h];
                for (r, v) in row.iter_mut().zip(s) {
                    *r += v;
                }
            }
        }
        let count = count.max(1e-9);
        row.iter_mut().for_each(|r| *r /= count);
        if cfg.normalize {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|r| *r /= norm);
        }
    }
    Ok(Tensor::from_f32(vec![b as i64, h as i64], &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_read_up_to_a_character_boundary() {
        assert_eq!(utf8_prefix("héllo".as_bytes(), 2), Some("h"));
        assert_eq!(utf8_prefix("héllo".as_bytes(), 3), Some("hé"));
        assert_eq!(utf8_prefix(b"ab\xffcd", 10), None);
        // A broken character at the very end of the whole text is not a cut.
        assert_eq!(utf8_prefix(b"ab\xc3", 10), None);
        assert_eq!(utf8_prefix(b"", 10), Some(""));
    }

    #[test]
    fn a_long_text_is_read_only_as_far_as_its_kept_tokens() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/minilm");
        let cfg = crate::config::load(&dir).expect("minilm config (scripts/setup.sh lays out the model)");
        let p = TextPipeline::load(&dir, cfg.text.as_ref().expect("text model")).expect("tokenizer");
        let text = "The quick brown fox jumps over the lazy dog, twice. ".repeat(10_000);
        let kept = p.kept_text(text.as_bytes(), 0).expect("utf-8");
        assert!(kept.len() <= 128 * 8, "read {} bytes", kept.len());
        let whole = p.tokenizer.encode(text.as_str(), true).expect("tokenize");
        let ids = |t: &Tensor| t.to_i64_vec().expect("ids");
        let encoded = p.encode(&[Bytes::from(text.clone())]).expect("encode");
        let want: Vec<i64> = whole.get_ids().iter().map(|&x| x as i64).collect();
        assert_eq!(ids(&encoded[0].1), want, "the model sees the same tokens");
        // Text without whitespace to cut at is read up to the hard bound.
        let solid = "x".repeat(1 << 20);
        assert_eq!(
            p.kept_text(solid.as_bytes(), 0).expect("utf-8").len(),
            p.max_text_bytes()
        );
        // A short text is read whole.
        assert_eq!(p.kept_text(b"short text", 0).expect("utf-8"), "short text");
    }

    #[test]
    fn tokens_pad_to_the_batch_length() {
        let t = Tensor::from_i64(vec![2, 2], &[1, 2, 3, 4]);
        let p = pad_tokens(&t, 3);
        assert_eq!(p.shape, vec![2, 3]);
        assert_eq!(p.to_i64_vec().unwrap(), vec![1, 2, 0, 3, 4, 0]);
        assert_eq!(pad_tokens(&t, 2), t);
    }

    #[test]
    fn mean_pool_ignores_padding_and_normalises() {
        let cfg = PoolingConfig {
            output: "e".into(),
            source: "s".into(),
            mask: "m".into(),
            normalize: true,
        };
        // One item, three tokens of width 2; the last token is padding.
        let states = Tensor::from_f32(vec![1, 3, 2], &[3.0, 0.0, 3.0, 8.0, 100.0, 100.0]);
        let mask = Tensor::from_i64(vec![1, 3], &[1, 1, 0]);
        let out = mean_pool(&cfg, &states, &mask).unwrap().to_f32_vec().unwrap();
        // mean = (3, 4) -> normalised (0.6, 0.8)
        assert!((out[0] - 0.6).abs() < 1e-6 && (out[1] - 0.8).abs() < 1e-6, "{out:?}");
    }
}
