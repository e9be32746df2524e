//! Where stored messages and room events go after the domain has done its
//! work. Standalone: the in-process [`crate::delivery::Delivery`]; distributed
//! mode puts a bus behind the same trait.

use async_trait::async_trait;
use stacker_proto::ws::Event;

use crate::model::{Message, RoomId, UserId};

#[async_trait]
pub trait Fanout: Send + Sync {
    /// A message is stored: acknowledge it to the sender's devices and, when
    /// `push` is set, push it to the room's online members.
    async fn message_stored(&self, message: &Message, push: bool);

    /// Membership of `room` changed (`removed`: who lost access, if anyone).
    async fn membership_changed(&self, room: RoomId, removed: Option<UserId>);

    /// Tells these users about a room event.
    async fn notify(&self, users: &[UserId], event: Event);
}

/// For processes that push nothing (tools, tests of the domain alone).
pub struct NoFanout;

#[async_trait]
impl Fanout for NoFanout {
    async fn message_stored(&self, _: &Message, _: bool) {}
    async fn membership_changed(&self, _: RoomId, _: Option<UserId>) {}
    async fn notify(&self, _: &[UserId], _: Event) {}
}
