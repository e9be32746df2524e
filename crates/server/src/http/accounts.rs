use axum::extract::State;
use stacker_proto::http::*;

use super::extract::{ok, ApiResult, Body, Caller, ClientAddress};
use super::AppState;

pub async fn register(
    State(app): State<AppState>,
    ClientAddress(from): ClientAddress,
    Body(req): Body<RegisterRequest>,
) -> ApiResult<RegisterResponse> {
    let user_id = app.accounts.register(&req.username, &req.password, req.nickname.as_deref(), from).await?;
    ok(RegisterResponse { user_id: user_id.into() })
}

pub async fn login(
    State(app): State<AppState>,
    ClientAddress(from): ClientAddress,
    Body(req): Body<LoginRequest>,
) -> ApiResult<LoginResponse> {
    let t = app.accounts.login(&req.username, &req.password, from).await?;
    ok(LoginResponse { token: t.token, user_id: t.user_id.into(), expires_at: t.expires_at })
}

pub async fn me(State(app): State<AppState>, Caller(me): Caller) -> ApiResult<MeResponse> {
    let user = app.accounts.user(me).await?;
    ok(MeResponse {
        user_id: user.id.into(),
        username: user.username,
        nickname: user.nickname,
        created_at: user.created_at,
    })
}
