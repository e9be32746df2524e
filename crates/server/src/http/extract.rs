//! Extractors whose failures are envelopes, and the `ok` response.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Query};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
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
        let token = bearer_token(&parts.headers)
            .ok_or_else(|| ApiError(Error::Unauthorized("missing Authorization: Bearer token".into())))?;
        Ok(Caller(app.accounts.authenticate(token)?))
    }
}

/// The client's address, for per-address limits: the TCP peer, or the
/// configured proxy header's last entry. An IPv6 address stands for its /64,
/// which one host usually has whole.
pub struct ClientAddress(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Infallible> {
        let header = app.config.auth.client_address_header.as_str();
        let given = (!header.is_empty()).then(|| parts.headers.get_all(header).iter().next_back()).flatten();
        let forwarded = given.and_then(|value| value.to_str().ok()?.rsplit(',').next().and_then(parse_address));
        if given.is_some() && forwarded.is_none() && !UNREADABLE_HEADER_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(header, "the client address header holds no address; using the TCP peer's (logged once)");
        }
        let peer = || parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
        Ok(ClientAddress(forwarded.or_else(peer).map(address_key)))
    }
}

static UNREADABLE_HEADER_LOGGED: AtomicBool = AtomicBool::new(false);

/// `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`, and either with a `:port`.
fn parse_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
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
