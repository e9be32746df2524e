//! Turns a [`Config`] into running services and serves them.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stacker_domain::accounts::Accounts;
use stacker_domain::auth::Tokens;
use stacker_domain::commit::{CommitConfig, GroupCommitter};
use stacker_domain::delivery::{self, Delivery, SessionLimits};
use stacker_domain::ids::IdGenerator;
use stacker_domain::messages::{MessageLimits, Messages};
use stacker_domain::rooms::Rooms;
use stacker_domain::store::Store;
use stacker_store_sql::{SqlOptions, SqlStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

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
}

impl App {
    /// Connects the store (running migrations) and starts the services.
    pub async fn build(config: Config) -> anyhow::Result<App> {
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
        let store: Arc<dyn Store> = Arc::new(store);
        let secret = jwt_secret(&config)?;
        let ids = Arc::new(IdGenerator::new(config.node_id)?);
        let tokens = Tokens::new(&secret, config.auth.token_ttl_s);
        let accounts =
            Accounts::new(store.clone(), ids.clone(), tokens, config.auth.max_login_failures_per_minute).await?;
        let delivery = Delivery::start(store.clone(), delivery_config(&config));
        let rooms = Arc::new(Rooms::new(store.clone(), ids.clone(), delivery.clone()));
        let committer = GroupCommitter::start(
            store.clone(),
            delivery.clone(),
            CommitConfig {
                writers,
                max_batch: config.database.max_batch,
                queue: config.database.queue,
                enqueue_timeout: config.enqueue_timeout(),
            },
        );
        let messages =
            Messages::new(store.clone(), rooms.clone(), committer, ids, message_limits(&config), delivery.clone());
        let gateway_id = format!("standalone-{}", config.node_id);
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
        })
    }

    /// Applies the keys of `new` that can change while running (messages.*,
    /// auth.max_login_failures_per_minute; log.level is the caller's, see
    /// [`crate::telemetry::Logging`]). Returns the other keys that differ from
    /// the running config: they take effect after a restart.
    pub fn reload(&self, new: &Config) -> Vec<&'static str> {
        self.messages.set_limits(message_limits(new));
        self.accounts.set_max_failures_per_minute(new.auth.max_login_failures_per_minute);
        let old = &self.config;
        [
            ("mode", old.mode != new.mode),
            ("data_dir", old.data_dir != new.data_dir),
            ("node_id", old.node_id != new.node_id),
            ("server", differs(&old.server, &new.server)),
            ("database", differs(&old.database, &new.database)),
            ("auth.jwt_secret", old.auth.jwt_secret != new.auth.jwt_secret),
            ("auth.token_ttl_s", old.auth.token_ttl_s != new.auth.token_ttl_s),
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

fn message_limits(config: &Config) -> MessageLimits {
    MessageLimits {
        max_content_bytes: config.messages.max_content_bytes,
        history_default: config.messages.history_default_limit,
        history_max: config.messages.history_max_limit,
    }
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
        session: SessionLimits {
            catch_up_page: d.catch_up_page,
            batch_bytes: d.batch_frame_bytes,
            ..SessionLimits::default()
        },
        ack_flush_interval: Duration::from_millis(d.ack_flush_ms),
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
    let app: Arc<App> = app.into();
    let router = crate::http::router(app.clone());
    let timeout = Duration::from_millis(app.config.server.shutdown_timeout_ms);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
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
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("mysql://root:pw@h:3306/db"), "mysql://root:***@h:3306/db");
        assert_eq!(super::redact("sqlite://./data/x.db"), "sqlite://./data/x.db");
    }
}
