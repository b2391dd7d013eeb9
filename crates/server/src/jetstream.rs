//! Queue-driven inference: a NATS JetStream durable pull consumer.
//!
//! A job is an Open Inference Protocol JSON request (the REST body) published on
//! `<jobs-subject>.<model>` with a `Nats-Msg-Id` header as its job id. The answer, the
//! REST response body or `{"error": ...}`, is published on
//! `<results-subject>.<job id>` with the same `Nats-Msg-Id`.
//!
//! Exactly once: a job is acked only after JetStream has stored its result. A crash
//! between the two redelivers the job; its result is published again with the same
//! message id, which the results stream's duplicate window drops. Within a process,
//! ids already answered are acked without recomputing. Bad input gets an error
//! result (retrying cannot fix it); overload and engine failures are nak'ed with a
//! delay so another attempt, maybe on another consumer, can succeed.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::{self, consumer::pull, stream, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use lattice_inference::ModelRepository;
use parking_lot::Mutex;

use crate::{
    error::{ApiError, ErrorKind},
    json::{decode_request, encode_response},
};

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub nats_url: String,
    pub jobs_stream: String,
    /// Jobs arrive on `<jobs_subject>.<model>`.
    pub jobs_subject: String,
    pub results_stream: String,
    /// Results go to `<results_subject>.<job id>`.
    pub results_subject: String,
    pub durable: String,
    /// Jobs processed at once (also the consumer's max ack pending).
    pub concurrency: usize,
    /// How long the results stream remembers message ids.
    pub dedupe_window: Duration,
    /// Delay before a nak'ed job is redelivered.
    pub retry_delay: Duration,
    /// How long a delivered job may stay unacked before JetStream redelivers it: what
    /// a crashed replica's in-flight jobs wait before another replica gets them.
    pub ack_wait: Duration,
}

/// Remembers recently answered job ids, bounded.
struct Answered {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Answered {
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

fn transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Overloaded | ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::DeadlineExceeded
    )
}

/// Creates the streams if needed, then consumes until `shutdown` resolves; jobs in
/// progress finish first.
pub async fn run(
    cfg: ConsumerConfig,
    repo: ModelRepository,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = async_nats::connect(&cfg.nats_url).await?;
    let js = jetstream::new(client);
    let jobs = js
        .get_or_create_stream(stream::Config {
            name: cfg.jobs_stream.clone(),
            subjects: vec![format!("{}.>", cfg.jobs_subject)],
            duplicate_window: cfg.dedupe_window,
            ..Default::default()
        })
        .await?;
    js.get_or_create_stream(stream::Config {
        name: cfg.results_stream.clone(),
        subjects: vec![format!("{}.>", cfg.results_subject)],
        duplicate_window: cfg.dedupe_window,
        ..Default::default()
    })
    .await?;
    let consumer = jobs
        .get_or_create_consumer(
            &cfg.durable,
            pull::Config {
                durable_name: Some(cfg.durable.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                // Room beyond our own concurrency, so that jobs a crashed replica held
                // (unacked until ack_wait) do not block delivery to the live ones.
                max_ack_pending: (cfg.concurrency * 4) as i64,
                ..Default::default()
            },
        )
        .await?;
    let messages = consumer.messages().await?;
    let answered = Arc::new(Mutex::new(Answered {
        set: HashSet::new(),
        order: VecDeque::new(),
        cap: 100_000,
    }));
    tracing::info!(stream = %cfg.jobs_stream, durable = %cfg.durable, "consuming inference jobs");
    let cfg = Arc::new(cfg);
    let work = messages
        .take_until(shutdown)
        .for_each_concurrent(cfg.concurrency, |msg| {
            let (js, repo, cfg, answered) = (js.clone(), repo.clone(), cfg.clone(), answered.clone());
            async move {
                match msg {
                    Ok(msg) => {
                        if let Err(e) = handle(&js, &repo, &cfg, &answered, msg).await {
                            tracing::warn!(error = %e, "job not settled; JetStream will redeliver it");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "pull from JetStream failed"),
                }
            }
        });
    work.await;
    Ok(())
}

async fn handle(
    js: &jetstream::Context,
    repo: &ModelRepository,
    cfg: &ConsumerConfig,
    answered: &Mutex<Answered>,
    msg: jetstream::Message,
) -> anyhow::Result<()> {
    let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
    // The publisher's message id names the job; without one the stream sequence does.
    let id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string())
        .unwrap_or_else(|| info.stream_sequence.to_string());
    if answered.lock().contains(&id) {
        msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(());
    }
    let model = msg.subject.as_str().rsplit('.').next().unwrap_or_default().to_string();
    let mut headers = async_nats::HeaderMap::new();
    let body = match infer(repo, &model, msg.payload.clone()).await {
        Ok((body, json_len)) => {
            if let Some(n) = json_len {
                headers.insert("Inference-Header-Content-Length", n.to_string().as_str());
            }
            body
        }
        Err(e) if transient(e.kind()) => {
            msg.ack_with(AckKind::Nak(Some(cfg.retry_delay)))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok(());
        }
        Err(e) => Bytes::from(serde_json::to_vec(&serde_json::json!({ "error": e.message() }))?),
    };
    headers.insert("Nats-Msg-Id", id.as_str());
    headers.insert("Lattice-Model", model.as_str());
    // Stored (the publish ack) before the job is acked: a crash in between repeats
    // the publish, which the duplicate window absorbs.
    js.publish_with_headers(format!("{}.{id}", cfg.results_subject), headers, body)
        .await?
        .await?;
    msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    answered.lock().insert(id);
    Ok(())
}

/// Runs one job; the answer body and, for binary outputs, its JSON header length.
async fn infer(repo: &ModelRepository, model: &str, payload: Bytes) -> Result<(Bytes, Option<usize>), ApiError> {
    let decoded = decode_request(payload, None)?;
    if !decoded.shm.is_empty() {
        // A job may run on any replica, far from the memory a region lives in.
        return Err(ApiError::Malformed(
            "queue-driven jobs cannot use shared-memory regions; send the tensor data in the job".into(),
        ));
    }
    let resp = repo.infer(model, "", decoded.parts).await?;
    Ok(encode_response(model, &resp, &decoded.binary, &Default::default()))
}
