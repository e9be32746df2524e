//! One connection's delivery state: per-room cursors, catch-up from the store,
//! and the order in which frames are written.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Chat, ConnHandle, Frame, Push};
use crate::model::{HistoryPage, RoomId, UserId};
use crate::store::Store;
use crate::Result;
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::ServerFrame;

/// Devices whose cursors are kept per user: past it, connecting a new
/// device forgets the cursors of the one that acknowledged least recently
/// (which, if it comes back, starts as a device new to the user).
pub const MAX_DEVICES_PER_USER: usize = 100;

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
    /// How long a message that arrived ahead of its room's cursor is held for
    /// the ones before it to arrive live, before the room catches up from the
    /// store. Pushes of one room from different processes (a cluster) can
    /// arrive out of order; zero goes to the store at once.
    pub gap_wait: Duration,
    /// Most messages held that way per connection.
    pub max_held: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            catch_up_page: 200,
            batch_messages: 100,
            batch_bytes: 64 * 1024,
            write_burst: 64,
            gap_wait: Duration::from_millis(25),
            max_held: 256,
        }
    }
}

/// Messages of one room that arrived ahead of its cursor, by seq.
struct Held {
    /// When the room goes to the store if the gap is still open.
    until: Instant,
    frames: BTreeMap<i64, Frame>,
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
    /// Rooms waiting (briefly) for a missing message; see `gap_wait`.
    held: HashMap<RoomId, Held>,
    /// A push taken from the queue whose handling had to wait (on the store)
    /// when the caller stopped polling; handled first on the next call.
    interrupted: Option<Push>,
    /// The device had no cursors when it connected.
    new_device: bool,
}

impl Session {
    /// Reads the cursors: the device's acknowledged seq per room (never below
    /// where the user joined: a rejoin does not replay what was posted while
    /// away). A device that has acknowledged other rooms but not this one (it
    /// was offline when the user joined, say) starts where the user joined; a
    /// device new to the user starts at the user's delivered seq (history from
    /// before is read with `GET /api/chat/history`).
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
            let cursor = match device.get(&room.room_id) {
                Some(&acked) => acked.max(room.joined_seq),
                None if device.is_empty() => room.delivered_seq,
                None => room.joined_seq,
            };
            if cursor < room.last_seq {
                catch_up.insert(room.room_id);
            }
            cursors.insert(room.room_id, cursor);
        }
        Ok(Session {
            new_device: device.is_empty(),
            store,
            handle: handle.clone(),
            rx,
            limits,
            cursors,
            catch_up,
            held: HashMap::new(),
            interrupted: None,
        })
    }

    /// The device had no cursors when it connected (new, or it never
    /// acknowledged anything).
    pub fn new_device(&self) -> bool {
        self.new_device
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
    /// only after each await completes, and a push whose handling was cut
    /// short is handled again on the next call (handling is idempotent).
    pub async fn next(&mut self, out: &mut Vec<Frame>) -> std::result::Result<(), Close> {
        // What `out` held already is not this call's (a caller that did not
        // drain it must not make this return at once, again and again).
        let start = out.len();
        crate::hot_metric!(histogram, "stacker_connection_queue_depth").record(self.rx.len() as f64);
        if let Some(push) = self.interrupted.take() {
            self.apply(push, out).await?;
        }
        loop {
            // A busy queue must not keep a held room waiting past its time.
            if !self.held.is_empty() {
                self.give_up_waiting(Instant::now());
            }
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
            while out.len() - start < self.limits.write_burst {
                match self.rx.try_recv() {
                    Ok(push) => {
                        got_push = true;
                        self.apply(push, out).await?;
                    }
                    Err(_) => break,
                }
            }
            if out.len() > start {
                return Ok(());
            }
            if let Some(&room) = self.catch_up.first() {
                self.catch_up_step(room, out).await.map_err(store_close)?;
                if out.len() > start {
                    return Ok(());
                }
                continue;
            }
            if got_push {
                continue;
            }
            let next_deadline = self.held.values().map(|h| h.until).min();
            let push = match next_deadline {
                None => self.rx.recv().await,
                Some(deadline) => tokio::select! {
                    push = self.rx.recv() => push,
                    // The top of the loop sends the room to the store.
                    _ = tokio::time::sleep_until(deadline) => continue,
                },
            };
            match push {
                Some(push) => self.apply(push, out).await?,
                None => return Err(Close { code: 1001, reason: "connection replaced".into() }),
            }
            if out.len() > start {
                return Ok(());
            }
        }
    }

    /// Handles one push, keeping it in `interrupted` while that waits.
    async fn apply(&mut self, push: Push, out: &mut Vec<Frame>) -> std::result::Result<(), Close> {
        let may_wait = match &push {
            Push::Message(chat) => !self.cursors.contains_key(&chat.room),
            Push::Recheck => true,
            Push::Sync(_) | Push::Frame(_) | Push::Left(_) | Push::Close(_) => false,
        };
        if !may_wait {
            return self.apply_now(push, out).await;
        }
        self.interrupted = Some(push.clone());
        let result = self.apply_now(push, out).await;
        self.interrupted = None;
        result
    }

    async fn apply_now(&mut self, push: Push, out: &mut Vec<Frame>) -> std::result::Result<(), Close> {
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
                if self.catch_up.contains(&room) || seq <= cursor {
                    // A replay in progress reads it from the store; or already written.
                } else if seq == cursor + 1 {
                    out.push(frame.clone());
                    self.cursors.insert(room, seq);
                    self.release_held(room, seq, out);
                } else {
                    // A gap: the message(s) before it may still be on their way
                    // (another process stored them); the store has them all.
                    self.hold(room, seq, frame);
                }
            }
            Push::Frame(frame) => out.push(frame),
            // Rooms the session does not know are checked against the user's
            // rooms in one read here (a sync may name 1,000 rooms the user is
            // not in); known ones are checked where the store is read
            // (`catch_up_step`), which forgets a room the user has left.
            Push::Sync(rooms) => {
                let joined: HashSet<RoomId> = if rooms.iter().all(|(room, _)| self.cursors.contains_key(room)) {
                    HashSet::new()
                } else {
                    self.store.joined_rooms(self.handle.user_id).await.map_err(store_close)?.into_iter().collect()
                };
                for (room, seq) in *rooms {
                    if self.cursors.contains_key(&room) || joined.contains(&room) {
                        self.cursors.insert(room, seq.max(0));
                        self.catch_up.insert(room);
                    }
                }
                metrics::counter!("stacker_catch_ups_total", "why" => "sync").increment(1);
            }
            Push::Recheck => self.recheck().await.map_err(store_close)?,
            Push::Left(room) => self.forget(room),
            Push::Close(close) => return Err(*close),
        }
        Ok(())
    }

    /// Holds `frame` (seq `seq` of `room`, past a gap) for the messages before
    /// it, or sends the room to the store when waiting is off or full.
    fn hold(&mut self, room: RoomId, seq: i64, frame: &Frame) {
        // Counted only here, on a gap: a few rooms hold a few messages each.
        let held_now: usize = self.held.values().map(|h| h.frames.len()).sum();
        if self.limits.gap_wait.is_zero() || held_now >= self.limits.max_held {
            self.catch_up_gap(room);
            return;
        }
        let until = Instant::now() + self.limits.gap_wait;
        let held = self.held.entry(room).or_insert_with(|| Held { until, frames: BTreeMap::new() });
        held.frames.insert(seq, frame.clone());
    }

    /// After `room`'s cursor moved to `seq`: writes the held messages that
    /// now follow on; the room waits on if a gap is left.
    fn release_held(&mut self, room: RoomId, mut seq: i64, out: &mut Vec<Frame>) {
        let Some(held) = self.held.get_mut(&room) else { return };
        while let Some(entry) = held.frames.first_entry() {
            if *entry.key() > seq + 1 {
                break;
            }
            let (next, frame) = entry.remove_entry();
            if next == seq + 1 {
                out.push(frame);
                seq = next;
                crate::hot_metric!(counter, "stacker_held_messages_written_total").increment(1);
            }
        }
        self.cursors.insert(room, seq);
        if held.frames.is_empty() {
            self.held.remove(&room);
        }
    }

    /// Rooms whose wait is over by `now` go to the store.
    fn give_up_waiting(&mut self, now: Instant) {
        let expired: Vec<RoomId> = self.held.iter().filter(|(_, h)| h.until <= now).map(|(r, _)| *r).collect();
        for room in expired {
            self.catch_up_gap(room);
        }
    }

    /// `room` has a gap: read what follows its cursor from the store (which
    /// has everything up to the newest push, held ones included).
    fn catch_up_gap(&mut self, room: RoomId) {
        self.held.remove(&room);
        if self.catch_up.insert(room) {
            metrics::counter!("stacker_catch_ups_total", "why" => "gap").increment(1);
        }
    }

    /// Stops following `room` (the user left it or was removed).
    fn forget(&mut self, room: RoomId) {
        self.cursors.remove(&room);
        self.catch_up.remove(&room);
        self.held.remove(&room);
    }

    /// Reads the next page of `room` after its cursor into `batch` frames.
    async fn catch_up_step(&mut self, room: RoomId, out: &mut Vec<Frame>) -> Result<()> {
        // The store has whatever was held for this room.
        self.held.remove(&room);
        let Some(&cursor) = self.cursors.get(&room) else {
            self.catch_up.remove(&room);
            return Ok(());
        };
        // A removal reaches the session as a push, which can come late (in a
        // cluster it crosses Redis, and a failed publish is only logged): the
        // store is read only for a room the user is still a member of.
        if self.store.member(room, self.handle.user_id).await?.is_none() {
            self.forget(room);
            return Ok(());
        }
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
            // A room joined while connected: every message since joining.
            let cursor = *self.cursors.entry(room.room_id).or_insert(room.joined_seq);
            if cursor < room.last_seq {
                self.catch_up.insert(room.room_id);
            }
        }
        Ok(())
    }

    /// Where a room the user is in now starts (the room's last seq when they
    /// joined), None if not a member.
    async fn joined_cursor(&self, room: RoomId) -> Result<Option<i64>> {
        let rooms = self.store.member_cursors(self.handle.user_id).await?;
        Ok(rooms.iter().find(|r| r.room_id == room).map(|r| r.joined_seq))
    }
}

fn store_close(e: crate::Error) -> Close {
    tracing::warn!(error = %e, "session store read failed; closing so the client reconnects");
    Close { code: 1011, reason: "temporary server error: reconnect".into() }
}
