//! The bare-socket baseline: a WebSocket broadcast server with no auth, no
//! storage and no ordering logic, to measure what raw sockets manage on the
//! same machine with the same generator.
//!
//! Protocol: `GET ws://ADDR/?room=N` upgrades (no auth; `room` defaults to
//! 0). Every text frame a client sends is sent, unchanged and as one shared
//! buffer, to every connection of room N — the sender included — in the order
//! the server read it. Binary frames are ignored; pings are answered. Each
//! connection has a queue of 1,024 frames; a full queue makes the reader of
//! the sending connection wait (back-pressure, nothing dropped). Socket
//! buffers match Stacker's defaults (4 KiB read, 8 KiB write).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::util;

#[derive(Args, Clone, Debug)]
pub struct BaselineArgs {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub listen: SocketAddr,
}

const QUEUE: usize = 1024;
const BURST: usize = 64;

type Member = (u64, mpsc::Sender<Message>);

#[derive(Default)]
struct Rooms {
    rooms: RwLock<HashMap<u64, Arc<[Member]>>>,
    next_id: AtomicU64,
}

impl Rooms {
    fn join(&self, room: u64, tx: mpsc::Sender<Message>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<Member> = rooms.get(&room).map(|l| l.to_vec()).unwrap_or_default();
        list.push((id, tx));
        rooms.insert(room, list.into());
        id
    }

    fn leave(&self, room: u64, id: u64) {
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        let rest: Vec<Member> =
            rooms.get(&room).map(|l| l.iter().filter(|(i, _)| *i != id).cloned().collect()).unwrap_or_default();
        if rest.is_empty() {
            rooms.remove(&room);
        } else {
            rooms.insert(room, rest.into());
        }
    }

    fn members(&self, room: u64) -> Option<Arc<[Member]>> {
        self.rooms.read().unwrap_or_else(|e| e.into_inner()).get(&room).cloned()
    }
}

pub async fn serve(args: &BaselineArgs) -> Result<()> {
    if !util::is_loopback(args.listen.ip()) {
        bail!("the baseline server listens on loopback addresses only (127.0.0.0/8)");
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot bind {}", args.listen))?;
    println!("stacker-bench baseline-server listening on ws://{}/?room=N", listener.local_addr()?);
    let rooms = Arc::new(Rooms::default());
    let accept = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of fds and the like: wait a little, keep serving.
                    eprintln!("baseline: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(connection(stream, rooms.clone()));
        }
    };
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        anyhow::Ok(())
    };
    tokio::select! {
        () = accept => Ok(()),
        r = stop => r,
    }
}

fn room_of(uri: &str) -> u64 {
    uri.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("room="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
async fn connection(stream: TcpStream, rooms: Arc<Rooms>) {
    let _ = stream.set_nodelay(true);
    let mut room = 0u64;
    let callback = |req: &Request, resp: Response| {
        room = room_of(&req.uri().to_string());
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192)
        .max_write_buffer_size(8192 + 256 * 1024)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    let id = rooms.join(room, tx);
    let writer = async {
        let mut burst = Vec::with_capacity(BURST);
        while rx.recv_many(&mut burst, BURST).await > 0 {
            for m in burst.drain(..) {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                Message::Text(_) => {
                    let Some(members) = rooms.members(room) else { continue };
                    for (_, member) in members.iter() {
                        // Shared payload (reference-counted bytes), not copied per socket.
                        let _ = member.send(msg.clone()).await;
                    }
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    };
    tokio::select! {
        () = writer => {},
        () = reader => {},
    }
    rooms.leave(room, id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_from_query() {
        assert_eq!(room_of("/?room=12"), 12);
        assert_eq!(room_of("/?x=1&room=7"), 7);
        assert_eq!(room_of("/"), 0);
        assert_eq!(room_of("/?room=x"), 0);
    }
}
