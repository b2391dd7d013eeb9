//! Observability against a real server: the exposition passes `promtool check
//! metrics`, the shipped alert rules pass `promtool check rules` and name only series
//! the registry declares, a real Prometheus scrapes the server under load and answers
//! quantile and QPS queries, and feature drift moves the KS score.

mod support;

use std::{
    collections::BTreeSet,
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::{repo_copy, start, workspace_root, Options};

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn some_traffic(server: &support::TestServer, http: &reqwest::Client, n: usize) {
    for i in 0..n {
        let body = json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32",
            "data": (0..2048).map(|j| (i * 7 + j) % 256).collect::<Vec<_>>()}]});
        let r = http
            .post(server.url("/v2/models/magika/infer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http
        .post(server.url("/v2/models/magika/infer"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// Metric-like identifiers used in a rules or dashboard file.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            ["ai_", "inference_", "http_", "process_", "tokio_", "lattice_"]
                .iter()
                .any(|p| t.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_is_promtool_clean_and_rules_name_real_series() {
    let repo = repo_copy(&["magika", "minilm"]);
    support::edit_config(repo.path(), "magika", |s| {
        s.replace(
            "inputs = [\"bytes\"]\n",
            "inputs = [\"bytes\"]\nreference_size = 4\nwindow = 4\n",
        )
    });
    // With the agent plane, so its series (named by the dashboard) are declared.
    let server = start(
        repo.path(),
        Options {
            agents: true,
            ..Options::default()
        },
    )
    .await;
    let http = reqwest::Client::new();
    some_traffic(&server, &http, 5).await;
    // One request that fails inside inference (a schema violation).
    let bad = json!({"inputs": [{"name": "bytes", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]}]});
    assert_eq!(
        http.post(server.url("/v2/models/magika/infer"))
            .json(&bad)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let text_req = json!({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hello world"]}]});
    // The caller's trace id becomes the exemplar of the latency bucket (no span is
    // built here: nothing exports them).
    let caller_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    assert_eq!(
        http.post(server.url("/v2/models/minilm/infer"))
            .header("traceparent", format!("00-{caller_trace}-00f067aa0ba902b7-01"))
            .json(&text_req)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A plain scrape gets the classic text format, which promtool lints.
    let scrape = reqwest::get(format!("http://{}/metrics", server.metrics))
        .await
        .unwrap();
    assert!(scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let exposition = scrape.text().await.unwrap();
    let (ok, out) = promtool(&["check", "metrics"], Some(&exposition));
    assert!(ok && out.trim().is_empty(), "promtool check metrics:\n{out}");
    // What Prometheus negotiates: OpenMetrics, with trace exemplars when traced.
    let om = http
        .get(format!("http://{}/metrics", server.metrics))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let om = om.text().await.unwrap();
    assert!(om.ends_with("# EOF\n"));
    assert!(
        om.lines().any(|l| l.starts_with("ai_inference_latency_seconds_bucket{")
            && l.contains("model_name=\"minilm\"")
            && l.contains(&format!("# {{trace_id=\"{caller_trace}\"}}"))),
        "no exemplar with the caller's trace id in\n{om}"
    );
    assert!(
        om.lines()
            .any(|l| l.starts_with("http_request_duration_seconds_bucket{")
                && l.contains("route=\"/v2/models/{model}/infer\"")
                && l.contains(&format!("# {{trace_id=\"{caller_trace}\"}}"))),
        "no request-duration exemplar with the caller's trace id in\n{om}"
    );
    for needle in [
        "http_requests_total{protocol=\"http\",method=\"POST\",status_code=\"200\"}",
        "http_requests_total{protocol=\"http\",method=\"POST\",status_code=\"400\"}",
        "ai_inference_success_total{model_name=\"magika\",model_version=\"1\"} 5",
        "ai_inference_pending_requests{model_name=\"magika\",model_version=\"1\"} 0",
        "ai_prediction_confidence_count{model_name=\"magika\",model_version=\"1\"} 5",
        "ai_inference_latency_recent_seconds{model_name=\"magika\",model_version=\"1\",quantile=\"0.99\"}",
        "ai_inference_failure_total{model_name=\"magika\",model_version=\"1\",error_type=\"input_schema_violation\"} 1",
        "ai_feature_drift_score{model_name=\"magika\",model_version=\"1\",feature=\"bytes:mean\"}",
        "process_resident_memory_bytes",
        "tokio_workers",
        "lattice_scaling_capacity 34",
        "lattice_scaling_saturation 0",
        "lattice_scaling_queue_p95_seconds",
        "lattice_scaling_demand_replicas",
        // A replica up for seconds has not been quiet for the guard's 60 s yet.
        "lattice_scaling_scale_in_safe 0",
        "lattice_scaling_pod_deletion_cost",
    ] {
        assert!(exposition.contains(needle), "{needle} missing from\n{exposition}");
    }
    // Latency carries its confidence level: Magika's answers are probabilities.
    assert!(exposition.contains("confidence_level=\"high\"") || exposition.contains("confidence_level=\"low\""));
    assert!(
        exposition.contains("model_name=\"minilm\",model_version=\"1\",confidence_level=\"none\",error_type=\"none\"")
    );
    // Scrape-time series show in a scrape; families with no sample yet (agent tasks
    // here) only in the registry's declarations.
    let mut known = lattice_observability::metrics::series_names(&exposition);
    known.extend(server.repo().metrics().declared_series().iter().cloned());

    let rules = workspace_root().join("deploy/observability/alerts.yaml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
    for file in [
        "deploy/observability/alerts.yaml",
        "deploy/observability/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        let used = referenced_metrics(&text);
        assert!(!used.is_empty());
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} names series the registry does not declare: {unknown:?}"
        );
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/observability/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_under_load_and_answers_queries() {
    let repo = repo_copy(&["magika"]);
    let server = start(repo.path(), Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: lattice\n    static_configs:\n      - targets: ['{}']\n",
            server.metrics
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package; scripts/setup.sh installs it)");
    let http = reqwest::Client::new();
    let query = |q: &str| {
        let (http, q) = (http.clone(), q.to_string());
        async move {
            let r = http
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", q.as_str())])
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            let first = v["data"]["result"].as_array()?.first()?.clone();
            first["value"][1].as_str()?.parse::<f64>().ok()
        }
    };
    // Load for as long as it takes Prometheus to see it (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut p90, mut qps) = (None, None);
    while Instant::now() < deadline && (p90.is_none() || qps.is_none()) {
        some_traffic(&server, &http, 20).await;
        p90 = query("histogram_quantile(0.9, sum by (le) (rate(ai_inference_latency_seconds_bucket{model_name=\"magika\"}[30s])))")
            .await
            .filter(|v| v.is_finite() && *v > 0.0);
        qps = query("max_over_time(ai_inference_qps{model_name=\"magika\"}[30s])")
            .await
            .filter(|v| *v > 0.0);
    }
    let _ = prom.kill();
    let _ = prom.wait();
    let p90 = p90.expect("Prometheus answered histogram_quantile of the inference latency");
    assert!(p90 < 5.0, "p90 {p90} s");
    assert!(qps.expect("Prometheus has the QPS series") >= 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_inputs_raise_the_drift_score_and_the_reference_does_not() {
    let repo = repo_copy(&["magika"]);
    support::edit_config(repo.path(), "magika", |s| {
        s.replace(
            "inputs = [\"bytes\"]\n",
            "inputs = [\"bytes\"]\nreference_size = 60\nwindow = 60\n",
        )
    });
    let server = start(repo.path(), Options::default()).await;
    let metrics = server.repo().model_metrics().clone();
    let labels = server.repo().version("magika", "").unwrap().labels().clone();
    let http = reqwest::Client::new();
    // A deterministic stream of "text-like" files: printable ASCII at varying densities.
    let mut seed = 7u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let mut send = |shift: bool| {
        let row: Vec<usize> = (0..2048)
            .map(|_| if shift { 128 + rnd() % 128 } else { 32 + rnd() % 95 })
            .collect();
        let body = json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": row}]});
        let (http, url) = (http.clone(), server.url("/v2/models/magika/infer"));
        async move { assert_eq!(http.post(url).json(&body).send().await.unwrap().status(), 200) }
    };
    for _ in 0..60 + 60 {
        send(false).await;
    }
    let same = metrics
        .drift_score(&labels, "bytes:mean")
        .expect("score after reference and window filled");
    assert!(same < 0.3, "same distribution scores {same}");
    for _ in 0..60 {
        send(true).await;
    }
    let shifted = metrics.drift_score(&labels, "bytes:mean").unwrap();
    assert!(shifted > 0.3, "shifted distribution scores {shifted}");
    let scrape = reqwest::get(format!("http://{}/metrics", server.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = scrape
        .lines()
        .find(|l| l.starts_with("ai_feature_drift_score{") && l.contains("feature=\"bytes:mean\""))
        .expect("drift gauge exported");
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v > 0.3, "{line}");
    server.stop().await;
}
