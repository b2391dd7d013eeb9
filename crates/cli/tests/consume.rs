//! `lattice consume` against the real NATS JetStream on 127.0.0.1:4222: 10,000 jobs,
//! the consumer killed with SIGKILL part-way and restarted, every job answered
//! exactly once.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream};
use futures::StreamExt;

const JOBS: usize = 10_000;

struct Names {
    jobs_stream: String,
    jobs_subject: String,
    results_stream: String,
    results_subject: String,
    durable: String,
}

fn start_consumer(n: &Names) -> Child {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lattice"))
        .current_dir(&root)
        .args(["consume", "--log", "warn", "--concurrency", "64"])
        .args(["--jobs-stream", &n.jobs_stream, "--jobs-subject", &n.jobs_subject])
        .args([
            "--results-stream",
            &n.results_stream,
            "--results-subject",
            &n.results_subject,
        ])
        .args(["--durable", &n.durable, "--ack-wait-secs", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("lattice consuming"), "{line:?}");
    child
}

async fn count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

async fn eventually<F: std::future::Future<Output = bool>>(within: Duration, mut cond: impl FnMut() -> F) {
    let until = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < until, "condition not met within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_answered_exactly_once_across_a_sigkill() {
    let tag = format!("{}{}", std::process::id(), Instant::now().elapsed().as_nanos() % 1000);
    let n = Names {
        jobs_stream: format!("TEST_JOBS_{tag}"),
        jobs_subject: format!("test{tag}.jobs"),
        results_stream: format!("TEST_RESULTS_{tag}"),
        results_subject: format!("test{tag}.results"),
        durable: format!("workers_{tag}"),
    };
    let client = async_nats::connect("nats://127.0.0.1:4222")
        .await
        .expect("NATS with JetStream on 127.0.0.1:4222");
    let js = jetstream::new(client);
    for (name, subject) in [
        (&n.jobs_stream, &n.jobs_subject),
        (&n.results_stream, &n.results_subject),
    ] {
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // A 36 ms chunk of a tone for the VAD model, the same for every job.
    let audio: Vec<String> = (0..576)
        .map(|i| format!("{:.4}", (i as f32 * 0.1728).sin() * 0.3))
        .collect();
    let body = format!(
        r#"{{"inputs":[{{"name":"input","shape":[1,576],"datatype":"FP32","data":[{}]}},{{"name":"state","shape":[2,1,128],"datatype":"FP32","data":[{}]}},{{"name":"sr","shape":[],"datatype":"INT64","data":[16000]}}],"outputs":[{{"name":"output"}}]}}"#,
        audio.join(","),
        vec!["0"; 256].join(",")
    );
    let body = bytes::Bytes::from(body);
    // Publish in windows: the client bounds the acks it keeps outstanding.
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for i in chunk {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("job-{i}").as_str());
            acks.push(
                js.publish_with_headers(format!("{}.silero_vad", n.jobs_subject), h, body.clone())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.expect("job stored");
        }
    }
    assert_eq!(count(&js, &n.jobs_stream).await, JOBS as u64);

    let mut first = start_consumer(&n);
    eventually(Duration::from_secs(120), || async {
        count(&js, &n.results_stream).await >= 3_000
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no drain, unacked jobs are redelivered
    first.wait().unwrap();
    let at_kill = count(&js, &n.results_stream).await;
    assert!(at_kill < JOBS as u64, "the kill must land mid-way ({at_kill} results)");
    let killed = Instant::now();
    let mut second = start_consumer(&n);
    eventually(Duration::from_secs(60), || async {
        count(&js, &n.results_stream).await > at_kill
    })
    .await;
    let recovery = killed.elapsed();
    assert!(
        recovery < Duration::from_secs(5),
        "new jobs flow before the dead replica's ack wait ends: {recovery:?}"
    );
    eventually(Duration::from_secs(180), || async {
        let mut c = js
            .get_stream(&n.jobs_stream)
            .await
            .unwrap()
            .get_consumer::<jetstream::consumer::pull::Config>(&n.durable)
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    let _ = second.kill();
    let _ = second.wait();
    eprintln!(
        "recovery after SIGKILL: {recovery:?} from restart to the first new result ({at_kill} results before the kill)"
    );

    // Every job has exactly one stored result, and every result is an answer.
    assert_eq!(count(&js, &n.results_stream).await, JOBS as u64);
    let results = js.get_stream(&n.results_stream).await.unwrap();
    let reader = results
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = reader.messages().await.unwrap();
    let mut ids = HashSet::new();
    while ids.len() < JOBS {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("results readable")
            .unwrap()
            .unwrap();
        let id = m.subject.as_str().rsplit('.').next().unwrap().to_string();
        assert!(ids.insert(id.clone()), "job {id} answered twice");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["model_name"], "silero_vad", "{v}");
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 1]));
    }
    assert_eq!(ids, (0..JOBS).map(|i| format!("job-{i}")).collect());
    for s in [&n.jobs_stream, &n.results_stream] {
        js.delete_stream(s).await.unwrap();
    }
}
