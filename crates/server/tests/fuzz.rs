//! Mutation fuzzing of every decoder that reads untrusted bytes, on a committed
//! corpus: OIP JSON, the binary tensor extension, the BYTES length prefix, protobuf
//! inference requests (then validation against the bundled models' configs), and
//! agent frames (through a real orchestrator's stream).
//!
//! Each target mutates its corpus entries (bit flips, interesting bytes, numbers
//! that overflow, splices, truncation) `LATTICE_FUZZ_ITERS` times (default 1500) with
//! a seed from `LATTICE_FUZZ_SEED` (default fixed, so CI is repeatable); nothing may
//! panic. A panicking input is written to `target/fuzz-crashes/` for the corpus.
//! The corpus is written from the seeds below with `LATTICE_FUZZ_WRITE_CORPUS=1`.
//!
//! Longer run: `LATTICE_FUZZ_ITERS=200000 LATTICE_FUZZ_SEED=$RANDOM cargo test -p
//! lattice-server --test fuzz --release`.

mod support;

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use lattice_inference::{config, pipeline::TextPipeline, repository::prepare, tensor::parse_wire_strings};
use lattice_proto::{
    agent::{agent_coordination_client::AgentCoordinationClient, agent_message, AgentMessage, Envelope, Hello},
    inference::{model_infer_request::InferInputTensor, InferTensorContents, ModelInferRequest},
};
use lattice_server::{grpc::request_parts, json::decode_request};
use prost::Message;

const TARGETS: [&str; 5] = ["oip_json", "binary", "bytes", "proto_infer", "agent_frame"];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(target)
}

fn iterations() -> usize {
    std::env::var("LATTICE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn rng(target: &str) -> fastrand::Rng {
    let seed: u64 = std::env::var("LATTICE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1a77_1ce5);
    let salt = target
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    fastrand::Rng::with_seed(seed ^ salt)
}

// === Seeds ===

/// A binary-extension body is stored as "<json length>\n<body>".
fn with_header_len(json: &str, tail: &[u8]) -> Vec<u8> {
    let mut v = format!("{}\n{json}", json.len()).into_bytes();
    v.extend_from_slice(tail);
    v
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "oip_json" => [
            r#"{"id":"a","inputs":[{"name":"TEXT","shape":[2],"datatype":"BYTES","data":["hello","world"]}],"outputs":[{"name":"embedding"}]}"#,
            r#"{"inputs":[{"name":"input_ids","shape":[1,3],"datatype":"INT64","data":[[101,7592,102]]},{"name":"attention_mask","shape":[1,3],"datatype":"INT64","data":[1,1,1]}],"parameters":{"priority":3,"timeout":1000}}"#,
            r#"{"inputs":[{"name":"sr","shape":[],"datatype":"INT64","data":[16000]},{"name":"state","shape":[2,1,128],"datatype":"FP32","data":[0.0]},{"name":"input","shape":[1,576],"datatype":"FP32","data":[0.5,1e-3,-2]}]}"#,
            r#"{"inputs":[{"name":"bytes","shape":[1,4],"datatype":"INT32","data":[1,2,3,256]}],"outputs":[{"name":"target_label","parameters":{"binary_data":true}}]}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        "binary" => {
            let mut fp = Vec::new();
            for x in [0.25f32, -1.0, 3.5] {
                fp.extend_from_slice(&x.to_le_bytes());
            }
            let mut strings = Vec::new();
            for s in [&b"hi"[..], b"\0\xff"] {
                strings.extend_from_slice(&(s.len() as u32).to_le_bytes());
                strings.extend_from_slice(s);
            }
            vec![
                with_header_len(
                    r#"{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}"#,
                    &fp,
                ),
                with_header_len(
                    r#"{"inputs":[{"name":"TEXT","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":14}}]}"#,
                    &strings,
                ),
                with_header_len(
                    r#"{"inputs":[{"name":"input_ids","shape":[1,1],"datatype":"INT64","parameters":{"binary_data_size":8}}]}"#,
                    &101i64.to_le_bytes(),
                ),
            ]
        }
        "bytes" => vec![
            vec![2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0],
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            vec![3, 0, 0, 0, 0, 0xff, 0x80],
        ],
        "proto_infer" => {
            let text = ModelInferRequest {
                model_name: "minilm".into(),
                id: "p".into(),
                inputs: vec![InferInputTensor {
                    name: "TEXT".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    contents: Some(InferTensorContents {
                        bytes_contents: vec![b"a sentence".to_vec()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let raw = ModelInferRequest {
                model_name: "silero_vad".into(),
                inputs: ["input", "state", "sr"]
                    .iter()
                    .zip([vec![1i64, 576], vec![2, 1, 128], vec![]])
                    .zip(["FP32", "FP32", "INT64"])
                    .map(|((n, shape), dt)| InferInputTensor {
                        name: (*n).into(),
                        datatype: dt.into(),
                        shape,
                        ..Default::default()
                    })
                    .collect(),
                raw_input_contents: vec![vec![0u8; 576 * 4], vec![0u8; 256 * 4], 16000i64.to_le_bytes().to_vec()],
                ..Default::default()
            };
            vec![text.encode_to_vec(), raw.encode_to_vec()]
        }
        "agent_frame" => {
            let env = |seq: u64| Envelope {
                msg_id: format!("m{seq}"),
                seq_no: seq,
                sent_at_us: 1,
                deadline_us: 0,
                ..Default::default()
            };
            let frames = [
                agent_message::Body::Offer(lattice_proto::agent::TaskOffer {
                    task_id: "t1".into(),
                    capability: "tools".into(),
                    payload: br#"{"tool":"echo","arguments":{"value":1}}"#.to_vec(),
                    max_attempts: 2,
                }),
                agent_message::Body::Credit(lattice_proto::agent::Credit {
                    ..Default::default()
                }),
                agent_message::Body::Heartbeat(lattice_proto::agent::Heartbeat {
                    sent_at_us: 5,
                    ..Default::default()
                }),
                agent_message::Body::Ack(lattice_proto::agent::Ack {}),
                agent_message::Body::Cancel(lattice_proto::agent::Cancel {
                    task_id: "t1".into(),
                    reason: "r".into(),
                    grace_ms: 10,
                }),
            ];
            frames
                .into_iter()
                .enumerate()
                .map(|(i, body)| {
                    AgentMessage {
                        agent_id: "fuzz".into(),
                        env: Some(env(i as u64 + 1)),
                        body: Some(body),
                        ..Default::default()
                    }
                    .encode_to_vec()
                })
                .collect()
        }
        _ => unreachable!("unknown target {target}"),
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    if std::env::var_os("LATTICE_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (i, s) in seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("write seed");
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (LATTICE_FUZZ_WRITE_CORPUS=1 writes it)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let out: Vec<Vec<u8>> = entries.iter().map(|p| std::fs::read(p).expect("read corpus")).collect();
    assert!(!out.is_empty(), "empty corpus for {target}");
    out
}

// === Mutation ===

/// Tokens that break decoders: numbers past every integer width, negative and
/// zero sizes, deep nesting, duplicated keys.
const DICTIONARY: &[&str] = &[
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "2305843009213693953",
    "4294967295",
    "-1",
    "0",
    "1e308",
    "NaN",
    "[[[[[[[[[[[[[[[[[[[[[[[[",
    "\"binary_data_size\":",
    "\"shape\":[",
    "\"BYTES\"",
    "\"outputs\":[{\"name\":\"embedding\"},{\"name\":\"embedding\"}]",
    "\\u0000",
    "\"",
    ",",
    "}",
];

fn mutate(rng: &mut fastrand::Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let len = v.len();
        match rng.u8(0..8) {
            0 if len > 0 => {
                let i = rng.usize(0..len);
                v[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(0..len);
                v[i] = rng
                    .choice([0u8, 0xff, 0x7f, 0x80, b'"', b'[', b'9', b'-'])
                    .expect("non-empty");
            }
            2 => {
                let i = rng.usize(0..=len);
                let tok = rng.choice(DICTIONARY).expect("non-empty");
                v.splice(i..i, tok.bytes());
            }
            3 if len > 1 => {
                let a = rng.usize(0..len);
                let b = rng.usize(a..=len.min(a + 64));
                v.drain(a..b);
            }
            4 if len > 1 => {
                let a = rng.usize(0..len);
                let b = rng.usize(a..=len.min(a + 64));
                let chunk = v[a..b].to_vec();
                let at = rng.usize(0..=v.len());
                v.splice(at..at, chunk);
            }
            5 => v.truncate(rng.usize(0..=len)),
            6 if !others.is_empty() => {
                let o = &others[rng.usize(0..others.len())];
                let cut = rng.usize(0..=len);
                let from = rng.usize(0..=o.len());
                v.truncate(cut);
                v.extend_from_slice(&o[from..]);
            }
            _ => {
                // A protobuf varint or a length prefix at its extreme.
                let i = rng.usize(0..=len);
                let n = rng
                    .choice([u32::MAX, 0x8000_0000, 0x7fff_ffff, 1 << 24])
                    .expect("non-empty");
                v.splice(i..i, n.to_le_bytes());
            }
        }
    }
    v
}

/// Runs `check` on the corpus and on mutations of it; any panic fails the test
/// after the offending input is saved.
fn fuzz(target: &str, mut check: impl FnMut(&[u8])) -> usize {
    let corpus = corpus(target);
    let mut rng = rng(target);
    let mut inputs: Vec<Vec<u8>> = corpus.clone();
    for _ in 0..iterations() {
        let base = &corpus[rng.usize(0..corpus.len())];
        inputs.push(mutate(&mut rng, base, &corpus));
    }
    let mut decoded = 0;
    for input in &inputs {
        let before = ACCEPTED.load(Ordering::Relaxed);
        if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/fuzz-crashes")
                .join(target);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{:016x}", fastrand::u64(..)));
            let _ = std::fs::write(&path, input);
            panic!("{target}: an input panicked; saved to {}", path.display());
        }
        decoded += ACCEPTED.load(Ordering::Relaxed) - before;
    }
    decoded
}

/// Inputs a decoder accepted, so a test can tell it reached past the parser.
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);

fn accepted() {
    ACCEPTED.fetch_add(1, Ordering::Relaxed);
}

// === Targets ===

struct Model {
    cfg: config::ModelConfig,
    text: Option<TextPipeline>,
}

fn bundled_models() -> Vec<Model> {
    let root = support::workspace_root().join("models");
    ["minilm", "magika", "silero_vad"]
        .iter()
        .map(|m| {
            let dir = root.join(m);
            let mut cfg = config::load(&dir).expect("config");
            cfg.name = (*m).to_string();
            let text = cfg
                .text
                .as_ref()
                .map(|t| TextPipeline::load(&dir, t).expect("tokenizer"));
            Model { cfg, text }
        })
        .collect()
}

/// Validation against every bundled model must answer, never panic; what it
/// accepts must be self-consistent.
fn validate(models: &[Model], parts: &lattice_inference::RequestParts) {
    for m in models {
        let p = lattice_inference::RequestParts {
            id: parts.id.clone(),
            inputs: parts.inputs.clone(),
            outputs: parts.outputs.clone(),
            priority: parts.priority,
            timeout: parts.timeout,
            sequence: None,
        };
        if let Ok(req) = prepare(&m.cfg, m.text.as_ref(), p) {
            for (name, t) in &req.inputs {
                assert!(
                    t.check_consistent().is_ok(),
                    "{}: accepted inconsistent '{name}'",
                    m.cfg.name
                );
            }
            if let Some(text) = &m.text {
                for (name, t) in &req.inputs {
                    if name == text.input_name() {
                        if let lattice_inference::TensorData::Strings(items) = &t.data {
                            let _ = text.encode(items);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn oip_json_and_binary_extension() {
    let models = bundled_models();
    let n = fuzz("oip_json", |input| {
        if let Ok(d) = decode_request(Bytes::copy_from_slice(input), None) {
            accepted();
            validate(&models, &d.parts);
        }
    });
    assert!(
        n > 0,
        "no JSON input decoded: the corpus does not reach past the parser"
    );
    let n = fuzz("binary", |input| {
        let Some(nl) = input.iter().position(|&b| b == b'\n') else {
            return;
        };
        let Some(len) = std::str::from_utf8(&input[..nl])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return;
        };
        if let Ok(d) = decode_request(Bytes::copy_from_slice(&input[nl + 1..]), Some(len)) {
            accepted();
            validate(&models, &d.parts);
        }
    });
    assert!(n > 0, "no binary-extension input decoded");
}

#[test]
fn bytes_length_prefix() {
    let n = fuzz("bytes", |input| {
        if let Ok(items) = parse_wire_strings(Bytes::copy_from_slice(input)) {
            accepted();
            let total: usize = items.iter().map(|i| 4 + i.len()).sum();
            assert_eq!(total, input.len(), "decoded items must account for every byte");
        }
    });
    assert!(n > 0);
}

#[test]
fn protobuf_infer_requests() {
    let models = bundled_models();
    let n = fuzz("proto_infer", |input| {
        if let Ok(req) = ModelInferRequest::decode(input) {
            if let Ok(parts) = request_parts(req, Some(Duration::from_secs(u64::MAX / 4))) {
                accepted();
                validate(&models, &parts);
            }
        }
    });
    assert!(n > 0);
}

/// Mutated frames go down a real agent stream, after a valid Hello; the
/// orchestrator must keep serving (a fresh stream still gets its Welcome) and
/// nothing may panic in its tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_frames_through_the_orchestrator() {
    let panics = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        seen.fetch_add(1, Ordering::Relaxed);
        default_hook(info);
    }));
    let repo = support::repo_copy(&[]);
    let server = support::start(
        repo.path(),
        support::Options {
            agents: true,
            load_models: false,
            ..support::Options::default()
        },
    )
    .await;
    let url = format!("http://{}", server.grpc);
    let mut frames = Vec::new();
    let decoded = fuzz("agent_frame", |input| {
        if let Ok(m) = AgentMessage::decode(input) {
            accepted();
            frames.push(m);
        }
    });
    assert!(decoded > 0);
    let hello = |id: &str| AgentMessage {
        agent_id: id.into(),
        env: Some(Envelope {
            msg_id: format!("{id}-hello"),
            ..Default::default()
        }),
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: 1,
            capabilities: vec!["tools".into()],
            max_in_flight: 4,
            ..Default::default()
        })),
        ..Default::default()
    };
    for (i, chunk) in frames.chunks(100).enumerate() {
        let mut client = AgentCoordinationClient::connect(url.clone()).await.expect("connect");
        let mut msgs = vec![hello(&format!("fuzz-{i}"))];
        // In sequence, so the frames pass the inbox's gap check and reach the
        // handlers; the fields that matter to them stay as mutated.
        msgs.extend(chunk.iter().cloned().enumerate().map(|(n, mut m)| {
            if let Some(env) = m.env.as_mut() {
                env.seq_no = n as u64 + 1;
            }
            m
        }));
        // Whatever the orchestrator answers (frames, an error status, the end of
        // the stream), it answers within a bound.
        if let Ok(resp) = client.negotiate_task(futures::stream::iter(msgs)).await {
            let mut stream = resp.into_inner();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(_)) = stream.message().await {}
            })
            .await;
        }
    }
    let mut client = AgentCoordinationClient::connect(url).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello("after-fuzz")).await.expect("send");
    let mut stream = client
        .negotiate_task(tokio_stream_from(rx))
        .await
        .expect("stream after fuzzing")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("welcome in time")
        .expect("stream ok")
        .expect("a frame");
    assert!(
        matches!(first.body, Some(lattice_proto::agent::agent_response::Body::Welcome(_))),
        "{first:?}"
    );
    drop(tx);
    assert_eq!(panics.load(Ordering::Relaxed), 0, "a task of the server panicked");
    let _ = std::panic::take_hook();
    server.stop().await;
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<AgentMessage>) -> impl futures::Stream<Item = AgentMessage> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[test]
fn every_target_has_a_corpus() {
    for t in TARGETS {
        assert!(!corpus(t).is_empty(), "{t}");
    }
}
