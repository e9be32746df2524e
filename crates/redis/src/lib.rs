//! Stacker's distributed-mode traits ([`stacker_domain::cluster`]) on Redis.
//!
//! Key schema (every key starts with the configured prefix, `stacker` by default):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}:gw:{id}` | string, PX ttl | the gateway's [`GatewayInfo`] as JSON; gone = dead |
//! | `{p}:gw:rank` | sorted set | gateway id → load (connections / capacity) |
//! | `{p}:route:{user}` | hash, no ttl | gateway id → open connections of the user there |
//! | `{p}:lease:{user}` | hash, PX lease | gateway id → Unix ms until which a reconnect returns there |
//! | `{p}:node:{n}` | string, PX ttl | the instance holding snowflake node id `n` |
//! | `{p}:svc:{kind}:{id}` | string, PX ttl | a live send/meta instance's URL |
//! | `{p}:stream:{gateway}` | stream, MAXLEN ~ | [`BusEntry`] JSON in field `e`; consumer group `gateway` |
//! | `{p}:members:{room}` | string, PX ttl | the room's [`RoomMembers`] as JSON `[[user, role, mute_until], …]` |
//! | `{p}:members_v:{room}` | string (integer), PX ttl | the room's member-list version, moved on by every change |
//!
//! Routes of connected users carry no TTL, so they never expire under a
//! connected user; a route to a gateway that is no longer live is ignored.
//!
//! Member lists are a read-through cache of SQL: a process that changed a
//! room's membership in SQL bumps `members_v` and deletes `members`; a loader
//! reads `members_v` before SQL and stores its list only if the version has not
//! moved since, so a load racing a change never restores the old list.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Script};
use stacker_domain::clock::now_ms;
use stacker_domain::cluster::{Bus, BusEntry, GatewayInfo, Registry};
use stacker_domain::membership::{RoomMembers, SharedMemberCache};
use stacker_domain::model::{RoomId, UserId};
use stacker_domain::{monitor, Error, Result};

const GROUP: &str = "gateway";

/// Connection settings.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Key prefix, so several clusters (or tests) can share one Redis.
    pub prefix: String,
    /// Approximate most entries kept per gateway stream.
    pub stream_max_len: usize,
    /// How long a cached member list lives. It bounds staleness only when an
    /// invalidation could not reach Redis; changes normally invalidate at once.
    pub member_list_ttl: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self { prefix: "stacker".into(), stream_max_len: 100_000, member_list_ttl: Duration::from_secs(60) }
    }
}

/// The connection for blocking stream reads, and the streams whose consumer
/// group it has made sure of. Both go after an error: a Redis that restarted
/// (or a stream that was deleted) has lost its groups, and reading one then
/// fails, so the next read makes sure of the group again instead of every
/// read paying a round trip for it.
struct BlockingConn {
    conn: redis::aio::MultiplexedConnection,
    grouped: std::collections::HashSet<String>,
}

/// Registry and bus on one Redis. Cheap to clone (a shared, reconnecting
/// connection); blocking stream reads use a dedicated connection each.
#[derive(Clone)]
pub struct RedisCluster {
    client: redis::Client,
    conn: ConnectionManager,
    /// For blocking stream reads, which must not share the manager's connection
    /// (nor its response timeout); rebuilt after an error.
    blocking: std::sync::Arc<tokio::sync::Mutex<Option<BlockingConn>>>,
    options: RedisOptions,
}

fn unavailable(op: &'static str, e: redis::RedisError) -> Error {
    tracing::warn!(op, error = %e, "redis call failed");
    metrics::counter!("stacker_redis_errors_total", "op" => op).increment(1);
    Error::Unavailable("redis unavailable".into())
}

/// Times a Redis call for metrics and the dependency monitor.
async fn observe<T>(op: &'static str, fut: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T> {
    let started = Instant::now();
    let result = fut.await;
    let elapsed = started.elapsed();
    metrics::histogram!("stacker_redis_seconds", "op" => op).record(elapsed.as_secs_f64());
    monitor::record("redis", result.is_ok(), elapsed);
    result.map_err(|e| unavailable(op, e))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("redis: bad {what}: {e}")))
}

impl RedisCluster {
    /// The readable entries of a read from `gateway`'s stream; the unreadable
    /// ones are acknowledged, so that they stop coming back (their messages
    /// are in the store: recipients catch up from there).
    async fn skip_unreadable(
        &self,
        gateway: &str,
        (readable, unreadable): (Vec<(String, BusEntry)>, Vec<String>),
    ) -> Vec<(String, BusEntry)> {
        if !unreadable.is_empty() {
            metrics::counter!("stacker_stream_unreadable_entries_total").increment(unreadable.len() as u64);
            // Not fatal: the readable ones are this consumer's now and must go on.
            if let Err(e) = self.ack(gateway, &unreadable).await {
                tracing::warn!(error = %e, "cannot acknowledge unreadable stream entries");
            }
        }
        readable
    }

    pub async fn connect(url: &str, options: RedisOptions) -> Result<RedisCluster> {
        let client = redis::Client::open(url).map_err(|e| Error::Store(format!("redis url: {e}")))?;
        let conn = observe("connect", ConnectionManager::new(client.clone())).await?;
        Ok(RedisCluster { client, conn, blocking: Default::default(), options })
    }

    fn key(&self, suffix: String) -> String {
        format!("{}:{suffix}", self.options.prefix)
    }

    fn stream(&self, gateway: &str) -> String {
        self.key(format!("stream:{gateway}"))
    }

    /// Round trip, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        observe("ping", redis::cmd("PING").query_async::<String>(&mut conn)).await.map(|_| ())
    }

    /// Deletes every key under this cluster's prefix (tests and tools).
    pub async fn delete_all_keys(&self) -> Result<()> {
        let keys = self.scan(&format!("{}:*", self.options.prefix)).await?;
        if !keys.is_empty() {
            let mut conn = self.conn.clone();
            observe("delete_all_keys", conn.del::<_, ()>(keys)).await?;
        }
        Ok(())
    }

    async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut iter: redis::AsyncIter<String> = observe("scan", conn.scan_match(pattern)).await?;
        let mut keys = Vec::new();
        while let Some(key) = futures_next(&mut iter).await {
            keys.push(key);
        }
        Ok(keys)
    }

    async fn gateway(&self, id: &str) -> Result<Option<GatewayInfo>> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = observe("gateway", conn.get(self.key(format!("gw:{id}")))).await?;
        raw.map(|b| decode("gateway", &b)).transpose()
    }

    async fn ensure_group(&self, stream: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, GROUP, "0").await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable("xgroup_create", e)),
        }
    }
}

async fn futures_next(iter: &mut redis::AsyncIter<'_, String>) -> Option<String> {
    iter.next_item().await.and_then(|r| r.ok())
}

/// A stream reply's entries, and apart from them the ids of entries that do
/// not decode (a bad write, another version's format), so that one of those
/// cannot hold up the rest of the batch.
fn entries(reply: Vec<redis::streams::StreamId>) -> (Vec<(String, BusEntry)>, Vec<String>) {
    let mut readable = Vec::with_capacity(reply.len());
    let mut unreadable = Vec::new();
    for id in reply {
        let bytes: Option<Vec<u8>> = id.get("e");
        match bytes.map(|b| decode::<BusEntry>("bus entry", &b)) {
            Some(Ok(entry)) => readable.push((id.id, entry)),
            Some(Err(e)) => {
                tracing::error!(id = %id.id, error = %e, "unreadable stream entry: acknowledged and skipped");
                unreadable.push(id.id);
            }
            None => {
                tracing::error!(id = %id.id, "stream entry without a body: acknowledged and skipped");
                unreadable.push(id.id);
            }
        }
    }
    (readable, unreadable)
}

#[async_trait]
impl Registry for RedisCluster {
    async fn heartbeat_gateway(&self, gateway: &GatewayInfo, ttl: Duration) -> Result<bool> {
        let json = serde_json::to_vec(gateway).map_err(|e| Error::Internal(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(format!("gw:{}", gateway.id)))
            .arg(json)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .arg("GET")
            .zadd(self.key("gw:rank".to_string()), &gateway.id, gateway.load())
            .ignore();
        let mut conn = self.conn.clone();
        let (previous,): (Option<Vec<u8>>,) = observe("heartbeat_gateway", pipe.query_async(&mut conn)).await?;
        Ok(previous.is_none())
    }

    async fn deregister_gateway(&self, id: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic().del(self.key(format!("gw:{id}"))).ignore().zrem(self.key("gw:rank".to_string()), id).ignore();
        let mut conn = self.conn.clone();
        observe("deregister_gateway", pipe.query_async::<()>(&mut conn)).await
    }

    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>> {
        let mut conn = self.conn.clone();
        let rank_key = self.key("gw:rank".to_string());
        let ids: Vec<String> = observe("live_gateways", conn.zrange(&rank_key, 0, -1)).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(format!("gw:{id}"))).collect();
        let infos: Vec<Option<Vec<u8>>> = observe("live_gateways", conn.mget(&keys)).await?;
        let mut live = Vec::new();
        let mut dead = Vec::new();
        for (id, info) in ids.into_iter().zip(infos) {
            match info {
                Some(bytes) => match decode::<GatewayInfo>("gateway", &bytes) {
                    Ok(info) => live.push(info),
                    // Left out until its next heartbeat rewrites it; the others are served.
                    Err(e) => tracing::error!(gateway = %id, error = %e, "unreadable gateway record: left out"),
                },
                None => dead.push(id),
            }
        }
        if !dead.is_empty() {
            observe("live_gateways", conn.zrem::<_, _, ()>(&rank_key, &dead)).await?;
        }
        Ok(live)
    }

    async fn pick_gateway(&self, user: Option<UserId>) -> Result<Option<GatewayInfo>> {
        if let Some(user) = user {
            let mut conn = self.conn.clone();
            let active: HashMap<String, i64> =
                observe("pick_gateway", conn.hgetall(self.key(format!("route:{user}")))).await?;
            let leases: HashMap<String, i64> =
                observe("pick_gateway", conn.hgetall(self.key(format!("lease:{user}")))).await?;
            let now = now_ms();
            let preferred = active.keys().chain(leases.iter().filter(|(_, until)| **until > now).map(|(gw, _)| gw));
            for gw in preferred {
                if let Some(info) = self.gateway(gw).await? {
                    if info.has_room() {
                        return Ok(Some(info));
                    }
                }
            }
        }
        // The least-loaded live gateway with room, and the placement counted in
        // the ranking until that gateway's next heartbeat reports its real load
        // (otherwise every client asking between two heartbeats would be sent
        // to the same gateway). One script, so that concurrent requests (a
        // reconnect storm) see each other's placements.
        // Like every script here, built (and hashed) once, and sent by hash
        // (the source only when Redis lacks it).
        static PICK_GATEWAY: LazyLock<Script> = LazyLock::new(|| {
            Script::new(
                r"
            for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
              local raw = redis.call('GET', ARGV[1] .. id)
              if not raw then
                redis.call('ZREM', KEYS[1], id)
              else
                local info = cjson.decode(raw)
                if info.connections < info.capacity then
                  redis.call('ZINCRBY', KEYS[1], 1 / math.max(info.capacity, 1), id)
                  return raw
                end
              end
            end
            return false",
            )
        });
        let script = &*PICK_GATEWAY;
        let mut conn = self.conn.clone();
        let mut invocation = script.prepare_invoke();
        invocation.key(self.key("gw:rank".to_string())).arg(self.key("gw:".to_string()));
        let picked: Option<Vec<u8>> = observe("pick_gateway", invocation.invoke_async(&mut conn)).await?;
        picked.map(|raw| decode("gateway", &raw)).transpose()
    }

    async fn route_connected(&self, user: UserId, gateway: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hincr(self.key(format!("route:{user}")), gateway, 1)
            .ignore()
            .hdel(self.key(format!("lease:{user}")), gateway)
            .ignore();
        let mut conn = self.conn.clone();
        observe("route_connected", pipe.query_async::<()>(&mut conn)).await
    }

    async fn route_disconnected(&self, user: UserId, gateway: &str, lease: Duration) -> Result<()> {
        // One script, so a concurrent connect on the same gateway cannot be undone.
        static ROUTE_DISCONNECTED: LazyLock<Script> = LazyLock::new(|| {
            Script::new(
                r"
            local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
            if n <= 0 then
              redis.call('HDEL', KEYS[1], ARGV[1])
              redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
              redis.call('PEXPIRE', KEYS[2], ARGV[3])
            end
            return n",
            )
        });
        let script = &*ROUTE_DISCONNECTED;
        let until = now_ms() + lease.as_millis() as i64;
        let mut conn = self.conn.clone();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key(format!("route:{user}")))
            .key(self.key(format!("lease:{user}")))
            .arg(gateway)
            .arg(until)
            .arg(lease.as_millis().max(1) as u64);
        observe("route_disconnected", invocation.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn routes(&self, users: &[UserId]) -> Result<HashMap<UserId, Vec<String>>> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hkeys(self.key(format!("route:{user}")));
        }
        let mut conn = self.conn.clone();
        let found: Vec<Vec<String>> = observe("routes", pipe.query_async(&mut conn)).await?;
        Ok(users.iter().copied().zip(found).filter(|(_, gws)| !gws.is_empty()).collect())
    }

    async fn restore_routes(&self, gateway: &str, users: &[(UserId, usize)]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (user, count) in users {
            pipe.hset(self.key(format!("route:{user}")), gateway, *count as u64).ignore();
        }
        let mut conn = self.conn.clone();
        observe("restore_routes", pipe.query_async::<()>(&mut conn)).await
    }

    async fn heartbeat_instance(&self, kind: &str, id: &str, url: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        let key = self.key(format!("svc:{kind}:{id}"));
        observe("heartbeat_instance", conn.pset_ex::<_, _, ()>(key, url, ttl.as_millis().max(1) as u64)).await
    }

    async fn deregister_instance(&self, kind: &str, id: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        observe("deregister_instance", conn.del::<_, ()>(self.key(format!("svc:{kind}:{id}")))).await
    }

    async fn live_instances(&self, kind: &str) -> Result<Vec<(String, String)>> {
        let prefix = self.key(format!("svc:{kind}:"));
        let mut keys = self.scan(&format!("{prefix}*")).await?;
        keys.sort();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let urls: Vec<Option<String>> = observe("live_instances", conn.mget(&keys)).await?;
        Ok(keys.into_iter().zip(urls).filter_map(|(k, url)| url.map(|u| (k[prefix.len()..].to_string(), u))).collect())
    }

    async fn lease_node_id(&self, instance: &str, ttl: Duration) -> Result<u16> {
        // Renew ours if we hold one; otherwise take the first free id from a
        // random start, all in one script so two instances never share an id.
        static LEASE_NODE_ID: LazyLock<Script> = LazyLock::new(|| {
            Script::new(
                r"
            local prefix, instance, ttl, start = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
            for i = 0, 1023 do
              local n = (start + i) % 1024
              local key = prefix .. n
              local holder = redis.call('GET', key)
              if holder == instance then
                redis.call('PEXPIRE', key, ttl)
                return n
              end
            end
            for i = 0, 1023 do
              local n = (start + i) % 1024
              if redis.call('SET', prefix .. n, instance, 'NX', 'PX', ttl) then
                return n
              end
            end
            return -1",
            )
        });
        let script = &*LEASE_NODE_ID;
        // A start fixed per instance: after Redis loses the leases (a restart) an
        // instance most likely gets its old id back.
        let start =
            instance.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)) % 1024;
        let mut conn = self.conn.clone();
        let mut invocation = script.prepare_invoke();
        invocation.key(self.key("node:".to_string())).arg(instance).arg(ttl.as_millis().max(1) as u64).arg(start);
        match observe("lease_node_id", invocation.invoke_async::<i64>(&mut conn)).await? {
            n if (0..1024).contains(&n) => Ok(n as u16),
            _ => Err(Error::Unavailable("all 1024 snowflake node ids are leased".into())),
        }
    }
}

#[async_trait]
impl Bus for RedisCluster {
    async fn publish(&self, gateway: &str, entry: &BusEntry) -> Result<()> {
        let json = serde_json::to_vec(entry).map_err(|e| Error::Internal(e.to_string()))?;
        let mut conn = self.conn.clone();
        let max = redis::streams::StreamMaxlen::Approx(self.options.stream_max_len);
        observe("publish", conn.xadd_maxlen::<_, _, _, _, String>(self.stream(gateway), max, "*", &[("e", json)]))
            .await
            .map(|_| ())
    }

    async fn publish_many(&self, entries: &[(String, BusEntry)]) -> Result<()> {
        let max = redis::streams::StreamMaxlen::Approx(self.options.stream_max_len);
        let mut pipe = redis::pipe();
        for (gateway, entry) in entries {
            let json = serde_json::to_vec(entry).map_err(|e| Error::Internal(e.to_string()))?;
            pipe.xadd_maxlen(self.stream(gateway), max, "*", &[("e", json)]).ignore();
        }
        let mut conn = self.conn.clone();
        observe("publish", pipe.query_async::<()>(&mut conn)).await
    }

    async fn consume(
        &self,
        gateway: &str,
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Vec<(String, BusEntry)>> {
        let stream = self.stream(gateway);
        // A blocking read holds its connection: use a dedicated one whose response
        // timeout outlasts the block (the client's default, 500 ms, would race it).
        let mut slot = self.blocking.lock().await;
        if slot.is_none() {
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(block + Duration::from_secs(5)));
            let conn = observe("consume", self.client.get_multiplexed_async_connection_with_config(&config)).await?;
            *slot = Some(BlockingConn { conn, grouped: Default::default() });
        }
        let Some(blocking) = slot.as_mut() else { return Ok(Vec::new()) };
        if !blocking.grouped.contains(&stream) {
            self.ensure_group(&stream).await?;
            blocking.grouped.insert(stream.clone());
        }
        let options = StreamReadOptions::default().group(GROUP, consumer).count(max).block(block.as_millis() as usize);
        let reply: Option<StreamReadReply> =
            match observe("consume", blocking.conn.xread_options(&[&stream], &[">"], &options)).await {
                Ok(reply) => reply,
                Err(e) => {
                    *slot = None; // reconnect next time (e.g. after a Redis restart)
                    return Err(e);
                }
            };
        let ids = reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default();
        Ok(self.skip_unreadable(gateway, entries(ids)).await)
    }

    async fn ack(&self, gateway: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        observe("ack", conn.xack::<_, _, _, i64>(self.stream(gateway), GROUP, ids)).await.map(|_| ())
    }

    async fn reclaim(
        &self,
        gateway: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<(String, BusEntry)>> {
        let stream = self.stream(gateway);
        self.ensure_group(&stream).await?;
        let mut conn = self.conn.clone();
        let options = StreamAutoClaimOptions::default().count(max);
        let reply: StreamAutoClaimReply = observe(
            "reclaim",
            conn.xautoclaim_options(&stream, GROUP, consumer, min_idle.as_millis() as u64, "0-0", options),
        )
        .await?;
        Ok(self.skip_unreadable(gateway, entries(reply.claimed)).await)
    }

    async fn drop_stream(&self, gateway: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        observe("drop_stream", conn.del::<_, ()>(self.stream(gateway))).await
    }

    async fn streams(&self) -> Result<Vec<String>> {
        let prefix = self.stream("");
        Ok(self.scan(&format!("{prefix}*")).await?.into_iter().map(|k| k[prefix.len()..].to_string()).collect())
    }
}

#[async_trait]
impl SharedMemberCache for RedisCluster {
    async fn get(&self, room: RoomId) -> Result<Option<RoomMembers>> {
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = observe("members_get", conn.get(self.key(format!("members:{room}")))).await?;
        bytes.map(|b| decode("member list", &b)).transpose()
    }

    async fn version(&self, room: RoomId) -> Result<u64> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = observe("members_version", conn.get(self.key(format!("members_v:{room}")))).await?;
        Ok(v.unwrap_or(0))
    }

    async fn fill(&self, room: RoomId, version: u64, members: &RoomMembers) -> Result<bool> {
        static FILL_MEMBERS: LazyLock<Script> = LazyLock::new(|| {
            Script::new(
                r"
            local current = tonumber(redis.call('GET', KEYS[1]) or '0')
            if current ~= tonumber(ARGV[1]) then return 0 end
            redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
            return 1",
            )
        });
        let script = &*FILL_MEMBERS;
        let json = serde_json::to_vec(members).map_err(|e| Error::Internal(e.to_string()))?;
        let mut conn = self.conn.clone();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key(format!("members_v:{room}")))
            .key(self.key(format!("members:{room}")))
            .arg(version)
            .arg(json)
            .arg(self.options.member_list_ttl.as_millis().max(1) as u64);
        Ok(observe("members_fill", invocation.invoke_async::<i64>(&mut conn)).await? == 1)
    }

    async fn invalidate(&self, room: RoomId) -> Result<()> {
        // The version outlives any list filled under it (a day vs the list TTL).
        let version_ttl = (self.options.member_list_ttl * 4).max(Duration::from_secs(86_400));
        let mut conn = self.conn.clone();
        let version_key = self.key(format!("members_v:{room}"));
        let pipe = redis::pipe()
            .atomic()
            .incr(&version_key, 1)
            .ignore()
            .pexpire(&version_key, version_ttl.as_millis() as i64)
            .ignore()
            .del(self.key(format!("members:{room}")))
            .ignore()
            .to_owned();
        observe("members_invalidate", pipe.query_async::<()>(&mut conn)).await
    }
}
