//! Model lifecycle against a real server: hot reload without failed requests, a bad
//! version that leaves the old one serving, unload that gives memory back, priority
//! order, and requests that are dropped before compute.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use lattice_inference::{InferError, RequestParts, Tensor};
use serde_json::{json, Value};
use support::{assert_eventually, repo_copy, start, Options};

fn magika_parts(priority: u8, timeout: Option<Duration>) -> RequestParts {
    RequestParts {
        id: String::new(),
        inputs: vec![(
            "bytes".into(),
            Tensor::raw(lattice_inference::DataType::I32, vec![1, 2048], vec![0u8; 2048 * 4]),
        )],
        outputs: vec![],
        priority: Some(priority),
        timeout,
        sequence: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_versions_without_failing_a_request() {
    let repo = repo_copy(&["magika"]);
    let server = start(repo.path(), Options::default()).await;
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let seen_v2 = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (http, url, stop, seen_v2) = (
            http.clone(),
            server.url("/v2/models/magika/infer"),
            stop.clone(),
            seen_v2.clone(),
        );
        clients.push(tokio::spawn(async move {
            let body =
                json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": vec![7; 2048]}]});
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = http.post(&url).json(&body).send().await.expect("send");
                assert_eq!(r.status(), 200, "no request may fail during a reload");
                let v: Value = r.json().await.unwrap();
                if v["model_version"] == "2" {
                    seen_v2.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        }));
    }
    // A new version appears on disk; reload picks it (version policy: latest 1).
    let v2 = repo.path().join("magika/2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::copy(repo.path().join("magika/1/model.onnx"), v2.join("model.onnx")).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = http
        .post(server.url("/v2/repository/models/magika/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s2 = seen_v2.clone();
    assert_eventually(Duration::from_secs(10), || s2.load(Ordering::Relaxed) > 20).await;

    // A broken version 3 fails to load and version 2 keeps serving.
    let v3 = repo.path().join("magika/3");
    std::fs::create_dir_all(&v3).unwrap();
    std::fs::write(v3.join("model.onnx"), b"this is not an onnx model").unwrap();
    let r = http
        .post(server.url("/v2/repository/models/magika/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("magika"), "{err}");
    let before = seen_v2.load(Ordering::Relaxed);
    let s2 = seen_v2.clone();
    assert_eventually(Duration::from_secs(10), || s2.load(Ordering::Relaxed) > before + 20).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.expect("client task: a request failed");
    }
    assert!(total > 50, "{total} requests");
    let index: Value = http
        .post(server.url("/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(index, json!([{"name": "magika", "state": "READY", "version": "2"}]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_returns_memory_and_reload_serves_again() {
    let repo = repo_copy(&["minilm"]);
    let server = start(
        repo.path(),
        Options {
            load_models: false,
            ..Options::default()
        },
    )
    .await;
    let text = || RequestParts {
        id: "t".into(),
        inputs: vec![(
            "TEXT".into(),
            Tensor::strings(vec![4], vec!["The quick brown fox jumps over the lazy dog.".into(); 4]),
        )],
        outputs: vec!["embedding".into()],
        priority: None,
        timeout: None,
        sequence: None,
    };
    let baseline = support::rss_bytes();
    for round in 0..2 {
        server.repo().load("minilm").await.expect("load");
        for _ in 0..20 {
            let r = server.repo().infer("minilm", "", text()).await.expect("infer");
            assert_eq!(r.outputs[0].1.shape, vec![4, 384]);
        }
        let loaded = support::rss_bytes();
        assert!(
            loaded > baseline + 20 * 1024 * 1024,
            "round {round}: a 23 MB model adds RSS"
        );
        server.repo().unload("minilm").await.expect("unload");
        assert!(matches!(
            server.repo().infer("minilm", "", text()).await,
            Err(InferError::ModelNotFound(_))
        ));
        // The engine session is released by its instance thread after the last request.
        let limit = baseline + (loaded - baseline) / 3;
        assert_eventually(Duration::from_secs(10), || support::rss_bytes() < limit).await;
    }
    server.stop().await;
}

/// One instance, no batching: the queue order is the compute order.
fn serial_magika() -> tempfile::TempDir {
    let repo = repo_copy(&["magika"]);
    support::edit_config(repo.path(), "magika", |s| {
        s.replace("max_batch_size = 32", "max_batch_size = 1")
            .replace("count = 2", "count = 1")
    });
    repo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_requests_overtake_queued_background_work() {
    let repo = serial_magika();
    let server = start(repo.path(), Options::default()).await;
    let done = Arc::new(parking_lot_free::Order::default());
    let mut tasks = Vec::new();
    for (i, prio) in std::iter::repeat_n(0u8, 24)
        .chain(std::iter::repeat_n(5u8, 4))
        .enumerate()
    {
        let (repo, done) = (server.repo().clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            repo.infer("magika", "", magika_parts(prio, None)).await.expect("infer");
            done.push(i, prio);
        }));
        // Background requests first, then realtime ones while the background ones queue.
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.take();
    let last_realtime = order.iter().rposition(|&(_, p)| p == 5).unwrap();
    assert!(
        last_realtime < 12,
        "realtime requests finish ahead of most background ones: {order:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_abandoned_requests_are_never_computed() {
    let repo = serial_magika();
    let server = start(repo.path(), Options::default()).await;
    let version = server.repo().version("magika", "").unwrap();
    let stats = || version.scheduler.runtime().stats.snapshot();
    let before = stats().inference_count;
    let fails_before = stats().fail.count;

    // Keep the single instance busy, then queue work behind it. Polling each request
    // future once submits it, in this order, without waiting for it.
    let repo = server.repo().clone();
    let mut busy: Vec<_> = (0..6)
        .map(|_| Box::pin(repo.infer("magika", "", magika_parts(5, None))))
        .collect();
    for b in busy.iter_mut() {
        assert!(futures::poll!(b.as_mut()).is_pending());
    }
    let expired = server
        .repo()
        .infer("magika", "", magika_parts(0, Some(Duration::from_micros(1))))
        .await;
    assert_eq!(expired.unwrap_err(), InferError::DeadlineExceeded);
    // The client goes away while its request is queued: the request future is
    // polled (so it is submitted) and then dropped.
    for _ in 0..5 {
        let gone = tokio::time::timeout(
            Duration::from_millis(1),
            server.repo().infer("magika", "", magika_parts(0, None)),
        )
        .await;
        assert!(
            gone.is_err(),
            "queued behind the busy instance, it cannot finish in 1 ms"
        );
    }
    for r in futures::future::join_all(busy).await {
        r.expect("busy requests succeed");
    }
    assert_eventually(Duration::from_secs(5), || {
        version.scheduler.pending() == 0 && version.scheduler.in_flight() == 0
    })
    .await;
    assert_eq!(
        stats().inference_count - before,
        6,
        "only the six live requests were computed"
    );
    // The expired and the abandoned requests count as failures when dequeued.
    assert_eventually(Duration::from_secs(5), || stats().fail.count - fails_before == 6).await;
    server.stop().await;
}

/// Records completion order across tasks.
mod parking_lot_free {
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Order(Mutex<Vec<(usize, u8)>>);

    impl Order {
        pub fn push(&self, i: usize, p: u8) {
            self.0.lock().unwrap().push((i, p));
        }
        pub fn take(&self) -> Vec<(usize, u8)> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }
}
