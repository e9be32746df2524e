//! `GET /api/ws` (SPEC §3). Each connection is one task that polls its reader
//! and its writer together: the reader handles client frames (acks, sends,
//! syncs, pings), the writer turns the session's pushes into frames and writes
//! them in bursts (feed, then one flush).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::future::{self, BoxFuture};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use stacker_domain::clock::now_ms;
use stacker_domain::cluster::Registry;
use stacker_domain::delivery::{Close, ConnHandle, Frame, Push, Session};
use stacker_domain::model::Appended;
use stacker_domain::{validate, Error};
use stacker_proto::ws::{ClientFrame, ServerFrame};

use super::extract::Params;
use super::AppState;
use crate::error::ApiError;

/// Most rooms one `sync` frame may name.
const MAX_SYNC_ROOMS: usize = 1000;

#[derive(Deserialize)]
pub struct WsParams {
    token: Option<String>,
    device_id: Option<String>,
}

pub async fn upgrade(
    State(app): State<AppState>,
    headers: HeaderMap,
    Params(q): Params<WsParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Not a WebSocket handshake: axum's status (400, 405 or 426) in the envelope.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(crate::error::error_response(rejection.status(), rejection.body_text())),
    };
    let header_token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    let token = header_token
        .or(q.token)
        .ok_or_else(|| Error::Unauthorized("missing token: send Authorization: Bearer or ?token=".into()))?;
    let user_id = app.accounts.authenticate(&token)?;
    // Trimmed, as validated: `phone ` and `phone` are one device (one cursor).
    let device_id = validate::short_text("device_id", q.device_id.as_deref().unwrap_or("default"), 64, true)?;
    if app.shutdown.is_cancelled() {
        return Err(Error::Unavailable("the server is shutting down; reconnect".into()).into());
    }
    // Distributed: the route goes in before the session reads its cursors, so
    // everything committed later is either pushed here or found by a recheck.
    if let Some(cluster) = &app.cluster {
        cluster.redis.route_connected(user_id, &cluster.instance).await?;
    }
    let (handle, session) = match app.delivery.connect(user_id, &device_id).await {
        Ok(pair) => pair,
        Err(e) => {
            route_closed(&app, user_id).await;
            return Err(e.into());
        }
    };
    if let Some(cluster) = &app.cluster {
        // Send instances may hold a cached "not connected" for this user a little longer.
        let (handle, wait) = (handle.clone(), Duration::from_millis(app.config.cluster.route_cache_ms * 2 + 200));
        cluster.fanout.forget_routes(&[user_id]).await;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            handle.offer(Push::Recheck, Duration::from_millis(100)).await;
        });
    }
    let ws_config = &app.config.ws;
    let failed = (app.clone(), handle.clone());
    let ws = ws
        .read_buffer_size(ws_config.read_buffer_bytes)
        .write_buffer_size(ws_config.write_buffer_bytes)
        .max_write_buffer_size(ws_config.write_buffer_bytes + 2 * ws_config.max_frame_bytes.max(64 * 1024) + 64 * 1024)
        .max_message_size(ws_config.max_frame_bytes)
        .max_frame_size(ws_config.max_frame_bytes)
        .on_failed_upgrade(move |e| {
            tracing::debug!(error = %e, "websocket upgrade failed");
            failed.0.delivery.disconnect(&failed.1);
            tokio::spawn(async move { route_closed(&failed.0, failed.1.user_id).await });
        });
    let tracker = app.ws_tasks.clone();
    Ok(ws.on_upgrade(move |socket| tracker.track_future(serve(app, socket, handle, session))))
}

async fn serve(app: AppState, socket: WebSocket, handle: ConnHandle, mut session: Session) {
    let (mut sink, mut stream) = socket.split();
    let last_seen = Arc::new(AtomicI64::new(now_ms()));
    let writer = write_loop(&app, &mut sink, &mut session, &last_seen);
    let reader = async {
        // Sends are checked and queued in arrival order, then stored while the
        // reader goes on; their errors are reported in that order too.
        let mut sends: FuturesOrdered<BoxFuture<'static, Result<(), Error>>> = FuturesOrdered::new();
        loop {
            tokio::select! {
                Some(result) = sends.next(), if !sends.is_empty() => {
                    if let Err(e) = result {
                        Box::pin(reply_api_error(&app, &handle, e)).await;
                    }
                }
                msg = stream.next(), if sends.len() < MAX_SENDS_IN_FLIGHT => {
                    let msg = msg?;
                    last_seen.store(now_ms(), Ordering::Relaxed);
                    match msg {
                        Ok(Message::Text(text)) => Box::pin(handle_frame(&app, &handle, &text, &mut sends)).await,
                        Ok(Message::Binary(_)) => {
                            Box::pin(reply_error(&app, &handle, 400, "binary frames are not supported; send JSON text")).await
                        }
                        Ok(Message::Close(_)) => return None,
                        Ok(_) => {} // ping/pong: answered by the protocol layer
                        Err(e) => {
                            let too_big = e.to_string().to_ascii_lowercase().contains("too long")
                                || e.to_string().to_ascii_lowercase().contains("too big");
                            return too_big.then(|| Close { code: 1009, reason: "frame too large".into() });
                        }
                    }
                }
            }
        }
    };
    let close = tokio::select! {
        close = writer => close,
        close = reader => close,
    };
    // Boxed, like the handling of each frame above: a future's size is its
    // largest state, and every idle connection's task would carry it.
    Box::pin(finish(&app, &mut sink, &handle, close)).await;
}

/// Sends the close frame, if any, and forgets the connection.
async fn finish(
    app: &AppState,
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    handle: &ConnHandle,
    close: Option<Close>,
) {
    if let Some(close) = close {
        let frame = CloseFrame { code: close.code, reason: close.reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
    }
    app.delivery.disconnect(handle);
    route_closed(app, handle.user_id).await;
}

/// Distributed: a connection of `user` on this gateway closed.
async fn route_closed(app: &AppState, user: stacker_domain::model::UserId) {
    if let Some(cluster) = &app.cluster {
        let lease = Duration::from_millis(app.config.cluster.route_lease_ms);
        if let Err(e) = cluster.redis.route_disconnected(user, &cluster.instance, lease).await {
            tracing::warn!(error = %e, user, "cannot record the disconnect; the route stays until the gateway is dead");
        }
    }
}

/// Writes hello, then whatever the session yields, pinging on the heartbeat.
/// Returns the close to send, or None when the socket is gone.
async fn write_loop(
    app: &AppState,
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    session: &mut Session,
    last_seen: &AtomicI64,
) -> Option<Close> {
    let config = &app.config.ws;
    let hello = Frame::encode(&ServerFrame::Hello {
        user_id: session.user_id().into(),
        session_id: format!("{}-{}", app.config.node_id, session.handle().id),
        gateway_id: app.gateway_id.clone(),
        heartbeat_s: config.heartbeat_s,
    });
    let write_timeout = Duration::from_millis(config.write_timeout_ms);
    let mut frames = vec![hello];
    let mut heartbeat = tokio::time::interval(Duration::from_secs(config.heartbeat_s.max(1)));
    heartbeat.tick().await;
    loop {
        // Boxed: it is the writer's largest state, and idle tasks would carry it.
        if !frames.is_empty() && !Box::pin(write_frames(sink, &mut frames, write_timeout)).await {
            return None;
        }
        tokio::select! {
            biased;
            _ = app.shutdown.cancelled() => {
                return Some(Close { code: 1012, reason: "server restarting: reconnect".into() });
            }
            _ = heartbeat.tick() => {
                let silent_ms = now_ms() - last_seen.load(Ordering::Relaxed);
                if silent_ms > (config.heartbeat_timeout_s * 1000) as i64 {
                    return Some(Close { code: 1001, reason: "heartbeat timeout".into() });
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return None;
                }
            }
            next = session.next(&mut frames) => {
                if let Err(close) = next {
                    // What the session took before the close goes out first
                    // (acks and events are not replayed on reconnect).
                    if !frames.is_empty() && !Box::pin(write_frames(sink, &mut frames, write_timeout)).await {
                        return None;
                    }
                    return Some(close);
                }
            }
        }
    }
}

/// Writes and flushes `frames` (draining it); false when the socket is gone or
/// the peer stopped reading for `timeout`.
async fn write_frames(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    frames: &mut Vec<Frame>,
    timeout: Duration,
) -> bool {
    let n = frames.len();
    let bytes: usize = frames.iter().map(Frame::len).sum();
    let write = async {
        for frame in frames.drain(..) {
            let text = Utf8Bytes::try_from(frame.into_bytes()).map_err(|_| ())?;
            sink.feed(Message::Text(text)).await.map_err(|_| ())?;
        }
        sink.flush().await.map_err(|_| ())
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => {
            stacker_domain::hot_metric!(counter, "stacker_frames_written_total").increment(n as u64);
            stacker_domain::hot_metric!(counter, "stacker_bytes_written_total").increment(bytes as u64);
            true
        }
        Ok(Err(())) => {
            metrics::counter!("stacker_write_errors_total").increment(1);
            false
        }
        Err(_) => {
            metrics::counter!("stacker_slow_consumer_disconnects_total").increment(1);
            false // the peer stopped reading; it catches up on reconnect
        }
    }
}

/// Most `send` frames of one connection being stored at once; past it the
/// connection's reader waits (back-pressure on that client alone).
const MAX_SENDS_IN_FLIGHT: usize = 64;

async fn handle_frame(
    app: &AppState,
    handle: &ConnHandle,
    text: &str,
    sends: &mut FuturesOrdered<BoxFuture<'static, Result<(), Error>>>,
) {
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return reply_error(app, handle, 400, &format!("malformed frame: {e}")).await,
    };
    let result = match frame {
        ClientFrame::Ping => {
            handle.offer(Push::Frame(Frame::encode(&ServerFrame::Pong)), app.delivery_enqueue_timeout()).await;
            Ok(())
        }
        ClientFrame::Ack { room_id, seq } => app.delivery.ack(handle.user_id, &handle.device_id, room_id.0, seq).await,
        // Each room named costs the session a store read: bounded per frame.
        ClientFrame::Sync { cursors } if cursors.len() > MAX_SYNC_ROOMS => {
            Err(Error::bad_request(format!("a sync names at most {MAX_SYNC_ROOMS} rooms; send several")))
        }
        ClientFrame::Sync { cursors } => {
            let rooms = cursors.into_iter().map(|(room, seq)| (room.0, seq)).collect();
            handle.offer(Push::Sync(Box::new(rooms)), app.delivery_enqueue_timeout()).await;
            Ok(())
        }
        // The ack frame reaches every device of the sender from the delivery side.
        ClientFrame::Send { room_id, content, client_msg_id } => {
            let queued = app.messages.submit(handle.user_id, room_id.0, content, client_msg_id).await;
            sends.push_back(match queued {
                Ok(stored) => stored.map(|r| r.map(|_: Appended| ())).boxed(),
                Err(e) => future::ready(Err(e)).boxed(),
            });
            return;
        }
    };
    if let Err(e) = result {
        reply_api_error(app, handle, e).await;
    }
}

async fn reply_api_error(app: &AppState, handle: &ConnHandle, e: Error) {
    let e = ApiError(e);
    let msg = e.client_message();
    reply_error(app, handle, e.status().as_u16(), &msg).await;
}

async fn reply_error(app: &AppState, handle: &ConnHandle, code: u16, msg: &str) {
    let frame = Frame::encode(&ServerFrame::Error { code, msg: msg.to_string() });
    handle.offer(Push::Frame(frame), app.delivery_enqueue_timeout()).await;
}
