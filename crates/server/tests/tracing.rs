//! Traces leave the process over OTLP and continue the caller's W3C trace on both
//! protocols: an in-test OTLP receiver gets the REST and gRPC server spans as
//! children of the caller's spans, and the core's inference spans as their children;
//! a task posted over REST is one chain REST → gRPC (agent.offer → agent.task) →
//! worker agent → tool call → model.
//! (Its own test binary: the tracing subscriber is global to a process.)

mod support;

use std::{sync::Arc, time::Duration};

use lattice_agent::{
    client::{ClientConfig, SendOptions},
    worker::{self, Requester, WorkerConfig},
};
use lattice_observability::telemetry::{self, TelemetryConfig};
use lattice_proto::agent::{agent_message, TaskOffer};
use lattice_proto::inference as pb;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    trace::v1::Span,
};
use parking_lot_free::Spans;
use serde_json::json;
use support::{assert_eventually, repo_copy, start, Options};

mod parking_lot_free {
    use std::sync::Mutex;

    use super::Span;

    #[derive(Default)]
    pub struct Spans(pub Mutex<Vec<Span>>);
}

struct Receiver(Arc<Spans>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0 .0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_over_rest_and_grpc() {
    let spans = Arc::new(Spans::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(spans.clone())))
            .serve_with_incoming(tokio_stream_shim::incoming(listener)),
    );
    let guard = telemetry::init(&TelemetryConfig {
        filter: "warn".into(),
        json_logs: false,
        otlp_endpoint: Some(format!("http://{otlp}")),
        service_name: "lattice-test".into(),
        sample_ratio: 1.0,
        route_sample_ratios: vec![("/v2/health".into(), 0.0)],
    })
    .expect("telemetry init");

    let repo = repo_copy(&["magika"]);
    let server = start(
        repo.path(),
        Options {
            agents: true,
            ..Options::default()
        },
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (rest_parent, grpc_parent) = ("00f067aa0ba902b7", "1a2b3c4d5e6f7081");

    let body = json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": vec![1; 2048]}]});
    let r = reqwest::Client::new()
        .post(server.url("/v2/models/magika/infer"))
        .header("traceparent", format!("00-{trace_id}-{rest_parent}-01"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut req = tonic::Request::new(pb::ModelInferRequest {
        model_name: "magika".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "bytes".into(),
            datatype: "INT32".into(),
            shape: vec![1, 2048],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; 2048 * 4]],
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{grpc_parent}-01").parse().unwrap(),
    );
    server.grpc_client().await.model_infer(req).await.expect("gRPC infer");

    let find = |name_part: &str, parent: &str| {
        spans
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name.contains(name_part) && hex(&s.trace_id) == trace_id && hex(&s.parent_span_id) == parent)
            .cloned()
    };
    assert_eventually(Duration::from_secs(20), || {
        guard.flush();
        find("/v2/models/{model}/infer", rest_parent).is_some() && find("ModelInfer", grpc_parent).is_some()
    })
    .await;
    let rest = find("/v2/models/{model}/infer", rest_parent).unwrap();
    let grpc = find("ModelInfer", grpc_parent).unwrap();
    assert_eq!(rest.name, "POST /v2/models/{model}/infer");
    // The core's span hangs under each server span, in the same trace.
    for edge in [&rest, &grpc] {
        let edge_id = hex(&edge.span_id);
        assert_eventually(Duration::from_secs(10), || {
            guard.flush();
            find("inference", &edge_id).is_some()
        })
        .await;
    }

    // The agent hop: a requester (this test, span `agent_parent`) offers a task; the
    // orchestrator's `agent.task` span continues its trace, the worker's `agent.run`
    // hangs under it, the tool gateway's `tool.call` under that, and the model's
    // `inference` span under the tool call.
    let agent_parent = "2b3c4d5e6f708192";
    let orch_url = format!("http://{}", server.grpc);
    let client = |caps: &[&str]| ClientConfig {
        endpoints: vec![orch_url.clone()],
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        ..ClientConfig::default()
    };
    tokio::spawn(worker::run(
        WorkerConfig {
            client: client(&["models"]),
        },
        std::future::pending(),
    ));
    let mut requester = Requester::connect(client(&[]));
    requester.client.established().await.unwrap();
    let payload = json!({"tool": "infer", "arguments": {"model": "magika", "inputs": {
        "bytes": {"datatype": "INT32", "shape": [1, 2048], "data": vec![1; 2048]}}}});
    requester
        .client
        .send(
            agent_message::Body::Offer(TaskOffer {
                task_id: "traced".into(),
                capability: "models".into(),
                payload: payload.to_string().into_bytes(),
                max_attempts: 0,
            }),
            SendOptions {
                traceparent: format!("00-{trace_id}-{agent_parent}-01"),
                correlation_id: "traced".into(),
                ..SendOptions::default()
            },
        )
        .await
        .unwrap();
    let result = requester.next_result().await.unwrap();
    assert_eq!(result.status.as_ref().map(|s| s.code), Some(0), "{result:?}");
    let out: serde_json::Value = serde_json::from_slice(&result.output).unwrap();
    assert_eq!(out["outputs"]["target_label"]["shape"], json!([1, 214]), "{out}");
    // Each named span is the child of the one before it, starting under `root`.
    let chain = |root: &str, names: &'static [&'static str]| {
        let (find, guard) = (&find, &guard);
        let mut parent = root.to_string();
        async move {
            for name in names {
                assert_eventually(Duration::from_secs(20), || {
                    guard.flush();
                    find(name, &parent).is_some()
                })
                .await;
                let span = find(name, &parent).unwrap();
                assert_eq!(span.name, *name);
                parent = hex(&span.span_id);
            }
        }
    };
    chain(agent_parent, &["agent.task", "agent.run", "tool.call", "inference"]).await;

    // REST → gRPC → agent → tool in one chain: a REST client (span `task_parent`)
    // posts a task; the REST span's `agent.offer` client span carries it over the
    // orchestrator's gRPC stream, and the agent spans follow as above.
    let task_parent = "3c4d5e6f70819203";
    let r = reqwest::Client::new()
        .post(server.url("/v1/agents/tasks"))
        .header("traceparent", format!("00-{trace_id}-{task_parent}-01"))
        .json(
            &json!({"capability": "models", "tool": "infer", "arguments": {"model": "magika", "inputs": {
            "bytes": {"datatype": "INT32", "shape": [1, 2048], "data": vec![2; 2048]}}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        out["output"]["outputs"]["target_label"]["shape"],
        json!([1, 214]),
        "{out}"
    );
    chain(
        task_parent,
        &[
            "POST /v1/agents/tasks",
            "agent.offer",
            "agent.task",
            "agent.run",
            "tool.call",
            "inference",
        ],
    )
    .await;
    server.stop().await;
}

/// tonic's `serve_with_incoming` wants a stream of connections.
mod tokio_stream_shim {
    pub fn incoming(l: tokio::net::TcpListener) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        futures::stream::unfold(l, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        })
    }
}
