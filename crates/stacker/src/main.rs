//! `stacker`: the standalone server (default) and the distributed roles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::net::TcpSocket;

mod local_cluster;

/// mimalloc instead of glibc malloc: glibc keeps each freed 19 MiB argon2
/// block in the arena of whichever blocking thread ran it (hundreds of MiB
/// after a login burst), and mimalloc is faster for the many small
/// per-message allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use stacker_server::cluster::{run_role, Role as ClusterRole};
use stacker_server::{App, Config};

#[derive(Parser)]
#[command(name = "stacker", version, about = "Stacker instant-messaging backend")]
struct Cli {
    /// YAML config file; every key can also be set as STACKER_<SECTION>__<KEY>.
    #[arg(long, short, global = true, env = "STACKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    role: Option<Role>,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// Every role in one process on one port (default): HTTP API, WebSocket, metrics.
    Standalone,
    /// Distributed: users, auth, rooms and membership (port 8082).
    Meta,
    /// Distributed: stateless send path (port 8081).
    Send,
    /// Distributed: gateway registry, load ranking and user routes (port 8083).
    Registry,
    /// Distributed: WebSocket gateway consuming its Redis stream (port 8084).
    Gateway,
    /// Distributed: reclaims the streams of dead gateways (ops routes on 8085).
    Flusher,
    /// Starts a whole cluster on this machine (registry, meta, send ×2, gateway ×2,
    /// flusher) as child processes; needs MariaDB/PostgreSQL and Redis.
    Cluster {
        #[arg(long, default_value_t = 2)]
        send: usize,
        #[arg(long, default_value_t = 2)]
        gateways: usize,
        /// send = base+1 (+10 each), meta = base+2, registry = base+3, gateways = base+4 (+10 each), flusher = base+5.
        #[arg(long, default_value_t = 8080)]
        base_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = cli.role.unwrap_or(Role::Standalone);
    let cluster_role = match role {
        Role::Standalone => None,
        Role::Meta => Some(ClusterRole::Meta),
        Role::Send => Some(ClusterRole::Send),
        Role::Registry => Some(ClusterRole::Registry),
        Role::Gateway => Some(ClusterRole::Gateway),
        Role::Flusher => Some(ClusterRole::Flusher),
        Role::Cluster { .. } => None,
    };
    // Each role listens on its own default port unless configured otherwise.
    let mut defaults = Config::default();
    if let Some(r) = cluster_role {
        defaults.server.listen.set_port(r.default_port());
    }
    let config = match Config::load_over(defaults, cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stacker: {e}");
            return ExitCode::from(2);
        }
    };
    if cluster_role.is_some() {
        if let Err(e) = config.validate_cluster() {
            eprintln!("stacker: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stacker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match (role, cluster_role) {
        (Role::Cluster { send, gateways, base_port }, _) => {
            let layout = local_cluster::Layout { send, gateways, base_port };
            runtime.block_on(local_cluster::run(config, layout, shutdown_signal()))
        }
        (_, None) => runtime.block_on(standalone(config, cli.config)),
        (_, Some(role)) => runtime.block_on(distributed(role, config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stacker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn standalone(config: Config, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let logging = stacker_server::telemetry::init_logging(&config.log)?;
    let listen = config.server.listen;
    let app = Arc::new(App::build(config).await?);
    let listener = bind(listen)?;
    tracing::info!(addr = %listener.local_addr()?, "stacker standalone listening");
    tokio::spawn(reload_on_sighup(app.clone(), logging, config_file));
    stacker_server::run(listener, app, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn distributed(role: ClusterRole, config: Config) -> anyhow::Result<()> {
    let _logging = stacker_server::telemetry::init_logging(&config.log)?;
    let listen = config.server.listen;
    let listener = bind(listen)?;
    tracing::info!(role = role.name(), addr = %listener.local_addr()?, "stacker role listening");
    run_role(role, config, listener, shutdown_signal()).await?;
    tracing::info!(role = role.name(), "stopped");
    Ok(())
}

/// Connections the kernel may hold ready for `accept` (Linux caps this at
/// `net.core.somaxconn`: 4,096 by default since Linux 5.4, 128 before). tokio's `TcpListener::bind` asks
/// for 1,024, and a reconnect storm of 10,000 clients overflowed it: the
/// dropped handshakes were retried only on the clients' timers, and the storm
/// took 30 s instead of a few.
const LISTEN_BACKLOG: u32 = 65_535;

fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = (|| {
        let socket = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
        // As tokio's own `bind` (on Windows it would let another process share the port).
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(listen)?;
        socket.listen(LISTEN_BACKLOG)
    })();
    listener.map_err(|e| anyhow::anyhow!("config: server.listen: cannot bind {listen}: {e}"))
}

/// SIGHUP re-reads the config (file and environment) and applies the keys that
/// can change live; a config that does not load is reported and ignored.
async fn reload_on_sighup(app: Arc<App>, logging: stacker_server::telemetry::Logging, file: Option<PathBuf>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
        while hangups.recv().await.is_some() {
            match Config::load(file.as_deref()) {
                Ok(new) => {
                    if let Err(e) = logging.set_level(&new.log.level) {
                        tracing::error!(error = %e, "config reload: log.level not applied");
                    }
                    let restart = app.reload(&new);
                    tracing::info!(
                        needs_restart = ?restart,
                        "config reloaded: applied log.level, messages.*, rooms.*, auth.max_*_per_minute"
                    );
                }
                Err(e) => tracing::error!(error = %e, "config reload failed; keeping the running config"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (app, logging, file);
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_accepts_and_reports_a_taken_address() {
        let listener = bind("127.0.0.1:0".parse().expect("an address")).expect("bind a free port");
        let addr = listener.local_addr().expect("the bound address");
        let client = tokio::net::TcpStream::connect(addr);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        connected.expect("the client connects");
        accepted.expect("the listener accepts");

        let taken = bind(addr).expect_err("the address is in use");
        assert!(taken.to_string().contains(&format!("cannot bind {addr}")), "{taken}");
    }
}
