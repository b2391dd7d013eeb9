//! The `lattice` binary as an operator runs it: start-up output, exit codes for bad
//! configuration, and a graceful SIGTERM under load.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

fn lattice() -> Command {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut c = Command::new(env!("CARGO_BIN_EXE_lattice"));
    // Each server gets its own agent store: redb files are single-writer.
    let store = std::env::temp_dir().join(format!("lattice-binary-test-{}-{n}.redb", std::process::id()));
    c.current_dir(support::root())
        .env_remove("RUST_LOG")
        .env("LATTICE_MEMORY_STORE", store);
    c
}

#[test]
fn bad_configuration_exits_64_with_one_line() {
    for args in [
        vec!["serve", "--model-repository", "/nonexistent/models", "--http-port", "0"],
        vec!["serve", "--http-port", "eighty"],
        vec!["serve", "--log", "info,[[", "--http-port", "0"],
        vec![
            "serve",
            "--ort-library",
            "/nonexistent/libonnxruntime.so",
            "--http-port",
            "0",
        ],
        vec!["serve", "--no-such-flag"],
    ] {
        let out = lattice().args(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one-line reason, got {err}");
        assert!(err.starts_with("lattice: "), "{err}");
    }
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    let out = lattice().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "LATTICE_HOST",
        "LATTICE_HTTP_PORT",
        "LATTICE_GRPC_PORT",
        "LATTICE_METRICS_PORT",
        "LATTICE_MODEL_REPOSITORY",
        "LATTICE_ORT_LIBRARY",
        "LATTICE_MAX_BODY_BYTES",
        "LATTICE_DRAIN_TIMEOUT_SECS",
    ] {
        assert!(help.contains(env), "--help mentions {env}");
    }
}

struct Server {
    child: Child,
    http: String,
    grpc: String,
}

/// Starts `lattice serve` on free loopback ports with `extra` flags; stderr as given.
fn spawn_server(extra: &[&str], stderr: Stdio) -> Server {
    let mut child = lattice()
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            // Local test server: no credentials, no tenant limits, no audit files.
            "--auth",
            "off",
            "--rate-limits",
            "off",
            "--audit",
            "off",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_else(|| panic!("bound addresses on the first line, got {line:?}"))
        .to_string();
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_default()
        .to_string();
    Server { child, http, grpc }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let started = Instant::now();
    let mut server = spawn_server(&[], Stdio::null());
    let http = reqwest::Client::new();
    let ready = format!("http://{}/v2/health/ready", server.http);
    loop {
        if http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "server never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long requests: a batch of 32 sentences, so they are still running at SIGTERM.
    let body = json!({"inputs": [{"name": "TEXT", "shape": [32], "datatype": "BYTES",
        "data": vec!["Graceful shutdown lets every accepted request finish before the process exits."; 32]}],
        "outputs": [{"name": "embedding"}]});
    let url = format!("http://{}/v2/models/minilm/infer", server.http);
    let mut in_flight = Vec::new();
    for _ in 0..8 {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        in_flight.push(tokio::spawn(async move { http.post(url).json(&body).send().await }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    sigterm(&server.child);
    for r in in_flight {
        let r = r.await.unwrap().expect("an in-flight request was dropped");
        assert_eq!(r.status(), 200, "in-flight requests finish");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["outputs"][0]["shape"], json!([32, 384]));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_trace_id_of_the_request() {
    let Server { mut child, http, .. } = spawn_server(
        &["--log-format", "json", "--log", "info,lattice_server=debug"],
        Stdio::piped(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let r = client
            .get(format!("http://{http}/v2/health/ready"))
            .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains(trace_id) => break l,
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("log stream ended: {e}"),
        }
        assert!(Instant::now() < deadline, "no JSON log line carried the trace id");
    };
    let v: serde_json::Value = serde_json::from_str(&found).expect("a JSON log line");
    assert_eq!(v["span"]["trace_id"], trace_id, "{found}");
    assert_eq!(v["span"]["span_id"].as_str().map(str::len), Some(16), "{found}");
    sigterm(&child);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn chat_pipes_stdin_half_closes_and_prints_every_reply() {
    let empty = tempfile::tempdir().unwrap();
    let mut server = spawn_server(&["--model-repository", empty.path().to_str().unwrap()], Stdio::null());
    let mut chat = lattice()
        .args([
            "chat",
            "--server",
            &format!("http://{}", server.grpc),
            "--room",
            "r1",
            "--name",
            "bob",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = chat.stdin.take().unwrap();
        stdin.write_all(b"hello\nhow are you?\n").unwrap();
        // Dropping stdin is EOF: the client half-closes and the server ends the
        // stream after echoing both messages.
    }
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["[r1#1] bob: hello", "[r1#2] bob: how are you?"]
    );
    sigterm(&server.child);
    assert!(server.child.wait().unwrap().success());
}

#[test]
fn simulate_writes_a_summary_csv_and_plots() {
    let out = tempfile::tempdir().unwrap();
    let res = lattice()
        .args([
            "simulate",
            "--trace",
            "crates/sim/traces/spike.csv",
            "--policy",
            "hpa,lattice",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        stdout.contains("replica-seconds") && stdout.contains("SLO violations"),
        "{stdout}"
    );
    for f in [
        "hpa.csv",
        "hpa.svg",
        "lattice.csv",
        "lattice.svg",
        "comparison.svg",
        "summary.csv",
    ] {
        let len = std::fs::metadata(out.path().join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{f} written");
    }
    let bad = lattice()
        .args(["simulate", "--trace", "crates/sim/traces/spike.csv", "--policy", "vpa"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
}

/// A stand-in for the Kubernetes API server (no cluster here): records each request
/// as (request line, authorization, content-type, body) and answers 200.
async fn fake_kube_api() -> (String, tokio::sync::mpsc::Receiver<(String, String, String, String)>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = tokio::io::BufReader::new(sock);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut auth, mut ctype, mut len) = (String::new(), String::new(), 0usize);
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        match k.to_ascii_lowercase().as_str() {
                            "authorization" => auth = v.trim().to_string(),
                            "content-type" => ctype = v.trim().to_string(),
                            "content-length" => len = v.trim().parse().unwrap(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    let _ = tx
                        .send((
                            line.trim_end().to_string(),
                            auth,
                            ctype,
                            String::from_utf8(body).unwrap(),
                        ))
                        .await;
                    r.get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                        .await
                        .unwrap();
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deletion_cost_annotation_follows_the_scale_in_guard() {
    let (api, mut requests) = fake_kube_api().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "sa-token\n").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let mut server = spawn_server(
        &[
            "--model-repository",
            empty.path().to_str().unwrap(),
            "--pod-deletion-cost",
            "on",
            "--kube-api",
            &api,
            "--pod-name",
            "lattice-0",
            "--pod-namespace",
            "prod",
            "--kube-token-file",
            token.to_str().unwrap(),
            "--pod-deletion-cost-interval-secs",
            "1",
        ],
        Stdio::null(),
    );
    let (line, auth, ctype, body) = tokio::time::timeout(Duration::from_secs(10), requests.recv())
        .await
        .expect("a patch within 10 s")
        .unwrap();
    assert_eq!(line, "PATCH /api/v1/namespaces/prod/pods/lattice-0 HTTP/1.1");
    assert_eq!(auth, "Bearer sa-token");
    assert_eq!(ctype, "application/merge-patch+json");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cost: i64 = v["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Up for a second: the guard has not seen 60 quiet seconds, so the pod is
    // protected by the premium.
    assert!(cost >= 100_000, "cost {cost}");
    // Unchanged cost: no second patch.
    assert!(tokio::time::timeout(Duration::from_millis(2500), requests.recv())
        .await
        .is_err());
    sigterm(&server.child);
    assert!(server.child.wait().unwrap().success());
}
