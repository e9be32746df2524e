//! Distributed mode (SPEC §5): the registry service, and the background work
//! of gateways (heartbeat, stream relay) and the flusher (reclaiming the
//! streams of dead gateways). `run_role` starts any role.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts as RequestParts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{middleware, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stacker_domain::auth::Tokens;
use stacker_domain::cluster::{GatewayInfo, Registry};
use stacker_domain::delivery::remote::{reclaim_dead, relay};
use stacker_domain::{monitor, Error};
use stacker_proto::http::Envelope;
use stacker_proto::Id;
use stacker_redis::{RedisCluster, RedisOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{error_response, ApiError};
use crate::http::{done, ok, ApiResult, Parts};
use crate::{App, Config};

/// The header internal callers put the shared secret in.
pub const INTERNAL_HEADER: &str = "x-stacker-internal";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Meta,
    Send,
    Registry,
    Gateway,
    Flusher,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Meta => "meta",
            Role::Send => "send",
            Role::Registry => "registry",
            Role::Gateway => "gateway",
            Role::Flusher => "flusher",
        }
    }

    /// The role's default port (SPEC §1); the flusher serves only ops routes.
    pub fn default_port(self) -> u16 {
        match self {
            Role::Send => 8081,
            Role::Meta => 8082,
            Role::Registry => 8083,
            Role::Gateway => 8084,
            Role::Flusher => 8085,
        }
    }
}

pub async fn connect_redis(config: &Config) -> anyhow::Result<RedisCluster> {
    let options = RedisOptions {
        prefix: config.cluster.redis_prefix.clone(),
        stream_max_len: config.cluster.stream_max_len,
        ..Default::default()
    };
    Ok(RedisCluster::connect(&config.cluster.redis_url, options).await?)
}

/// Runs one role until `shutdown` resolves.
pub async fn run_role(
    role: Role,
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate_cluster()?;
    // Install the recorder before anything records (the Redis connect does).
    crate::telemetry::prometheus();
    let redis = connect_redis(&config).await?;
    let addr = listener.local_addr()?;
    match role {
        Role::Registry => serve_registry(listener, redis, config, shutdown).await,
        Role::Meta => {
            let parts = Parts { meta: true, send: false, ws: false };
            serve_app(role, config, redis, addr, listener, parts, shutdown).await
        }
        Role::Send => {
            let parts = Parts { meta: false, send: true, ws: false };
            serve_app(role, config, redis, addr, listener, parts, shutdown).await
        }
        Role::Gateway => serve_gateway(config, redis, listener, addr, shutdown).await,
        Role::Flusher => serve_flusher(config, redis, listener, shutdown).await,
    }
}

/// A meta or send instance: serves its part of the API and heartbeats to the
/// registry so it appears in `/registry/instances?kind=`.
async fn serve_app(
    role: Role,
    config: Config,
    redis: RedisCluster,
    addr: SocketAddr,
    listener: TcpListener,
    parts: Parts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let kind = role.name();
    let id = format!("{kind}-{}", addr.port());
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let url = format!("http://{host}:{}", addr.port());
    let app = Arc::new(App::build_distributed(config.clone(), redis, id.clone(), false).await?);
    let http = reqwest::Client::new();
    let registry = config.cluster.registry_url.trim_end_matches('/').to_string();
    let secret = config.cluster.internal_secret.clone();
    let body = json!({ "kind": kind, "id": id, "url": url, "ttl_ms": config.cluster.gateway_ttl_ms });
    let stop = CancellationToken::new();
    let beat = {
        let (stop, http, registry, secret, body) =
            (stop.clone(), http.clone(), registry.clone(), secret.clone(), body.clone());
        let period = Duration::from_millis(config.cluster.heartbeat_ms);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let sent = http
                    .post(format!("{registry}/registry/instance/heartbeat"))
                    .header(INTERNAL_HEADER, &secret)
                    .json(&body)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                if let Err(e) = sent.and_then(|r| r.error_for_status()) {
                    tracing::warn!(error = %e, "instance heartbeat failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.cancelled() => break,
                }
            }
        })
    };
    let result = crate::run_parts(listener, app, parts, shutdown).await;
    stop.cancel();
    let _ = beat.await;
    let _ = http
        .post(format!("{registry}/registry/instance/deregister"))
        .header(INTERNAL_HEADER, &secret)
        .json(&json!({ "kind": kind, "id": id }))
        .send()
        .await;
    result
}

fn gateway_info(config: &Config, id: &str, addr: SocketAddr, connections: usize) -> GatewayInfo {
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let ws_url = if config.cluster.public_ws_url.is_empty() {
        format!("ws://{host}:{}/api/ws", addr.port())
    } else {
        config.cluster.public_ws_url.clone()
    };
    GatewayInfo {
        id: id.to_string(),
        ws_url,
        internal_url: format!("http://{host}:{}", addr.port()),
        capacity: config.cluster.gateway_capacity,
        connections: connections as u64,
    }
}

async fn serve_gateway(
    config: Config,
    redis: RedisCluster,
    listener: TcpListener,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let id = if config.cluster.gateway_id.is_empty() {
        format!("gw-{}", addr.port())
    } else {
        config.cluster.gateway_id.clone()
    };
    let app = Arc::new(App::build_distributed(config.clone(), redis.clone(), id.clone(), true).await?);
    let stop = CancellationToken::new();
    let http = reqwest::Client::new();
    let registry = config.cluster.registry_url.trim_end_matches('/').to_string();
    let secret = config.cluster.internal_secret.clone();

    // Registered before serving, so clients can be sent here as soon as it listens.
    heartbeat(&http, &registry, &secret, &gateway_info(&config, &id, addr, 0), config.cluster.gateway_ttl_ms).await?;
    let beat = {
        let (app, stop, http, registry, secret, id, config, redis) = (
            app.clone(),
            stop.clone(),
            http.clone(),
            registry.clone(),
            secret.clone(),
            id.clone(),
            config.clone(),
            redis.clone(),
        );
        tokio::spawn(async move {
            let period = Duration::from_millis(config.cluster.heartbeat_ms);
            let mut rejoin_pending = false;
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.cancelled() => break,
                }
                let info = gateway_info(&config, &id, addr, app.delivery.hub().connections());
                match heartbeat(&http, &registry, &secret, &info, config.cluster.gateway_ttl_ms).await {
                    Ok(registered) => rejoin_pending |= registered,
                    Err(e) => tracing::warn!(error = %e, "gateway heartbeat failed"),
                }
                if rejoin_pending {
                    rejoin_pending = !rejoin(&app, &redis, &id).await;
                }
            }
        })
    };
    let relay_task = tokio::spawn(relay(
        Arc::new(redis.clone()),
        Arc::new(redis.clone()),
        app.delivery.hub().clone(),
        id.clone(),
        app.delivery_enqueue_timeout(),
        stop.clone(),
    ));
    tracing::info!(gateway = %id, "gateway registered and relaying its stream");
    let result = crate::run_parts(listener, app, Parts { meta: false, send: false, ws: true }, shutdown).await;
    stop.cancel();
    let _ = beat.await;
    let _ = relay_task.await;
    let deregister = http
        .post(format!("{registry}/registry/gateway/deregister"))
        .header(INTERNAL_HEADER, &secret)
        .json(&json!({ "id": id }))
        .send()
        .await;
    if let Err(e) = deregister {
        tracing::warn!(error = %e, "cannot deregister; the registry drops this gateway after its TTL");
    }
    result
}

/// Returns whether the registry took it as a new registration.
async fn heartbeat(
    http: &reqwest::Client,
    registry: &str,
    secret: &str,
    info: &GatewayInfo,
    ttl_ms: u64,
) -> anyhow::Result<bool> {
    let resp = http
        .post(format!("{registry}/registry/gateway/heartbeat"))
        .header(INTERNAL_HEADER, secret)
        .json(&HeartbeatRequest { gateway: info.clone(), ttl_ms: Some(ttl_ms) })
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "registry answered {}", resp.status());
    let body: Envelope<HeartbeatResponse> = resp.json().await?;
    Ok(body.data.is_some_and(|d| d.registered))
}

/// The registry lost this gateway (Redis restarted, or a long stall): put its
/// users' routes back, and once route caches have expired have every session
/// compare its cursors with the store, so nothing pushed meanwhile is missed.
/// False when the routes could not be restored (the caller retries).
async fn rejoin(app: &Arc<App>, redis: &RedisCluster, gateway: &str) -> bool {
    let counts = app.delivery.hub().connection_counts();
    if let Err(e) = redis.restore_routes(gateway, &counts).await {
        tracing::warn!(error = %e, "cannot restore routes yet; retrying with the next heartbeat");
        return false;
    }
    tracing::warn!(users = counts.len(), "registry had lost this gateway: routes restored");
    // Off the heartbeat loop: it must keep beating meanwhile.
    let (app, wait) = (app.clone(), Duration::from_millis(app.config.cluster.route_cache_ms * 2 + 200));
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        for conn in app.delivery.hub().all_connections() {
            conn.offer(stacker_domain::delivery::Push::Recheck, Duration::from_millis(100)).await;
        }
    });
    true
}

async fn serve_flusher(
    config: Config,
    redis: RedisCluster,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let task = {
        let (stop, redis) = (stop.clone(), redis.clone());
        let period = Duration::from_millis(config.cluster.flush_interval_ms);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                match reclaim_dead(&redis, &redis, "flusher").await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(entries = n, "re-routed entries of dead gateways"),
                    Err(e) => tracing::warn!(error = %e, "flusher pass failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.cancelled() => break,
                }
            }
        })
    };
    let result = serve_ops_only(listener, redis, config, shutdown).await;
    stop.cancel();
    let _ = task.await;
    result
}

// ---- The registry service -------------------------------------------------

struct RegistryState {
    redis: RedisCluster,
    config: Config,
    /// Checks the user tokens of `gateway/available` calls that name a user.
    tokens: Tokens,
}

type Shared = Arc<RegistryState>;

/// A caller that presented the internal credential.
struct Internal;

impl FromRequestParts<Shared> for Internal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut RequestParts, state: &Shared) -> Result<Self, ApiError> {
        let given = parts.headers.get(INTERNAL_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, state.config.cluster.internal_secret.as_bytes()) {
            Ok(Internal)
        } else {
            Err(ApiError(Error::Unauthorized(format!("internal endpoint: send the {INTERNAL_HEADER} credential"))))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub gateway: GatewayInfo,
    /// Dead after this long without another heartbeat (default: cluster.gateway_ttl_ms).
    pub ttl_ms: Option<u64>,
}

async fn gateway_heartbeat(
    State(s): State<Shared>,
    _: Internal,
    crate::http::Body(req): crate::http::Body<HeartbeatRequest>,
) -> ApiResult<HeartbeatResponse> {
    if req.gateway.id.is_empty() || req.gateway.id.contains(':') || req.gateway.id.len() > 64 {
        return Err(ApiError(Error::bad_request("gateway.id must be 1 to 64 characters without ':'")));
    }
    let ttl = Duration::from_millis(req.ttl_ms.unwrap_or(s.config.cluster.gateway_ttl_ms).clamp(100, 600_000));
    let registered = s.redis.heartbeat_gateway(&req.gateway, ttl).await?;
    ok(HeartbeatResponse { registered })
}

#[derive(Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// True when the registry had no live record of this gateway.
    pub registered: bool,
}

#[derive(Deserialize)]
struct IdRequest {
    id: String,
}

async fn gateway_deregister(
    State(s): State<Shared>,
    _: Internal,
    crate::http::Body(req): crate::http::Body<IdRequest>,
) -> ApiResult<()> {
    s.redis.deregister_gateway(&req.id).await?;
    done()
}

#[derive(Deserialize)]
struct AvailableQuery {
    user_id: Option<Id>,
}

/// Public: where a client should connect. Anyone gets the least-loaded
/// gateway; the gateway a user is already on (or leased) goes only to that
/// user's own token, since it tells whether they are online. Without a
/// token `user_id` is ignored (GoStacker's clients send it without one).
async fn gateway_available(
    State(s): State<Shared>,
    headers: axum::http::HeaderMap,
    crate::http::Params(q): crate::http::Params<AvailableQuery>,
) -> ApiResult<stacker_proto::http::AvailableGatewayResponse> {
    let caller = match crate::http::bearer_token(&headers) {
        Some(token) => Some(s.tokens.verify(token)?),
        None => None,
    };
    if let (Some(asked), Some(me)) = (q.user_id, caller) {
        if asked.0 != me {
            return Err(ApiError(Error::Forbidden("user_id must be the token's own user".into())));
        }
    }
    match s.redis.pick_gateway(caller).await? {
        Some(gw) => ok(stacker_proto::http::AvailableGatewayResponse { gateway_id: gw.id, ws_url: gw.ws_url }),
        None => Err(ApiError(Error::Unavailable("no gateway with free capacity is alive".into()))),
    }
}

async fn gateways(State(s): State<Shared>, _: Internal) -> ApiResult<Value> {
    ok(json!({ "gateways": s.redis.live_gateways().await? }))
}

#[derive(Deserialize)]
struct RoutesRequest {
    user_ids: Vec<Id>,
}

async fn routes(
    State(s): State<Shared>,
    _: Internal,
    crate::http::Body(req): crate::http::Body<RoutesRequest>,
) -> ApiResult<Value> {
    if req.user_ids.len() > 10_000 {
        return Err(ApiError(Error::bad_request("at most 10000 user_ids per call")));
    }
    let ids: Vec<i64> = req.user_ids.iter().map(|id| id.0).collect();
    let found = s.redis.routes(&ids).await?;
    let routes: serde_json::Map<String, Value> =
        found.into_iter().map(|(u, gws)| (u.to_string(), json!(gws))).collect();
    ok(json!({ "routes": routes }))
}

#[derive(Deserialize)]
struct InstanceHeartbeat {
    kind: String,
    id: String,
    url: String,
    ttl_ms: Option<u64>,
}

fn check_kind(kind: &str) -> Result<(), ApiError> {
    match kind {
        "send" | "meta" => Ok(()),
        _ => Err(ApiError(Error::bad_request("kind must be send or meta"))),
    }
}

async fn instance_heartbeat(
    State(s): State<Shared>,
    _: Internal,
    crate::http::Body(req): crate::http::Body<InstanceHeartbeat>,
) -> ApiResult<()> {
    check_kind(&req.kind)?;
    if req.id.is_empty() || req.id.len() > 64 || req.id.contains(':') || req.url.is_empty() || req.url.len() > 512 {
        return Err(ApiError(Error::bad_request("id must be 1 to 64 characters without ':' and url 1 to 512")));
    }
    let ttl = Duration::from_millis(req.ttl_ms.unwrap_or(s.config.cluster.gateway_ttl_ms).clamp(100, 600_000));
    s.redis.heartbeat_instance(&req.kind, &req.id, &req.url, ttl).await?;
    done()
}

#[derive(Deserialize)]
struct InstanceId {
    kind: String,
    id: String,
}

async fn instance_deregister(
    State(s): State<Shared>,
    _: Internal,
    crate::http::Body(req): crate::http::Body<InstanceId>,
) -> ApiResult<()> {
    check_kind(&req.kind)?;
    s.redis.deregister_instance(&req.kind, &req.id).await?;
    done()
}

#[derive(Deserialize)]
struct KindQuery {
    kind: String,
}

async fn instances(
    State(s): State<Shared>,
    _: Internal,
    crate::http::Params(q): crate::http::Params<KindQuery>,
) -> ApiResult<Value> {
    check_kind(&q.kind)?;
    let list: Vec<Value> =
        s.redis.live_instances(&q.kind).await?.into_iter().map(|(id, url)| json!({ "id": id, "url": url })).collect();
    ok(json!({ "instances": list }))
}

async fn registry_ready(State(s): State<Shared>) -> ApiResult<Value> {
    s.redis.ping().await?;
    ok(json!({ "status": "ready", "redis": "ok", "dependencies": monitor::snapshot() }))
}

/// The registry's routes (or, for the flusher, only the ops routes) until `shutdown`.
async fn serve_registry(
    listener: TcpListener,
    redis: RedisCluster,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_registry_routes(listener, redis, config, true, shutdown).await
}

async fn serve_ops_only(
    listener: TcpListener,
    redis: RedisCluster,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_registry_routes(listener, redis, config, false, shutdown).await
}

async fn serve_registry_routes(
    listener: TcpListener,
    redis: RedisCluster,
    config: Config,
    registry: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    crate::telemetry::prometheus();
    let tokens = Tokens::new(config.auth.jwt_secret.as_bytes(), config.auth.token_ttl_s);
    let state = Arc::new(RegistryState { redis, config, tokens });
    let mut router = Router::new()
        .route("/ping", get(|| async { ok("pong") }))
        .route("/healthz", get(|| async { ok(json!({ "status": "alive" })) }))
        .route("/readyz", get(registry_ready))
        .route("/metrics", get(crate::http::metrics));
    if registry {
        router = router
            .route("/registry/gateway/register", post(gateway_heartbeat))
            .route("/registry/gateway/heartbeat", post(gateway_heartbeat))
            .route("/registry/gateway/deregister", post(gateway_deregister))
            .route("/registry/gateway/available", get(gateway_available))
            .route("/registry/gateways", get(gateways))
            .route("/registry/routes", post(routes))
            .route("/registry/instance/heartbeat", post(instance_heartbeat))
            .route("/registry/instance/deregister", post(instance_deregister))
            .route("/registry/instances", get(instances));
    }
    let router = router
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn(crate::telemetry::track_http))
        .with_state(state);
    axum::serve(crate::app::no_delay(listener), router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
