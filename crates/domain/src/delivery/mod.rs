//! Realtime delivery (SPEC §3–4): the connection registry ([`Hub`]), the push
//! engine ([`Dispatcher`]), per-connection ordering and catch-up ([`Session`]),
//! and batched persistence of delivery cursors ([`AckBuffer`]).
//!
//! The transport (WebSocket) lives in the server crate; here a connection is a
//! bounded queue of [`Push`]es and a [`Session`] that turns them into frames.
//!
//! How nothing is lost: a message is dispatched only after it is committed, a
//! connection registers in the hub before it reads its cursors from the store,
//! and each session writes a room's messages only in seq order, starting right
//! after its cursor. A message that would leave a gap, a full queue, or a
//! `sync` frame send the session to the store for what it is missing.

mod acks;
mod dispatch;
mod frame;
mod hub;
pub mod remote;
mod session;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::membership::MemberCache;
pub use acks::AckBuffer;
pub use dispatch::Dispatcher;
pub use frame::Frame;
pub use hub::{Chat, ConnHandle, Hub, Push};
pub use session::{Close, Session, SessionLimits, MAX_DEVICES_PER_USER};

use crate::fanout::Fanout;
use crate::limits::{Admission, AttemptWindow};
use crate::model::{Message, RoomId, UserId};
use crate::store::Store;
use crate::{Error, Result};
use stacker_proto::ws::{Event, ServerFrame};

#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Dispatcher worker tasks.
    pub workers: usize,
    /// Jobs waiting per worker.
    pub worker_queue: usize,
    /// Members handled per dispatch job.
    pub batch_size: usize,
    /// Frames waiting per connection.
    pub connection_queue: usize,
    /// How long the dispatcher waits for room in a full connection queue
    /// before it switches that connection to catch-up.
    pub enqueue_timeout: Duration,
    pub max_connections: usize,
    /// One user's connections at most (per process).
    pub max_connections_per_user: usize,
    pub session: SessionLimits,
    /// How often acknowledged cursors are written to the store.
    pub ack_flush_interval: Duration,
    /// How often, at most, one user's stale devices are forgotten.
    pub device_prune_every: Duration,
    /// Only devices that have not acknowledged for this long are forgotten.
    pub device_forget_idle: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            worker_queue: 4096,
            batch_size: 100,
            connection_queue: 1024,
            enqueue_timeout: Duration::from_millis(100),
            max_connections: 200_000,
            max_connections_per_user: 256,
            session: SessionLimits::default(),
            ack_flush_interval: Duration::from_millis(500),
            device_prune_every: Duration::from_secs(600),
            device_forget_idle: Duration::from_secs(30 * 86_400),
        }
    }
}

/// The realtime side of a process: where stored messages and room events go.
pub struct Delivery {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    members: Arc<MemberCache>,
    dispatcher: Dispatcher,
    acks: AckBuffer,
    config: DeliveryConfig,
    /// Stale devices are forgotten at most once per user per
    /// `device_prune_every` (a window of one attempt), so that a reconnect
    /// storm of devices that never acknowledged does not read each user's
    /// devices each time.
    pruned: AttemptWindow<UserId>,
}

impl Delivery {
    pub fn start(store: Arc<dyn Store>, members: Arc<MemberCache>, config: DeliveryConfig) -> Arc<Self> {
        let hub = Arc::new(Hub::new(config.max_connections, config.max_connections_per_user, config.connection_queue));
        let dispatcher = Dispatcher::start(hub.clone(), members.clone(), &config);
        let acks = AckBuffer::start(store.clone(), config.ack_flush_interval);
        let pruned = AttemptWindow::with_window(1, config.device_prune_every);
        Arc::new(Self { store, hub, members, dispatcher, acks, config, pruned })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn members(&self) -> &Arc<MemberCache> {
        &self.members
    }

    /// Registers a connection and prepares its session: cursors come from the
    /// device's acknowledged positions (or, for a new device, the user's).
    pub async fn connect(&self, user_id: UserId, device_id: &str) -> Result<(ConnHandle, Session)> {
        let (handle, rx) = self.hub.register(user_id, device_id)?;
        // Registered first, read second: whatever commits from now on reaches the
        // queue, whatever committed before is in the cursors' catch-up.
        match Session::open(self.store.clone(), &handle, rx, self.config.session.clone()).await {
            Ok(session) => {
                if session.new_device() {
                    self.forget_stale_devices(user_id);
                }
                Ok((handle, session))
            }
            Err(e) => {
                self.hub.unregister(&handle);
                Err(e)
            }
        }
    }

    /// A device with no cursors connected: every device id a client makes
    /// up would otherwise keep its cursors forever, so past 100 devices the
    /// least recent ones that have been silent for `device_forget_idle` and
    /// are not connected make room (in the background, off the connect path).
    fn forget_stale_devices(&self, user_id: UserId) {
        if self.pruned.admit(Some(user_id)) == Admission::Refused {
            return;
        }
        let store = self.store.clone();
        // Connected devices are spared: their latest acks may still be in
        // the ack buffer.
        let connected: Vec<Arc<str>> = self
            .hub
            .user_connections(user_id)
            .map(|c| c.iter().map(|h| h.device_id.clone()).collect())
            .unwrap_or_default();
        let idle_before = crate::clock::now_ms().saturating_sub(self.config.device_forget_idle.as_millis() as i64);
        tokio::spawn(async move {
            let spare: Vec<&str> = connected.iter().map(|d| &**d).collect();
            let keep = MAX_DEVICES_PER_USER - 1;
            match store.forget_stale_devices(user_id, keep, idle_before, &spare).await {
                Ok(forgotten) => metrics::counter!("stacker_devices_forgotten_total").increment(forgotten as u64),
                Err(e) => tracing::warn!(error = %e, user = user_id, "cannot forget stale devices"),
            }
        });
    }

    pub fn disconnect(&self, handle: &ConnHandle) {
        self.hub.unregister(handle);
    }

    pub fn enqueue_timeout(&self) -> Duration {
        self.config.enqueue_timeout
    }

    /// A client acknowledged everything up to `seq` in `room`.
    pub async fn ack(&self, user_id: UserId, device_id: &str, room: RoomId, seq: i64) -> Result<()> {
        if seq < 0 {
            return Err(Error::bad_request("seq must not be negative"));
        }
        if !self.members.is_member(room, user_id).await? {
            return Err(Error::forbidden("you are not a member of this room"));
        }
        self.acks.record(user_id, device_id, room, seq);
        Ok(())
    }

    /// Closes every connection with `code` and writes pending acks.
    pub async fn shutdown(&self, code: u16, reason: &str) {
        self.hub.close_all(code, reason).await;
        self.dispatcher.shutdown().await;
        self.acks.flush().await;
    }
}

/// The `ack` frame every device of a message's sender gets once it is stored.
pub fn ack_frame(message: &Message) -> Frame {
    Frame::encode(&ServerFrame::Ack {
        id: message.id.into(),
        room_id: message.room_id.into(),
        seq: message.seq,
        client_msg_id: message.client_msg_id.clone(),
    })
}

#[async_trait]
impl Fanout for Delivery {
    /// Acks go to every device of the sender, through the dispatcher so that
    /// they keep their order and share a write with the sender's own copy
    /// (see [`Dispatcher`]); this waits only for room in the dispatch queue.
    async fn message_stored(&self, message: &Message, push: bool) {
        let ack = Push::Frame(ack_frame(message));
        self.dispatcher.dispatch_stored(message, ack, push).await;
    }

    /// Tells a removed user's sessions to stop delivering the room (the
    /// member cache was invalidated by [`crate::rooms::Rooms`]).
    async fn membership_changed(&self, room: RoomId, removed: Option<UserId>) {
        if let Some(user) = removed {
            self.hub.push_to_user(user, &Push::Left(room), self.config.enqueue_timeout).await;
        }
    }

    async fn notify(&self, users: &[UserId], event: Event) {
        let frame = Frame::encode(&ServerFrame::Event(event));
        for user in users {
            self.hub.push_to_user(*user, &Push::Frame(frame.clone()), self.config.enqueue_timeout).await;
        }
    }
}
