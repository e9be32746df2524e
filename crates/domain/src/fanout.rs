//! Where stored messages and room events go after the domain has done its
//! work. Standalone: the in-process [`crate::delivery::Delivery`]; distributed
//! mode puts a bus behind the same trait.

use async_trait::async_trait;
use stacker_proto::ws::Event;

use crate::model::{Appended, Message, RoomId, UserId};

#[async_trait]
pub trait Fanout: Send + Sync {
    /// A message is stored: acknowledge it to the sender's devices and, when
    /// `push` is set, push it to the room's online members.
    async fn message_stored(&self, message: &Message, push: bool);

    /// A committed batch, in seq order: [`message_stored`](Self::message_stored)
    /// for each (a duplicate is acknowledged again but not pushed again).
    async fn batch_stored(&self, outcomes: &[Appended]) {
        for outcome in outcomes {
            self.message_stored(outcome.message(), matches!(outcome, Appended::Stored(_))).await;
        }
    }

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
