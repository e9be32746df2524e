//! Extractors whose failures are envelopes, and the `ok` response.

use axum::extract::{FromRequest, FromRequestParts, Query};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::Json;
use serde::Serialize;
use stacker_domain::model::UserId;
use stacker_domain::Error;
use stacker_proto::http::Envelope;

use super::AppState;
use crate::error::ApiError;

/// A JSON body; a bad one is a 400 (or 413) envelope.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

/// A query string; a bad one is a 400 envelope.
#[derive(FromRequestParts)]
#[from_request(via(Query), rejection(ApiError))]
pub struct Params<T>(pub T);

/// The user a valid `Authorization: Bearer` token names.
pub struct Caller(pub UserId);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(parts)
            .ok_or_else(|| ApiError(Error::Unauthorized("missing Authorization: Bearer token".into())))?;
        Ok(Caller(app.accounts.authenticate(token)?))
    }
}

pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

pub type ApiResult<T> = Result<Json<Envelope<T>>, ApiError>;

pub fn ok<T: Serialize>(data: T) -> ApiResult<T> {
    Ok(Json(Envelope { code: 0, msg: "ok".into(), data: Some(data) }))
}

/// Success with no data (`"data": null`).
pub fn done() -> ApiResult<()> {
    Ok(Json(Envelope { code: 0, msg: "ok".into(), data: None }))
}
