//! Keeps this pod's `controller.kubernetes.io/pod-deletion-cost` annotation equal to
//! the scale-in guard's verdict, so that when the HPA lowers the replica count the
//! ReplicaSet removes an idle replica rather than one that just absorbed a burst.
//!
//! The pod patches itself through the Kubernetes API, via a `kubectl proxy` sidecar
//! that holds the service-account credentials (RBAC: `patch` on pods,
//! `deploy/k8s/base/rbac.yaml`). Patches are
//! sent only when the cost changes, at most once per interval: the annotation is a
//! hint, and the API server must not see a write per scrape.

use std::{sync::Arc, time::Duration};

use lattice_observability::Metrics;
use tokio_util::sync::CancellationToken;

pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

#[derive(Clone, Debug)]
pub struct PodCostConfig {
    /// API server base URL, e.g. https://kubernetes.default.svc.
    pub api: String,
    pub namespace: String,
    pub pod: String,
    /// Bearer token, if the endpoint wants one ("" = none).
    pub token: String,
    pub interval: Duration,
}

/// The merge patch that sets the annotation.
pub fn patch_body(cost: i64) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {ANNOTATION: cost.to_string()}}})
}

pub async fn run(cfg: PodCostConfig, metrics: Arc<Metrics>, http: reqwest::Client, stop: CancellationToken) {
    let url = format!(
        "{}/api/v1/namespaces/{}/pods/{}",
        cfg.api.trim_end_matches('/'),
        cfg.namespace,
        cfg.pod
    );
    let signals = metrics.set::<crate::replica_signals::ReplicaSignals>();
    let mut last: Option<i64> = None;
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let cost = signals.pod_deletion_cost();
        if last == Some(cost) {
            continue;
        }
        let mut req = http.patch(&url);
        if !cfg.token.is_empty() {
            req = req.bearer_auth(&cfg.token);
        }
        let sent = req
            .header("content-type", "application/merge-patch+json")
            .body(patch_body(cost).to_string())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => last = Some(cost),
            Ok(r) => tracing::warn!(status = %r.status(), "pod-deletion-cost patch refused"),
            Err(e) => tracing::warn!(error = %e, "pod-deletion-cost patch failed"),
        }
    }
}
