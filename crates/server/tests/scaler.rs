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
    let trigger = scaled_object(&[("model", "magika")]);

    let spec = scaler.get_metric_spec(trigger.clone()).await.unwrap().into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "lattice_inference_demand");
    assert_eq!(
        spec.metric_specs[0].target_size_float, 1.0,
        "default target: the replica's capacity"
    );
    let custom = scaler
        .get_metric_spec(scaled_object(&[("targetPerReplica", "4")]))
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
