//! The storage traits the domain needs. Implementations: `stacker-store-sql`
//! (SQLite, MySQL/MariaDB, PostgreSQL); one conformance suite checks them all.
//!
//! Contract for every method: `Error::Conflict` for a unique-key clash the
//! method documents, `Error::Unavailable` when the database cannot be reached,
//! `Error::Store` for anything else.

use async_trait::async_trait;

use crate::model::*;
use crate::Result;

/// Why a room takes no one in: its owner left it as the last member.
pub const ROOM_CLOSED: &str = "this room is closed: its owner left it last";

/// What [`RoomStore::remove_member`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    NotMember,
    /// The user owns the room and others are still members: nothing changed.
    OwnerNotLast,
}

#[async_trait]
pub trait UserStore: Send + Sync {
    /// `Conflict` when the username is taken.
    async fn insert_user(&self, user: &User) -> Result<()>;
    async fn user_by_name(&self, username: &str) -> Result<Option<User>>;
    async fn user_by_id(&self, id: UserId) -> Result<Option<User>>;
    /// Which of `ids` exist.
    async fn existing_users(&self, ids: &[UserId]) -> Result<Vec<UserId>>;
}

#[async_trait]
pub trait RoomStore: Send + Sync {
    /// Creates the room with its first members in one transaction. `Conflict`
    /// when a direct room with the same `direct_key` exists.
    async fn insert_room(&self, room: &Room, members: &[Member]) -> Result<()>;
    async fn room(&self, id: RoomId) -> Result<Option<Room>>;
    async fn direct_room(&self, direct_key: &str) -> Result<Option<Room>>;
    /// Group rooms whose name contains `query` (case-insensitive), newest
    /// first; not those whose owner left (they take no one in).
    async fn search_rooms(&self, query: &str, limit: u32) -> Result<Vec<Room>>;

    async fn member(&self, room: RoomId, user: UserId) -> Result<Option<Member>>;
    /// Members in join order.
    async fn members(&self, room: RoomId) -> Result<Vec<Member>>;
    /// Inserts those not yet members, with read and delivered cursors at the
    /// room's current last seq (history before joining is not "unread");
    /// returns the user ids actually added. `NotFound` ([`ROOM_CLOSED`]) when
    /// the room's owner is not a member, checked in the same transaction, so
    /// a join racing the owner's last leave cannot leave members with no owner.
    async fn add_members(&self, members: &[Member]) -> Result<Vec<UserId>>;
    /// Removes a member, keeping a running mute for a rejoin. The room's
    /// owner is removed only as its last member ([`Removal::OwnerNotLast`]
    /// otherwise), judged by the owner at the time of the removal, in its
    /// transaction, and serialized with `add_members` and ownership
    /// transfers: a room never keeps members without its owner.
    async fn remove_member(&self, room: RoomId, user: UserId) -> Result<Removal>;
    /// False when the user is not a member. `Forbidden` for a role change of
    /// the room's owner (ownership moves only by `transfer_ownership`).
    async fn update_member(&self, room: RoomId, user: UserId, change: &MemberChange) -> Result<bool>;
    /// Atomically: `to` becomes owner, `from` becomes admin, the room's owner_id is `to`.
    async fn transfer_ownership(&self, room: RoomId, from: UserId, to: UserId) -> Result<()>;
    async fn joined_rooms(&self, user: UserId) -> Result<Vec<RoomId>>;
    /// The user's rooms with read cursor and last message, most recently active first.
    async fn room_summaries(&self, user: UserId) -> Result<Vec<RoomSummary>>;

    async fn insert_join_request(&self, request: &JoinRequest) -> Result<()>;
    async fn join_request(&self, id: i64) -> Result<Option<JoinRequest>>;
    async fn pending_join_request(&self, room: RoomId, user: UserId) -> Result<Option<JoinRequest>>;
    /// Pending requests of a room, oldest first (by `created_at`, then id),
    /// at most `limit`, those after `after` (a request's `(created_at, id)`).
    async fn pending_join_requests(
        &self,
        room: RoomId,
        after: Option<(i64, i64)>,
        limit: u32,
    ) -> Result<Vec<JoinRequest>>;
    /// Marks a pending request approved (adding `member` unless it is a
    /// member already) or rejected, in one transaction. `None` when the
    /// request was no longer pending; otherwise whether `member` was added.
    /// `NotFound` ([`ROOM_CLOSED`]) as for `add_members`.
    async fn decide_join_request(&self, id: i64, approve: bool, member: Option<&Member>) -> Result<Option<bool>>;
}

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Stores a batch in one transaction. Each room's seq continues from its
    /// last one with no gap; a `(sender_id, client_msg_id)` seen before (in the
    /// store or earlier in this batch) yields `Duplicate` and stores nothing.
    /// Results are in the order of `batch`. Every room must exist.
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>>;
    async fn message(&self, id: MessageId) -> Result<Option<Message>>;
    /// The message `sender` stored under `client_msg_id`, if any.
    async fn message_by_client_id(&self, sender: UserId, client_msg_id: &str) -> Result<Option<Message>>;
    async fn history(&self, room: RoomId, page: HistoryPage) -> Result<Vec<Message>>;
}

#[async_trait]
pub trait CursorStore: Send + Sync {
    /// The user's rooms with the user's delivered cursor and the room's last seq.
    async fn member_cursors(&self, user: UserId) -> Result<Vec<MemberCursor>>;
    /// The rooms this device acknowledged, with the acknowledged seq.
    async fn device_cursors(&self, user: UserId, device_id: &str) -> Result<Vec<(RoomId, i64)>>;
    /// Forgets the cursors of the devices of `user` beyond the `keep` that
    /// acknowledged most recently, sparing any that acknowledged at or after
    /// `idle_before` (Unix ms) and those named in `spare`; returns how many
    /// devices it forgot.
    async fn forget_stale_devices(&self, user: UserId, keep: usize, idle_before: i64, spare: &[&str]) -> Result<usize>;
    /// Moves each device cursor, and the member's delivered cursor, forward to
    /// `seq` (clamped to the room's last seq); never backwards. Cursors of rooms
    /// the user is not a member of are ignored.
    async fn save_cursors(&self, cursors: &[DeviceCursor]) -> Result<()>;
}

/// Everything the domain stores.
#[async_trait]
pub trait Store: UserStore + RoomStore + MessageStore + CursorStore {
    /// Cheap round trip for readiness checks.
    async fn ping(&self) -> Result<()>;
}
