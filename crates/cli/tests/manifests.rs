//! The Kubernetes manifests under deploy/k8s, checked offline: every document
//! deserialises into its Kubernetes type (CRDs as plain values), and the values that
//! must agree with the binary do: ports, probes, drain timing, the metric names the
//! HPA, adapter rules and ScaledObjects read, and the external scaler's address.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::ConfigMap, core::v1::Service,
    policy::v1::PodDisruptionBudget,
};
use lattice_observability::{ErrorType, Metrics, ModelLabels};
use serde::Deserialize;
use serde_json::Value;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/base")
}

/// Every document of the base, by (kind, name), as JSON values.
fn documents() -> BTreeMap<(String, String), Value> {
    let kustomization: Value =
        serde_norway::from_str(&std::fs::read_to_string(base().join("kustomization.yaml")).unwrap()).unwrap();
    let mut docs = BTreeMap::new();
    for file in kustomization["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(base().join(file.as_str().unwrap())).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap();
            let key = (
                v["kind"].as_str().unwrap().to_string(),
                v["metadata"]["name"].as_str().unwrap().to_string(),
            );
            assert!(docs.insert(key.clone(), v).is_none(), "duplicate {key:?}");
        }
    }
    docs
}

fn typed<T: serde::de::DeserializeOwned>(docs: &BTreeMap<(String, String), Value>, kind: &str, name: &str) -> T {
    let v = docs
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("{kind}/{name} missing"));
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{kind}/{name}: {e}"))
}

/// Names the metrics registry declares, plus the scrape-time series it exposes once
/// it serves a model.
fn registry_names() -> BTreeSet<String> {
    let m = Metrics::new();
    let labels = ModelLabels {
        model_name: "m".into(),
        model_version: "1".into(),
    };
    let rec = m.recorder(&labels);
    m.track_model(&rec, 1, Box::new(|| 0), vec![("x:mean".into(), vec![1.0])], 1, 1);
    // The recent-latency summary and the drift gauge need a sample.
    rec.observe_inference(Duration::from_millis(1), Some(0.9), ErrorType::None, None);
    rec.observe_features(&[1.0]);
    m.observe_service_time(0.001);
    m.observe_queue_time(0.001);
    m.set_load_source(Box::new(|| {
        Some(lattice_observability::metrics::Load {
            in_flight: 0,
            queued: 0,
            capacity: 1,
        })
    }));
    let mut names = lattice_observability::metrics::series_names(&m.encode());
    names.extend(m.declared_series().iter().cloned());
    names
}

fn env(container: &k8s_openapi::api::core::v1::Container, key: &str) -> Option<String> {
    container.env.as_ref()?.iter().find(|e| e.name == key)?.value.clone()
}

#[test]
fn every_document_deserialises_and_agrees_with_the_binary() {
    let docs = documents();
    let names = registry_names();

    // The server: ports as the binary's flags say, probes on real routes.
    let d: Deployment = typed(&docs, "Deployment", "lattice");
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let ports: BTreeMap<String, i32> = c
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    for (name, flag, default) in [
        ("http", "LATTICE_HTTP_PORT", 8000),
        ("grpc", "LATTICE_GRPC_PORT", 8001),
        ("metrics", "LATTICE_METRICS_PORT", 8002),
    ] {
        assert_eq!(ports[name], default, "{name} port is the binary's default");
        assert_eq!(env(c, flag).map(|v| v.parse::<i32>().unwrap()), Some(default), "{flag}");
    }
    for probe in [&c.startup_probe, &c.readiness_probe] {
        let path = probe.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert_eq!(path, "/v2/health/ready");
    }
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/v2/health/live")
    );
    // Drain fits in the grace period.
    let grace = pod.termination_grace_period_seconds.unwrap();
    let pre_stop: i64 = c
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap()
        .exec
        .as_ref()
        .unwrap()
        .command
        .as_ref()
        .unwrap()[1]
        .parse()
        .unwrap();
    let drain: i64 = env(c, "LATTICE_DRAIN_TIMEOUT_SECS").unwrap().parse().unwrap();
    // The pod-deletion-cost patcher goes through the sidecar, with RBAC to patch pods.
    assert_eq!(env(c, "LATTICE_POD_DELETION_COST").as_deref(), Some("on"));
    let proxy_port = env(c, "LATTICE_KUBE_API").unwrap();
    let sidecar = pod
        .containers
        .iter()
        .find(|c| c.name == "kubectl-proxy")
        .expect("kubectl-proxy sidecar");
    assert!(sidecar
        .args
        .as_ref()
        .unwrap()
        .iter()
        .any(|a| proxy_port.ends_with(a.trim_start_matches("--port="))));
    let role: k8s_openapi::api::rbac::v1::Role = typed(&docs, "Role", "lattice-pod-deletion-cost");
    let rule = &role.rules.as_ref().unwrap()[0];
    assert!(rule.resources.as_ref().unwrap().contains(&"pods".to_string()));
    assert!(rule.verbs.contains(&"patch".to_string()));
    // Several replicas: the agent store must be the shared one, not a pod-local file.
    let store: lattice_agent::store::StoreUrl = env(c, "LATTICE_MEMORY_STORE").unwrap().parse().unwrap();
    assert!(matches!(store, lattice_agent::store::StoreUrl::Redis(_)), "{store:?}");
    assert!(
        grace > pre_stop + drain,
        "grace {grace} > preStop {pre_stop} + drain {drain}"
    );

    // gRPC is headless and on the gRPC port.
    let grpc: Service = typed(&docs, "Service", "lattice-grpc");
    let spec = grpc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.ports.unwrap()[0].port, ports["grpc"]);
    let _: Service = typed(&docs, "Service", "lattice");
    let pdb: PodDisruptionBudget = typed(&docs, "PodDisruptionBudget", "lattice");
    assert!(pdb.spec.unwrap().min_available.is_some());

    // The HPA reads series the registry declares, through the adapter's rules.
    let hpa: HorizontalPodAutoscaler = typed(&docs, "HorizontalPodAutoscaler", "lattice");
    let hspec = hpa.spec.unwrap();
    assert!(hspec.max_replicas > hspec.min_replicas.unwrap());
    let behavior = hspec.behavior.unwrap();
    assert_eq!(behavior.scale_up.unwrap().stabilization_window_seconds, Some(0));
    assert!(behavior.scale_down.unwrap().stabilization_window_seconds.unwrap() >= 300);
    let adapter: ConfigMap = typed(&docs, "ConfigMap", "prometheus-adapter-lattice");
    let rules: Value = serde_norway::from_str(&adapter.data.unwrap()["config.yaml"]).unwrap();
    let exposed: BTreeSet<String> = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let series = r["seriesQuery"]
                .as_str()
                .unwrap()
                .split('{')
                .next()
                .unwrap()
                .to_string();
            assert!(names.contains(&series), "adapter rule reads undeclared {series}");
            r["name"]["as"].as_str().unwrap().to_string()
        })
        .collect();
    for m in hspec.metrics.unwrap() {
        let name = m.pods.expect("per-pod custom metrics").metric.name;
        assert!(names.contains(&name), "HPA reads undeclared {name}");
        assert!(exposed.contains(&name), "no adapter rule exposes {name}");
    }

    // KEDA: the external scaler is this binary's gRPC port; Prometheus reads our names.
    let ext = &docs[&("ScaledObject".to_string(), "lattice-external".to_string())];
    let trigger = &ext["spec"]["triggers"][0];
    assert!(["external", "external-push"].contains(&trigger["type"].as_str().unwrap()));
    let addr = trigger["metadata"]["scalerAddress"].as_str().unwrap();
    assert_eq!(addr, format!("lattice-grpc:{}", ports["grpc"]));
    for key in trigger["metadata"].as_object().unwrap().keys() {
        assert!(
            ["scalerAddress", "model", "targetPerReplica", "activationThreshold"].contains(&key.as_str()),
            "unknown scaler metadata {key}"
        );
    }
    let prom = &docs[&("ScaledObject".to_string(), "lattice-prometheus".to_string())];
    let query = prom["spec"]["triggers"][0]["metadata"]["query"].as_str().unwrap();
    let used: Vec<&str> = query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("ai_") || t.starts_with("inference_"))
        .collect();
    assert!(!used.is_empty());
    for n in used {
        assert!(names.contains(n), "ScaledObject query reads undeclared {n}");
    }
    let js = &docs[&("ScaledObject".to_string(), "lattice-consume".to_string())];
    assert_eq!(js["spec"]["triggers"][0]["type"], "nats-jetstream");
    let consume: Deployment = typed(&docs, "Deployment", "lattice-consume");
    let cpod = consume.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        js["spec"]["triggers"][0]["metadata"]["stream"].as_str(),
        env(&cpod.containers[0], "LATTICE_JOBS_STREAM").as_deref()
    );
    assert_eq!(
        js["spec"]["triggers"][0]["metadata"]["consumer"].as_str(),
        env(&cpod.containers[0], "LATTICE_DURABLE").as_deref()
    );
    let ack_wait: i64 = env(&cpod.containers[0], "LATTICE_ACK_WAIT_SECS")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cpod.termination_grace_period_seconds.unwrap() > ack_wait);
    assert!(docs.contains_key(&("ScaledObject".to_string(), "lattice-consume-kafka".to_string())));

    // Canary routing targets subsets the DestinationRule defines, weights sum to 100.
    let vs = &docs[&("VirtualService".to_string(), "lattice".to_string())];
    let dr = &docs[&("DestinationRule".to_string(), "lattice".to_string())];
    let subsets: BTreeSet<&str> = dr["spec"]["subsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let weighted = vs["spec"]["http"][1]["route"].as_array().unwrap();
    assert_eq!(weighted.iter().map(|r| r["weight"].as_i64().unwrap()).sum::<i64>(), 100);
    for r in vs["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["route"].as_array().unwrap())
    {
        assert!(subsets.contains(r["destination"]["subset"].as_str().unwrap()));
    }
}
