//! Plain domain records.

use std::sync::Arc;

pub use stacker_proto::http::{JoinPolicy, JoinRequestStatus};
pub use stacker_proto::Content;

pub type UserId = i64;
pub type RoomId = i64;
pub type MessageId = i64;

/// A member's role in a room. The numbers are the API's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Owner = 0,
    Admin = 1,
    Member = 2,
}

impl Role {
    pub fn from_code(code: i64) -> Option<Role> {
        match code {
            0 => Some(Role::Owner),
            1 => Some(Role::Admin),
            2 => Some(Role::Member),
            _ => None,
        }
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    /// Owners and admins add, remove and mute members and answer join requests.
    pub fn is_moderator(self) -> bool {
        self != Role::Member
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub id: UserId,
    /// Lower-case; usernames are case-insensitive.
    pub username: String,
    pub nickname: String,
    pub password_hash: String,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Room {
    pub id: RoomId,
    pub name: String,
    pub is_group: bool,
    pub join_policy: JoinPolicy,
    pub owner_id: UserId,
    /// `"{low}:{high}"` user ids for a direct room, so each pair has one room.
    pub direct_key: Option<String>,
    /// The seq of the newest message (0 when empty).
    pub last_seq: i64,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub room_id: RoomId,
    pub user_id: UserId,
    pub role: Role,
    pub nickname: String,
    /// Unix ms; the member may not send before then.
    pub mute_until: i64,
    pub joined_at: i64,
    /// Everything up to this seq has been read.
    pub read_seq: i64,
}

impl Member {
    pub fn new(room_id: RoomId, user_id: UserId, role: Role, joined_at: i64) -> Self {
        Self { room_id, user_id, role, nickname: String::new(), mute_until: 0, joined_at, read_seq: 0 }
    }
}

/// A change to one member row.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberChange {
    Nickname(String),
    Role(Role),
    MuteUntil(i64),
    /// Moves the read cursor forward only.
    ReadSeq(i64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct JoinRequest {
    pub id: i64,
    pub room_id: RoomId,
    pub user_id: UserId,
    pub message: String,
    pub status: JoinRequestStatus,
    pub created_at: i64,
}

/// A message about to be stored; the store gives it its seq.
#[derive(Clone, Debug, PartialEq)]
pub struct NewMessage {
    pub id: MessageId,
    pub room_id: RoomId,
    pub sender_id: UserId,
    pub client_msg_id: Option<String>,
    /// Shared, never changed: a message's content is passed along (store,
    /// ack, fan-out) far more often than it is built.
    pub content: Arc<Content>,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub id: MessageId,
    pub room_id: RoomId,
    pub seq: i64,
    pub sender_id: UserId,
    pub client_msg_id: Option<String>,
    pub content: Arc<Content>,
    pub created_at: i64,
}

/// What appending one [`NewMessage`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Appended {
    /// Stored now, with a fresh seq.
    Stored(Message),
    /// The sender already sent this `client_msg_id`: the earlier message.
    Duplicate(Message),
}

impl Appended {
    pub fn message(&self) -> &Message {
        match self {
            Appended::Stored(m) | Appended::Duplicate(m) => m,
        }
    }
    pub fn into_message(self) -> Message {
        match self {
            Appended::Stored(m) | Appended::Duplicate(m) => m,
        }
    }
}

/// Which slice of a room's history to read. Results are always in ascending seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryPage {
    /// The newest `limit` messages.
    Latest { limit: u32 },
    /// The newest `limit` messages with seq < `seq`.
    Before { seq: i64, limit: u32 },
    /// The oldest `limit` messages with seq > `seq`.
    After { seq: i64, limit: u32 },
}

/// One row of a user's room list.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomSummary {
    pub room: Room,
    pub read_seq: i64,
    pub last_message: Option<Message>,
}

impl From<&Message> for stacker_proto::http::ChatMessage {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id.into(),
            room_id: m.room_id.into(),
            seq: m.seq,
            sender_id: m.sender_id.into(),
            client_msg_id: m.client_msg_id.clone(),
            content: m.content.clone(),
            created_at: m.created_at,
        }
    }
}

/// A member's delivery position in one of their rooms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberCursor {
    pub room_id: RoomId,
    /// The highest seq any of the user's devices acknowledged (at least the
    /// room's last seq when the user joined).
    pub delivered_seq: i64,
    pub last_seq: i64,
    /// The room's last seq when the user joined.
    pub joined_seq: i64,
}

/// "Device `device_id` of `user_id` has everything up to `seq` in `room_id`."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCursor {
    pub user_id: UserId,
    pub device_id: String,
    pub room_id: RoomId,
    pub seq: i64,
}
