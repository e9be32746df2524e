//! One YAML file (`--config`), every key overridable from the environment as
//! `STACKER_<SECTION>__<KEY>` (e.g. `STACKER_SERVER__LISTEN=127.0.0.1:9000`),
//! and defaults that run with no file at all. See `stacker.example.yaml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `development` generates a JWT secret when none is set; `production` refuses to start without one.
    pub mode: Mode,
    /// Where the default SQLite database and the generated JWT secret live.
    pub data_dir: PathBuf,
    /// Snowflake node id (0–1023); must differ between processes sharing a database.
    pub node_id: u16,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub messages: MessagesConfig,
    pub rooms: RoomsConfig,
    pub ws: WsConfig,
    pub delivery: DeliveryConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Development,
    Production,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest HTTP request body, in bytes (413 past it).
    pub max_body_bytes: usize,
    /// How long a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH?mode=rwc`, `mysql://…` or `postgres://…`. Empty: SQLite under data_dir.
    pub url: String,
    pub max_connections: u32,
    /// Messages group-committed in one transaction at most; 0 picks 2,048
    /// for SQLite and 512 for MySQL/PostgreSQL.
    pub max_batch: usize,
    /// Writer lanes, the most transactions at once; 0 picks 1 for SQLite and
    /// 4 for MySQL/PostgreSQL.
    pub writers: usize,
    /// Queued sends from which the lanes commit side by side; below it one
    /// transaction at a time takes them all. 0 picks 256.
    pub spread_at: usize,
    /// Sends waiting for a writer at most.
    pub queue: usize,
    /// How long a send waits for room in that queue before it gets 503.
    pub enqueue_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret, at least 32 bytes. Required in production mode.
    pub jwt_secret: String,
    pub token_ttl_s: u64,
    /// Failed logins for one username from one client address per minute
    /// before further attempts get 429 (0: no limit). Per address too, so
    /// that nobody can lock a user out by guessing wrong on purpose.
    pub max_login_failures_per_minute: u32,
    /// Logins for one username from one client address per minute,
    /// successful or not (0: no limit).
    pub max_logins_per_user_per_minute: u32,
    /// Failed logins for one username from all client addresses together
    /// per minute (0: no limit): a cap on guessing one account from many
    /// addresses, well above the per-address one so that locking a user out
    /// takes many addresses.
    pub max_login_failures_per_user_from_all_addresses_per_minute: u32,
    /// Failed logins from one client address per minute, whatever the
    /// usernames, before further attempts get 429 (0: no limit).
    pub max_login_failures_per_address_per_minute: u32,
    /// Registrations from one client address per minute (0: no limit).
    pub max_registrations_per_address_per_minute: u32,
    /// The request header that carries the client's address when every
    /// request comes through a reverse proxy that sets it (e.g.
    /// `x-forwarded-for`, whose last entry is used: the one the proxy
    /// added). Empty: the TCP peer's address.
    pub client_address_header: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Rooms one user may create per minute (0: no limit); past it, 429.
    pub max_creations_per_user_per_minute: u32,
    /// Room searches one user may run per minute (0: no limit); past it, 429.
    pub max_searches_per_user_per_minute: u32,
    /// Joins and join requests one user may make per minute (0: no limit);
    /// past it, 429.
    pub max_joins_per_user_per_minute: u32,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            max_creations_per_user_per_minute: 30,
            max_searches_per_user_per_minute: 60,
            max_joins_per_user_per_minute: 30,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagesConfig {
    /// Largest message `content`, JSON-encoded, in bytes (413 past it).
    pub max_content_bytes: usize,
    pub history_default_limit: u32,
    pub history_max_limit: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// The server pings this often; `hello` tells clients the same number.
    pub heartbeat_s: u64,
    /// A connection silent this long (no frame, no pong) is closed (1001).
    pub heartbeat_timeout_s: u64,
    /// Largest client frame in bytes; larger ones close the connection (1009).
    pub max_frame_bytes: usize,
    /// A write that takes longer means the peer stopped reading: it is dropped.
    pub write_timeout_ms: u64,
    /// Per-connection socket buffers (tungstenite defaults to 128 KiB each).
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Connections past this get 503.
    pub max_connections: usize,
    /// One user's connections (devices, tabs) past this get 429.
    pub max_connections_per_user: usize,
    /// Frames waiting per connection; past it the connection catches up from the store.
    pub connection_queue: usize,
}

/// A held message waits at most this long for the one before it (ms).
const MAX_GAP_WAIT_MS: u64 = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Push workers; 0 = twice the CPU cores.
    pub workers: usize,
    /// Fan-out jobs waiting per worker.
    pub worker_queue: usize,
    /// Members per fan-out job.
    pub batch_size: usize,
    /// How long a push waits for room in a full connection queue before the
    /// connection is switched to catch-up from the store.
    pub enqueue_timeout_ms: u64,
    /// How often client acks are written to the store.
    pub ack_flush_ms: u64,
    /// Messages read from the store per catch-up step.
    pub catch_up_page: u32,
    /// Most bytes in one `batch` frame (roughly; one message may exceed it alone).
    pub batch_frame_bytes: usize,
    /// How long a connection holds a message that arrived ahead of a missing
    /// one for it to arrive live, before reading the room from the store.
    pub gap_wait_ms: u64,
    /// When a device with no cursors connects, a user's cursors of all but
    /// their 99 most recent devices are forgotten, at most this often per
    /// user and process.
    pub device_prune_every_s: u64,
    /// Only devices that have not acknowledged for this long (and are not
    /// connected) are forgotten that way.
    pub device_forget_idle_s: u64,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            heartbeat_s: 30,
            heartbeat_timeout_s: 90,
            max_frame_bytes: 64 * 1024,
            write_timeout_ms: 10_000,
            read_buffer_bytes: 4096,
            write_buffer_bytes: 8192,
            max_connections: 200_000,
            max_connections_per_user: 256,
            connection_queue: 1024,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            worker_queue: 4096,
            batch_size: 100,
            enqueue_timeout_ms: 100,
            ack_flush_ms: 500,
            catch_up_page: 200,
            batch_frame_bytes: 64 * 1024,
            gap_wait_ms: 25,
            device_prune_every_s: 600,
            device_forget_idle_s: 30 * 86_400,
        }
    }
}

/// Distributed mode (`stacker meta|send|registry|gateway|flusher`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Redis for the registry, routes, node-id leases and gateway streams.
    pub redis_url: String,
    /// Prefix of every Redis key (several clusters can share one Redis).
    pub redis_prefix: String,
    /// Shared secret for internal endpoints (header `x-stacker-internal`); at least 16 bytes.
    pub internal_secret: String,
    /// Where gateways reach the registry.
    pub registry_url: String,
    /// This gateway's id; empty: `gw-<port>`.
    pub gateway_id: String,
    /// The WebSocket URL the registry gives clients for this gateway; empty: from server.listen.
    pub public_ws_url: String,
    /// Connections this gateway accepts (the registry skips it when full).
    pub gateway_capacity: u64,
    /// Gateways heartbeat this often and are dead after `gateway_ttl_ms` without one.
    pub heartbeat_ms: u64,
    pub gateway_ttl_ms: u64,
    /// After a user's last connection closes, a reconnect within this returns to the same gateway.
    pub route_lease_ms: u64,
    /// Send/meta instances cache user routes this long.
    pub route_cache_ms: u64,
    /// How long a cluster process keeps its own copy of a room's member list
    /// (in front of the shared Redis copy): how late it may see a change made by
    /// another process.
    pub member_cache_ms: u64,
    /// Approximate most entries kept per gateway stream.
    pub stream_max_len: usize,
    /// The flusher's pass interval.
    pub flush_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_prefix: "stacker".into(),
            internal_secret: String::new(),
            registry_url: "http://127.0.0.1:8083".into(),
            gateway_id: String::new(),
            public_ws_url: String::new(),
            gateway_capacity: 100_000,
            heartbeat_ms: 2000,
            gateway_ttl_ms: 6000,
            route_lease_ms: 30_000,
            route_cache_ms: 1000,
            member_cache_ms: 1000,
            stream_max_len: 100_000,
            flush_interval_ms: 2000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// An env-filter directive, e.g. `info` or `stacker_server=debug,info`.
    pub level: String,
    /// When set, logs also go to daily-rotated files in this directory.
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Development,
            data_dir: PathBuf::from("./data"),
            node_id: 1,
            server: ServerConfig::default(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            messages: MessagesConfig::default(),
            rooms: RoomsConfig::default(),
            ws: WsConfig::default(),
            delivery: DeliveryConfig::default(),
            cluster: ClusterConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], 8080)), max_body_bytes: 64 * 1024, shutdown_timeout_ms: 10_000 }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 16,
            max_batch: 0,
            writers: 0,
            spread_at: 0,
            queue: 8192,
            enqueue_timeout_ms: 200,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            token_ttl_s: 7 * 24 * 3600,
            max_login_failures_per_minute: 10,
            max_logins_per_user_per_minute: 30,
            max_login_failures_per_user_from_all_addresses_per_minute: 100,
            max_login_failures_per_address_per_minute: 100,
            max_registrations_per_address_per_minute: 60,
            client_address_header: String::new(),
        }
    }
}

impl Default for MessagesConfig {
    fn default() -> Self {
        Self { max_content_bytes: 16 * 1024, history_default_limit: 50, history_max_limit: 200 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Human, level: "info".into(), dir: None }
    }
}

/// A config value that is present but wrong; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Defaults, then the YAML file (if given), then `STACKER_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_over(Config::default(), file)
    }

    /// [`Config::load`] starting from other defaults (a role's own port).
    pub fn load_over(defaults: Config, file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!("config file {} does not exist", path.display())));
            }
            figment = figment.merge(Yaml::file(path));
        }
        // STACKER_TEST_* belong to the test harness and STACKER_CONFIG to the CLI.
        let env = Env::prefixed("STACKER_")
            .filter(|k| {
                let key = k.as_str().to_ascii_lowercase();
                !key.starts_with("test_") && key != "config"
            })
            .split("__");
        let config: Config = figment.merge(env).extract().map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.node_id > stacker_domain::ids::MAX_NODE_ID {
            return fail("node_id", "must be 0 to 1023");
        }
        if self.mode == Mode::Production && self.auth.jwt_secret.is_empty() {
            return fail("auth.jwt_secret", "must be set in production mode (at least 32 bytes)");
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < 32 {
            return fail("auth.jwt_secret", "must be at least 32 bytes");
        }
        let header = &self.auth.client_address_header;
        if !header.is_empty() && axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return fail("auth.client_address_header", "must be an HTTP header name such as x-forwarded-for");
        }
        if self.auth.token_ttl_s == 0 {
            return fail("auth.token_ttl_s", "must be positive");
        }
        if self.server.max_body_bytes < 1024 {
            return fail("server.max_body_bytes", "must be at least 1024");
        }
        if self.messages.max_content_bytes == 0 || self.messages.max_content_bytes >= self.server.max_body_bytes {
            return fail("messages.max_content_bytes", "must be positive and below server.max_body_bytes");
        }
        if self.messages.history_max_limit == 0
            || !(1..=self.messages.history_max_limit).contains(&self.messages.history_default_limit)
        {
            return fail("messages.history_default_limit", "must be 1 to messages.history_max_limit");
        }
        if self.database.queue == 0 || self.database.max_connections == 0 {
            return fail("database", "queue and max_connections must be positive");
        }
        if self.ws.heartbeat_s == 0 || self.ws.heartbeat_timeout_s <= self.ws.heartbeat_s {
            return fail("ws.heartbeat_timeout_s", "must be greater than ws.heartbeat_s (which must be positive)");
        }
        if self.ws.max_frame_bytes < 1024
            || self.ws.connection_queue == 0
            || self.ws.read_buffer_bytes == 0
            || self.ws.max_connections_per_user == 0
        {
            return fail(
                "ws",
                "max_frame_bytes must be at least 1024; connection_queue, read_buffer_bytes and max_connections_per_user positive",
            );
        }
        if self.delivery.batch_size == 0 || self.delivery.worker_queue == 0 || self.delivery.catch_up_page == 0 {
            return fail("delivery", "batch_size, worker_queue and catch_up_page must be positive");
        }
        if self.delivery.device_prune_every_s > 86_400 {
            return fail("delivery.device_prune_every_s", "must be at most 86400 (a day)");
        }
        if self.delivery.device_forget_idle_s > 3650 * 86_400 {
            return fail("delivery.device_forget_idle_s", "must be at most 315360000 (ten years)");
        }
        if self.delivery.gap_wait_ms > MAX_GAP_WAIT_MS {
            return fail("delivery.gap_wait_ms", &format!("must be at most {MAX_GAP_WAIT_MS}"));
        }
        let url = &self.database.url;
        if !url.is_empty()
            && !["sqlite:", "mysql:", "mariadb:", "postgres:", "postgresql:"].iter().any(|p| url.starts_with(p))
        {
            return fail("database.url", "must start with sqlite:, mysql: or postgres:");
        }
        Ok(())
    }

    /// What a distributed role needs on top of [`Config::validate`].
    pub fn validate_cluster(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.cluster.redis_url.is_empty() {
            return fail("cluster.redis_url", "distributed roles need Redis (e.g. redis://127.0.0.1:6379)");
        }
        if self.cluster.internal_secret.len() < 16 {
            return fail("cluster.internal_secret", "distributed roles need a shared secret of at least 16 bytes");
        }
        if self.auth.jwt_secret.is_empty() {
            return fail("auth.jwt_secret", "every role must share one JWT secret: set it explicitly");
        }
        if self.cluster.gateway_ttl_ms <= self.cluster.heartbeat_ms {
            return fail("cluster.gateway_ttl_ms", "must be greater than cluster.heartbeat_ms");
        }
        Ok(())
    }

    /// The database URL, defaulting to a SQLite file under `data_dir`.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!("sqlite://{}?mode=rwc", self.data_dir.join("stacker.db").display())
        } else {
            self.database.url.clone()
        }
    }

    pub fn enqueue_timeout(&self) -> Duration {
        Duration::from_millis(self.database.enqueue_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_yaml(yaml: &str) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!("stacker-config-{}.yaml", rand::random::<u64>()));
        std::fs::File::create(&path).unwrap().write_all(yaml.as_bytes()).unwrap();
        let result = Config::load(Some(&path));
        std::fs::remove_file(&path).ok();
        result
    }

    #[test]
    fn the_example_config_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../stacker.example.yaml");
        let loaded = Config::load(Some(&path)).unwrap();
        let defaults = Config::default();
        assert_eq!(serde_json::to_value(&loaded).unwrap(), serde_json::to_value(&defaults).unwrap());
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.database_url().starts_with("sqlite://"));
    }

    #[test]
    fn yaml_overrides_and_errors_name_the_key() {
        let c = load_yaml("server:\n  listen: 127.0.0.1:9999\nnode_id: 5\n").unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(c.node_id, 5);
        let err = load_yaml("server:\n  listen: nowhere\n").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let err = load_yaml("sever:\n  listen: 127.0.0.1:1\n").unwrap_err().to_string();
        assert!(err.contains("sever"), "{err}");
        let err = load_yaml("node_id: 4000\n").unwrap_err().to_string();
        assert!(err.contains("node_id"), "{err}");
        let err = load_yaml("delivery:\n  gap_wait_ms: 18446744073709551615\n").unwrap_err().to_string();
        assert!(err.contains("delivery.gap_wait_ms"), "{err}");
        let err = load_yaml("mode: production\n").unwrap_err().to_string();
        assert!(err.contains("auth.jwt_secret"), "{err}");
        assert!(Config::load(Some(Path::new("/nonexistent/stacker.yaml"))).is_err());
    }
}
