//! Delivery across processes (distributed mode): send and meta instances
//! publish pushes to the streams of the gateways holding the recipients
//! ([`BusFanout`]); each gateway relays its stream to its own connections
//! ([`relay`]); the flusher re-routes what dead gateways left ([`reclaim_dead`]).
//! A gateway that stores messages itself (WebSocket `send` frames) hands the
//! pushes for its own connections over directly ([`LocalGateway`]), as its
//! relay would, without the round trip through its stream.
//!
//! Live pushes are a fast path only: whatever a device misses (a stale route,
//! a dead gateway) it reads from the store after its cursor, as in standalone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::future::Cache;
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::{Event, ServerFrame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Frame, Hub, MemberCache, Push};
use crate::cluster::{Bus, BusEntry, BusPush, Registry};
use crate::fanout::Fanout;
use crate::model::{Appended, Message, RoomId, UserId};
use crate::Result;

/// Publishes pushes to the recipients' gateways.
pub struct BusFanout {
    registry: Arc<dyn Registry>,
    bus: Arc<dyn Bus>,
    members: Arc<MemberCache>,
    /// user → gateways, for a short while (a miss costs one Redis round trip per batch).
    routes: Cache<UserId, Arc<[String]>>,
    batch_size: usize,
    /// Set on a gateway: its own entries skip the stream.
    local: Option<LocalQueue>,
}

/// Entries for the gateway's own connections, on their way to its hand-off
/// task: a connection that is slow to take its push holds up that task, not
/// the committed batches behind it.
struct LocalQueue {
    id: String,
    entries: mpsc::Sender<BusEntry>,
}

/// Entries waiting for the local hand-off; past it the fan-out waits.
const LOCAL_QUEUE: usize = 4096;

/// The gateway a [`BusFanout`] runs in, when it runs in one: entries routed to
/// it are handed to its connections by a task of its own, as [`relay`] would
/// hand them over after reading them back from its stream.
pub struct LocalGateway {
    pub id: String,
    pub hub: Arc<Hub>,
    pub enqueue_timeout: Duration,
}

impl BusFanout {
    pub fn new(
        registry: Arc<dyn Registry>,
        bus: Arc<dyn Bus>,
        members: Arc<MemberCache>,
        route_cache_ttl: Duration,
        batch_size: usize,
        local: Option<LocalGateway>,
    ) -> Self {
        let routes = Cache::builder().max_capacity(1_000_000).time_to_live(route_cache_ttl).build();
        let local = local.map(|gateway| {
            let (entries, queue) = mpsc::channel(LOCAL_QUEUE);
            let id = gateway.id.clone();
            tokio::spawn(hand_off_locally(registry.clone(), bus.clone(), gateway, queue));
            LocalQueue { id, entries }
        });
        Self { registry, bus, members, routes, batch_size: batch_size.max(1), local }
    }

    /// Gateways of each user, through the local cache.
    async fn gateways_of(&self, users: &[UserId]) -> Result<BTreeMap<String, Vec<UserId>>> {
        let mut by_gateway: BTreeMap<String, Vec<UserId>> = BTreeMap::new();
        let mut missing = Vec::new();
        for user in users {
            match self.routes.get(user).await {
                Some(gws) => gws.iter().for_each(|gw| by_gateway.entry(gw.clone()).or_default().push(*user)),
                None => missing.push(*user),
            }
        }
        for chunk in missing.chunks(self.batch_size * 10) {
            let found = self.registry.routes(chunk).await?;
            for user in chunk {
                let gws: Arc<[String]> = found.get(user).cloned().unwrap_or_default().into();
                gws.iter().for_each(|gw| by_gateway.entry(gw.clone()).or_default().push(*user));
                self.routes.insert(*user, gws).await;
            }
        }
        Ok(by_gateway)
    }

    /// The stream entries that carry `push` to `users`: one per gateway and
    /// batch of recipients, appended to `out`.
    async fn entries(&self, users: &[UserId], push: BusPush, out: &mut Vec<(String, BusEntry)>) {
        let by_gateway = match self.gateways_of(users).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "route lookup failed; recipients catch up from the store");
                metrics::counter!("stacker_dispatch_failures_total").increment(1);
                return;
            }
        };
        for (gateway, users) in by_gateway {
            for batch in users.chunks(self.batch_size) {
                out.push((gateway.clone(), BusEntry { users: batch.to_vec(), push: push.clone(), hops: 0 }));
            }
        }
    }

    /// Queues this gateway's own entries for its connections, then appends
    /// the rest to their streams, in order, in one round trip.
    async fn send(&self, mut entries: Vec<(String, BusEntry)>) {
        if let Some(local) = &self.local {
            if entries.iter().any(|(gateway, _)| *gateway == local.id) {
                let (own, others): (Vec<_>, Vec<_>) =
                    entries.into_iter().partition(|(gateway, _)| *gateway == local.id);
                entries = others;
                crate::hot_metric!(counter, "stacker_local_entries_total").increment(own.len() as u64);
                for (_, entry) in own {
                    if local.entries.send(entry).await.is_err() {
                        tracing::warn!("the local hand-off stopped; recipients catch up from the store");
                        break;
                    }
                }
            }
        }
        if entries.is_empty() {
            return;
        }
        if let Err(e) = self.bus.publish_many(&entries).await {
            tracing::warn!(error = %e, entries = entries.len(), "publish failed; recipients catch up from the store");
            metrics::counter!("stacker_dispatch_failures_total").increment(1);
        }
    }

    async fn publish(&self, users: &[UserId], push: BusPush) {
        let mut out = Vec::new();
        self.entries(users, push, &mut out).await;
        self.send(out).await;
    }

    /// The ack for the sender and, if `push`, the message for the room's members.
    async fn message_entries(&self, message: &Message, push: bool, out: &mut Vec<(String, BusEntry)>) {
        let ack = super::ack_frame(message);
        self.entries(&[message.sender_id], BusPush::Frame { frame: text(&ack) }, out).await;
        if !push {
            return;
        }
        let members = match self.members.get(message.room_id).await {
            Ok(m) => m.ids().clone(),
            Err(e) => {
                tracing::warn!(room = message.room_id, error = %e, "cannot load members; skipping live push");
                return;
            }
        };
        let frame = Frame::encode(&ServerFrame::Chat(ChatMessage::from(message)));
        let push = BusPush::Message { room: message.room_id, seq: message.seq, frame: text(&frame) };
        self.entries(&members, push, out).await;
        crate::hot_metric!(counter, "stacker_pushes_total").increment(members.len() as u64);
    }

    /// Forgets cached routes of these users (they connected somewhere new).
    pub async fn forget_routes(&self, users: &[UserId]) {
        for u in users {
            self.routes.invalidate(u).await;
        }
    }
}

fn text(frame: &Frame) -> String {
    String::from_utf8_lossy(frame.bytes()).into_owned()
}

#[async_trait]
impl Fanout for BusFanout {
    async fn message_stored(&self, message: &Message, push: bool) {
        let mut out = Vec::new();
        self.message_entries(message, push, &mut out).await;
        self.send(out).await;
    }

    /// A whole committed batch in one pipelined round trip to Redis (entries
    /// stay in seq order on each stream).
    async fn batch_stored(&self, outcomes: &[Appended]) {
        let mut out = Vec::new();
        for outcome in outcomes {
            self.message_entries(outcome.message(), matches!(outcome, Appended::Stored(_)), &mut out).await;
        }
        self.send(out).await;
    }

    async fn membership_changed(&self, room: RoomId, removed: Option<UserId>) {
        if let Some(user) = removed {
            self.publish(&[user], BusPush::Left { room }).await;
        }
    }

    async fn notify(&self, users: &[UserId], event: Event) {
        let frame = Frame::encode(&ServerFrame::Event(event));
        self.publish(users, BusPush::Frame { frame: text(&frame) }).await;
    }
}

fn to_push(push: &BusPush) -> Push {
    match push {
        BusPush::Message { room, seq, frame } => Push::message(*room, *seq, Frame::from_string(frame.clone())),
        BusPush::Frame { frame } => Push::Frame(Frame::from_string(frame.clone())),
        BusPush::Left { room } => Push::Left(*room),
    }
}

/// Hands one entry to local connections; returns the users not connected here.
async fn hand_off(hub: &Hub, entry: &BusEntry, enqueue_timeout: Duration) -> Vec<UserId> {
    let push = to_push(&entry.push);
    let mut absent = Vec::new();
    for user in &entry.users {
        if hub.push_to_user(*user, &push, enqueue_timeout).await == 0 {
            absent.push(*user);
        }
    }
    absent
}

/// A gateway's own entries, handed to its connections in order as its relay
/// hands over what it reads from its stream.
async fn hand_off_locally(
    registry: Arc<dyn Registry>,
    bus: Arc<dyn Bus>,
    gateway: LocalGateway,
    mut entries: mpsc::Receiver<BusEntry>,
) {
    while let Some(entry) = entries.recv().await {
        deliver_here(&*registry, &*bus, &gateway.hub, &gateway.id, &entry, gateway.enqueue_timeout).await;
    }
}

/// What a gateway does with an entry for it, from its stream or its own
/// fan-out: hands it to the local connections, then pushes it on for the
/// users who are not connected here.
async fn deliver_here(
    registry: &dyn Registry,
    bus: &dyn Bus,
    hub: &Hub,
    here: &str,
    entry: &BusEntry,
    enqueue_timeout: Duration,
) {
    let absent = hand_off(hub, entry, enqueue_timeout).await;
    push_back(registry, bus, here, entry, absent).await;
}

/// Sends an entry's absent users on to the gateways they are on now (once:
/// `hops` stops ping-pong between gateways with stale views).
async fn push_back(registry: &dyn Registry, bus: &dyn Bus, here: &str, entry: &BusEntry, absent: Vec<UserId>) {
    if absent.is_empty() || entry.hops >= 1 {
        return;
    }
    let Ok(routes) = registry.routes(&absent).await else { return };
    let mut by_gateway: HashMap<String, Vec<UserId>> = HashMap::new();
    for (user, gws) in routes {
        for gw in gws.into_iter().filter(|gw| gw != here) {
            by_gateway.entry(gw).or_default().push(user);
        }
    }
    for (gw, users) in by_gateway {
        let moved = BusEntry { users, push: entry.push.clone(), hops: entry.hops + 1 };
        metrics::counter!("stacker_pushbacks_total").increment(1);
        if let Err(e) = bus.publish(&gw, &moved).await {
            tracing::warn!(gateway = %gw, error = %e, "push-back failed; recipients catch up from the store");
        }
    }
}

/// A gateway's consumer: reads its stream, hands entries to local connections,
/// acknowledges them after hand-off, and pushes back entries for users who
/// moved. Runs until `stop` is cancelled.
pub async fn relay(
    registry: Arc<dyn Registry>,
    bus: Arc<dyn Bus>,
    hub: Arc<Hub>,
    gateway: String,
    enqueue_timeout: Duration,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    // Entries handed off and not yet acknowledged: their ack goes out while
    // the next read waits (the two use different connections).
    let mut handed: Vec<String> = Vec::new();
    while !stop.is_cancelled() {
        let (_, read) = tokio::join!(
            ack(&*bus, &gateway, &handed),
            bus.consume(&gateway, &gateway, 256, Duration::from_millis(500))
        );
        handed.clear();
        let entries = match read {
            Ok(e) => {
                failures = 0;
                e
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "stream read failed; retrying");
                tokio::time::sleep(Duration::from_millis((50 * failures as u64).min(2000))).await;
                continue;
            }
        };
        crate::hot_metric!(counter, "stacker_stream_entries_total").increment(entries.len() as u64);
        for (id, entry) in entries {
            deliver_here(&*registry, &*bus, &hub, &gateway, &entry, enqueue_timeout).await;
            handed.push(id);
        }
    }
    ack(&*bus, &gateway, &handed).await;
}

/// Acknowledges entries of `gateway`'s stream that were handed off.
async fn ack(bus: &dyn Bus, gateway: &str, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) = bus.ack(gateway, ids).await {
        // Unacknowledged entries are redelivered or reclaimed; sessions drop duplicates.
        tracing::warn!(error = %e, "stream ack failed");
    }
}

/// The flusher's pass: for every stream whose gateway is dead, re-route its
/// entries (pending or never read) to the recipients' current gateways, then
/// delete the stream. Returns how many entries were moved.
pub async fn reclaim_dead(registry: &dyn Registry, bus: &dyn Bus, consumer: &str) -> Result<usize> {
    let live: HashSet<String> = registry.live_gateways().await?.into_iter().map(|g| g.id).collect();
    let mut moved = 0;
    for gateway in bus.streams().await? {
        if live.contains(&gateway) {
            continue;
        }
        loop {
            let mut batch = bus.reclaim(&gateway, consumer, Duration::ZERO, 256).await?;
            batch.extend(bus.consume(&gateway, consumer, 256, Duration::from_millis(1)).await?);
            if batch.is_empty() {
                break;
            }
            let mut ids = Vec::new();
            for (id, entry) in batch {
                let fresh = BusEntry { hops: 0, ..entry };
                push_back(registry, bus, &gateway, &fresh, fresh.users.clone()).await;
                ids.push(id);
                moved += 1;
            }
            bus.ack(&gateway, &ids).await?;
        }
        bus.drop_stream(&gateway).await?;
        tracing::info!(%gateway, "reclaimed the stream of a dead gateway");
    }
    metrics::counter!("stacker_reclaimed_entries_total").increment(moved as u64);
    Ok(moved)
}
