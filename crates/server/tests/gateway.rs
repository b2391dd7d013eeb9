//! The gateway on real sockets: authentication outcomes on REST and gRPC (JWT in
//! HS256, RS256 and ES256, key rotation, API keys, tenant and scope checks), the
//! agent plane behind the same layer (agent streams, Chat, REST tasks), tenant
//! limits with honest Retry-After / RetryInfo, canary routing, and one audit record
//! per request.

mod support;

use std::{path::Path, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lattice_proto::inference::{self as pb, model_infer_request::InferInputTensor};
use lattice_server::{
    audit::{AuditConfig, SinkConfig},
    auth::AuthConfig,
    gateway::GatewayConfig,
};
use serde_json::{json, Value};
use support::{repo_copy, start, Options, TestServer};
use tonic::{Code, Request};

// === Keys and tokens ===

struct Keys {
    hs_secret: Vec<u8>,
    es: EncodingKey,
    es_jwk: Value,
    rs: EncodingKey,
    rs_jwk: Value,
}

fn keys() -> Keys {
    let hs_secret: Vec<u8> = (0..32).map(|i| (i * 7 + 3) as u8).collect();
    // ES256 (P-256) with rcgen.
    let es = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = es.public_key_raw();
    assert_eq!(point.len(), 65, "uncompressed P-256 point");
    let es_jwk = json!({"kty": "EC", "crv": "P-256", "kid": "es-1", "alg": "ES256",
                        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..])});
    let es = EncodingKey::from_ec_pem(es.serialize_pem().as_bytes()).unwrap();
    // RS256: a small key keeps generation quick in debug builds; size is not under test.
    use rsa::{pkcs8::EncodePrivateKey, traits::PublicKeyParts};
    let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
    let rs_jwk = json!({"kty": "RSA", "kid": "rs-1", "alg": "RS256",
                        "n": B64.encode(rsa.n().to_bytes_be()), "e": B64.encode(rsa.e().to_bytes_be())});
    let pem = rsa.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let rs = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    Keys {
        hs_secret,
        es,
        es_jwk,
        rs,
        rs_jwk,
    }
}

fn oct_jwk(kid: &str, secret: &[u8]) -> Value {
    json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": B64.encode(secret)})
}

fn write_jwks(path: &Path, keys: &[Value]) {
    // Written beside and renamed: the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({"keys": keys}).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(tenant: &str, user: &str, scope: &str, exp_in: i64) -> Value {
    json!({"tenant_id": tenant, "sub": user, "scope": scope, "exp": now() + exp_in})
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn hs(kid: &str, secret: &[u8], claims: &Value) -> String {
    sign(Algorithm::HS256, kid, &EncodingKey::from_secret(secret), claims)
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// === Requests ===

fn magika_body() -> Value {
    json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": vec![0; 2048]}]})
}

fn grpc_infer(model: &str) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "bytes".into(),
            datatype: "INT32".into(),
            shape: vec![1, 2048],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; 2048 * 4]],
        ..Default::default()
    }
}

/// Credentials of one request: (header, value) pairs.
type Creds<'a> = &'a [(&'a str, &'a str)];

async fn rest_infer(server: &TestServer, http: &reqwest::Client, creds: Creds<'_>) -> (u16, Value) {
    let mut r = http.post(server.url("/v2/models/magika/infer")).json(&magika_body());
    for (k, v) in creds {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn grpc_call(server: &TestServer, creds: Creds<'_>) -> Result<pb::ModelInferResponse, tonic::Status> {
    let mut client = server.grpc_client().await;
    let mut req = Request::new(grpc_infer("magika"));
    for (k, v) in creds {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap();
        req.metadata_mut().insert(key, v.parse().unwrap());
    }
    client.model_infer(req).await.map(|r| r.into_inner())
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn start_with(repo: &Path, gateway: GatewayConfig, agents: bool) -> TestServer {
    start(
        repo,
        Options {
            gateway,
            agents,
            ..Options::default()
        },
    )
    .await
}

// === Tests ===

/// Every authentication outcome, the same on REST and gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_outcome_is_the_same_on_both_protocols() {
    let repo = repo_copy(&["magika"]);
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let jwks = dir.path().join("jwks.json");
    write_jwks(
        &jwks,
        &[oct_jwk("hs-1", &k.hs_secret), k.es_jwk.clone(), k.rs_jwk.clone()],
    );
    let api_key = "lat_test_key_0123456789";
    let api_keys = dir.path().join("keys.toml");
    std::fs::write(
        &api_keys,
        format!(
            "[[key]]\nsha256 = \"{}\"\ntenant = \"acme\"\nuser = \"ci\"\nscopes = [\"infer\"]\n",
            sha256_hex(api_key)
        ),
    )
    .unwrap();
    let server = start_with(
        repo.path(),
        GatewayConfig {
            auth: Some(AuthConfig {
                jwt_keys: Some(jwks.clone()),
                api_keys: Some(api_keys),
                audience: None,
            }),
            ..GatewayConfig::default()
        },
        false,
    )
    .await;
    let http = reqwest::Client::new();
    let good = claims("acme", "alice", "infer", 600);
    let valid_hs = bearer(&hs("hs-1", &k.hs_secret, &good));
    let valid_es = bearer(&sign(Algorithm::ES256, "es-1", &k.es, &good));
    let valid_rs = bearer(&sign(Algorithm::RS256, "rs-1", &k.rs, &good));
    let expired = bearer(&hs("hs-1", &k.hs_secret, &claims("acme", "alice", "infer", -3600)));
    let wrong_sig = bearer(&hs("hs-1", b"not-the-secret-not-the-secret-xx", &good));
    let no_scope = bearer(&hs("hs-1", &k.hs_secret, &claims("acme", "alice", "metrics", 600)));
    let no_tenant_claim = bearer(&hs(
        "hs-1",
        &k.hs_secret,
        &json!({"sub": "x", "scope": "infer", "exp": now() + 600}),
    ));
    // An HS256 token "signed" with the RSA public key's bytes must not pass (alg confusion).
    let confused = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rs-1".into());
        bearer(
            &jsonwebtoken::encode(
                &h,
                &good,
                &EncodingKey::from_secret(k.rs_jwk["n"].as_str().unwrap().as_bytes()),
            )
            .unwrap(),
        )
    };

    let tenant = ("x-tenant-id", "acme");
    struct Case<'a> {
        what: &'a str,
        creds: Vec<(&'a str, &'a str)>,
        http: u16,
        grpc: Code,
        says: &'a str,
    }
    let auth = "authorization";
    let cases = vec![
        Case {
            what: "HS256",
            creds: vec![(auth, &valid_hs), tenant],
            http: 200,
            grpc: Code::Ok,
            says: "",
        },
        Case {
            what: "ES256",
            creds: vec![(auth, &valid_es), tenant],
            http: 200,
            grpc: Code::Ok,
            says: "",
        },
        Case {
            what: "RS256",
            creds: vec![(auth, &valid_rs), tenant],
            http: 200,
            grpc: Code::Ok,
            says: "",
        },
        Case {
            what: "API key",
            creds: vec![("x-api-key", api_key), tenant],
            http: 200,
            grpc: Code::Ok,
            says: "",
        },
        Case {
            what: "API key as bearer",
            creds: vec![(auth, "Bearer lat_test_key_0123456789"), tenant],
            http: 200,
            grpc: Code::Ok,
            says: "",
        },
        Case {
            what: "no credential",
            creds: vec![tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "authentication required",
        },
        Case {
            what: "expired",
            creds: vec![(auth, &expired), tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "expired",
        },
        Case {
            what: "wrong signature",
            creds: vec![(auth, &wrong_sig), tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "invalid token",
        },
        Case {
            what: "alg confusion",
            creds: vec![(auth, &confused), tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "invalid token",
        },
        Case {
            what: "garbage",
            creds: vec![(auth, "Bearer a.b.c"), tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "invalid token",
        },
        Case {
            what: "unknown API key",
            creds: vec![("x-api-key", "lat_nope"), tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "unknown API key",
        },
        Case {
            what: "no tenant_id claim",
            creds: vec![(auth, &no_tenant_claim), tenant],
            http: 401,
            grpc: Code::Unauthenticated,
            says: "tenant_id",
        },
        Case {
            what: "no X-Tenant-ID",
            creds: vec![(auth, &valid_hs)],
            http: 403,
            grpc: Code::PermissionDenied,
            says: "X-Tenant-ID",
        },
        Case {
            what: "other tenant",
            creds: vec![(auth, &valid_hs), ("x-tenant-id", "globex")],
            http: 403,
            grpc: Code::PermissionDenied,
            says: "globex",
        },
        Case {
            what: "API key, other tenant",
            creds: vec![("x-api-key", api_key), ("x-tenant-id", "globex")],
            http: 403,
            grpc: Code::PermissionDenied,
            says: "globex",
        },
        Case {
            what: "missing scope",
            creds: vec![(auth, &no_scope), tenant],
            http: 403,
            grpc: Code::PermissionDenied,
            says: "'infer' scope",
        },
    ];
    for c in &cases {
        let (status, body) = rest_infer(&server, &http, &c.creds).await;
        assert_eq!(status, c.http, "REST {}: {body}", c.what);
        if c.http != 200 {
            let msg = body["error"].as_str().unwrap_or_default();
            assert!(msg.contains(c.says), "REST {}: {msg}", c.what);
        }
        match grpc_call(&server, &c.creds).await {
            Ok(r) => assert_eq!(c.grpc, Code::Ok, "gRPC {}: answered {r:?}", c.what),
            Err(s) => {
                assert_eq!(s.code(), c.grpc, "gRPC {}: {s:?}", c.what);
                assert!(s.message().contains(c.says), "gRPC {}: {}", c.what, s.message());
            }
        }
    }

    // Health stays open; the repository API needs its own scope.
    let r = http.get(server.url("/v2/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut client = server.grpc_client().await;
    assert!(client.server_live(pb::ServerLiveRequest {}).await.is_ok());
    let load = |token: String| {
        http.post(server.url("/v2/repository/models/magika/load"))
            .header("authorization", token)
            .header("x-tenant-id", "acme")
            .send()
    };
    assert_eq!(load(valid_hs.clone()).await.unwrap().status(), 403);
    let admin = bearer(&hs(
        "hs-1",
        &k.hs_secret,
        &claims("acme", "ops", "repository infer", 600),
    ));
    assert_eq!(load(admin).await.unwrap().status(), 200);

    // Rotation: a new key joins (both valid during the overlap), then the old one leaves.
    let new_secret: Vec<u8> = (0..32).map(|i| (i * 11 + 5) as u8).collect();
    let old = bearer(&hs("hs-1", &k.hs_secret, &good));
    let new = bearer(&hs("hs-2", &new_secret, &good));
    assert_eq!(
        rest_infer(&server, &http, &[("authorization", &new), tenant]).await.0,
        401
    );
    write_jwks(&jwks, &[oct_jwk("hs-1", &k.hs_secret), oct_jwk("hs-2", &new_secret)]);
    wait_status(&server, &http, &new, 200).await;
    assert_eq!(
        rest_infer(&server, &http, &[("authorization", &old), tenant]).await.0,
        200
    );
    write_jwks(&jwks, &[oct_jwk("hs-2", &new_secret)]);
    wait_status(&server, &http, &old, 401).await;
    assert_eq!(
        rest_infer(&server, &http, &[("authorization", &new), tenant]).await.0,
        200
    );
    let s = grpc_call(&server, &[("authorization", &old), tenant])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "old key after rotation: {s:?}");
    // A broken key file leaves the last good keys in force.
    std::fs::write(&jwks, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rest_infer(&server, &http, &[("authorization", &new), tenant]).await.0,
        200
    );
    server.stop().await;
}

/// Polls until `token` gets `want` (the key file is re-read once a second).
async fn wait_status(server: &TestServer, http: &reqwest::Client, token: &str, want: u16) {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = rest_infer(server, http, &[("authorization", token), ("x-tenant-id", "acme")]).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "still {got} ({body}), want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Agent streams, Chat and REST tasks pass the same layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_plane_is_behind_the_same_check() {
    use lattice_agent::{
        client::ClientConfig,
        worker::{self, WorkerConfig},
    };
    use lattice_proto::agent::{chat_client::ChatClient, ChatMessage};
    let repo = repo_copy(&["magika"]);
    let dir = tempfile::tempdir().unwrap();
    let secret = b"agent-plane-secret-agent-plane-s".to_vec();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[oct_jwk("k", &secret)]);
    let server = start_with(
        repo.path(),
        GatewayConfig {
            auth: Some(AuthConfig {
                jwt_keys: Some(jwks),
                ..AuthConfig::default()
            }),
            ..GatewayConfig::default()
        },
        true,
    )
    .await;
    let agent_token = hs("k", &secret, &claims("acme", "worker-1", "agent", 600));
    let infer_token = hs("k", &secret, &claims("acme", "alice", "infer", 600));
    // A worker with an agent-scoped token for its tenant.
    let worker_cfg = |token: Option<String>| ClientConfig {
        endpoints: vec![format!("http://{}", server.grpc)],
        capabilities: vec!["tools".into()],
        tenant: "acme".into(),
        auth_token: token,
        metadata: vec![("x-tenant-id".into(), "acme".into())],
        handshake_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    tokio::spawn(worker::run(
        WorkerConfig {
            client: worker_cfg(Some(agent_token.clone())),
        },
        std::future::pending(),
    ));
    // A raw stream without a token is refused before the orchestrator sees it.
    let mut raw = lattice_proto::agent::agent_coordination_client::AgentCoordinationClient::connect(format!(
        "http://{}",
        server.grpc
    ))
    .await
    .unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel::<lattice_proto::agent::AgentMessage>(1);
    let s = raw
        .negotiate_task(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    // With an inference-only token: the scope is missing.
    let (_tx, rx) = tokio::sync::mpsc::channel::<lattice_proto::agent::AgentMessage>(1);
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", bearer(&infer_token).parse().unwrap());
    req.metadata_mut().insert("x-tenant-id", "acme".parse().unwrap());
    let s = raw.negotiate_task(req).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // An agent token for acme whose hello names another tenant: refused, so a
    // stream cannot act for a tenant its credential is not for.
    let (tx, rx) = tokio::sync::mpsc::channel::<lattice_proto::agent::AgentMessage>(1);
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", bearer(&agent_token).parse().unwrap());
    req.metadata_mut().insert("x-tenant-id", "acme".parse().unwrap());
    tx.send(lattice_proto::agent::AgentMessage {
        agent_id: "intruder".into(),
        env: Some(lattice_agent::wire::envelope("")),
        body: Some(lattice_proto::agent::agent_message::Body::Hello(
            lattice_proto::agent::Hello {
                protocol_version: lattice_agent::wire::PROTOCOL_VERSION,
                tenant: "globex".into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut answers = raw.negotiate_task(req).await.unwrap().into_inner();
    let s = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer to the hello")
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("globex"), "{s:?}");

    // REST tasks: the caller's token is checked; the hop to the orchestrator is the
    // server's own.
    let http = reqwest::Client::new();
    let calc =
        json!({"capability": "tools", "tool": "calculator", "arguments": {"expression": "6 * 7"}, "timeout_ms": 20000});
    let post = |token: Option<&str>, tenant: Option<&str>| {
        let mut r = http.post(server.url("/v1/agents/tasks")).json(&calc);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(t) = tenant {
            r = r.header("x-tenant-id", t);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(post(None, Some("acme")).await.0, 401);
    assert_eq!(post(Some(&infer_token), Some("acme")).await.0, 403);
    assert_eq!(post(Some(&agent_token), None).await.0, 403);
    assert_eq!(post(Some(&agent_token), Some("globex")).await.0, 403);
    // The worker may still be connecting: the first tasks wait for it.
    let (status, body) = post(Some(&agent_token), Some("acme")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"]["value"], json!(42.0), "{body}");

    // Chat: refused without a token, served with one.
    let mut chat = ChatClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let msg = ChatMessage {
        room: "r".into(),
        sender: "alice".into(),
        text: "hello".into(),
        ..ChatMessage::default()
    };
    let s = chat.chat(futures::stream::iter(vec![msg.clone()])).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", bearer(&agent_token).parse().unwrap());
    req.metadata_mut().insert("x-tenant-id", "acme".parse().unwrap());
    let mut replies = chat.chat(req).await.unwrap().into_inner();
    tx.send(msg).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.text, "hello");

    // The tool catalogue: agent scope, and the tenant is the credential's.
    let tools = |token: Option<&str>| {
        let mut r = http.get(server.url("/v1/tools")).header("x-tenant-id", "acme");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(tools(None).await.0, 401);
    assert_eq!(tools(Some(&infer_token)).await.0, 403);
    let (status, body) = tools(Some(&agent_token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tenant"], "acme");
    let calc = body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "calculator")
        .unwrap();
    assert_eq!(calc["source"], "builtin");
    assert_eq!(calc["input_schema"]["required"], json!(["expression"]));
    let mut catalog =
        lattice_proto::agent::tool_catalog_client::ToolCatalogClient::connect(format!("http://{}", server.grpc))
            .await
            .unwrap();
    let s = catalog
        .list_tools(lattice_proto::agent::ListToolsRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut req = Request::new(lattice_proto::agent::ListToolsRequest {});
    req.metadata_mut()
        .insert("authorization", bearer(&agent_token).parse().unwrap());
    req.metadata_mut().insert("x-tenant-id", "acme".parse().unwrap());
    let listed = catalog.list_tools(req).await.unwrap().into_inner();
    assert_eq!(listed.tools.len(), body["tools"].as_array().unwrap().len());
    server.stop().await;
}

/// Tenant limits over real sockets: a burst past the policy's bucket is cut with an
/// honest wait on both protocols, tenants are independent, and the policy file is
/// re-read live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_an_honest_wait_on_both_protocols() {
    let repo = repo_copy(&["magika"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    // Small buckets keep the test short; the design defaults are unit-tested in limit.rs.
    std::fs::write(
        &policy,
        "[tenants.acme]\nfast = { burst = 3, per_second = 2 }\nsteady = { burst = 100, per_second = 100 }\n",
    )
    .unwrap();
    let server = start_with(
        repo.path(),
        GatewayConfig {
            policy: Some(policy.clone()),
            limits: true,
            ..GatewayConfig::default()
        },
        false,
    )
    .await;
    let http = reqwest::Client::new();
    let acme = [("x-tenant-id", "acme")];
    for _ in 0..3 {
        assert_eq!(rest_infer(&server, &http, &acme).await.0, 200);
    }
    let r = http
        .post(server.url("/v2/models/magika/infer"))
        .header("x-tenant-id", "acme")
        .json(&magika_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, 1, "one token at 2/s is under a second away, rounded up");
    // gRPC: RESOURCE_EXHAUSTED with RetryInfo.
    let s = grpc_call(&server, &acme).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    use tonic_types::StatusExt;
    let delay = s
        .get_details_retry_info()
        .and_then(|i| i.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(500),
        "{delay:?}"
    );
    // Another tenant is not affected.
    assert_eq!(rest_infer(&server, &http, &[("x-tenant-id", "globex")]).await.0, 200);
    // Waiting the time named is enough.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(rest_infer(&server, &http, &acme).await.0, 200);
    // Refusals are counted per tenant and reason.
    let text = server.repo().metrics().encode();
    assert!(
        text.contains(r#"lattice_gateway_refusals_total{tenant="acme",reason="rate_fast"} 2"#),
        "{}",
        text.lines()
            .filter(|l| l.contains("refusals"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A live change: acme gets a large bucket.
    std::fs::write(&policy, "[tenants.acme]\nfast = { burst = 1000, per_second = 1000 }\n").unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.state.gateway.policy().limits("acme").fast.burst != 1000 {
        assert!(tokio::time::Instant::now() < until, "policy not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        assert_eq!(rest_infer(&server, &http, &acme).await.0, 200);
    }
    server.stop().await;
}

/// The per-tenant concurrency cap over real sockets: while a tenant holds its cap in
/// open requests (inference streams, which hold their slot until they end), its
/// next request is refused on both protocols with 429 / RESOURCE_EXHAUSTED, another
/// tenant still passes, and ending one request frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_holds_per_tenant() {
    let repo = repo_copy(&["magika"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let cap = 3;
    // Buckets far above the test's traffic: only the cap can refuse.
    std::fs::write(
        &policy,
        format!(
            "[tenants.acme]\nmax_concurrent = {cap}\nfast = {{ burst = 1000, per_second = 1000 }}\n\
             steady = {{ burst = 1000, per_second = 1000 }}\n"
        ),
    )
    .unwrap();
    let server = start_with(
        repo.path(),
        GatewayConfig {
            policy: Some(policy),
            limits: true,
            ..GatewayConfig::default()
        },
        false,
    )
    .await;
    let open_stream = |tenant: &'static str| {
        let server = &server;
        async move {
            let mut client = server.grpc_client().await;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut().insert("x-tenant-id", tenant.parse().unwrap());
            let opened = client.model_stream_infer(req).await;
            (tx, opened)
        }
    };
    // `cap` streams, each answered once: all admitted and open.
    let mut held = Vec::new();
    for _ in 0..cap {
        let (tx, opened) = open_stream("acme").await;
        let mut answers = opened.expect("admitted under the cap").into_inner();
        tx.send(grpc_infer("magika")).await.unwrap();
        let a = tokio::time::timeout(Duration::from_secs(30), answers.message())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        assert!(a.error_message.is_empty(), "{}", a.error_message);
        held.push((tx, answers));
    }
    let http = reqwest::Client::new();
    // The next request of the tenant: refused, on REST and on gRPC, unary or stream.
    let (status, body) = rest_infer(&server, &http, &[("x-tenant-id", "acme")]).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.to_string().contains(&cap.to_string()), "{body}");
    let s = grpc_call(&server, &[("x-tenant-id", "acme")]).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let (_tx, opened) = open_stream("acme").await;
    assert_eq!(opened.unwrap_err().code(), Code::ResourceExhausted);
    // Another tenant is not affected.
    assert_eq!(rest_infer(&server, &http, &[("x-tenant-id", "globex")]).await.0, 200);
    assert!(grpc_call(&server, &[("x-tenant-id", "globex")]).await.is_ok());
    // One stream ends: its slot is free again.
    let (tx, mut answers) = held.pop().unwrap();
    drop(tx);
    while answers.message().await.ok().flatten().is_some() {}
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = rest_infer(&server, &http, &[("x-tenant-id", "acme")]).await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "the slot was not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = server.repo().metrics().encode();
    assert!(
        text.contains(r#"lattice_gateway_refusals_total{tenant="acme",reason="concurrency"}"#),
        "{}",
        text.lines()
            .filter(|l| l.contains("refusals"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(held);
    server.stop().await;
}

/// Canary: the tag header wins, users stay on their version, and the split shows in
/// the per-version metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_routes_by_tag_and_sticky_weight() {
    let repo = repo_copy(&["magika"]);
    // Version 2: the same model file, so only routing differs.
    let m = repo.path().join("magika");
    std::fs::create_dir_all(m.join("2")).unwrap();
    std::fs::hard_link(m.join("1/model.onnx"), m.join("2/model.onnx")).unwrap();
    support::edit_config(repo.path(), "magika", |c| {
        format!("version_policy = {{ all = {{}} }}\n{c}")
    });
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[canary.magika]\nsplit = { \"1\" = 85, \"2\" = 15 }\ntags = { beta = [\"2\"] }\n",
    )
    .unwrap();
    let server = start_with(
        repo.path(),
        GatewayConfig {
            policy: Some(policy),
            ..GatewayConfig::default()
        },
        false,
    )
    .await;
    let http = reqwest::Client::new();
    let version_of = |user: String, tag: Option<&'static str>| {
        let mut r = http
            .post(server.url("/v2/models/magika/infer"))
            .header("x-user-id", user)
            .json(&magika_body());
        if let Some(t) = tag {
            r = r.header("x-deployment-tag", t);
        }
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["model_version"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let mut on_2 = 0;
    let mut a_user_on_1 = None;
    let n = 400;
    for i in 0..n {
        let user = format!("user-{i}");
        let v = version_of(user.clone(), None).await;
        on_2 += usize::from(v == "2");
        if v == "1" {
            a_user_on_1.get_or_insert_with(|| user.clone());
        }
        // Sticky, and the tag wins.
        assert_eq!(version_of(user.clone(), None).await, v);
        assert_eq!(version_of(user, Some("beta")).await, "2");
    }
    // 400 users: 15 % ± 5 % (the ±2 % check over 10,000 is in canary.rs).
    let share = on_2 as f64 / n as f64;
    assert!((0.10..=0.20).contains(&share), "{share}");
    // gRPC takes the same route for the same user.
    let mut client = server.grpc_client().await;
    let mut req = Request::new(grpc_infer("magika"));
    req.metadata_mut().insert("x-deployment-tag", "beta".parse().unwrap());
    assert_eq!(client.model_infer(req).await.unwrap().into_inner().model_version, "2");
    // Every request of a stream takes its caller's route too: a user the split put
    // on version 1 stays there (without routing, a stream would get the latest, 2).
    let user = a_user_on_1.expect("85 % of 400 users are on version 1");
    let mut req = Request::new(futures::stream::iter((0..3).map(|_| grpc_infer("magika"))));
    req.metadata_mut().insert("x-user-id", user.parse().unwrap());
    let mut answers = client.model_stream_infer(req).await.unwrap().into_inner();
    for _ in 0..3 {
        let a = answers.message().await.unwrap().expect("an answer per request");
        assert_eq!(a.error_message, "");
        assert_eq!(a.infer_response.unwrap().model_version, "1");
    }
    // The per-version metrics show the split.
    let text = server.repo().metrics().encode();
    let count = |v: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with("ai_inference_success_total")
                    && l.contains("model_name=\"magika\"")
                    && l.contains(&format!("model_version=\"{v}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        count("2") as usize,
        2 * on_2 + n + 1,
        "{}",
        text.lines()
            .filter(|l| l.contains("success"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.stop().await;
}

/// Every request of a load test has exactly one audit record, refused ones
/// included, and no record holds a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_exactly_one_audit_record() {
    let repo = repo_copy(&["magika"]);
    let dir = tempfile::tempdir().unwrap();
    let secret = b"audit-secret-audit-secret-audit!".to_vec();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[oct_jwk("k", &secret)]);
    let audit_dir = dir.path().join("audit");
    let server = start_with(
        repo.path(),
        GatewayConfig {
            auth: Some(AuthConfig {
                jwt_keys: Some(jwks),
                ..AuthConfig::default()
            }),
            audit: Some(AuditConfig {
                sink: SinkConfig::File {
                    dir: audit_dir.clone(),
                    fsync_every: Duration::from_millis(200),
                },
                retention: lattice_server::audit::DEFAULT_RETENTION,
                queue: 65_536,
            }),
            ..GatewayConfig::default()
        },
        false,
    )
    .await;
    let token = hs("k", &secret, &claims("acme", "alice", "infer", 600));
    let http = reqwest::Client::new();
    let per_task = 50;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (http, url, token) = (http.clone(), server.url("/v2/models/magika/infer"), token.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let id = format!("req-{t}-{i}");
                let mut r = http.post(&url).header("x-request-id", &id).json(&magika_body());
                // Every fifth request has no credential: refused, and audited too.
                if i % 5 != 0 {
                    r = r.bearer_auth(&token).header("x-tenant-id", "acme");
                }
                let status = r.send().await.unwrap().status().as_u16();
                assert_eq!(status, if i % 5 == 0 { 401 } else { 200 });
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let grpc_ok = grpc_call(&server, &[("authorization", &bearer(&token)), ("x-tenant-id", "acme")]).await;
    assert!(grpc_ok.is_ok());
    server.state.gateway.flush_audit().await;
    let records = lattice_server::audit::file::read_all(&audit_dir, None).unwrap();
    let mut by_id = std::collections::HashMap::new();
    for r in &records {
        if let Some(id) = r.headers.get("x-request-id") {
            *by_id.entry(id.clone()).or_insert(0) += 1;
        }
        let line = serde_json::to_string(r).unwrap();
        assert!(!line.contains(&token), "a record holds the token: {line}");
    }
    assert_eq!(by_id.len(), 4 * per_task, "one record per request");
    assert!(by_id.values().all(|n| *n == 1), "duplicates: {by_id:?}");
    let ok = records
        .iter()
        .find(|r| r.status == 200 && r.protocol == "http")
        .unwrap();
    assert_eq!((ok.tenant_id.as_str(), ok.user_id.as_str()), ("acme", "alice"));
    assert_eq!(
        (ok.model.as_deref(), ok.version.as_deref()),
        (Some("magika"), Some("1"))
    );
    assert_eq!(ok.client_ip.as_deref(), Some("127.0.0.1"));
    assert!(ok.bytes_in > 2048 && ok.bytes_out > 0, "{ok:?}");
    assert_eq!(ok.headers["credential"], "bearer");
    let refused = records.iter().filter(|r| r.status == 401).count();
    assert_eq!(refused, 4 * per_task / 5);
    assert!(records
        .iter()
        .any(|r| r.status == 401 && r.refusal.as_deref() == Some("no_credential")));
    let grpc = records
        .iter()
        .find(|r| r.protocol == "grpc")
        .expect("the gRPC call's record");
    assert_eq!(
        (grpc.grpc_status, grpc.status, grpc.model.as_deref()),
        (Some(0), 200, Some("magika"))
    );
    assert_eq!(grpc.api, "/inference.GRPCInferenceService/ModelInfer");
    // Files are per tenant: refused requests without a tenant go to `_`.
    assert!(audit_dir.join("acme").is_dir() && audit_dir.join("_").is_dir());
    assert_eq!(
        server
            .repo()
            .metrics()
            .set::<lattice_server::edge_metrics::EdgeMetrics>()
            .audit_counters()
            .get("written") as usize,
        records.len()
    );
    server.stop().await;
}

// === JetStream sink ===

struct Nats {
    child: std::process::Child,
    port: u16,
    store: std::path::PathBuf,
}

impl Nats {
    fn start(port: u16, store: &Path) -> Nats {
        let bin = "/usr/sbin/nats-server";
        assert!(Path::new(bin).exists(), "nats-server is expected at {bin}");
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Nats {
            child,
            port,
            store: store.to_path_buf(),
        }
    }

    async fn wait_up(&self) {
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(tokio::time::Instant::now() < until, "nats-server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The JetStream sink keeps every record across a NATS restart: records of requests
/// answered while NATS was down are published once it is back, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_sink_survives_a_nats_restart() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let store = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(port, store.path());
    nats.wait_up().await;
    let url = format!("nats://127.0.0.1:{port}");
    let stream = "LATTICE_AUDIT_TEST";
    let repo = repo_copy(&["magika"]);
    let server = start_with(
        repo.path(),
        GatewayConfig {
            audit: Some(AuditConfig {
                sink: SinkConfig::Nats {
                    url: url.clone(),
                    stream: stream.into(),
                },
                retention: lattice_server::audit::DEFAULT_RETENTION,
                queue: 65_536,
            }),
            ..GatewayConfig::default()
        },
        false,
    )
    .await;
    let http = reqwest::Client::new();
    let send = |i: usize| {
        let r = http
            .post(server.url("/v2/models/magika/infer"))
            .header("x-tenant-id", "acme")
            .header("x-request-id", format!("r-{i}"))
            .json(&magika_body())
            .send();
        async move { assert_eq!(r.await.unwrap().status(), 200) }
    };
    for i in 0..20 {
        send(i).await;
    }
    server.state.gateway.flush_audit().await;
    // NATS goes away; requests are still answered (the audit never holds them).
    nats.stop();
    for i in 20..40 {
        send(i).await;
    }
    let _nats = Nats::start(port, &nats.store);
    _nats.wait_up().await;
    tokio::time::timeout(Duration::from_secs(60), server.state.gateway.flush_audit())
        .await
        .expect("records published after NATS came back");
    let records = lattice_server::audit::nats::read_all(&url, stream).await.unwrap();
    let mut ids: Vec<String> = records
        .iter()
        .filter_map(|r| r.headers.get("x-request-id").cloned())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("r-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every record exactly once");
    assert!(records.iter().all(|r| r.tenant_id == "acme" && r.status == 200));
    server.stop().await;
}

/// One audit record per agent task, whoever offered it: each task a requester's
/// stream offers (done, failed or refused) and each REST task has exactly one
/// record, with its tenant, verified user, capability and final status; the
/// stream and the REST request keep their own records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_task_has_exactly_one_audit_record() {
    use lattice_agent::{
        client::{ClientConfig, SendOptions},
        worker::{self, Requester, WorkerConfig},
    };
    use lattice_proto::agent::{agent_message, TaskOffer};
    let repo = repo_copy(&["magika"]);
    let dir = tempfile::tempdir().unwrap();
    let secret = b"task-audit-secret-task-audit-sec".to_vec();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[oct_jwk("k", &secret)]);
    let audit_dir = dir.path().join("audit");
    let server = start_with(
        repo.path(),
        GatewayConfig {
            auth: Some(AuthConfig {
                jwt_keys: Some(jwks),
                ..AuthConfig::default()
            }),
            audit: Some(AuditConfig {
                sink: SinkConfig::File {
                    dir: audit_dir.clone(),
                    fsync_every: Duration::from_millis(200),
                },
                retention: lattice_server::audit::DEFAULT_RETENTION,
                queue: 65_536,
            }),
            ..GatewayConfig::default()
        },
        true,
    )
    .await;
    let client = |user: &str, caps: &[&str]| ClientConfig {
        endpoints: vec![format!("http://{}", server.grpc)],
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        tenant: "acme".into(),
        auth_token: Some(hs("k", &secret, &claims("acme", user, "agent", 600))),
        metadata: vec![("x-tenant-id".into(), "acme".into())],
        ..ClientConfig::default()
    };
    tokio::spawn(worker::run(
        WorkerConfig {
            client: client("worker-1", &["tools"]),
        },
        std::future::pending(),
    ));
    // Bob's stream claims to act for mallory: only the server's own hop may.
    let mut bob = client("bob", &[]);
    bob.metadata.push(("x-lattice-on-behalf-of".into(), "mallory".into()));
    bob.metadata.push(("x-lattice-delegate".into(), "1".into()));
    let mut requester = Requester::connect(bob);
    requester.client.established().await.unwrap();
    // Done, failed (an unknown tool) and refused (its deadline already passed).
    let offers = [
        (
            "t-ok-1",
            json!({"tool": "calculator", "arguments": {"expression": "1 + 1"}}),
            0i64,
        ),
        (
            "t-ok-2",
            json!({"tool": "calculator", "arguments": {"expression": "2 * 3"}}),
            0,
        ),
        ("t-fail", json!({"tool": "no-such-tool", "arguments": {}}), 0),
        (
            "t-late",
            json!({"tool": "calculator", "arguments": {"expression": "1"}}),
            1,
        ),
    ];
    for (id, payload, deadline_us) in &offers {
        requester
            .client
            .send(
                agent_message::Body::Offer(TaskOffer {
                    task_id: id.to_string(),
                    capability: "tools".into(),
                    payload: payload.to_string().into_bytes(),
                    max_attempts: 1,
                }),
                SendOptions {
                    correlation_id: id.to_string(),
                    deadline_us: *deadline_us,
                    ..SendOptions::default()
                },
            )
            .await
            .unwrap();
    }
    let mut codes = std::collections::HashMap::new();
    for _ in &offers {
        let r = tokio::time::timeout(Duration::from_secs(30), requester.next_result())
            .await
            .expect("every task ends")
            .unwrap();
        codes.insert(r.task_id.clone(), r.status.map_or(0, |s| s.code));
    }
    // And one REST task, by alice.
    let rest_token = hs("k", &secret, &claims("acme", "alice", "agent", 600));
    let r = reqwest::Client::new()
        .post(server.url("/v1/agents/tasks"))
        .bearer_auth(&rest_token)
        .header("x-tenant-id", "acme")
        .json(
            &json!({"capability": "tools", "tool": "calculator", "arguments": {"expression": "6 * 7"},
                      "task_id": "t-rest", "timeout_ms": 20000}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    server.state.gateway.flush_audit().await;
    let records = lattice_server::audit::file::read_all(&audit_dir, None).unwrap();
    let tasks: Vec<_> = records.iter().filter(|r| r.protocol == "agent-task").collect();
    let mut per_id = std::collections::HashMap::new();
    for r in &tasks {
        *per_id.entry(r.task_id.clone().unwrap()).or_insert(0) += 1;
    }
    let mut want: Vec<&str> = offers.iter().map(|o| o.0).collect();
    want.push("t-rest");
    for id in &want {
        assert_eq!(per_id.get(*id), Some(&1), "records of {id}: {per_id:?}");
    }
    assert_eq!(tasks.len(), want.len(), "{per_id:?}");
    for r in &tasks {
        let id = r.task_id.as_deref().unwrap();
        assert_eq!(r.tenant_id, "acme");
        assert_eq!(r.capability.as_deref(), Some("tools"));
        assert_eq!(r.api, lattice_server::audit::tasks::TASK_API);
        if id == "t-rest" {
            assert_eq!(r.user_id, "alice");
            assert_eq!(r.status, 200);
        } else {
            assert_eq!(r.user_id, "bob", "{r:?}");
            assert_eq!(r.grpc_status, Some(codes[id]), "{id}");
            assert_eq!(r.status, lattice_server::audit::grpc_to_http(codes[id]));
        }
    }
    assert_eq!(codes["t-ok-1"], 0);
    assert_ne!(codes["t-fail"], 0);
    assert_eq!(codes["t-late"], Code::DeadlineExceeded as i32);
    // The REST request has its own record beside its task's.
    assert!(records
        .iter()
        .any(|r| r.protocol == "http" && r.api == "/v1/agents/tasks" && r.status == 200));
    server.state.gateway.flush_audit().await;
    server.stop().await;
}
