//! A JetStream stream (file storage, `max_age` = the retention) with one message per
//! record on `lattice.audit.<tenant>`.
//!
//! Each record is published with its request id as `Nats-Msg-Id` and kept until
//! JetStream acknowledges it; a batch that fails (NATS restarting, a timeout) is
//! published again after a pause, and the stream's duplicate window drops the copies
//! of records that had been stored. While NATS is away the writer holds its batch
//! and stops reading the channel, so records wait there (and past its bound are
//! dropped and counted), never in the request.

use std::time::Duration;

use crate::edge_metrics::AuditCounters;
use async_nats::jetstream::{self, stream};
use tokio::sync::mpsc;

use super::{safe_component, Msg, Record};

const BATCH: usize = 512;
const SUBJECT_PREFIX: &str = "lattice.audit";

/// A failure of the JetStream side of the audit log; `url` is the server's.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("--audit {url}: no answer within 10 s")]
    Timeout { url: String },
    #[error("--audit {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("--audit {url}: stream {stream}: {source}")]
    CreateStream {
        url: String,
        stream: String,
        source: jetstream::context::CreateStreamError,
    },
}

/// Why `lattice audit` could not read the stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
    /// Reading the stream once found: its info, the consumer, the messages.
    #[error("{0}")]
    Read(Box<dyn std::error::Error + Send + Sync>),
}

impl ReadError {
    fn read(e: impl std::error::Error + Send + Sync + 'static) -> ReadError {
        ReadError::Read(Box::new(e))
    }
}

pub struct NatsSink {
    js: jetstream::Context,
}

impl NatsSink {
    pub async fn connect(url: &str, stream_name: &str, retention: Duration) -> Result<NatsSink, NatsError> {
        let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
            .await
            .map_err(|_| NatsError::Timeout { url: url.into() })?
            .map_err(|source| NatsError::Connect {
                url: url.into(),
                source,
            })?;
        let js = jetstream::new(client);
        js.get_or_create_stream(stream::Config {
            name: stream_name.to_string(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            storage: stream::StorageType::File,
            max_age: retention,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|source| NatsError::CreateStream {
            url: url.into(),
            stream: stream_name.into(),
            source,
        })?;
        Ok(NatsSink { js })
    }

    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Msg>, counters: AuditCounters) {
        let mut batch: Vec<Record> = Vec::new();
        while let Some(first) = rx.recv().await {
            let flushes = super::gather(first, &mut rx, &mut batch, BATCH);
            let mut pause = Duration::from_millis(50);
            while !batch.is_empty() {
                let stored = self.publish(&batch).await;
                counters.written(stored.iter().filter(|s| **s).count() as u64);
                let mut i = 0;
                batch.retain(|_| {
                    let keep = !stored[i];
                    i += 1;
                    keep
                });
                if !batch.is_empty() {
                    tracing::warn!(
                        pending = batch.len(),
                        "audit records not acknowledged by JetStream; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// Publishes every record, then waits for the acks; true where stored.
    async fn publish(&self, batch: &[Record]) -> Vec<bool> {
        let mut acks = Vec::with_capacity(batch.len());
        for r in batch {
            let Ok(body) = serde_json::to_vec(r) else {
                acks.push(None);
                continue;
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", r.request_id.as_str());
            let subject = format!("{SUBJECT_PREFIX}.{}", safe_component(&r.tenant_id));
            let sent = tokio::time::timeout(
                Duration::from_secs(5),
                self.js.publish_with_headers(subject, headers, body.into()),
            )
            .await;
            acks.push(match sent {
                Ok(Ok(ack)) => Some(ack),
                _ => None,
            });
        }
        let mut stored = Vec::with_capacity(acks.len());
        for ack in acks {
            stored.push(match ack {
                Some(ack) => matches!(
                    tokio::time::timeout(Duration::from_secs(5), std::future::IntoFuture::into_future(ack)).await,
                    Ok(Ok(_))
                ),
                None => false,
            });
        }
        stored
    }
}

/// Every record of the stream, for `lattice audit --nats`.
pub async fn read_all(url: &str, stream_name: &str) -> Result<Vec<Record>, ReadError> {
    use futures::StreamExt;
    let client = async_nats::connect(url).await.map_err(|source| ReadError::Connect {
        url: url.into(),
        source,
    })?;
    let js = jetstream::new(client);
    let mut s = js.get_stream(stream_name).await.map_err(|source| ReadError::Stream {
        stream: stream_name.into(),
        source,
    })?;
    let last = s.info().await.map_err(ReadError::read)?.state.last_sequence;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(ReadError::read)?;
    let mut out = Vec::new();
    if last == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(ReadError::read)?;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
        let m = m.map_err(ReadError::read)?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(last);
        if let Ok(r) = serde_json::from_slice::<Record>(&m.payload) {
            out.push(r);
        }
        if seq >= last {
            break;
        }
    }
    Ok(out)
}
