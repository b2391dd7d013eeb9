//! The metrics port: the exposition of the process's one registry, in OpenMetrics
//! when the scraper asks for it (Prometheus does; it then gets exemplars) and in the
//! classic text format otherwise. The same document is served at `/metrics` on the
//! REST port.

use axum::{
    extract::State,
    http::{header, HeaderMap},
    response::IntoResponse,
    routing::get,
    Router,
};
use lattice_observability::metrics::{CLASSIC_CONTENT_TYPE, CONTENT_TYPE};

use crate::AppState;

pub fn router(state: AppState) -> Router {
    Router::new().route("/metrics", get(render)).with_state(state)
}

pub async fn render(State(s): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let metrics = s.repo.metrics();
    if openmetrics {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode())
    } else {
        ([(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)], metrics.encode_classic())
    }
}
