//! Every bad-input kind over REST and gRPC, against a real server: each gets the one
//! HTTP status and gRPC code of the error table, a clear message, and the server keeps
//! serving.

mod support;

use bytes::{Buf, BufMut};
use lattice_proto::inference::{self as pb, infer_parameter::ParameterChoice, model_infer_request::InferInputTensor};
use lattice_server::error::ErrorKind;
use serde_json::{json, Value};
use support::{repo_copy, start, Options};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

fn magika_json(shape: Value, data: Value, datatype: &str, name: &str) -> Value {
    json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]})
}

fn zeros(n: usize) -> Value {
    Value::Array(vec![json!(0); n])
}

fn raw_i32(n: usize) -> Vec<u8> {
    vec![0u8; n * 4]
}

fn grpc_req(
    model: &str,
    version: &str,
    name: &str,
    datatype: &str,
    shape: Vec<i64>,
    raw: Vec<Vec<u8>>,
) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        inputs: vec![InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: raw,
        ..Default::default()
    }
}

enum Grpc {
    Typed(pb::ModelInferRequest),
    /// Bytes sent as the request message body as they are.
    Raw(Vec<u8>),
}

struct Case {
    what: &'static str,
    path: String,
    header_len: Option<usize>,
    body: Vec<u8>,
    grpc: Grpc,
    kind: ErrorKind,
}

/// Sends pre-encoded bytes as a gRPC message: the only way to send malformed protobuf.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = buf.chunk().to_vec();
        buf.advance(v.len());
        Ok(Some(v))
    }
}

/// One INT32-sized tensor request sent both ways: `n` zeros as JSON data and as raw
/// bytes, against `model` (and `version`, when given).
#[allow(clippy::too_many_arguments)]
fn tensor_case(
    what: &'static str,
    model: &str,
    version: &str,
    name: &str,
    datatype: &str,
    shape: Vec<i64>,
    n: usize,
    kind: ErrorKind,
) -> Case {
    let path = match version {
        "" => format!("/v2/models/{model}/infer"),
        v => format!("/v2/models/{model}/versions/{v}/infer"),
    };
    Case {
        what,
        path,
        header_len: None,
        body: serde_json::to_vec(&magika_json(json!(shape), zeros(n), datatype, name)).unwrap(),
        grpc: Grpc::Typed(grpc_req(model, version, name, datatype, shape, vec![raw_i32(n)])),
        kind,
    }
}

/// A valid one-row Magika request over gRPC.
fn good_req() -> pb::ModelInferRequest {
    grpc_req("magika", "", "bytes", "INT32", vec![1, 2048], vec![raw_i32(2048)])
}

async fn grpc_call(server: &support::TestServer, g: Grpc) -> tonic::Status {
    match g {
        Grpc::Typed(req) => server
            .grpc_client()
            .await
            .model_infer(req)
            .await
            .expect_err("request must fail"),
        Grpc::Raw(bytes) => {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = tonic::client::Grpc::new(channel);
            client.ready().await.unwrap();
            let path =
                tonic::codegen::http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
            client
                .unary(tonic::Request::new(bytes), path, RawCodec)
                .await
                .expect_err("request must fail")
        }
    }
}

async fn check(server: &support::TestServer, http: &reqwest::Client, c: Case) {
    let (status, code) = c.kind.codes();
    let mut req = http.post(server.url(&c.path)).body(c.body.clone());
    if let Some(n) = c.header_len {
        req = req
            .header("Inference-Header-Content-Length", n.to_string())
            .header("content-type", "application/octet-stream");
    }
    let resp = req.send().await.expect("http send");
    assert_eq!(resp.status().as_u16(), status.as_u16(), "{}: HTTP status", c.what);
    let retry_after = resp.headers().get("retry-after").is_some();
    let body: Value = resp
        .json()
        .await
        .unwrap_or_else(|e| panic!("{}: JSON error body: {e}", c.what));
    let msg = body["error"].as_str().unwrap_or_default().to_string();
    assert!(!msg.is_empty(), "{}: error message in {body}", c.what);
    if c.kind == ErrorKind::Overloaded {
        assert!(retry_after, "429 carries Retry-After");
    }
    let st = grpc_call(server, c.grpc).await;
    assert_eq!(st.code(), code, "{}: gRPC code ({})", c.what, st.message());
    assert!(!st.message().is_empty(), "{}: gRPC message", c.what);
}

async fn still_serving(server: &support::TestServer, http: &reqwest::Client) {
    let body = magika_json(json!([1, 2048]), zeros(2048), "INT32", "bytes");
    let r = http
        .post(server.url("/v2/models/magika/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = server
        .grpc_client()
        .await
        .model_infer(good_req())
        .await
        .expect("good gRPC request after errors");
    assert_eq!(out.into_inner().raw_output_contents[0].len(), 214 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_error_kind_on_both_protocols() {
    let repo = repo_copy(&["magika"]);
    let server = start(repo.path(), Options::default()).await;
    let http = reqwest::Client::new();
    let infer = "/v2/models/magika/infer".to_string();
    let ok_body = magika_json(json!([1, 2048]), zeros(2048), "INT32", "bytes");
    let json_bytes = |v: &Value| serde_json::to_vec(v).unwrap();
    let timeout_req = {
        let mut r = good_req();
        r.parameters.insert(
            "timeout".into(),
            pb::InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(1)),
            },
        );
        r
    };
    let mut deadline_body = ok_body.clone();
    deadline_body["parameters"] = json!({"timeout": 1});
    let cases = vec![
        tensor_case(
            "unknown model",
            "nope",
            "",
            "bytes",
            "INT32",
            vec![1, 2048],
            2048,
            ErrorKind::NotFound,
        ),
        tensor_case(
            "unknown version",
            "magika",
            "9",
            "bytes",
            "INT32",
            vec![1, 2048],
            2048,
            ErrorKind::NotFound,
        ),
        tensor_case(
            "unparsable version",
            "magika",
            "abc",
            "bytes",
            "INT32",
            vec![1, 2048],
            2048,
            ErrorKind::InvalidInput,
        ),
        tensor_case(
            "wrong input name",
            "magika",
            "",
            "byts",
            "INT32",
            vec![1, 2048],
            2048,
            ErrorKind::InvalidInput,
        ),
        tensor_case(
            "wrong datatype",
            "magika",
            "",
            "bytes",
            "FP32",
            vec![1, 2048],
            2048,
            ErrorKind::InvalidInput,
        ),
        tensor_case(
            "wrong shape",
            "magika",
            "",
            "bytes",
            "INT32",
            vec![1, 100],
            100,
            ErrorKind::InvalidInput,
        ),
        tensor_case(
            "wrong element count",
            "magika",
            "",
            "bytes",
            "INT32",
            vec![1, 2048],
            10,
            ErrorKind::InvalidInput,
        ),
        tensor_case(
            "batch too large",
            "magika",
            "",
            "bytes",
            "INT32",
            vec![33, 2048],
            33 * 2048,
            ErrorKind::BatchTooLarge,
        ),
        Case {
            what: "missing input",
            path: infer.clone(),
            header_len: None,
            body: json_bytes(&json!({"inputs": []})),
            grpc: Grpc::Typed(pb::ModelInferRequest {
                model_name: "magika".into(),
                ..Default::default()
            }),
            kind: ErrorKind::InvalidInput,
        },
        Case {
            what: "malformed JSON / protobuf",
            path: infer.clone(),
            header_len: None,
            body: b"{\"inputs\": [".to_vec(),
            // Field 1 (model_name) as a length-delimited value claiming 100 bytes.
            grpc: Grpc::Raw(vec![0x0a, 100, b'x']),
            kind: ErrorKind::Malformed,
        },
        Case {
            what: "malformed binary header / raw contents",
            path: infer.clone(),
            header_len: Some(100_000),
            body: json_bytes(&ok_body),
            grpc: Grpc::Typed(grpc_req(
                "magika",
                "",
                "bytes",
                "INT32",
                vec![1, 2048],
                vec![raw_i32(2048), raw_i32(1)],
            )),
            kind: ErrorKind::Malformed,
        },
        Case {
            what: "deadline passed before compute",
            path: infer.clone(),
            header_len: None,
            body: json_bytes(&deadline_body),
            grpc: Grpc::Typed(timeout_req),
            kind: ErrorKind::DeadlineExceeded,
        },
    ];
    for c in cases {
        check(&server, &http, c).await;
    }
    still_serving(&server, &http).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_body_is_rejected_on_both_protocols() {
    let repo = repo_copy(&["magika"]);
    let server = start(
        repo.path(),
        Options {
            max_body_bytes: 64 * 1024,
            ..Options::default()
        },
    )
    .await;
    let http = reqwest::Client::new();
    let rows = 20;
    let json = serde_json::to_vec(
        &json!({"inputs": [{"name": "bytes", "shape": [rows, 2048], "datatype": "INT32",
        "parameters": {"binary_data_size": rows * 2048 * 4}}]}),
    )
    .unwrap();
    let mut body = json.clone();
    body.extend(raw_i32(rows * 2048));
    check(
        &server,
        &http,
        Case {
            what: "oversize body",
            path: "/v2/models/magika/infer".into(),
            header_len: Some(json.len()),
            body,
            grpc: Grpc::Typed(grpc_req(
                "magika",
                "",
                "bytes",
                "INT32",
                vec![rows as i64, 2048],
                vec![raw_i32(rows * 2048)],
            )),
            kind: ErrorKind::PayloadTooLarge,
        },
    )
    .await;
    still_serving(&server, &http).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_overloaded_and_loses_nothing_else() {
    let repo = repo_copy(&["magika"]);
    support::edit_config(repo.path(), "magika", |s| {
        s.replace("max_batch_size = 32", "max_batch_size = 1")
            .replace("max_queue_size = 512", "max_queue_size = 2")
            .replace("count = 2", "count = 1")
    });
    let server = start(repo.path(), Options::default()).await;
    let http = reqwest::Client::new();
    let body = magika_json(json!([1, 2048]), zeros(2048), "INT32", "bytes");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (http, url, body) = (http.clone(), server.url("/v2/models/magika/infer"), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()),
            )
        }));
    }
    let mut ok = 0;
    let mut rejected = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (429, Some(after)) => {
                assert!(after.parse::<u64>().unwrap() >= 1);
                rejected += 1
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(ok >= 3 && rejected >= 1, "ok {ok}, rejected {rejected}");
    let mut client = server.grpc_client().await;
    let mut calls = Vec::new();
    for _ in 0..32 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move { c.model_infer(good_req()).await }));
    }
    let mut exhausted = 0;
    for c in calls {
        if let Err(st) = c.await.unwrap() {
            assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{}", st.message());
            exhausted += 1;
        }
    }
    assert!(exhausted >= 1);
    // The queue drains and the model serves again.
    let r = client.model_infer(good_req()).await;
    assert!(r.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_health_follows_readiness() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let repo = repo_copy(&["magika"]);
    let server = start(repo.path(), Options::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["inference.GRPCInferenceService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == s), "{s} in {names:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |svc: &str| tonic_health::pb::HealthCheckRequest { service: svc.into() };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    // Every service listed answers its own health check; nothing unserved is listed.
    assert!(!names.iter().any(|n| n.starts_with("lattice.bench")), "{names:?}");
    for svc in [""].into_iter().chain(names.iter().map(String::as_str)) {
        assert_eq!(
            health.check(check(svc)).await.unwrap().into_inner().status,
            serving,
            "{svc:?}"
        );
    }
    server.stop().await;
}

/// `POST /v1/agents/tasks`: a task offered over REST goes through the orchestrator's
/// gRPC stream to a worker agent, and each way it can fail gets its status from the
/// error table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_tasks_reach_a_worker_and_failures_map_to_statuses() {
    use lattice_agent::{
        client::ClientConfig,
        worker::{self, WorkerConfig},
    };
    let repo = repo_copy(&["magika"]);
    let token = "s3cret";
    let server = start(
        repo.path(),
        Options {
            agents: true,
            agent_token: Some(token.into()),
            ..Options::default()
        },
    )
    .await;
    tokio::spawn(worker::run(
        WorkerConfig {
            client: ClientConfig {
                endpoints: vec![format!("http://{}", server.grpc)],
                capabilities: vec!["tools".into()],
                auth_token: Some(token.into()),
                ..ClientConfig::default()
            },
        },
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let post = |body: Value, auth: Option<&str>| {
        let mut r = http.post(server.url("/v1/agents/tasks")).json(&body);
        if let Some(t) = auth {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let calc = json!({"capability": "tools", "tool": "calculator", "arguments": {"expression": "6 * 7"},
                      "priority": "high", "timeout_ms": 20000});

    let (status, body) = post(calc.clone(), Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"]["value"], json!(42.0), "{body}");
    assert!(body["worker_id"].as_str().is_some_and(|w| !w.is_empty()), "{body}");

    let expect = |k: ErrorKind| k.codes().0.as_u16();
    let cases: Vec<(&str, Value, Option<&str>, u16, &str)> = vec![
        (
            "no token",
            calc.clone(),
            None,
            expect(ErrorKind::Unauthenticated),
            "bearer token",
        ),
        (
            "wrong token",
            calc.clone(),
            Some("nope"),
            expect(ErrorKind::Unauthenticated),
            "bearer token",
        ),
        (
            "not an object",
            json!([1]),
            Some(token),
            expect(ErrorKind::Malformed),
            "task request",
        ),
        (
            "no tool",
            json!({"capability": "tools"}),
            Some(token),
            expect(ErrorKind::Malformed),
            "tool",
        ),
        (
            "tool and payload both",
            json!({"capability": "tools", "tool": "echo", "payload": {"x": 1}}),
            Some(token),
            expect(ErrorKind::Malformed),
            "not both",
        ),
        (
            "arguments beside a payload",
            json!({"capability": "tools", "payload": {"x": 1}, "arguments": {}}),
            Some(token),
            expect(ErrorKind::Malformed),
            "put them in payload",
        ),
        (
            "unknown field",
            json!({"capability": "tools", "tool": "echo", "colour": 1}),
            Some(token),
            expect(ErrorKind::Malformed),
            "colour",
        ),
        (
            "bad priority",
            json!({"capability": "tools", "tool": "echo", "priority": "asap"}),
            Some(token),
            expect(ErrorKind::Malformed),
            "priority",
        ),
        (
            "arguments not an object",
            json!({"capability": "tools", "tool": "echo", "arguments": 3}),
            Some(token),
            expect(ErrorKind::Malformed),
            "arguments",
        ),
        (
            "unknown tool",
            json!({"capability": "tools", "tool": "teleport", "timeout_ms": 20000}),
            Some(token),
            expect(ErrorKind::NotFound),
            "teleport",
        ),
        (
            "arguments against the tool's schema",
            json!({"capability": "tools", "tool": "calculator", "arguments": {"expression": 7}, "timeout_ms": 20000}),
            Some(token),
            expect(ErrorKind::InvalidInput),
            "schema of 'calculator'",
        ),
        (
            "slower than its timeout",
            json!({"capability": "tools", "tool": "sleep", "arguments": {"ms": 60000}, "timeout_ms": 300}),
            Some(token),
            expect(ErrorKind::DeadlineExceeded),
            "",
        ),
        (
            "no worker has the capability",
            json!({"capability": "nobody", "tool": "echo", "arguments": {"value": 1}, "timeout_ms": 300}),
            Some(token),
            expect(ErrorKind::DeadlineExceeded),
            "",
        ),
    ];
    for (what, body, auth, want, needle) in cases {
        let started = std::time::Instant::now();
        let (status, resp) = post(body, auth).await;
        assert_eq!(status, want, "{what}: {resp}");
        let msg = resp["error"].as_str().unwrap_or_default();
        assert!(!msg.is_empty() && msg.contains(needle), "{what}: {resp}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{what} took {:?}",
            started.elapsed()
        );
    }

    // Still serving after every failure.
    let (status, _) = post(calc, Some(token)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// The kinds only the shared-memory extension raises (and the ones it shares), over
/// both protocols against real shared-memory objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_kinds_on_both_protocols() {
    let repo = repo_copy(&["magika"]);
    let server = start(repo.path(), Options::default()).await;
    let http = reqwest::Client::new();
    let mut grpc = server.grpc_client().await;
    let key = format!("lattice_errors_{}", std::process::id());
    let path = std::path::Path::new(lattice_server::shm::SHM_DIR).join(&key);
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let expect_http = |r: reqwest::Response, kind: ErrorKind, what: &str| {
        assert_eq!(r.status().as_u16(), kind.codes().0.as_u16(), "{what}: HTTP status");
    };
    let expect_grpc = |st: tonic::Status, kind: ErrorKind, what: &str| {
        assert_eq!(st.code(), kind.codes().1, "{what}: gRPC code ({})", st.message());
        assert!(!st.message().is_empty(), "{what}: message");
    };
    let register = |name: &str| pb::SystemSharedMemoryRegisterRequest {
        name: name.into(),
        key: format!("/{key}"),
        offset: 0,
        byte_size: 4096,
    };
    let rest_register = |name: &str| {
        http.post(server.url(&format!("/v2/systemsharedmemory/region/{name}/register")))
            .json(&json!({"key": format!("/{key}"), "byte_size": 4096}))
            .send()
    };

    // AlreadyExists: a name registered twice.
    assert_eq!(rest_register("a").await.unwrap().status(), 200);
    expect_http(rest_register("a").await.unwrap(), ErrorKind::AlreadyExists, "duplicate");
    let st = grpc.system_shared_memory_register(register("a")).await.unwrap_err();
    expect_grpc(st, ErrorKind::AlreadyExists, "duplicate");

    // Unsupported: CUDA shared memory without a GPU.
    let r = http
        .post(server.url("/v2/cudasharedmemory/region/g/register"))
        .json(&json!({"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 8}))
        .send()
        .await
        .unwrap();
    expect_http(r, ErrorKind::Unsupported, "cuda register");
    let st = grpc
        .cuda_shared_memory_register(pb::CudaSharedMemoryRegisterRequest {
            name: "g".into(),
            byte_size: 8,
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_grpc(st, ErrorKind::Unsupported, "cuda register");

    // NotFound: an input naming a region that is not registered.
    let mut req = good_req();
    req.raw_input_contents.clear();
    req.inputs[0].parameters.insert(
        "shared_memory_region".into(),
        pb::InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("ghost".into())),
        },
    );
    req.inputs[0].parameters.insert(
        "shared_memory_byte_size".into(),
        pb::InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(2048 * 4)),
        },
    );
    let body = json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32",
        "parameters": {"shared_memory_region": "ghost", "shared_memory_byte_size": 2048 * 4}}]});
    let r = http
        .post(server.url("/v2/models/magika/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_http(r, ErrorKind::NotFound, "unknown region");
    expect_grpc(
        grpc.model_infer(req).await.unwrap_err(),
        ErrorKind::NotFound,
        "unknown region",
    );

    // Overloaded: more regions than the limit.
    let limit = lattice_server::shm::Limits::default().max_regions;
    for i in 1..limit {
        grpc.system_shared_memory_register(register(&format!("r{i}")))
            .await
            .expect("room for this region");
    }
    expect_http(rest_register("over").await.unwrap(), ErrorKind::Overloaded, "too many");
    let st = grpc.system_shared_memory_register(register("over")).await.unwrap_err();
    expect_grpc(st, ErrorKind::Overloaded, "too many");

    // Unregistering all leaves none, and the server still serves.
    grpc.system_shared_memory_unregister(pb::SystemSharedMemoryUnregisterRequest::default())
        .await
        .unwrap();
    let status: Value = http
        .get(server.url("/v2/systemsharedmemory/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status, json!([]));
    std::fs::remove_file(&path).unwrap();
    still_serving(&server, &http).await;
    server.stop().await;
}
