//! WebSocket plumbing for the generator: dialing from a spread of loopback
//! source addresses, the frames it sends, and a lean parser for the frames it
//! receives (only the fields the checks need).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use stacker_client::Client;
use stacker_proto::Id;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::server::Kind;
use crate::util;

pub type Ws = WebSocketStream<TcpStream>;

/// Opens client sockets to one server, round-robin over the source addresses
/// 127.0.0.2, 127.0.0.3, … so the client side is not capped by one address's
/// ephemeral ports.
pub struct Dialer {
    server: SocketAddr,
    /// Distributed mode: the gateway of each user, by token (else `server`).
    gateways: HashMap<String, SocketAddr>,
    sources: Vec<Ipv4Addr>,
    next: AtomicUsize,
    config: WebSocketConfig,
    pub kind: Kind,
}

impl Dialer {
    pub fn new(kind: Kind, server: SocketAddr, sources: u8) -> Dialer {
        // Small buffers (like the server's) so tens of thousands of idle sockets stay cheap.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20)
            .max_message_size(Some(16 << 20));
        Dialer {
            server,
            gateways: HashMap::new(),
            sources: util::source_addrs(sources),
            next: AtomicUsize::new(0),
            config,
            kind,
        }
    }

    /// Distributed mode: asks the registry where each user connects, so every
    /// later dial with that user's token goes to their gateway. Returns how many
    /// users each gateway got.
    pub async fn route_via_registry(
        &mut self,
        registry: &str,
        users: &[(Id, String)],
        concurrency: usize,
    ) -> Result<BTreeMap<String, usize>> {
        let client = Client::new(registry);
        let found: Vec<(String, String)> = stream::iter(users)
            .map(|(id, token)| {
                let client = &client;
                async move {
                    let gw = client
                        .with_token(token.clone(), *id)
                        .available_gateway()
                        .await
                        .with_context(|| format!("registry: gateway for {id}"))?;
                    anyhow::Ok((token.clone(), gw.ws_url))
                }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect()
            .await?;
        let mut spread = BTreeMap::new();
        for (token, ws_url) in found {
            let addr = util::loopback_addr(&ws_url)?;
            *spread.entry(addr.to_string()).or_insert(0) += 1;
            self.gateways.insert(token, addr);
        }
        Ok(spread)
    }

    pub fn sources(&self) -> &[Ipv4Addr] {
        &self.sources
    }

    /// Connects to `path` (e.g. `/api/ws?device_id=d1`), with a bearer token when given.
    pub async fn dial(&self, path: &str, bearer: Option<&str>) -> Result<Ws> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let source = self.sources[i % self.sources.len()];
        let server = bearer.and_then(|t| self.gateways.get(t)).copied().unwrap_or(self.server);
        let fut = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0)).with_context(|| format!("bind {source}:0"))?;
            let stream = socket.connect(server).await.with_context(|| format!("connect {server}"))?;
            stream.set_nodelay(true)?;
            let mut request = format!("ws://{server}{path}").into_client_request()?;
            if let Some(token) = bearer {
                request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
            }
            let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(self.config))
                .await
                .map_err(describe_ws_error)?;
            anyhow::Ok(ws)
        };
        match tokio::time::timeout(Duration::from_secs(30), fut).await {
            Ok(r) => r.with_context(|| format!("websocket {path} from {source}")),
            Err(_) => bail!("websocket {path} from {source}: no answer within 30 s"),
        }
    }

    /// Dials and, for Stacker, waits for `hello`.
    pub async fn open(&self, path: &str, bearer: Option<&str>) -> Result<Ws> {
        let mut ws = self.dial(path, bearer).await?;
        if self.kind == Kind::Stacker {
            match next_in(&mut ws, Duration::from_secs(15)).await? {
                Some(In::Hello) => {}
                Some(other) => bail!("expected hello first, got {other:?}"),
                None => bail!("no hello within 15 s"),
            }
        }
        Ok(ws)
    }
}

fn describe_ws_error(e: tokio_tungstenite::tungstenite::Error) -> anyhow::Error {
    if let tokio_tungstenite::tungstenite::Error::Http(resp) = &e {
        let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        return anyhow!("upgrade refused with {}: {}", resp.status(), body);
    }
    anyhow!("websocket: {e}")
}

/// What a sent message carries in its `custom` content: the sender's index in
/// this run, its per-sender counter and the send time (ns since the
/// generator started).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub struct Payload {
    #[serde(default)]
    pub s: u32,
    #[serde(default)]
    pub n: u64,
    #[serde(default)]
    pub t: u64,
}

/// One chat message as the checks see it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InChat {
    pub room: i64,
    pub seq: i64,
    pub payload: Option<Payload>,
}

/// A received frame, reduced to what the generator checks.
#[derive(Debug, PartialEq)]
pub enum In {
    Hello,
    Chat(InChat),
    Batch(Vec<InChat>),
    Ack { room: i64, seq: i64, client_msg_id: Option<String> },
    Error { code: u16, msg: String },
    Other,
}

#[derive(Deserialize)]
struct RawContent {
    #[serde(default)]
    data: Option<Payload>,
}

#[derive(Deserialize)]
struct RawChat {
    room_id: Id,
    #[serde(default)]
    seq: i64,
    #[serde(default)]
    content: Option<RawContent>,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    room_id: Option<Id>,
    seq: Option<i64>,
    content: Option<RawContent>,
    messages: Option<Vec<RawChat>>,
    code: Option<u16>,
    msg: Option<String>,
    client_msg_id: Option<String>,
}

impl RawChat {
    fn chat(self) -> InChat {
        InChat { room: self.room_id.0, seq: self.seq, payload: self.content.and_then(|c| c.data) }
    }
}

/// Parses a server text frame.
pub fn parse(text: &str) -> Result<In> {
    let raw: RawFrame = serde_json::from_str(text).map_err(|e| anyhow!("unparsable frame ({e}): {text:.200}"))?;
    let field = |v: Option<i64>, name: &str| v.ok_or_else(|| anyhow!("{} frame without {name}: {text:.200}", raw.ty));
    Ok(match raw.ty.as_ref() {
        "hello" => In::Hello,
        "chat" => In::Chat(InChat {
            room: field(raw.room_id.map(|r| r.0), "room_id")?,
            seq: raw.seq.unwrap_or(0),
            payload: raw.content.and_then(|c| c.data),
        }),
        "batch" => In::Batch(raw.messages.unwrap_or_default().into_iter().map(RawChat::chat).collect()),
        "ack" => In::Ack {
            room: field(raw.room_id.map(|r| r.0), "room_id")?,
            seq: field(raw.seq, "seq")?,
            client_msg_id: raw.client_msg_id,
        },
        "error" => In::Error { code: raw.code.unwrap_or(0), msg: raw.msg.unwrap_or_default() },
        _ => In::Other,
    })
}

/// The next parsed frame within `timeout`; `Ok(None)` on timeout.
/// A closed connection is an error naming the close code.
pub async fn next_in(ws: &mut Ws, timeout: Duration) -> Result<Option<In>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Ok(None),
            Ok(m) => m,
        };
        if let Some(text) = text_of(msg)? {
            return parse(&text).map(Some);
        }
    }
}

/// The text of a received WebSocket message; `None` for pings and pongs;
/// an error for a close, an end of stream or a transport error.
pub fn text_of(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Result<Option<Utf8Bytes>> {
    match msg {
        None => bail!("the server closed the connection (end of stream)"),
        Some(Err(e)) => bail!("connection failed: {e}"),
        Some(Ok(Message::Text(t))) => Ok(Some(t)),
        Some(Ok(Message::Close(frame))) => {
            let (code, reason) =
                frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
            bail!("the server closed the connection: {code} {reason}")
        }
        Some(Ok(Message::Binary(_))) => bail!("unexpected binary frame"),
        Some(Ok(_)) => Ok(None),
    }
}

/// The message content the generator sends: custom data with the payload and padding.
fn content_json(p: &Payload, pad: usize) -> String {
    format!(r#"{{"type":"custom","data":{{"s":{},"n":{},"t":{},"p":"{}"}}}}"#, p.s, p.n, p.t, Pad(pad))
}

struct Pad(usize);

impl std::fmt::Display for Pad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const XS: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
        let mut left = self.0;
        while left > 0 {
            let n = left.min(XS.len());
            f.write_str(&XS[..n])?;
            left -= n;
        }
        Ok(())
    }
}

pub fn client_msg_id(run: &str, p: &Payload) -> String {
    format!("{run}-{}-{}", p.s, p.n)
}

/// Stacker's `send` frame.
pub fn send_frame(run: &str, room: i64, p: &Payload, pad: usize) -> String {
    format!(
        r#"{{"type":"send","room_id":"{room}","client_msg_id":"{}","content":{}}}"#,
        client_msg_id(run, p),
        content_json(p, pad)
    )
}

/// What the generator sends to the baseline server: a frame shaped and sized
/// like the `chat` frame Stacker would push for the same message, so both
/// targets move and parse the same bytes.
pub fn baseline_frame(run: &str, room: i64, p: &Payload, pad: usize) -> String {
    format!(
        r#"{{"type":"chat","id":"7324000000000000001","room_id":"{room}","seq":0,"sender_id":"7324000000000000002","client_msg_id":"{}","content":{},"created_at":1700000000000}}"#,
        client_msg_id(run, p),
        content_json(p, pad)
    )
}

pub fn ack_frame(room: i64, seq: i64) -> String {
    format!(r#"{{"type":"ack","room_id":"{room}","seq":{seq}}}"#)
}

pub fn sync_frame(cursors: &[(i64, i64)]) -> String {
    let body: Vec<String> = cursors.iter().map(|(r, s)| format!(r#""{r}":{s}"#)).collect();
    format!(r#"{{"type":"sync","cursors":{{{}}}}}"#, body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacker_proto::http::ChatMessage;
    use stacker_proto::ws::{ClientFrame, ServerFrame};
    use stacker_proto::Content;

    #[test]
    fn parses_what_the_server_sends() {
        let p = Payload { s: 3, n: 7, t: 123456789 };
        let content: Content = serde_json::from_str(&content_json(&p, 10)).unwrap();
        let chat = ServerFrame::Chat(ChatMessage {
            id: Id(9),
            room_id: Id(2),
            seq: 5,
            sender_id: Id(1),
            client_msg_id: Some("x".into()),
            content: content.clone().into(),
            created_at: 1,
        });
        let text = serde_json::to_string(&chat).unwrap();
        assert_eq!(parse(&text).unwrap(), In::Chat(InChat { room: 2, seq: 5, payload: Some(p) }));
        let ack = ServerFrame::Ack { id: Id(9), room_id: Id(2), seq: 5, client_msg_id: Some("c".into()) };
        assert_eq!(
            parse(&serde_json::to_string(&ack).unwrap()).unwrap(),
            In::Ack { room: 2, seq: 5, client_msg_id: Some("c".into()) }
        );
        let text_msg = ServerFrame::Batch {
            messages: vec![ChatMessage {
                id: Id(1),
                room_id: Id(4),
                seq: 1,
                sender_id: Id(1),
                client_msg_id: None,
                content: Content::text("hi").into(),
                created_at: 1,
            }],
        };
        assert_eq!(
            parse(&serde_json::to_string(&text_msg).unwrap()).unwrap(),
            In::Batch(vec![InChat { room: 4, seq: 1, payload: None }])
        );
        assert_eq!(
            parse(r#"{"type":"error","code":503,"msg":"busy"}"#).unwrap(),
            In::Error { code: 503, msg: "busy".into() }
        );
        assert!(parse("nope").is_err());
        // The baseline frame parses like a chat.
        assert_eq!(
            parse(&baseline_frame("r", 11, &p, 4)).unwrap(),
            In::Chat(InChat { room: 11, seq: 0, payload: Some(p) })
        );
    }

    #[test]
    fn sent_frames_are_valid_client_frames() {
        let p = Payload { s: 1, n: 2, t: 3 };
        let f: ClientFrame = serde_json::from_str(&send_frame("run", 42, &p, 5)).unwrap();
        match f {
            ClientFrame::Send { room_id, client_msg_id, content: Content::Custom { data } } => {
                assert_eq!(room_id, Id(42));
                assert_eq!(client_msg_id.as_deref(), Some("run-1-2"));
                assert_eq!(data["p"], "xxxxx");
            }
            other => panic!("{other:?}"),
        }
        let f: ClientFrame = serde_json::from_str(&sync_frame(&[(5, 3), (6, 0)])).unwrap();
        assert_eq!(f, ClientFrame::Sync { cursors: [(Id(5), 3), (Id(6), 0)].into() });
        let f: ClientFrame = serde_json::from_str(&ack_frame(5, 9)).unwrap();
        assert_eq!(f, ClientFrame::Ack { room_id: Id(5), seq: 9 });
    }
}
