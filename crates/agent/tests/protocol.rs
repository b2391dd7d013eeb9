//! The agent plane over real sockets, in one process: an orchestrator on
//! 127.0.0.1:0 with a real store, worker and requester agents from the client
//! library, and raw tonic clients for protocol violations.

use std::{net::SocketAddr, time::Duration};

use lattice_agent::{
    client::{AgentClient, ClientConfig, Event, LinkState, SendOptions},
    orchestrator::{Orchestrator, OrchestratorConfig},
    store::{Store, StoreUrl},
    tools::{ToolGateway, COUNTER_COLL},
    worker::{self, Requester, WorkerConfig},
};
use lattice_proto::agent::{
    agent_coordination_client::AgentCoordinationClient, agent_coordination_server::AgentCoordinationServer,
    agent_message, agent_response, chat_client::ChatClient, chat_server::ChatServer, memory_op, AgentMessage,
    ChatMessage, Hello, MemoryOp, MemoryPut, MemorySync,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

struct Plane {
    metrics: std::sync::Arc<lattice_observability::Metrics>,
    addr: SocketAddr,
    orch: Orchestrator,
    store: Store,
    stop: CancellationToken,
    _dir: Option<tempfile::TempDir>,
}

impl Plane {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn fast_config() -> OrchestratorConfig {
    OrchestratorConfig {
        heartbeat_interval: Duration::from_millis(500),
        reassign_after: Duration::from_millis(500),
        ..OrchestratorConfig::default()
    }
}

async fn start_with(store: Store, cfg: OrchestratorConfig, dir: Option<tempfile::TempDir>) -> Plane {
    let metrics = std::sync::Arc::new(lattice_observability::Metrics::new());
    let tools = ToolGateway::new(store.clone(), None, metrics.clone()).unwrap();
    let orch = Orchestrator::new(cfg, store.clone(), tools, metrics.clone())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(AgentCoordinationServer::new(orch.clone()))
        .add_service(ChatServer::new(lattice_agent::chat::ChatService::default()))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    Plane {
        metrics,
        addr,
        orch,
        store,
        stop,
        _dir: dir,
    }
}

async fn start() -> Plane {
    start_cfg(fast_config()).await
}

/// An orchestrator with its own embedded store and `cfg`.
async fn start_cfg(cfg: OrchestratorConfig) -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreUrl::Redb(dir.path().join("agents.redb")), "t")
        .await
        .unwrap();
    start_with(store, cfg, Some(dir)).await
}

fn client_cfg(plane: &Plane, caps: &[&str]) -> ClientConfig {
    ClientConfig {
        endpoints: vec![plane.url()],
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        max_in_flight: 32,
        ..ClientConfig::default()
    }
}

fn spawn_worker(plane: &Plane, caps: &[&str]) -> CancellationToken {
    let stop = CancellationToken::new();
    let cfg = WorkerConfig {
        client: client_cfg(plane, caps),
    };
    tokio::spawn(worker::run(cfg, stop.clone().cancelled_owned()));
    stop
}

/// Offers `n` counter tasks `{prefix}{i}`, each incrementing the counter of that name.
async fn offer_counters(req: &Requester, prefix: &str, n: usize) {
    for i in 0..n {
        let id = format!("{prefix}{i}");
        req.offer_tool(&id, "tools", "counter", serde_json::json!({"name": id}), 2, None)
            .await
            .unwrap();
    }
}

async fn counter(store: &Store, name: &str) -> i64 {
    store
        .backend()
        .get(COUNTER_COLL, name)
        .await
        .unwrap()
        .map(|v| std::str::from_utf8(&v).unwrap().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn tasks_flow_to_workers_and_side_effects_happen_once() {
    let plane = start().await;
    let _w1 = spawn_worker(&plane, &["tools"]);
    let _w2 = spawn_worker(&plane, &["tools"]);
    let mut req = Requester::connect(client_cfg(&plane, &[]));
    req.client.established().await.unwrap();
    let n = 500;
    offer_counters(&req, "c", n).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let r = tokio::time::timeout(Duration::from_secs(20), req.next_result())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
        assert!(seen.insert(r.task_id.clone()), "result twice for {}", r.task_id);
    }
    for i in [0, 17, n - 1] {
        assert_eq!(counter(&plane.store, &format!("c{i}")).await, 1);
    }
    // The agent plane's own series.
    let text = plane.metrics.encode();
    for series in [
        "lattice_agent_tasks_total{outcome=\"ok\"} 500",
        "lattice_tool_calls_total{tool=\"counter\",outcome=\"ok\"} 500",
        "lattice_agent_sessions{state=\"established\"} 3",
        "lattice_agent_dispatch_seconds_count 500",
        "lattice_agent_frames_total{direction=\"in\",kind=\"offer\"} 500",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    // A calculator task returns the tool's output as the task output.
    req.offer_tool(
        "calc",
        "tools",
        "calculator",
        serde_json::json!({"expression": "6 * 7"}),
        5,
        None,
    )
    .await
    .unwrap();
    let r = req.next_result().await.unwrap();
    let out: serde_json::Value = serde_json::from_slice(&r.output).unwrap();
    assert_eq!(out["value"], 42.0);
    // Schema violations are the requester's error, not a retry.
    req.offer_tool("bad", "tools", "counter", serde_json::json!({"nom": 1}), 2, None)
        .await
        .unwrap();
    let r = req.next_result().await.unwrap();
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(Code::InvalidArgument as i32));
    assert!(r.status.unwrap().message.contains("schema"));
    plane.stop.cancel();
}

#[tokio::test]
async fn first_frame_must_be_hello_and_malformed_frames_are_refused() {
    let plane = start().await;
    let mut raw = AgentCoordinationClient::connect(plane.url()).await.unwrap();
    let not_hello = AgentMessage {
        body: Some(agent_message::Body::Heartbeat(Default::default())),
        ..AgentMessage::default()
    };
    let mut stream = raw
        .negotiate_task(tokio_stream::iter(vec![not_hello]))
        .await
        .unwrap()
        .into_inner();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("first frame must be hello"), "{}", err.message());

    // Bytes that are not an AgentMessage, sent with a raw codec.
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(plane.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/lattice.agent.v1.AgentCoordination/NegotiateTask");
    let garbage = vec![bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f, 0x08])];
    let res = grpc
        .streaming(tonic::Request::new(tokio_stream::iter(garbage)), path, RawCodec)
        .await;
    let code = match res {
        Ok(resp) => resp.into_inner().message().await.unwrap_err().code(),
        Err(s) => s.code(),
    };
    assert_eq!(code, Code::InvalidArgument);

    // Wrong protocol version.
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: 99,
            ..Hello::default()
        })),
        ..AgentMessage::default()
    };
    let mut stream = raw
        .negotiate_task(tokio_stream::iter(vec![hello]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap_err().code(), Code::FailedPrecondition);

    // The server is unaffected: a proper agent still gets through.
    let c = AgentClient::connect(client_cfg(&plane, &[])).0;
    tokio::time::timeout(Duration::from_secs(5), c.established())
        .await
        .unwrap()
        .unwrap();
    plane.stop.cancel();
}

/// Sends pre-encoded bytes as messages, to get malformed protobuf on the wire.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: bytes::Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[tokio::test]
async fn deadlines_and_cancel_cascade_to_worker_and_tool() {
    let plane = start().await;
    let _w = spawn_worker(&plane, &["tools"]);
    let mut req = Requester::connect(client_cfg(&plane, &[]));
    req.client.established().await.unwrap();

    // The tool would sleep 10 s; the task's deadline is 300 ms.
    let started = std::time::Instant::now();
    req.offer_tool(
        "slow",
        "tools",
        "sleep",
        serde_json::json!({"ms": 10_000}),
        2,
        Some(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let r = req.next_result().await.unwrap();
    assert_eq!(
        r.status.as_ref().map(|s| s.code),
        Some(Code::DeadlineExceeded as i32),
        "{r:?}"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "deadline answered after {took:?}");

    // Cancel: the requester's Cancel reaches the worker and the running tool.
    req.offer_tool("long", "tools", "sleep", serde_json::json!({"ms": 10_000}), 2, None)
        .await
        .unwrap();
    // Wait until the tool call is running in the gateway.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while plane.orch.tools().running_calls() == 0 {
        assert!(std::time::Instant::now() < deadline, "tool never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cancelled_at = std::time::Instant::now();
    req.client
        .send(
            agent_message::Body::Cancel(lattice_proto::agent::Cancel {
                task_id: "long".into(),
                reason: "user pressed stop".into(),
                grace_ms: 0,
            }),
            SendOptions::default(),
        )
        .await
        .unwrap();
    let r = req.next_result().await.unwrap();
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(Code::Cancelled as i32));
    while plane.orch.tools().running_calls() > 0 {
        assert!(
            cancelled_at.elapsed() < Duration::from_millis(100),
            "tool still running 100 ms after cancel"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(cancelled_at.elapsed() < Duration::from_millis(100));
    plane.stop.cancel();
}

#[tokio::test]
async fn priorities_realtime_first() {
    let plane = start().await;
    let mut req = Requester::connect(client_cfg(&plane, &[]));
    req.client.established().await.unwrap();
    // Queue first, then let one single-slot worker drain the lanes.
    for i in 0..20 {
        req.offer_tool(
            &format!("bg{i}"),
            "one",
            "echo",
            serde_json::json!({"value": i}),
            0,
            None,
        )
        .await
        .unwrap();
    }
    req.offer_tool("rt", "one", "echo", serde_json::json!({"value": "rt"}), 5, None)
        .await
        .unwrap();
    assert!(req.client.flush(Duration::from_secs(5)).await);
    let mut cfg = client_cfg(&plane, &["one"]);
    cfg.max_in_flight = 1;
    let stop = CancellationToken::new();
    tokio::spawn(worker::run(
        WorkerConfig { client: cfg },
        stop.clone().cancelled_owned(),
    ));
    let first = req.next_result().await.unwrap();
    assert_eq!(first.task_id, "rt");
    for _ in 0..20 {
        req.next_result().await.unwrap();
    }
    plane.stop.cancel();
}

#[tokio::test]
async fn memory_broker_versions_conflicts_and_delta_sync() {
    let plane = start().await;
    let (c, mut events) = AgentClient::connect(client_cfg(&plane, &[]));
    c.established().await.unwrap();
    let put = |block: &str, value: &str, expected: u64| {
        agent_message::Body::MemoryOp(MemoryOp {
            memory_ref: "team".into(),
            op: Some(memory_op::Op::Put(MemoryPut {
                block_id: block.into(),
                value: value.as_bytes().to_vec(),
                expected_version: expected,
            })),
        })
    };
    let mut next_memory = async || loop {
        if let Some(Event::Frame(f)) = events.recv().await {
            if let Some(agent_response::Body::Memory(m)) = f.body {
                return m;
            }
        }
    };
    c.send(put("plan", "v1", 0), SendOptions::default()).await.unwrap();
    let m = next_memory().await;
    assert_eq!((m.version, m.status.as_ref().unwrap().code), (1, 0));
    c.send(put("plan", "stale", 0), SendOptions::default()).await.unwrap();
    let m = next_memory().await;
    assert_eq!(m.status.as_ref().unwrap().code, Code::Aborted as i32, "{m:?}");
    assert_eq!(m.version, 1);
    c.send(put("notes", "n", 1), SendOptions::default()).await.unwrap();
    assert_eq!(next_memory().await.version, 2);
    // Delta since version 1: the one write after it.
    c.send(
        agent_message::Body::MemoryOp(MemoryOp {
            memory_ref: "team".into(),
            op: Some(memory_op::Op::Sync(MemorySync { since_version: 1 })),
        }),
        SendOptions::default(),
    )
    .await
    .unwrap();
    let m = next_memory().await;
    assert!(!m.snapshot);
    assert_eq!(m.blocks.len(), 1);
    assert_eq!(m.blocks[0].block_id, "notes");
    // No memory_ref: refused.
    c.send(
        agent_message::Body::MemoryOp(MemoryOp {
            memory_ref: String::new(),
            op: Some(memory_op::Op::Sync(MemorySync { since_version: 0 })),
        }),
        SendOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(next_memory().await.status.unwrap().code, Code::InvalidArgument as i32);
    let text = plane.metrics.encode();
    for series in [
        "lattice_memory_ops_total{op=\"put\",outcome=\"ok\"} 2",
        "lattice_memory_ops_total{op=\"put\",outcome=\"aborted\"} 1",
        "lattice_memory_ops_total{op=\"sync\",outcome=\"invalid_argument\"} 1",
    ] {
        assert!(text.contains(series), "{series} missing");
    }
    plane.stop.cancel();
}

#[tokio::test]
async fn chat_room_echoes_and_ends_after_half_close() {
    let plane = start().await;
    let mut a = ChatClient::connect(plane.url()).await.unwrap();
    let msgs: Vec<ChatMessage> = (0..3)
        .map(|i| ChatMessage {
            room: "r1".into(),
            sender: "ann".into(),
            text: format!("hello {i}"),
            ..ChatMessage::default()
        })
        .collect();
    // The request stream ends after three messages: CloseSend.
    let mut replies = a.chat(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(m) = replies.message().await.unwrap() {
        got.push((m.seq, m.text));
    }
    assert_eq!(
        got,
        vec![(1, "hello 0".into()), (2, "hello 1".into()), (3, "hello 2".into())]
    );
    plane.stop.cancel();
}

#[tokio::test]
async fn drain_moves_agents_to_another_replica_without_loss() {
    // Two orchestrators over one store, as two replicas over one Redis.
    let a = start().await;
    let cfg = OrchestratorConfig {
        adopt_all_on_start: false,
        ..fast_config()
    };
    let b = start_with(a.store.clone(), cfg, None).await;
    let both = |caps: &[&str]| ClientConfig {
        endpoints: vec![a.url(), b.url()],
        ..client_cfg(&a, caps)
    };
    let stop = CancellationToken::new();
    tokio::spawn(worker::run(
        WorkerConfig {
            client: both(&["tools"]),
        },
        stop.clone().cancelled_owned(),
    ));
    let mut req = Requester::connect(both(&[]));
    let sid = req.client.established().await.unwrap();
    offer_counters(&req, "d", 200).await;
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 20 {
        let r = tokio::time::timeout(Duration::from_secs(20), req.next_result())
            .await
            .unwrap()
            .unwrap();
        ids.insert(r.task_id);
    }
    a.orch.drain("test drain", Duration::from_millis(50)).await;
    while ids.len() < 200 {
        let r = match tokio::time::timeout(Duration::from_secs(10), req.next_result()).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "stuck at {} results; a={:?} b={:?} qa={:?} qb={:?} state={:?} unacked={}",
                ids.len(),
                a.orch.session_counts(),
                b.orch.session_counts(),
                a.orch.queue_depths(),
                b.orch.queue_depths(),
                req.client.state().borrow().clone(),
                req.client.unacked()
            ),
        };
        assert!(ids.insert(r.task_id.clone()), "result twice for {}", r.task_id);
    }
    // Same session, now on the other replica.
    assert_eq!(req.client.session_id().as_deref(), Some(sid.as_str()));
    let on_b = matches!(&*req.client.state().borrow(), LinkState::Established { .. });
    assert!(on_b);
    assert!(req.client.reconnects() >= 1);
    for i in 0..200 {
        assert_eq!(counter(&a.store, &format!("d{i}")).await, 1, "counter d{i}");
    }
    stop.cancel();
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test]
async fn memory_broker_on_redis_shares_versions_between_replicas() {
    let prefix = format!("lattice-test-mem-{}", fastrand::u64(..));
    let store_a = Store::open(&StoreUrl::Redis("redis://127.0.0.1:6379".into()), &prefix)
        .await
        .unwrap();
    let store_b = Store::open(&StoreUrl::Redis("redis://127.0.0.1:6379".into()), &prefix)
        .await
        .unwrap();
    let a = lattice_agent::memory::MemoryBroker::new(store_a.clone());
    let b = lattice_agent::memory::MemoryBroker::new(store_b);
    let put = |expected: u64, value: &str| MemoryOp {
        memory_ref: "shared".into(),
        op: Some(memory_op::Op::Put(MemoryPut {
            block_id: "plan".into(),
            value: value.as_bytes().to_vec(),
            expected_version: expected,
        })),
    };
    assert_eq!(a.handle("t", put(0, "from a"), "w1").await.version, 1);
    // Replica b saw version 0 too: conflict.
    let r = b.handle("t", put(0, "from b"), "w2").await;
    assert_eq!(r.status.unwrap().code, Code::Aborted as i32);
    // The same write resent (its answer was lost) is answered, not refused.
    let r = b.handle("t", put(0, "from a"), "w1").await;
    assert_eq!((r.version, r.status.unwrap().code), (1, 0));
    assert_eq!(b.handle("t", put(1, "from b"), "w3").await.version, 2);
    let sync = |since| MemoryOp {
        memory_ref: "shared".into(),
        op: Some(memory_op::Op::Sync(MemorySync { since_version: since })),
    };
    let r = a.handle("t", sync(1), "").await;
    assert_eq!(r.blocks.len(), 1);
    assert_eq!(r.blocks[0].value, b"from b");
    // Another tenant's namespace of the same name is separate.
    assert_eq!(a.handle("u", sync(0), "").await.version, 0);
    lattice_agent::store::RedisBackend::connect("redis://127.0.0.1:6379", &prefix)
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
}

#[tokio::test]
async fn memory_sync_falls_back_to_a_snapshot_past_the_op_log() {
    let plane = start().await;
    let broker = lattice_agent::memory::MemoryBroker::new(plane.store.clone());
    let keep = lattice_agent::memory::OPLOG_KEEP;
    for v in 0..keep + 5 {
        let op = MemoryOp {
            memory_ref: "log".into(),
            op: Some(memory_op::Op::Put(MemoryPut {
                block_id: format!("b{}", v % 3),
                value: v.to_string().into_bytes(),
                expected_version: v,
            })),
        };
        assert_eq!(broker.handle("t", op, "").await.version, v + 1);
    }
    let sync = |since| MemoryOp {
        memory_ref: "log".into(),
        op: Some(memory_op::Op::Sync(MemorySync { since_version: since })),
    };
    let delta = broker.handle("t", sync(keep), "").await;
    assert!(!delta.snapshot);
    assert_eq!(delta.blocks.len(), 5);
    let snap = broker.handle("t", sync(1), "").await;
    assert!(snap.snapshot, "version 1 is no longer in the op log");
    assert_eq!(snap.blocks.len(), 3);
    assert_eq!(snap.version, keep + 5);
}

#[tokio::test]
async fn tool_cache_is_per_tenant_and_fetch_is_loopback_only() {
    let plane = start().await;
    let tools = plane.orch.tools().clone();
    let ctx = |tenant: &str| lattice_agent::tools::CallContext {
        tenant: tenant.into(),
        idempotency_key: "charge-42".into(),
        ..Default::default()
    };
    let call = |tool: &str, args: serde_json::Value| lattice_proto::agent::ToolCall {
        call_id: "c".into(),
        tool: tool.into(),
        arguments_json: args.to_string(),
        timeout_ms: 0,
    };
    let first = tools
        .call(&ctx("acme"), call("counter", serde_json::json!({"name": "charges"})))
        .await;
    assert!(!first.cached);
    let again = tools
        .call(&ctx("acme"), call("counter", serde_json::json!({"name": "charges"})))
        .await;
    assert!(again.cached, "a resent call is answered from the cache");
    assert_eq!(again.output_json, first.output_json);
    assert_eq!(counter(&plane.store, "charges").await, 1);
    let other = tools
        .call(&ctx("globex"), call("counter", serde_json::json!({"name": "charges"})))
        .await;
    assert!(!other.cached);
    assert_eq!(counter(&plane.store, "charges").await, 2);

    // A loopback HTTP server: one answer, then a redirect to a port not listed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answers = [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello".to_string(),
            format!("HTTP/1.1 302 Found\r\nlocation: http://{other_addr}/secret\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
        ];
        for answer in answers {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    let none = lattice_agent::tools::CallContext::default();
    let fetch = |url: String| call("http_fetch", serde_json::json!({ "url": url }));
    // Nothing is reachable until the operator lists it, loopback included.
    let r = tools.call(&none, fetch(format!("http://{addr}/x"))).await;
    assert_eq!(r.status.unwrap().code, Code::PermissionDenied as i32);
    tools.set_fetch_allow(vec![format!("http://{addr}").parse().unwrap()]);
    let r = tools.call(&none, fetch(format!("http://{addr}/x"))).await;
    assert_eq!(r.status.as_ref().unwrap().code, 0, "{r:?}");
    let out: serde_json::Value = serde_json::from_str(&r.output_json).unwrap();
    assert_eq!(
        (out["status"].as_u64(), out["body"].as_str()),
        (Some(200), Some("hello"))
    );
    // A redirect out of the allowed origin is answered as it is, not followed.
    let r = tools.call(&none, fetch(format!("http://{addr}/moved"))).await;
    let out: serde_json::Value = serde_json::from_str(&r.output_json).unwrap();
    assert_eq!(out["status"].as_u64(), Some(302), "{r:?}");
    for denied in [format!("http://{other_addr}/secret"), "http://example.com/".to_string()] {
        let r = tools.call(&none, fetch(denied.clone())).await;
        assert_eq!(r.status.unwrap().code, Code::PermissionDenied as i32, "{denied}");
    }
    drop(other);
    let r = tools.call(&none, call("nope", serde_json::json!({}))).await;
    assert_eq!(r.status.unwrap().code, Code::NotFound as i32);
    // Without models in this process, inference is refused clearly.
    let r = tools
        .call(&none, call("infer", serde_json::json!({"model": "m", "inputs": {}})))
        .await;
    assert_eq!(r.status.unwrap().code, Code::FailedPrecondition as i32);
    plane.stop.cancel();
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    let plane = start_cfg(OrchestratorConfig {
        auth_token: Some("s3cret".into()),
        ..fast_config()
    })
    .await;
    let mut raw = AgentCoordinationClient::connect(plane.url()).await.unwrap();
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: 1,
            ..Hello::default()
        })),
        ..AgentMessage::default()
    };
    let err = raw.negotiate_task(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut cfg = client_cfg(&plane, &[]);
    cfg.auth_token = Some("s3cret".into());
    let c = AgentClient::connect(cfg).0;
    tokio::time::timeout(Duration::from_secs(5), c.established())
        .await
        .unwrap()
        .unwrap();
    plane.stop.cancel();
}

#[tokio::test]
async fn idle_sessions_are_evicted_and_a_late_resume_gets_a_gap() {
    let plane = start_cfg(OrchestratorConfig {
        session_idle_timeout: Duration::from_millis(500),
        ..fast_config()
    })
    .await;
    let hello = |resume: Option<&str>| AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: 1,
            resume: resume.map(|sid| lattice_proto::agent::Resume {
                session_id: sid.into(),
                ..Default::default()
            }),
            ..Hello::default()
        })),
        ..AgentMessage::default()
    };
    let welcome = |f: lattice_proto::agent::AgentResponse| match f.body {
        Some(agent_response::Body::Welcome(w)) => w,
        other => panic!("expected welcome, got {other:?}"),
    };
    let mut raw = AgentCoordinationClient::connect(plane.url()).await.unwrap();
    // The request stream stays open until `keep` is dropped.
    let (keep, rx) = tokio::sync::mpsc::channel(1);
    keep.send(hello(None)).await.unwrap();
    let mut s = raw
        .negotiate_task(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let w = welcome(s.message().await.unwrap().unwrap());
    assert_eq!(w.result, lattice_proto::agent::ResumeResult::Fresh as i32);
    assert_eq!(plane.orch.session_counts(), (1, 0));
    drop(keep);
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // Detached, then evicted.
    while plane.orch.session_counts() != (0, 0) {
        assert!(std::time::Instant::now() < deadline, "session never evicted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (keep, rx) = tokio::sync::mpsc::channel(1);
    keep.send(hello(Some(&w.session_id))).await.unwrap();
    let mut s = raw
        .negotiate_task(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let late = welcome(s.message().await.unwrap().unwrap());
    drop(keep);
    assert_eq!(late.result, lattice_proto::agent::ResumeResult::Gap as i32);
    assert_ne!(late.session_id, w.session_id);
    plane.stop.cancel();
}

#[tokio::test]
async fn a_requester_that_stops_reading_holds_bounded_memory_and_blocks_no_one() {
    let plane = start_cfg(OrchestratorConfig {
        requester_window: 64,
        ..fast_config()
    })
    .await;
    let _w = spawn_worker(&plane, &["tools"]);
    // The slow one: its events are never read, and its channel holds 4.
    let mut slow_cfg = client_cfg(&plane, &[]);
    slow_cfg.event_capacity = 4;
    let slow = Requester::connect(slow_cfg);
    let slow_sid = slow.client.established().await.unwrap();
    let offering = {
        let client = slow.client.clone();
        tokio::spawn(async move {
            let r = Requester {
                client,
                events: tokio::sync::mpsc::channel(1).1,
            };
            for i in 0..10_000 {
                r.offer_tool(
                    &format!("s{i}"),
                    "tools",
                    "echo",
                    serde_json::json!({"value": i}),
                    2,
                    None,
                )
                .await
                .unwrap();
            }
        })
    };
    // Meanwhile a normal requester is served as usual.
    let mut fast = Requester::connect(client_cfg(&plane, &[]));
    fast.client.established().await.unwrap();
    let started = std::time::Instant::now();
    for i in 0..200 {
        fast.offer_tool(
            &format!("f{i}"),
            "tools",
            "echo",
            serde_json::json!({"value": i}),
            2,
            None,
        )
        .await
        .unwrap();
    }
    for _ in 0..200 {
        tokio::time::timeout(Duration::from_secs(10), fast.next_result())
            .await
            .unwrap()
            .unwrap();
    }
    let fast_took = started.elapsed();
    // The slow requester's state stays within its window: no more than 64 tasks
    // outstanding and results waiting for it, whatever it tries to send.
    let (outstanding, outbox) = plane.orch.session_backlog(&slow_sid).unwrap();
    assert!(
        outstanding <= 64 && outbox <= 64,
        "outstanding {outstanding}, outbox {outbox}"
    );
    assert!(!offering.is_finished(), "the slow requester is held back by its window");
    assert!(fast_took < Duration::from_secs(10));
    offering.abort();
    drop(slow);
    plane.stop.cancel();
}

#[tokio::test]
async fn offers_accepted_by_a_session_that_is_gone_are_reported_lost_and_credited_back() {
    // A knows the session; B (its own store) does not: resuming on B is a GAP.
    let a = start_cfg(OrchestratorConfig {
        requester_window: 3,
        ..fast_config()
    })
    .await;
    let b = start().await;
    let mut cfg = client_cfg(&a, &[]);
    cfg.endpoints = vec![a.url(), b.url()];
    let mut req = Requester::connect(cfg);
    req.client.established().await.unwrap();
    for i in 0..3 {
        req.offer_tool(
            &format!("x{i}"),
            "nobody",
            "echo",
            serde_json::json!({"value": i}),
            2,
            None,
        )
        .await
        .unwrap();
    }
    assert!(
        req.client.flush(Duration::from_secs(5)).await,
        "A accepted the three offers"
    );
    a.orch.drain("moving", Duration::from_millis(10)).await;
    let mut lost = std::collections::HashSet::new();
    while lost.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), req.events.recv())
            .await
            .unwrap()
            .unwrap();
        if let Event::Lost { task_id } = ev {
            lost.insert(task_id);
        }
    }
    assert_eq!(lost, ["x0", "x1", "x2"].iter().map(|s| s.to_string()).collect());
    // The window's credit came back: three more offers go through without blocking.
    for i in 0..3 {
        tokio::time::timeout(
            Duration::from_secs(5),
            req.offer_tool(
                &format!("y{i}"),
                "nobody",
                "echo",
                serde_json::json!({"value": i}),
                2,
                None,
            ),
        )
        .await
        .expect("credit returned after the loss")
        .unwrap();
    }
    a.stop.cancel();
    b.stop.cancel();
}
