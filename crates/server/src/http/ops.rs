use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use super::extract::{ok, ApiResult};
use super::AppState;

pub async fn ping() -> ApiResult<&'static str> {
    ok("pong")
}

pub async fn healthz() -> ApiResult<Value> {
    ok(json!({ "status": "alive" }))
}

/// Ready when the database answers.
pub async fn readyz(State(app): State<AppState>) -> ApiResult<Value> {
    app.store.ping().await?;
    ok(json!({ "status": "ready", "database": "ok" }))
}

pub async fn metrics() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::prometheus().render())
}
