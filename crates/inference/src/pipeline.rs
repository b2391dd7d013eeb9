//! Work around the engine call: text tokenization before it, pooling after it.

use std::path::Path;

use bytes::Bytes;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{
    config::{PoolingConfig, TextPipelineConfig},
    tensor::{DataType, Tensor},
};

pub struct TextPipeline {
    cfg: TextPipelineConfig,
    tokenizer: Tokenizer,
}

impl TextPipeline {
    pub fn load(model_dir: &Path, cfg: &TextPipelineConfig) -> Result<TextPipeline, String> {
        let path = model_dir.join(&cfg.tokenizer);
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| format!("tokenizer {}: {e}", path.display()))?;
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
            .map_err(|e| format!("tokenizer truncation: {e}"))?;
        Ok(TextPipeline {
            cfg: cfg.clone(),
            tokenizer,
        })
    }

    pub fn input_name(&self) -> &str {
        &self.cfg.input
    }

    /// Rejects what would fail at tokenization or in the embedding lookup: text that
    /// is not UTF-8, and token ids outside the vocabulary.
    pub fn check(&self, inputs: &[(String, Tensor)]) -> Result<(), String> {
        for (name, t) in inputs {
            if *name == self.cfg.input {
                if let crate::tensor::TensorData::Strings(items) = &t.data {
                    if let Some(i) = items.iter().position(|s| std::str::from_utf8(s).is_err()) {
                        return Err(format!("input '{name}' item {i} is not valid UTF-8"));
                    }
                }
            } else if *name == self.cfg.input_ids {
                let vocab = self.tokenizer.get_vocab_size(true) as i64;
                if let Some(id) = t
                    .to_i64_vec()
                    .and_then(|ids| ids.into_iter().find(|&id| id < 0 || id >= vocab))
                {
                    return Err(format!(
                        "input '{name}' has token id {id} outside the vocabulary 0..{vocab}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Tokenizes a batch of texts into the model's integer inputs, padded to the
    /// longest item.
    pub fn encode(&self, texts: &[Bytes]) -> Result<Vec<(String, Tensor)>, String> {
        let strs = texts
            .iter()
            .map(|t| std::str::from_utf8(t).map_err(|_| "text input is not valid UTF-8".to_string()))
            .collect::<Result<Vec<&str>, _>>()?;
        let encodings = self
            .tokenizer
            .encode_batch(strs, true)
            .map_err(|e| format!("tokenization failed: {e}"))?;
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

/// Mean pooling of token states over the attention mask, optionally L2-normalised:
/// what sentence-transformers' Pooling + Normalize modules compute.
pub fn mean_pool(cfg: &PoolingConfig, states: &Tensor, mask: &Tensor) -> Result<Tensor, String> {
    if states.dtype != DataType::F32 || states.shape.len() != 3 {
        return Err(format!(
            "pooling source '{}' must be FP32 [batch, tokens, hidden]",
            cfg.source
        ));
    }
    let (b, t, h) = (
        states.shape[0] as usize,
        states.shape[1] as usize,
        states.shape[2] as usize,
    );
    let mask = mask
        .to_i64_vec()
        .ok_or_else(|| format!("pooling mask '{}' must be integer", cfg.mask))?;
    if mask.len() != b * t {
        return Err(format!("pooling mask '{}' does not match the token states", cfg.mask));
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
