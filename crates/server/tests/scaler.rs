//! The KEDA external scaler, driven by a client generated from the same proto, while
//! a real load runs against the server: demand rises with the load, activity is
//! pushed on change, and both fall back when the load stops.

mod support;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use lattice_inference::{DataType, RequestParts, Tensor};
use lattice_proto::externalscaler::{external_scaler_client::ExternalScalerClient, GetMetricsRequest, ScaledObjectRef};
use support::{repo_copy, start, Options};

fn scaled_object(md: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "lattice".into(),
        namespace: "default".into(),
        scaler_metadata: md
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_scaler_follows_a_real_load() {
    // One instance, no batching: capacity 1, so demand is easy to read.
    let repo = repo_copy(&["magika"]);
    support::edit_config(repo.path(), "magika", |s| s.replace("count = 2", "count = 1"));
    let server = start(repo.path(), Options::default()).await;
    let mut scaler = ExternalScalerClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let trigger = scaled_object(&[("model", "magika"), ("policy", "demand")]);

    let spec = scaler.get_metric_spec(trigger.clone()).await.unwrap().into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "lattice_inference_demand");
    assert_eq!(
        spec.metric_specs[0].target_size_float, 1.0,
        "default target: the replica's capacity"
    );
    let custom = scaler
        .get_metric_spec(scaled_object(&[("targetPerReplica", "4"), ("policy", "demand")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(custom.metric_specs[0].target_size_float, 4.0);
    assert!(
        !scaler.is_active(trigger.clone()).await.unwrap().into_inner().result,
        "idle before the load"
    );
    let mut pushes = scaler.stream_is_active(trigger.clone()).await.unwrap().into_inner();
    assert!(
        !pushes.message().await.unwrap().unwrap().result,
        "the current state is pushed at once"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..12 {
        let (repo, stop) = (server.repo().clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 2_000 {
                let parts = RequestParts {
                    id: String::new(),
                    inputs: vec![(
                        "bytes".into(),
                        Tensor::raw(DataType::I32, vec![1, 2048], vec![0u8; 8192]),
                    )],
                    outputs: vec![],
                    priority: None,
                    timeout: None,
                };
                repo.infer("magika", "", parts).await.expect("infer under load");
                n += 1;
            }
        }));
    }
    let pushed = tokio::time::timeout(Duration::from_secs(10), pushes.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(pushed.result, "activity is pushed when the load starts");
    let mut peak = 0.0f64;
    for _ in 0..50 {
        let v = scaler
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(trigger.clone()),
                metric_name: "lattice_inference_demand".into(),
            })
            .await
            .unwrap()
            .into_inner();
        peak = peak.max(v.metric_values[0].metric_value_float);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Twelve closed-loop clients on one instance: most of them are always waiting.
    // A client's next request can be queued an instant before its previous one
    // leaves the in-flight count, so a sample may see one or two more.
    assert!((6.0..=14.0).contains(&peak), "demand under a 12-client load: {peak}");
    assert!(scaler.is_active(trigger.clone()).await.unwrap().into_inner().result);
    assert!(
        !scaler
            .is_active(scaled_object(&[("model", "magika"), ("activationThreshold", "100")]))
            .await
            .unwrap()
            .into_inner()
            .result,
        "activation needs demand strictly above the threshold"
    );

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let pushed = tokio::time::timeout(Duration::from_secs(10), pushes.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!pushed.result, "inactivity is pushed when the load ends");
    let v = scaler
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(trigger.clone()),
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.metric_values[0].metric_value_float, 0.0);

    let err = scaler.is_active(scaled_object(&[("model", "nope")])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = scaler
        .get_metric_spec(scaled_object(&[("targetPerReplica", "-1")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    drop(pushes);
    server.stop().await;
}

/// The server's policy and the simulator's are one function: the same seconds (the
/// shipped spike trace) give the same fleet sizes, and KEDA's arithmetic turns the
/// scaler's metric back into exactly those sizes.
#[test]
fn the_server_runs_the_simulated_policy() {
    use lattice_scaling::{keda, Fleet, PredictiveConfig, Second};
    let trace = std::fs::read_to_string(support::workspace_root().join("crates/sim/traces/spike.csv")).unwrap();
    let fleet = Fleet {
        pod_capacity: 40.0,
        target_utilization: 0.7,
        lead_time_s: 60,
        min: 1,
        max: 50,
    };
    let seconds: Vec<Second> = trace
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(',')?.1.trim().parse::<f64>().ok())
        .enumerate()
        // A queue that builds while the arrivals outrun a small fleet.
        .map(|(i, arrivals)| Second {
            arrivals,
            queue: ((i % 7) as f64) * (arrivals / 50.0),
        })
        .collect();
    assert!(seconds.len() > 1000);
    let simulated = lattice_sim::policy::lattice::replay(PredictiveConfig::default(), fleet, &seconds, 1);
    let mut runner = lattice_server::scaling::PolicyRunner::new(PredictiveConfig::default(), fleet);
    let mut current = 1;
    let served: Vec<u32> = seconds
        .iter()
        .map(|&s| {
            current = runner.tick(s, current);
            keda::replicas_for(keda::metric_for(current, 1.0), 1.0)
        })
        .collect();
    assert_eq!(served, simulated);
    let (lo, hi) = (served.iter().min().unwrap(), served.iter().max().unwrap());
    assert!(hi > lo, "the spike moves the fleet: {lo}..{hi}");
}

/// Two replicas share their per-second signals through Redis: load sent to one
/// moves the other's decision too, and both see a fleet of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_sees_the_whole_fleet_through_redis() {
    let prefix = format!("lattice-scaling-test-{}", uuid::Uuid::new_v4());
    let scaling = |replica: &str| lattice_server::scaling::ScalingConfig {
        // A small pod, so a light load needs several.
        pod_capacity: Some(2.0),
        target_utilization: 1.0,
        store: Some("redis://127.0.0.1:6379".into()),
        prefix: prefix.clone(),
        replica: replica.into(),
        ..Default::default()
    };
    let repo = repo_copy(&["magika"]);
    let a = start(
        repo.path(),
        Options {
            scaling: scaling("a"),
            ..Options::default()
        },
    )
    .await;
    let b = start(
        repo.path(),
        Options {
            scaling: scaling("b"),
            ..Options::default()
        },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, mut client) = (stop.clone(), a.grpc_client().await);
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                let req = lattice_proto::inference::ModelInferRequest {
                    model_name: "magika".into(),
                    inputs: vec![lattice_proto::inference::model_infer_request::InferInputTensor {
                        name: "bytes".into(),
                        datatype: "INT32".into(),
                        shape: vec![1, 2048],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![vec![0u8; 8192]],
                    ..Default::default()
                };
                client.model_infer(req).await.expect("infer");
                n += 1;
            }
        })
    };
    let mut scaler = ExternalScalerClient::connect(format!("http://{}", b.grpc))
        .await
        .unwrap();
    let trigger = scaled_object(&[("model", "magika")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let metric = loop {
        let v = scaler
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(trigger.clone()),
                metric_name: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .metric_values[0]
            .metric_value_float;
        if b.state.scaling.fleet() == 2 && v >= 3.0 {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica b never saw a's load: fleet {}, metric {v}",
            b.state.scaling.fleet()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let spec = scaler.get_metric_spec(trigger).await.unwrap().into_inner();
    assert_eq!(
        spec.metric_specs[0].target_size_float, 1.0,
        "the metric is the fleet size"
    );
    assert!(metric >= 3.0);
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    a.stop().await;
    b.stop().await;
}
