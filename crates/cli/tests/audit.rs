//! The audit log of a real `lattice serve` under `kill -9`: what the write policy
//! says can be lost (records still queued, not yet written) is all that is lost, and
//! `lattice audit` reads and filters what is on disk.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// A repository with magika only; the model file is hard-linked.
fn magika_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = support::root().join("models/magika");
    let dst = dir.path().join("magika");
    std::fs::create_dir_all(dst.join("1")).unwrap();
    std::fs::copy(src.join("config.toml"), dst.join("config.toml")).unwrap();
    std::fs::hard_link(src.join("1/model.onnx"), dst.join("1/model.onnx"))
        .or_else(|_| std::fs::copy(src.join("1/model.onnx"), dst.join("1/model.onnx")).map(|_| ()))
        .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_only_records_not_yet_written() {
    let repo = magika_repo();
    let audit = tempfile::tempdir().unwrap();
    let mut child = support::serve()
        .args(["--auth", "off", "--rate-limits", "off", "--agents", "off"])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--audit")
        .arg(audit.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.ends_with("auth=OFF limits=off audit=on\n"), "{line}");
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(60);
    while !client
        .get(format!("http://{http}/v2/health/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < until, "server not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"inputs": [{"name": "bytes", "shape": [1, 2048], "datatype": "INT32", "data": vec![0; 2048]}]});
    let n = 300;
    let mut answered_at = Vec::with_capacity(n);
    for i in 0..n {
        let r = client
            .post(format!("http://{http}/v2/models/magika/infer"))
            .header("x-tenant-id", if i % 2 == 0 { "acme" } else { "globex" })
            .header("x-request-id", format!("r-{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        answered_at.push(Instant::now());
    }
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();

    let list = |extra: &[&str]| -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_lattice"))
            .arg("audit")
            .arg("--from")
            .arg(audit.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let records = list(&[]);
    let found: std::collections::HashSet<usize> = records
        .iter()
        .filter_map(|r| r["headers"]["x-request-id"].as_str()?.strip_prefix("r-")?.parse().ok())
        .collect();
    let lost: Vec<usize> = (0..n).filter(|i| !found.contains(i)).collect();
    // The policy: a record is on disk once the writer thread has taken it, so only
    // the last answered requests can be missing. Every request answered a second or
    // more before the kill must be there.
    for i in &lost {
        let before_kill = killed.duration_since(answered_at[*i]);
        assert!(
            before_kill < Duration::from_secs(1),
            "r-{i}, answered {before_kill:?} before the kill, was lost"
        );
    }
    println!("kill -9 after {n} requests: {} records lost", lost.len());
    // Filters: tenant, status, time.
    assert_eq!(
        list(&["--tenant", "acme"]).len(),
        found.iter().filter(|i| *i % 2 == 0).count()
    );
    assert_eq!(list(&["--status", "429"]).len(), 0);
    assert_eq!(list(&["--since", "2000-01-01", "--until", "2000-01-02"]).len(), 0);
    assert_eq!(list(&["--since", "2000-01-01", "--status", "200"]).len(), records.len());
}
