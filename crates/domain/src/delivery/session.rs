//! One connection's delivery state: per-room cursors, catch-up from the store,
//! and the order in which frames are written.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Chat, ConnHandle, Frame, Push};
use crate::model::{HistoryPage, RoomId, UserId};
use crate::store::Store;
use crate::Result;
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::ServerFrame;

#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// Messages read from the store per catch-up step.
    pub catch_up_page: u32,
    /// Most messages in one `batch` frame.
    pub batch_messages: usize,
    /// Most bytes (roughly) in one `batch` frame.
    pub batch_bytes: usize,
    /// Queued pushes turned into frames per write.
    pub write_burst: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self { catch_up_page: 200, batch_messages: 100, batch_bytes: 64 * 1024, write_burst: 64 }
    }
}

/// Why a session ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

pub struct Session {
    store: Arc<dyn Store>,
    handle: ConnHandle,
    rx: mpsc::Receiver<Push>,
    limits: SessionLimits,
    /// The last seq written to this connection, per room.
    cursors: HashMap<RoomId, i64>,
    /// Rooms with messages to read from the store.
    catch_up: BTreeSet<RoomId>,
}

impl Session {
    /// Reads the cursors: the device's acknowledged seq per room, or for rooms
    /// this device never acknowledged, the user's delivered seq.
    pub(crate) async fn open(
        store: Arc<dyn Store>,
        handle: &ConnHandle,
        rx: mpsc::Receiver<Push>,
        limits: SessionLimits,
    ) -> Result<Session> {
        let rooms = store.member_cursors(handle.user_id).await?;
        let device: HashMap<RoomId, i64> =
            store.device_cursors(handle.user_id, &handle.device_id).await?.into_iter().collect();
        let mut cursors = HashMap::with_capacity(rooms.len());
        let mut catch_up = BTreeSet::new();
        for room in rooms {
            let cursor = device.get(&room.room_id).copied().unwrap_or(room.delivered_seq);
            if cursor < room.last_seq {
                catch_up.insert(room.room_id);
            }
            cursors.insert(room.room_id, cursor);
        }
        Ok(Session { store, handle: handle.clone(), rx, limits, cursors, catch_up })
    }

    pub fn user_id(&self) -> UserId {
        self.handle.user_id
    }

    pub fn handle(&self) -> &ConnHandle {
        &self.handle
    }

    /// Rooms with messages still to replay.
    pub fn catching_up(&self) -> bool {
        !self.catch_up.is_empty()
    }

    /// Waits for the next frames to write, in order, and appends them to `out`.
    /// `Err(close)` when the connection must close. Cancel-safe: state changes
    /// only after each await completes.
    pub async fn next(&mut self, out: &mut Vec<Frame>) -> std::result::Result<(), Close> {
        crate::hot_metric!(histogram, "stacker_connection_queue_depth").record(self.rx.len() as f64);
        loop {
            if self.handle.is_doomed() {
                metrics::counter!("stacker_slow_consumer_disconnects_total").increment(1);
                return Err(Close { code: 1008, reason: "too slow: reconnect to catch up".into() });
            }
            if self.handle.take_lagging() {
                // Messages were skipped while the queue was full: replay every room.
                // Marked before the await below, so a cancelled call loses nothing.
                metrics::counter!("stacker_catch_ups_total", "why" => "overflow").increment(1);
                self.catch_up.extend(self.cursors.keys().copied());
                self.recheck().await.map_err(store_close)?;
            }
            // Live pushes first when they are waiting, so catch-up of one room never
            // starves the others; each push is checked against the cursors anyway.
            let mut got_push = false;
            while out.len() < self.limits.write_burst {
                match self.rx.try_recv() {
                    Ok(push) => {
                        got_push = true;
                        self.apply(push, out).await?;
                    }
                    Err(_) => break,
                }
            }
            if !out.is_empty() {
                return Ok(());
            }
            if let Some(&room) = self.catch_up.first() {
                self.catch_up_step(room, out).await.map_err(store_close)?;
                if !out.is_empty() {
                    return Ok(());
                }
                continue;
            }
            if got_push {
                continue;
            }
            match self.rx.recv().await {
                Some(push) => self.apply(push, out).await?,
                None => return Err(Close { code: 1001, reason: "connection replaced".into() }),
            }
            if !out.is_empty() {
                return Ok(());
            }
        }
    }

    async fn apply(&mut self, push: Push, out: &mut Vec<Frame>) -> std::result::Result<(), Close> {
        match push {
            Push::Message(chat) => {
                let Chat { room, seq, ref frame } = *chat;
                let cursor = match self.cursors.get(&room) {
                    Some(c) => *c,
                    // A room joined after connecting: start at the membership's cursor.
                    None => match self.joined_cursor(room).await.map_err(store_close)? {
                        Some(start) => {
                            self.cursors.insert(room, start);
                            start
                        }
                        None => return Ok(()), // not a member (any more)
                    },
                };
                if seq == cursor + 1 && !self.catch_up.contains(&room) {
                    out.push(frame.clone());
                    self.cursors.insert(room, seq);
                } else if seq > cursor {
                    // A gap (or a replay in progress): the store has everything up to seq.
                    if self.catch_up.insert(room) {
                        metrics::counter!("stacker_catch_ups_total", "why" => "gap").increment(1);
                    }
                }
                // seq <= cursor: already written.
            }
            Push::Frame(frame) => out.push(frame),
            Push::Sync(rooms) => {
                for (room, seq) in *rooms {
                    if !self.cursors.contains_key(&room)
                        && self.store.member(room, self.handle.user_id).await.map_err(store_close)?.is_none()
                    {
                        continue;
                    }
                    self.cursors.insert(room, seq.max(0));
                    self.catch_up.insert(room);
                }
                metrics::counter!("stacker_catch_ups_total", "why" => "sync").increment(1);
            }
            Push::Recheck => self.recheck().await.map_err(store_close)?,
            Push::Left(room) => {
                self.cursors.remove(&room);
                self.catch_up.remove(&room);
            }
            Push::Close(close) => return Err(*close),
        }
        Ok(())
    }

    /// Reads the next page of `room` after its cursor into `batch` frames.
    async fn catch_up_step(&mut self, room: RoomId, out: &mut Vec<Frame>) -> Result<()> {
        let Some(&cursor) = self.cursors.get(&room) else {
            self.catch_up.remove(&room);
            return Ok(());
        };
        let page = self.limits.catch_up_page;
        let messages = self.store.history(room, HistoryPage::After { seq: cursor, limit: page }).await?;
        if (messages.len() as u32) < page {
            self.catch_up.remove(&room);
        }
        let Some(last) = messages.last() else { return Ok(()) };
        let last_seq = last.seq;
        let mut chunk: Vec<ChatMessage> = Vec::new();
        let mut bytes = 0;
        for m in &messages {
            let chat = ChatMessage::from(m);
            let size = 160 + crate::validate::encoded_len(&chat.content).unwrap_or(0);
            if !chunk.is_empty()
                && (chunk.len() >= self.limits.batch_messages || bytes + size > self.limits.batch_bytes)
            {
                out.push(Frame::encode(&ServerFrame::Batch { messages: std::mem::take(&mut chunk) }));
                bytes = 0;
            }
            bytes += size;
            chunk.push(chat);
        }
        if !chunk.is_empty() {
            out.push(Frame::encode(&ServerFrame::Batch { messages: chunk }));
        }
        metrics::counter!("stacker_catch_up_messages_total").increment(messages.len() as u64);
        self.cursors.insert(room, last_seq);
        Ok(())
    }

    /// Compares every room's cursor with the store: picks up rooms joined since
    /// the session opened and marks for catch-up every room that is behind.
    async fn recheck(&mut self) -> Result<()> {
        for room in self.store.member_cursors(self.handle.user_id).await? {
            let cursor = *self.cursors.entry(room.room_id).or_insert(room.delivered_seq);
            if cursor < room.last_seq {
                self.catch_up.insert(room.room_id);
            }
        }
        Ok(())
    }

    /// The delivered cursor of a room the user is in now, None if not a member.
    async fn joined_cursor(&self, room: RoomId) -> Result<Option<i64>> {
        let rooms = self.store.member_cursors(self.handle.user_id).await?;
        Ok(rooms.iter().find(|r| r.room_id == room).map(|r| r.delivered_seq))
    }
}

fn store_close(e: crate::Error) -> Close {
    tracing::warn!(error = %e, "session store read failed; closing so the client reconnects");
    Close { code: 1011, reason: "temporary server error: reconnect".into() }
}
