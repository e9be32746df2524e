use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde_json::{json, Value};
use stacker_domain::monitor;

use super::extract::{ok, ApiResult};
use super::AppState;

pub async fn ping() -> ApiResult<&'static str> {
    ok("pong")
}

pub async fn healthz() -> ApiResult<Value> {
    ok(json!({ "status": "alive" }))
}

/// Ready when the database answers, and in a cluster Redis too; also the
/// last minute of each dependency.
pub async fn readyz(State(app): State<AppState>) -> ApiResult<Value> {
    app.store.ping().await?;
    let mut ready = json!({ "status": "ready", "database": "ok", "dependencies": monitor::snapshot() });
    if let Some(cluster) = &app.cluster {
        cluster.redis.ping().await?;
        ready["redis"] = json!("ok");
    }
    ok(ready)
}

pub async fn metrics() -> impl IntoResponse {
    for dep in monitor::snapshot() {
        metrics::gauge!("stacker_dependency_success_ratio", "dependency" => dep.name).set(dep.success_rate);
        metrics::gauge!("stacker_dependency_latency_avg_seconds", "dependency" => dep.name).set(dep.avg_ms / 1000.0);
        metrics::gauge!("stacker_dependency_calls_per_minute", "dependency" => dep.name).set(dep.calls as f64);
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::prometheus().render())
}
