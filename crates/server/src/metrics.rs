//! The metrics port: Prometheus text rendered from the scheduler's own statistics
//! (Triton's breakdown: success, failure, queue and compute time, pending requests).

use std::fmt::Write;

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};

use crate::AppState;

pub fn router(state: AppState) -> Router {
    Router::new().route("/metrics", get(render)).with_state(state)
}

async fn render(State(s): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let models = s.repo.loaded();
    let mut family = |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (String, i64, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (model, version, v) in values {
            let _ = writeln!(out, "{name}{{model=\"{model}\",version=\"{version}\"}} {v}");
        }
    };
    let versions: Vec<_> = models
        .iter()
        .flat_map(|m| m.versions.values().cloned())
        .map(|v| (v.clone(), v.scheduler.runtime().stats.snapshot()))
        .collect();
    let each =
        |f: &dyn Fn(&lattice_inference::stats::Snapshot, &lattice_inference::repository::ModelVersion) -> f64| {
            versions
                .iter()
                .map(|(v, s)| (v.name.clone(), v.version, f(s, v)))
                .collect::<Vec<_>>()
        };
    family(
        "lattice_inference_request_success_total",
        "counter",
        "Inference requests that succeeded.",
        &mut each(&|s, _| s.success.count as f64).into_iter(),
    );
    family(
        "lattice_inference_request_failure_total",
        "counter",
        "Inference requests that failed (including deadline and cancellation).",
        &mut each(&|s, _| s.fail.count as f64).into_iter(),
    );
    family(
        "lattice_inference_count_total",
        "counter",
        "Inferences performed (a batch of n counts n).",
        &mut each(&|s, _| s.inference_count as f64).into_iter(),
    );
    family(
        "lattice_inference_exec_count_total",
        "counter",
        "Model executions (batches) performed.",
        &mut each(&|s, _| s.execution_count as f64).into_iter(),
    );
    family(
        "lattice_inference_queue_duration_seconds_total",
        "counter",
        "Cumulative time requests waited in the queue.",
        &mut each(&|s, _| s.queue.ns as f64 / 1e9).into_iter(),
    );
    family(
        "lattice_inference_compute_infer_duration_seconds_total",
        "counter",
        "Cumulative time spent in the engine.",
        &mut each(&|s, _| s.compute_infer.ns as f64 / 1e9).into_iter(),
    );
    family(
        "lattice_inference_pending_requests",
        "gauge",
        "Requests waiting in the queue.",
        &mut each(&|_, v| v.scheduler.pending() as f64).into_iter(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
