//! What distributed mode needs besides the store: a registry of gateways and
//! of where users are connected, and a bus that carries pushes to the gateway
//! holding the recipients. Implemented on Redis by `stacker-redis`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::UserId;
use crate::Result;

/// A gateway as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub id: String,
    /// Where clients connect (`ws://host:port/api/ws`).
    pub ws_url: String,
    /// Where other services reach it (`http://host:port`).
    pub internal_url: String,
    /// Most connections it accepts.
    pub capacity: u64,
    /// Open connections at its last heartbeat.
    pub connections: u64,
}

impl GatewayInfo {
    pub fn has_room(&self) -> bool {
        self.connections < self.capacity
    }

    /// Fraction of capacity in use; the ranking's score.
    pub fn load(&self) -> f64 {
        if self.capacity == 0 {
            1.0
        } else {
            self.connections as f64 / self.capacity as f64
        }
    }
}

#[async_trait]
pub trait Registry: Send + Sync {
    /// Registers or refreshes (heartbeat) a gateway; it is dead once `ttl`
    /// passes without another call. True when the registry held no live record
    /// of it (first start, or the registry lost its state, e.g. a Redis restart).
    async fn heartbeat_gateway(&self, gateway: &GatewayInfo, ttl: Duration) -> Result<bool>;
    async fn deregister_gateway(&self, id: &str) -> Result<()>;
    /// Live gateways, least loaded first; dead ones leave the ranking.
    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>>;
    /// Where `user` should connect: their leased or current gateway if it is
    /// live and has room, else the least-loaded live gateway with room.
    async fn pick_gateway(&self, user: Option<UserId>) -> Result<Option<GatewayInfo>>;

    /// A connection of `user` opened on `gateway`. Routes of connected users never expire.
    async fn route_connected(&self, user: UserId, gateway: &str) -> Result<()>;
    /// A connection closed; when it was the user's last one on `gateway`, the
    /// route becomes a lease that lasts `lease`, so a quick reconnect returns there.
    async fn route_disconnected(&self, user: UserId, gateway: &str, lease: Duration) -> Result<()>;
    /// The gateways each user has open connections on (users with none are absent).
    async fn routes(&self, users: &[UserId]) -> Result<HashMap<UserId, Vec<String>>>;
    /// Sets `gateway`'s connection counts for these users (after the registry lost them).
    async fn restore_routes(&self, gateway: &str, users: &[(UserId, usize)]) -> Result<()>;

    /// Registers or refreshes a service instance (`kind` "send" or "meta") at `url`.
    async fn heartbeat_instance(&self, kind: &str, id: &str, url: &str, ttl: Duration) -> Result<()>;
    async fn deregister_instance(&self, kind: &str, id: &str) -> Result<()>;
    /// Live instances of `kind` as (id, url), sorted by id.
    async fn live_instances(&self, kind: &str) -> Result<Vec<(String, String)>>;

    /// Leases a snowflake node id (0–1023) distinct from every other live
    /// instance's; the holder renews it with the same call before `ttl` ends.
    async fn lease_node_id(&self, instance: &str, ttl: Duration) -> Result<u16>;
}

/// One entry on a gateway's stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BusEntry {
    /// Recipients connected to that gateway.
    pub users: Vec<UserId>,
    pub push: BusPush,
    /// How many times a gateway passed it on to another (users who moved).
    #[serde(default)]
    pub hops: u8,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusPush {
    /// A stored message: its room, seq and encoded `chat` frame.
    Message { room: i64, seq: i64, frame: String },
    /// Any other frame (ack, event).
    Frame { frame: String },
    /// The users left this room.
    Left { room: i64 },
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Appends an entry to `gateway`'s stream (trimmed to a bounded length).
    async fn publish(&self, gateway: &str, entry: &BusEntry) -> Result<()>;
    /// Appends each `(gateway, entry)` in order, in one round trip.
    async fn publish_many(&self, entries: &[(String, BusEntry)]) -> Result<()>;
    /// New entries for `consumer` of `gateway`'s group, waiting up to `block`.
    async fn consume(
        &self,
        gateway: &str,
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<(String, BusEntry)>>;
    /// Marks entries handled.
    async fn ack(&self, gateway: &str, ids: &[String]) -> Result<()>;
    /// Takes over entries of `gateway`'s stream pending longer than `min_idle`.
    async fn reclaim(
        &self,
        gateway: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<(String, BusEntry)>>;
    /// Deletes a dead gateway's stream.
    async fn drop_stream(&self, gateway: &str) -> Result<()>;
    /// The gateways that have a stream.
    async fn streams(&self) -> Result<Vec<String>>;
}
