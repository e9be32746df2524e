//! The HTTP API of SPEC §2: one router, thin handlers that parse, call the
//! domain and wrap the answer in the envelope.

mod accounts;
mod extract;
pub(crate) use extract::{bearer_token, done, ok, ApiResult, Body, Params};
pub(crate) use ops::metrics;
mod messages;
mod ops;
mod rooms;
mod views;
mod ws;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Router};

use crate::app::App;
use crate::error::error_response;

pub type AppState = Arc<App>;

/// Which parts of the API a process serves.
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    /// Accounts, rooms, membership, history (the meta role).
    pub meta: bool,
    /// send_message / resend_message (the send role).
    pub send: bool,
    /// `/api/ws` (the gateway role).
    pub ws: bool,
}

impl Parts {
    pub const ALL: Parts = Parts { meta: true, send: true, ws: true };
}

pub fn router(app: AppState) -> Router {
    router_for(app, Parts::ALL)
}

/// The ops routes (`/ping`, `/healthz`, `/readyz`, `/metrics`) plus `parts`.
pub fn router_for(app: AppState, parts: Parts) -> Router {
    let max_body = app.config.server.max_body_bytes;
    let mut api = Router::new()
        .route("/ping", get(ops::ping))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics));
    if parts.meta {
        let group = Router::new()
            .route("/create", post(rooms::create))
            .route("/add_member", post(rooms::add_member))
            .route("/add_members", post(rooms::add_members))
            .route("/remove_member", post(rooms::remove_member))
            .route("/leave", post(rooms::leave))
            .route("/change_nickname", post(rooms::change_nickname))
            .route("/change_member_role", post(rooms::change_member_role))
            .route("/mute_member", post(rooms::mute_member))
            .route("/join", post(rooms::join))
            .route("/join/request", post(rooms::join_request))
            .route("/join/requests", get(rooms::join_requests))
            .route("/join/respond", post(rooms::join_respond))
            .route("/search", get(rooms::search))
            .route("/members", get(rooms::members));
        api = api
            .route("/register", post(accounts::register))
            .route("/login", post(accounts::login))
            .route("/api/me", get(accounts::me))
            .nest("/api/chat/group", group)
            .route("/api/joined_rooms", get(rooms::joined_rooms))
            .route("/api/rooms", get(rooms::summaries))
            .route("/api/chat/mark_read", post(messages::mark_read))
            .route("/api/chat/history", get(messages::history));
    }
    if parts.send {
        api = api
            .route("/api/chat/send_message", post(messages::send))
            .route("/api/chat/resend_message", post(messages::resend));
    }
    if parts.ws {
        api = api.route("/api/ws", get(ws::upgrade));
    }
    api.fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route".into())
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(crate::telemetry::track_http))
        .with_state(app)
}
