//! Sending, resending and reading messages.

use std::future::Future;
use std::sync::{Arc, RwLock};

use crate::clock::now_ms;
use crate::commit::GroupCommitter;
use crate::fanout::Fanout;
use crate::ids::IdGenerator;
use crate::model::*;
use crate::rooms::Rooms;
use crate::store::Store;
use crate::{validate, Error, Result};

#[derive(Clone, Debug)]
pub struct MessageLimits {
    /// Largest encoded `content` accepted (413 past it).
    pub max_content_bytes: usize,
    pub history_default: u32,
    pub history_max: u32,
}

impl Default for MessageLimits {
    fn default() -> Self {
        Self { max_content_bytes: 16 * 1024, history_default: 50, history_max: 200 }
    }
}

pub struct Messages {
    store: Arc<dyn Store>,
    rooms: Arc<Rooms>,
    committer: GroupCommitter,
    ids: Arc<IdGenerator>,
    /// Changeable while running (config reload).
    limits: RwLock<MessageLimits>,
    fanout: Arc<dyn Fanout>,
}

/// The query of `GET /api/chat/history`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HistoryQuery {
    pub before_seq: Option<i64>,
    pub after_seq: Option<i64>,
    pub limit: Option<u32>,
}

impl Messages {
    pub fn new(
        store: Arc<dyn Store>,
        rooms: Arc<Rooms>,
        committer: GroupCommitter,
        ids: Arc<IdGenerator>,
        limits: MessageLimits,
        fanout: Arc<dyn Fanout>,
    ) -> Self {
        Self { store, rooms, committer, ids, limits: RwLock::new(limits), fanout }
    }

    pub fn limits(&self) -> MessageLimits {
        self.limits.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_limits(&self, limits: MessageLimits) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// Validates, checks membership and mute, stores (group-committed).
    /// A repeated `client_msg_id` returns the earlier message as `Duplicate`.
    pub async fn send(
        &self,
        sender: UserId,
        room_id: RoomId,
        content: Content,
        client_msg_id: Option<String>,
    ) -> Result<Appended> {
        self.submit(sender, room_id, content, client_msg_id).await?.await
    }

    /// [`send`](Self::send) in two steps: checks the message and queues it for
    /// storage, then returns what resolves once it is stored. Sends submitted
    /// in order are numbered in that order.
    pub async fn submit(
        &self,
        sender: UserId,
        room_id: RoomId,
        content: Content,
        client_msg_id: Option<String>,
    ) -> Result<impl Future<Output = Result<Appended>> + Send + 'static> {
        if let Some(id) = &client_msg_id {
            validate::client_msg_id(id)?;
        }
        // Queued, or (a retry refused now) the message stored under its id before.
        let queued = match self.check_send(sender, room_id, &content).await {
            Ok(()) => {
                let message = NewMessage {
                    id: self.ids.next_id(),
                    room_id,
                    sender_id: sender,
                    client_msg_id,
                    content: Arc::new(content),
                    created_at: now_ms(),
                };
                // The committer acknowledges and pushes it once stored.
                Ok(self.committer.submit(message).await?)
            }
            Err(refused) => Err(self.stored_before(sender, client_msg_id.as_deref()).await?.ok_or(refused)?),
        };
        Ok(async move {
            let stored = match queued {
                Ok(stored) => stored,
                Err(earlier) => return Ok(Appended::Duplicate(earlier)),
            };
            let outcome = stored.await?;
            if matches!(outcome, Appended::Stored(_)) {
                crate::hot_metric!(counter, "stacker_messages_stored_total").increment(1);
            }
            Ok(outcome)
        })
    }

    /// Whether `sender` may post `content` to the room now.
    async fn check_send(&self, sender: UserId, room_id: RoomId, content: &Content) -> Result<()> {
        validate::content(content, self.limits().max_content_bytes)?;
        self.rooms.require_sender(room_id, sender).await.map(|_| ())
    }

    /// For a send refused now (the sender muted or removed since, the size
    /// limit lowered): the message stored under its `client_msg_id` by an
    /// earlier try, whose answer the client may have missed. The same id
    /// always yields the same message (SPEC 4.2); the sender's devices get
    /// its ack again, as for any repeated send.
    async fn stored_before(&self, sender: UserId, client_msg_id: Option<&str>) -> Result<Option<Message>> {
        let Some(id) = client_msg_id else { return Ok(None) };
        let earlier = self.store.message_by_client_id(sender, id).await?;
        if let Some(message) = &earlier {
            self.fanout.message_stored(message, false).await;
        }
        Ok(earlier)
    }

    /// The original sender asks for a stored message again (same id and seq).
    pub async fn resend(&self, actor: UserId, message_id: MessageId) -> Result<Message> {
        let message = self.store.message(message_id).await?.ok_or_else(|| Error::not_found("message not found"))?;
        if message.sender_id != actor {
            return Err(Error::forbidden("only the message's sender may resend it"));
        }
        // A push to every member, like a send: not while muted.
        self.rooms.require_sender(message.room_id, actor).await?;
        self.fanout.message_stored(&message, true).await;
        Ok(message)
    }

    /// A page of history in ascending seq, and whether more lies beyond it.
    pub async fn history(&self, actor: UserId, room_id: RoomId, q: HistoryQuery) -> Result<(Vec<Message>, bool)> {
        let limits = self.limits();
        let limit = q.limit.unwrap_or(limits.history_default);
        if !(1..=limits.history_max).contains(&limit) {
            return Err(Error::bad_request(format!("limit must be 1 to {}", limits.history_max)));
        }
        let page = match (q.before_seq, q.after_seq) {
            (Some(_), Some(_)) => return Err(Error::bad_request("give before_seq or after_seq, not both")),
            (Some(seq), None) if seq >= 1 => HistoryPage::Before { seq, limit: limit + 1 },
            (None, Some(seq)) if seq >= 0 => HistoryPage::After { seq, limit: limit + 1 },
            (None, None) => HistoryPage::Latest { limit: limit + 1 },
            _ => return Err(Error::bad_request("before_seq must be at least 1 and after_seq at least 0")),
        };
        self.rooms.room(room_id).await?;
        self.rooms.require_member(room_id, actor).await?;
        let mut messages = self.store.history(room_id, page).await?;
        let has_more = messages.len() > limit as usize;
        if has_more {
            match page {
                // The extra row is the oldest one for backwards pages, the newest forwards.
                HistoryPage::After { .. } => {
                    messages.pop();
                }
                _ => {
                    messages.remove(0);
                }
            }
        }
        Ok((messages, has_more))
    }

    /// Waits until every accepted send is stored.
    pub async fn shutdown(&self) {
        self.committer.shutdown().await;
    }
}
