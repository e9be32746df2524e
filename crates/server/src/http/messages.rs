use axum::extract::State;
use serde::Deserialize;
use stacker_domain::messages::HistoryQuery;
use stacker_proto::http::*;
use stacker_proto::Id;

use super::extract::{ok, ApiResult, Body, Caller, Params};
use super::{views, AppState};

pub async fn send(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<SendMessageRequest>,
) -> ApiResult<SendMessageResponse> {
    let message = app.messages.send(me, req.room_id.0, req.content, req.client_msg_id).await?.into_message();
    ok(SendMessageResponse { msg_id: message.id.into(), seq: message.seq, created_at: message.created_at })
}

pub async fn resend(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<ResendMessageRequest>,
) -> ApiResult<SendMessageResponse> {
    let message = app.messages.resend(me, req.message_id.0).await?;
    ok(SendMessageResponse { msg_id: message.id.into(), seq: message.seq, created_at: message.created_at })
}

/// Extension to SPEC §2: moves the caller's read cursor (what `unread` counts from).
pub async fn mark_read(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<MarkReadRequest>,
) -> ApiResult<MarkReadRequest> {
    let seq = app.rooms.mark_read(me, req.room_id.0, req.seq).await?;
    ok(MarkReadRequest { room_id: req.room_id, seq })
}

#[derive(Deserialize)]
pub struct HistoryParams {
    room_id: Id,
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<u32>,
}

pub async fn history(
    State(app): State<AppState>,
    Caller(me): Caller,
    Params(q): Params<HistoryParams>,
) -> ApiResult<HistoryResponse> {
    let query = HistoryQuery { before_seq: q.before_seq, after_seq: q.after_seq, limit: q.limit };
    let (messages, has_more) = app.messages.history(me, q.room_id.0, query).await?;
    ok(HistoryResponse { messages: messages.iter().map(views::chat).collect(), has_more })
}
