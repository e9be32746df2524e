//! The WebSocket side: a raw [`Socket`], and a [`Subscriber`] that reconnects,
//! re-syncs from its cursors and drops duplicates by `(room_id, seq)`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::{ClientFrame, Event, ServerFrame};
use stacker_proto::{Content, Id};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Client, ClientError, Result};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server said in `hello`.
#[derive(Clone, Debug)]
pub struct Hello {
    pub user_id: Id,
    pub session_id: String,
    pub gateway_id: String,
    pub heartbeat_s: u64,
}

/// One WebSocket connection.
pub struct Socket {
    ws: Ws,
    pub hello: Hello,
    /// The close code and reason, once the server closed.
    pub closed: Option<(u16, String)>,
}

impl Client {
    /// The `ws://…/api/ws` URL for this client's server.
    pub fn ws_url(&self, device_id: &str) -> String {
        let base = self.base_url().replacen("http://", "ws://", 1).replacen("https://", "wss://", 1);
        format!("{base}/api/ws?device_id={}", crate::encode(device_id))
    }

    /// Connects with the client's token and waits for `hello`.
    pub async fn connect(&self, device_id: &str) -> Result<Socket> {
        self.connect_url(&self.ws_url(device_id)).await
    }

    /// Connects to a gateway's WebSocket URL (as the registry hands it out),
    /// naming the device.
    pub async fn connect_gateway(&self, gateway_ws_url: &str, device_id: &str) -> Result<Socket> {
        let sep = if gateway_ws_url.contains('?') { '&' } else { '?' };
        self.connect_url(&format!("{gateway_ws_url}{sep}device_id={}", crate::encode(device_id))).await
    }

    async fn connect_url(&self, url: &str) -> Result<Socket> {
        let token = self.token().ok_or_else(|| ClientError::Protocol("connect needs a logged-in client".into()))?;
        let mut request = url.into_client_request().map_err(ws_err)?;
        let bearer = format!("Bearer {token}").parse().map_err(|_| ClientError::Protocol("bad token".into()))?;
        request.headers_mut().insert("authorization", bearer);
        let config = WebSocketConfig::default().max_message_size(Some(16 << 20));
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), true).await.map_err(ws_err)?;
        let mut socket = Socket {
            ws,
            hello: Hello { user_id: Id(0), session_id: String::new(), gateway_id: String::new(), heartbeat_s: 0 },
            closed: None,
        };
        match socket.next_frame().await? {
            Some(ServerFrame::Hello { user_id, session_id, gateway_id, heartbeat_s }) => {
                socket.hello = Hello { user_id, session_id, gateway_id, heartbeat_s };
                Ok(socket)
            }
            other => Err(ClientError::Protocol(format!("expected hello, got {other:?}"))),
        }
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    if let tokio_tungstenite::tungstenite::Error::Http(resp) = &e {
        let status = resp.status().as_u16();
        let msg = resp
            .body()
            .as_ref()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v["msg"].as_str().map(str::to_owned))
            .unwrap_or_else(|| e.to_string());
        return ClientError::Api { code: status, msg };
    }
    ClientError::Protocol(format!("websocket: {e}"))
}

impl Socket {
    /// The next server frame; `None` once the connection is closed.
    pub async fn next_frame(&mut self) -> Result<Option<ServerFrame>> {
        loop {
            let Some(msg) = self.ws.next().await else { return Ok(None) };
            match msg.map_err(ws_err)? {
                Message::Text(text) => {
                    return serde_json::from_str(&text)
                        .map(Some)
                        .map_err(|e| ClientError::Protocol(format!("bad frame {text}: {e}")));
                }
                Message::Close(frame) => {
                    self.closed =
                        Some(frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string())));
                    return Ok(None);
                }
                _ => {}
            }
        }
    }

    /// The next frame within `timeout`; `Ok(None)` on timeout or close.
    pub async fn next_frame_within(&mut self, timeout: Duration) -> Result<Option<ServerFrame>> {
        tokio::time::timeout(timeout, self.next_frame()).await.unwrap_or(Ok(None))
    }

    /// Reads frames until `n` chat messages of `room` (live or in `batch`
    /// frames) arrived, for at most `timeout`; returns their seqs in arrival
    /// order. A close or the timeout first is an error saying how many came.
    pub async fn room_seqs(&mut self, room: Id, n: usize, timeout: Duration) -> Result<Vec<i64>> {
        let mut seqs = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while seqs.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame_within(left).await? {
                Some(ServerFrame::Chat(m)) if m.room_id == room => seqs.push(m.seq),
                Some(ServerFrame::Batch { messages }) => {
                    seqs.extend(messages.iter().filter(|m| m.room_id == room).map(|m| m.seq))
                }
                Some(_) => {}
                None => {
                    return Err(ClientError::Protocol(format!(
                        "stream ended or timed out after {} of {n} messages (close: {:?})",
                        seqs.len(),
                        self.closed
                    )))
                }
            }
        }
        Ok(seqs)
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<()> {
        let text = serde_json::to_string(frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_raw(Message::text(text)).await
    }

    /// Sends any WebSocket message (tests use it for malformed input).
    pub async fn send_raw(&mut self, message: Message) -> Result<()> {
        self.ws.send(message).await.map_err(ws_err)
    }

    pub async fn send_message(&mut self, room_id: Id, content: Content, client_msg_id: Option<&str>) -> Result<()> {
        let frame = ClientFrame::Send { room_id, content, client_msg_id: client_msg_id.map(Into::into) };
        self.send_frame(&frame).await
    }

    pub async fn ack(&mut self, room_id: Id, seq: i64) -> Result<()> {
        self.send_frame(&ClientFrame::Ack { room_id, seq }).await
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// What a [`Subscriber`] hands out.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivered {
    /// A message not seen before on this subscriber.
    Message(ChatMessage),
    /// One of this user's messages was stored.
    Ack {
        id: Id,
        room_id: Id,
        seq: i64,
        client_msg_id: Option<String>,
    },
    Event(Event),
    Error {
        code: u16,
        msg: String,
    },
}

/// A connection that survives disconnects: it reconnects, asks the server to
/// replay after its cursors (`sync`), drops duplicates by `(room_id, seq)` and
/// acknowledges what it hands out.
pub struct Subscriber {
    client: Client,
    device_id: String,
    socket: Option<Socket>,
    /// Highest seq handed out per room.
    cursors: HashMap<Id, i64>,
    pending: std::collections::VecDeque<Delivered>,
    /// Reconnects so far.
    pub reconnects: u32,
    /// Duplicates dropped so far.
    pub duplicates: u64,
    /// Messages whose seq skipped ahead of the cursor (should stay 0).
    pub gaps: u64,
    ack_every: i64,
    unacked: HashMap<Id, i64>,
}

impl Subscriber {
    pub async fn connect(client: &Client, device_id: &str) -> Result<Subscriber> {
        let socket = client.connect(device_id).await?;
        Ok(Subscriber {
            client: client.clone(),
            device_id: device_id.into(),
            socket: Some(socket),
            cursors: HashMap::new(),
            pending: Default::default(),
            reconnects: 0,
            duplicates: 0,
            gaps: 0,
            ack_every: 1,
            unacked: HashMap::new(),
        })
    }

    /// Connects and resumes after `cursors` (room → last seq held): the server
    /// replays what follows, and anything at or before them is dropped as a duplicate.
    pub async fn resume(client: &Client, device_id: &str, cursors: HashMap<Id, i64>) -> Result<Subscriber> {
        let mut sub = Self::connect(client, device_id).await?;
        let sync: BTreeMap<Id, i64> = cursors.iter().map(|(r, s)| (*r, *s)).collect();
        sub.cursors = cursors;
        if let Some(socket) = sub.socket.as_mut() {
            socket.send_frame(&ClientFrame::Sync { cursors: sync }).await?;
        }
        Ok(sub)
    }

    /// Acknowledge after every `n` messages of a room (and on each batch).
    pub fn ack_every(mut self, n: i64) -> Self {
        self.ack_every = n.max(1);
        self
    }

    pub fn cursor(&self, room: Id) -> i64 {
        self.cursors.get(&room).copied().unwrap_or(0)
    }

    pub fn socket(&mut self) -> Option<&mut Socket> {
        self.socket.as_mut()
    }

    /// Drops the connection as if the network failed; the next call reconnects.
    pub fn drop_connection(&mut self) {
        self.socket = None;
    }

    /// The next new thing, reconnecting as needed; `Ok(None)` after `timeout`
    /// without anything new.
    pub async fn next_within(&mut self, timeout: Duration) -> Result<Option<Delivered>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Ok(Some(d));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if self.socket.is_none() {
                self.reconnect(deadline).await?;
                continue;
            }
            let socket = self.socket.as_mut().ok_or_else(|| ClientError::Protocol("no socket".into()))?;
            match tokio::time::timeout(deadline - now, socket.next_frame()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(frame))) => self.absorb(frame).await?,
                Ok(Ok(None)) | Ok(Err(_)) => self.socket = None,
            }
        }
    }

    async fn reconnect(&mut self, deadline: tokio::time::Instant) -> Result<()> {
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.client.connect(&self.device_id).await {
                Ok(mut socket) => {
                    self.reconnects += 1;
                    let cursors: BTreeMap<Id, i64> = self.cursors.clone().into_iter().collect();
                    socket.send_frame(&ClientFrame::Sync { cursors }).await?;
                    self.socket = Some(socket);
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() + backoff >= deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn absorb(&mut self, frame: ServerFrame) -> Result<()> {
        match frame {
            ServerFrame::Chat(m) => self.message(m),
            ServerFrame::Batch { messages } => {
                for m in messages {
                    self.message(m);
                }
            }
            ServerFrame::Ack { id, room_id, seq, client_msg_id } => {
                self.pending.push_back(Delivered::Ack { id, room_id, seq, client_msg_id })
            }
            ServerFrame::Event(e) => self.pending.push_back(Delivered::Event(e)),
            ServerFrame::Error { code, msg } => self.pending.push_back(Delivered::Error { code, msg }),
            ServerFrame::Hello { .. } | ServerFrame::Pong => {}
        }
        let due: Vec<(Id, i64)> =
            self.unacked.iter().filter(|(_, n)| **n >= self.ack_every).map(|(r, _)| (*r, self.cursor(*r))).collect();
        for (room, seq) in due {
            self.unacked.remove(&room);
            if let Some(socket) = self.socket.as_mut() {
                socket.ack(room, seq).await?;
            }
        }
        Ok(())
    }

    fn message(&mut self, m: ChatMessage) {
        let cursor = self.cursor(m.room_id);
        if m.seq <= cursor {
            self.duplicates += 1;
            return;
        }
        if cursor > 0 && m.seq > cursor + 1 {
            self.gaps += 1;
        }
        self.cursors.insert(m.room_id, m.seq);
        *self.unacked.entry(m.room_id).or_insert(0) += 1;
        self.pending.push_back(Delivered::Message(m));
    }

    /// Acknowledges everything handed out so far.
    pub async fn ack_all(&mut self) -> Result<()> {
        let cursors: Vec<(Id, i64)> = self.cursors.iter().map(|(r, s)| (*r, *s)).collect();
        self.unacked.clear();
        if let Some(socket) = self.socket.as_mut() {
            for (room, seq) in cursors {
                socket.ack(room, seq).await?;
            }
        }
        Ok(())
    }
}
