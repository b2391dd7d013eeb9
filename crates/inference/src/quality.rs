//! Turns tensors into the signals `lattice-observability` records: per-item
//! confidence and entropy of a probability output, and per-item input features for
//! drift.

use lattice_observability::quality::confidence_and_entropy;

use crate::{
    config::{DriftConfig, ModelConfig, ProbabilityKind},
    tensor::{DataType, Tensor, TensorData},
};

/// (top-1 probability, entropy in nats) of each item along the first dimension.
pub fn item_confidences(kind: ProbabilityKind, t: &Tensor) -> Vec<(f64, f64)> {
    let Some(values) = t.to_f32_vec() else {
        return Vec::new();
    };
    let items = t.shape.first().copied().unwrap_or(1).max(1) as usize;
    let width = values.len() / items;
    if width == 0 {
        return Vec::new();
    }
    values
        .chunks_exact(width)
        .map(|row| match kind {
            ProbabilityKind::Probabilities => confidence_and_entropy(row),
            ProbabilityKind::Binary => {
                let p = row[0].clamp(0.0, 1.0);
                confidence_and_entropy(&[p, 1.0 - p])
            }
        })
        .collect()
}

/// Feature names, in the order [`item_features`] produces values.
pub fn feature_names(cfg: &ModelConfig, drift: &DriftConfig) -> Vec<String> {
    drift
        .inputs
        .iter()
        .flat_map(|i| match cfg.input_by_name(i).map(|t| t.dtype()) {
            Some(DataType::Bytes) => vec![format!("{i}:length")],
            _ => vec![format!("{i}:mean"), format!("{i}:std")],
        })
        .collect()
}

/// Per-item feature values of a validated request (items along the first dimension
/// when the model batches; the whole tensor is one item otherwise). Inputs the
/// request does not carry contribute nothing.
pub fn item_features(drift: &DriftConfig, inputs: &[(String, Tensor)], batching: bool) -> Vec<Vec<f64>> {
    let mut per_item: Vec<Vec<f64>> = Vec::new();
    for name in &drift.inputs {
        let Some((_, t)) = inputs.iter().find(|(n, _)| n == name) else {
            return Vec::new();
        };
        let items = if batching {
            t.shape.first().copied().unwrap_or(1).max(1) as usize
        } else {
            1
        };
        per_item.resize_with(items, Vec::new);
        match &t.data {
            TensorData::Strings(s) => {
                let per = (s.len() / items).max(1);
                for (i, chunk) in s.chunks(per).take(items).enumerate() {
                    per_item[i].push(chunk.iter().map(|b| b.len() as f64).sum());
                }
            }
            TensorData::Raw(_) => {
                let values = numeric(t);
                let per = (values.len() / items).max(1);
                for (i, row) in values.chunks(per).take(items).enumerate() {
                    let n = row.len() as f64;
                    let mean = row.iter().sum::<f64>() / n;
                    let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                    per_item[i].push(mean);
                    per_item[i].push(var.sqrt());
                }
            }
        }
    }
    per_item
}

fn numeric(t: &Tensor) -> Vec<f64> {
    match t.dtype {
        DataType::F32 => t.to_f32_vec().unwrap_or_default().into_iter().map(f64::from).collect(),
        DataType::I32 | DataType::I64 => t
            .to_i64_vec()
            .unwrap_or_default()
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        // Other types are summarised by their raw bytes: still a distribution to watch.
        _ => t.raw_bytes().iter().map(|&b| f64::from(b)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidences_per_row() {
        let t = Tensor::from_f32(vec![2, 2], &[0.9, 0.1, 0.5, 0.5]);
        let c = item_confidences(ProbabilityKind::Probabilities, &t);
        assert_eq!(c.len(), 2);
        assert!((c[0].0 - 0.9).abs() < 1e-6 && (c[1].0 - 0.5).abs() < 1e-6);
        let b = item_confidences(ProbabilityKind::Binary, &Tensor::from_f32(vec![1, 1], &[0.2]));
        assert!((b[0].0 - 0.8).abs() < 1e-6);
    }

    #[test]
    fn features_per_item() {
        let drift = DriftConfig {
            inputs: vec!["x".into()],
            reference_file: None,
            reference_size: 1,
            window: 1,
        };
        let t = Tensor::raw(
            DataType::I32,
            vec![2, 2],
            [1i32, 3, 10, 10]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let f = item_features(&drift, &[("x".into(), t)], true);
        assert_eq!(f, vec![vec![2.0, 1.0], vec![10.0, 0.0]]);
    }
}
