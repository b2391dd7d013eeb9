//! The warm-up inference each new version runs before it serves: the first client
//! does not pay for lazy engine initialisation. Its request is flagged
//! ([`InferRequest::warm_up`](crate::scheduler::InferRequest::warm_up)) so the
//! metrics leave it out.

use bytes::Bytes;

use crate::{
    error::InferError,
    repository::{tokenize, LoadedModel},
    tensor::{element_count, DataType, Tensor, TensorData},
    validate::{prepare, RequestParts},
};

/// Runs one request through each new version before it serves traffic, so the first
/// client does not pay for lazy engine initialisation. Failures are logged only: some
/// models reject all-zero input.
pub(crate) async fn warm_up(model: &LoadedModel) {
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
            id: "warm-up".into(),
            inputs: inputs.clone(),
            outputs: Vec::new(),
            priority: Some(0),
            timeout: None,
            sequence: None,
        };
        let pipeline = v.scheduler.runtime().text.as_deref();

        let result = async {
            let mut req = prepare(cfg, pipeline, parts)?;
            req.warm_up = true;
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
