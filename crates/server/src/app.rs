//! Turns a [`Config`] into running services and serves them.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stacker_domain::accounts::{Accounts, AuthLimits};
use stacker_domain::auth::Tokens;
use stacker_domain::cluster::Registry;
use stacker_domain::commit::{CommitConfig, GroupCommitter, DEFAULT_SPREAD_AT};
use stacker_domain::delivery::remote::{BusFanout, LocalGateway};
use stacker_domain::delivery::{self, Delivery, SessionLimits};
use stacker_domain::fanout::Fanout;
use stacker_domain::ids::IdGenerator;
use stacker_domain::membership::MemberCache;
use stacker_domain::messages::{MessageLimits, Messages};
use stacker_domain::rooms::{RoomLimits, Rooms};
use stacker_domain::store::Store;
use stacker_redis::RedisCluster;
use stacker_store_sql::{SqlOptions, SqlStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// What a distributed-mode process shares with the rest of the cluster.
pub struct ClusterContext {
    pub redis: RedisCluster,
    pub fanout: Arc<BusFanout>,
    /// This process's instance id (gateway id for gateways).
    pub instance: String,
}

/// Everything a request handler needs, shared by all of them.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub accounts: Accounts,
    pub rooms: Arc<Rooms>,
    pub messages: Messages,
    pub delivery: Arc<Delivery>,
    /// Named in `hello`.
    pub gateway_id: String,
    /// Cancelled when the process starts shutting down.
    pub shutdown: CancellationToken,
    /// WebSocket connection tasks, awaited at shutdown.
    pub ws_tasks: TaskTracker,
    /// Set in distributed mode.
    pub cluster: Option<ClusterContext>,
}

impl App {
    /// Connects the store (running migrations) and starts the services, all in
    /// this process (standalone).
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_in(config, None).await
    }

    /// Like [`App::build`] for one process of a cluster: pushes go through
    /// Redis streams, and the snowflake node id is leased from Redis. A
    /// `gateway` (its `instance` id is its gateway id) hands the pushes for
    /// its own connections over in place.
    pub async fn build_distributed(
        config: Config,
        redis: RedisCluster,
        instance: String,
        gateway: bool,
    ) -> anyhow::Result<App> {
        Self::build_in(config, Some((redis, instance, gateway))).await
    }

    async fn build_in(config: Config, cluster: Option<(RedisCluster, String, bool)>) -> anyhow::Result<App> {
        // Install the recorder before anything records.
        crate::telemetry::prometheus();
        let url = config.database_url();
        let store = SqlStore::connect(
            &url,
            SqlOptions { max_connections: config.database.max_connections, ..Default::default() },
        )
        .await
        .with_context(|| format!("database: cannot open {}", redact(&url)))?;
        let writers = match config.database.writers {
            0 => store.recommended_writers(),
            n => n,
        };
        let max_batch = match config.database.max_batch {
            0 => store.recommended_max_batch(),
            n => n,
        };
        let store: Arc<dyn Store> = Arc::new(store);
        let secret = jwt_secret(&config)?;
        let node_id = match &cluster {
            Some((redis, instance, _)) => lease_node_id(redis.clone(), instance.clone()).await?,
            None => config.node_id,
        };
        let ids = Arc::new(IdGenerator::new(node_id)?);
        let tokens = Tokens::new(&secret, config.auth.token_ttl_s);
        let accounts = Accounts::new(store.clone(), ids.clone(), tokens, auth_limits(&config)).await?;
        // Standalone: this process makes every membership change and invalidates
        // its own cache, so lists live long. A cluster process also shares a Redis
        // tier and keeps its own copy only briefly (other processes change rooms).
        let members = Arc::new(match &cluster {
            Some((redis, _, _)) => MemberCache::new(
                store.clone(),
                Some(Arc::new(redis.clone())),
                Duration::from_millis(config.cluster.member_cache_ms),
            ),
            None => MemberCache::new(store.clone(), None, Duration::from_secs(600)),
        });
        let delivery = Delivery::start(store.clone(), members.clone(), delivery_config(&config));
        let cluster = cluster.map(|(redis, instance, gateway)| {
            let local = gateway.then(|| LocalGateway {
                id: instance.clone(),
                hub: delivery.hub().clone(),
                enqueue_timeout: delivery.enqueue_timeout(),
            });
            let fanout = Arc::new(BusFanout::new(
                Arc::new(redis.clone()),
                Arc::new(redis.clone()),
                members.clone(),
                Duration::from_millis(config.cluster.route_cache_ms),
                config.delivery.batch_size,
                local,
            ));
            ClusterContext { redis, fanout, instance }
        });
        let fanout: Arc<dyn Fanout> = match &cluster {
            Some(c) => c.fanout.clone(),
            None => delivery.clone(),
        };
        let rooms = Arc::new(Rooms::new(store.clone(), ids.clone(), fanout.clone(), members, room_limits(&config)));
        let committer = GroupCommitter::start(
            store.clone(),
            fanout.clone(),
            CommitConfig {
                writers,
                max_batch,
                spread_at: match config.database.spread_at {
                    0 => DEFAULT_SPREAD_AT,
                    n => n,
                },
                queue: config.database.queue,
                enqueue_timeout: config.enqueue_timeout(),
            },
        );
        let messages = Messages::new(store.clone(), rooms.clone(), committer, ids, message_limits(&config), fanout);
        let gateway_id = match &cluster {
            Some(c) => c.instance.clone(),
            None => format!("standalone-{}", config.node_id),
        };
        Ok(App {
            config,
            store,
            accounts,
            rooms,
            messages,
            delivery,
            gateway_id,
            shutdown: CancellationToken::new(),
            ws_tasks: TaskTracker::new(),
            cluster,
        })
    }

    /// Applies the keys of `new` that can change while running (messages.*,
    /// auth.max_*_per_minute, rooms.*; log.level is the caller's, see
    /// [`crate::telemetry::Logging`]). Returns the other keys that differ from
    /// the running config: they take effect after a restart.
    pub fn reload(&self, new: &Config) -> Vec<&'static str> {
        self.messages.set_limits(message_limits(new));
        self.accounts.set_limits(auth_limits(new));
        self.rooms.set_limits(room_limits(new));
        let old = &self.config;
        [
            ("mode", old.mode != new.mode),
            ("data_dir", old.data_dir != new.data_dir),
            ("node_id", old.node_id != new.node_id),
            ("server", differs(&old.server, &new.server)),
            ("database", differs(&old.database, &new.database)),
            ("auth.jwt_secret", old.auth.jwt_secret != new.auth.jwt_secret),
            ("auth.token_ttl_s", old.auth.token_ttl_s != new.auth.token_ttl_s),
            ("auth.client_address_header", old.auth.client_address_header != new.auth.client_address_header),
            ("ws", differs(&old.ws, &new.ws)),
            ("delivery", differs(&old.delivery, &new.delivery)),
            ("log.format", old.log.format != new.log.format),
            ("log.dir", old.log.dir != new.log.dir),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    pub fn delivery_enqueue_timeout(&self) -> Duration {
        self.delivery.enqueue_timeout()
    }
}

fn room_limits(config: &Config) -> RoomLimits {
    RoomLimits {
        creations_per_user: config.rooms.max_creations_per_user_per_minute,
        searches_per_user: config.rooms.max_searches_per_user_per_minute,
        joins_per_user: config.rooms.max_joins_per_user_per_minute,
    }
}

fn auth_limits(config: &Config) -> AuthLimits {
    AuthLimits {
        failures_per_user: config.auth.max_login_failures_per_minute,
        logins_per_user: config.auth.max_logins_per_user_per_minute,
        failures_per_address: config.auth.max_login_failures_per_address_per_minute,
        failures_per_user_anywhere: config.auth.max_login_failures_per_user_from_all_addresses_per_minute,
        registrations_per_address: config.auth.max_registrations_per_address_per_minute,
    }
}

fn message_limits(config: &Config) -> MessageLimits {
    MessageLimits {
        max_content_bytes: config.messages.max_content_bytes,
        history_default: config.messages.history_default_limit,
        history_max: config.messages.history_max_limit,
    }
}

/// Leases a snowflake node id for this instance and keeps renewing it.
async fn lease_node_id(redis: RedisCluster, instance: String) -> anyhow::Result<u16> {
    const TTL: Duration = Duration::from_secs(30);
    let id = redis.lease_node_id(&instance, TTL).await?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TTL / 3).await;
            match redis.lease_node_id(&instance, TTL).await {
                Ok(renewed) if renewed == id => {}
                Ok(other) => tracing::error!(id, other, "lost the snowflake node id lease; restart this instance"),
                Err(e) => tracing::warn!(error = %e, "cannot renew the snowflake node id lease"),
            }
        }
    });
    tracing::info!(node_id = id, "leased snowflake node id");
    Ok(id)
}

/// Whether two config values differ (compared by their serialized form).
fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

fn delivery_config(config: &Config) -> delivery::DeliveryConfig {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let d = &config.delivery;
    delivery::DeliveryConfig {
        workers: if d.workers == 0 { cores * 2 } else { d.workers },
        worker_queue: d.worker_queue,
        batch_size: d.batch_size,
        connection_queue: config.ws.connection_queue,
        enqueue_timeout: Duration::from_millis(d.enqueue_timeout_ms),
        max_connections: config.ws.max_connections,
        max_connections_per_user: config.ws.max_connections_per_user,
        session: SessionLimits {
            catch_up_page: d.catch_up_page,
            batch_bytes: d.batch_frame_bytes,
            gap_wait: Duration::from_millis(d.gap_wait_ms),
            ..SessionLimits::default()
        },
        ack_flush_interval: Duration::from_millis(d.ack_flush_ms),
        device_prune_every: Duration::from_secs(d.device_prune_every_s),
        device_forget_idle: Duration::from_secs(d.device_forget_idle_s),
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting,
/// finishes in-flight requests and stores every accepted message, within
/// `server.shutdown_timeout_ms`.
pub async fn run(
    listener: TcpListener,
    app: impl Into<Arc<App>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_parts(listener, app.into(), crate::http::Parts::ALL, shutdown).await
}

/// [`run`] serving only `parts` of the API (a distributed role).
pub async fn run_parts(
    listener: TcpListener,
    app: Arc<App>,
    parts: crate::http::Parts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = crate::http::router_for(app.clone(), parts);
    let timeout = Duration::from_millis(app.config.server.shutdown_timeout_ms);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    // The peer's address feeds the per-address login and registration limits.
    let router = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let serve = axum::serve(no_delay(listener), router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let server = tokio::spawn(async move { serve.await });
    let _ = stopping_rx.await;
    tracing::info!("shutting down: closing connections (1012) and draining requests");
    // WebSocket tasks see the token and close with 1012 after what they queued.
    app.shutdown.cancel();
    app.ws_tasks.close();
    let drained = tokio::time::timeout(timeout, async {
        app.ws_tasks.wait().await;
        let _ = server.await;
        app.messages.shutdown().await;
        app.delivery.shutdown(1012, "server restarting: reconnect").await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?timeout, "shutdown timed out; exiting with work in flight");
    }
    Ok(())
}

/// Accepted sockets with Nagle's algorithm off: pushes are small frames that
/// must leave at once, not wait for the peer's delayed ACK (up to 40 ms).
/// (A nameable type, so that axum can hand handlers the peer's address.)
pub(crate) fn no_delay(listener: TcpListener) -> axum::serve::TapIo<TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set_nodelay(socket: &mut tokio::net::TcpStream) {
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    }
    listener.tap_io(set_nodelay as fn(&mut tokio::net::TcpStream))
}

/// The configured secret, or (development only) one generated on first start
/// and kept in the data directory.
fn jwt_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if !config.auth.jwt_secret.is_empty() {
        return Ok(config.auth.jwt_secret.as_bytes().to_vec());
    }
    let path = config.data_dir.join("jwt_secret");
    tracing::warn!(
        path = %path.display(),
        "auth.jwt_secret is not set: using a secret generated in the data directory; set one in production"
    );
    keep_private(&path).with_context(|| format!("cannot make {} private", path.display()))?;
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if existing.len() >= 32 {
            return Ok(existing.as_bytes().to_vec());
        }
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    write_private(&path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret.into_bytes())
}

/// An existing secret file that others may read (copied, restored from a
/// backup, made by hand) is made readable by its owner only.
fn keep_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the JWT secret file was readable by others: made private (0600)");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(path)?, contents.as_bytes())
}

/// A database URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    /// A generated secret is private, and an existing one that others could
    /// read is made private before it is used.
    #[cfg(unix)]
    #[test]
    fn the_generated_jwt_secret_stays_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("stacker-jwt-{:016x}", rand::random::<u64>()));
        let config = crate::Config { data_dir: dir.clone(), ..crate::Config::default() };
        let mode = || std::fs::metadata(dir.join("jwt_secret")).unwrap().permissions().mode() & 0o777;
        let first = super::jwt_secret(&config).unwrap();
        assert_eq!(mode(), 0o600);
        std::fs::set_permissions(dir.join("jwt_secret"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(super::jwt_secret(&config).unwrap(), first, "the same secret");
        assert_eq!(mode(), 0o600, "made private again");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("mysql://root:pw@h:3306/db"), "mysql://root:***@h:3306/db");
        assert_eq!(super::redact("sqlite://./data/x.db"), "sqlite://./data/x.db");
    }
}
