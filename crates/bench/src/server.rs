//! The process under load: a running Stacker (`--url`), one spawned in a
//! temporary data dir (`--spawn PATH`), or the built-in baseline server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tokio::process::{Child, Command};

use crate::util;

/// Where the Stacker server under test comes from.
#[derive(Args, Clone, Debug, Default)]
pub struct ServerArgs {
    /// Base URL of a running Stacker (loopback only), e.g. http://127.0.0.1:8080.
    #[arg(long, conflicts_with = "spawn")]
    pub url: Option<String>,
    /// Spawn this `stacker` binary (e.g. target/release/stacker) on a free
    /// 127.0.0.1 port with a fresh temporary data dir, and stop it afterwards.
    #[arg(long, value_name = "PATH_TO_STACKER")]
    pub spawn: Option<PathBuf>,
    /// Pid of the server given with --url, to report its CPU and RSS from
    /// /proc; repeat it for every process of a cluster (their CPU and RSS are summed).
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,
    /// Distributed mode: the registry's URL. --url is then meta's (accounts and
    /// rooms), and each WebSocket goes to the gateway the registry names for its
    /// user (`GET /registry/gateway/available`); sends travel over the WebSocket.
    #[arg(long, requires = "url")]
    pub registry_url: Option<String>,
    /// Distributed mode: a send instance's URL, for the HTTP `send_message`
    /// calls of the reconnect and history scenarios (default: --url).
    #[arg(long, requires = "url")]
    pub send_url: Option<String>,
    /// Extra environment for the spawned server (repeatable), e.g.
    /// --server-env STACKER_DELIVERY__WORKERS=2
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
}

/// Which kind of server a [`Server`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Stacker,
    Baseline,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Stacker => "stacker",
            Kind::Baseline => "baseline",
        }
    }
}

pub struct Server {
    pub kind: Kind,
    /// `http://ip:port` (Stacker's API; for the baseline only its address matters).
    pub base: String,
    pub addr: SocketAddr,
    /// The processes whose CPU and RSS are reported (empty: not measured).
    pub pids: Vec<u32>,
    /// Distributed mode: where WebSocket clients ask for their gateway.
    pub registry: Option<String>,
    /// Distributed mode: where HTTP sends go (else `base`).
    pub send_base: Option<String>,
    child: Option<Child>,
    dir: Option<PathBuf>,
    log: Option<PathBuf>,
}

impl Server {
    /// A running Stacker at `--url`, or one spawned from `--spawn`.
    pub async fn stacker(args: &ServerArgs) -> Result<Server> {
        if let Some(path) = &args.spawn {
            return Self::spawn_stacker(path, &args.server_env).await;
        }
        let base = args.url.clone().unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let base = base.trim_end_matches('/').to_string();
        let addr = util::loopback_addr(&base)?;
        let server = Server {
            kind: Kind::Stacker,
            base,
            addr,
            pids: args.server_pids.clone(),
            registry: args.registry_url.as_ref().map(|r| r.trim_end_matches('/').to_string()),
            send_base: args.send_url.as_ref().map(|r| r.trim_end_matches('/').to_string()),
            child: None,
            dir: None,
            log: None,
        };
        for url in server.registry.iter().chain(&server.send_base) {
            util::loopback_addr(url)?;
        }
        server.wait_ready(Duration::from_secs(5)).await?;
        Ok(server)
    }

    async fn spawn_stacker(path: &Path, extra_env: &[String]) -> Result<Server> {
        let port = util::free_port()?;
        let dir = std::env::temp_dir().join(format!("stacker-bench-{}-{}", std::process::id(), util::run_id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let secret =
            format!("stacker-bench-secret-{}-{}-{}-{}", util::run_id(), util::run_id(), util::run_id(), util::run_id());
        let mut cmd = Command::new(path);
        // Only the settings given here (and --server-env): none inherited from this shell.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STACKER_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("standalone")
            .env("STACKER_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("STACKER_DATA_DIR", &dir)
            .env("STACKER_AUTH__JWT_SECRET", secret)
            .env("STACKER_LOG__LEVEL", "warn")
            .env("STACKER_WS__MAX_CONNECTIONS", "1000000")
            // Every bench user registers from this one address.
            .env("STACKER_AUTH__MAX_REGISTRATIONS_PER_ADDRESS_PER_MINUTE", "0")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        for kv in extra_env {
            let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--server-env {kv}: expected KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {}", path.display()))?;
        let pids = child.id().into_iter().collect();
        let base = format!("http://127.0.0.1:{port}");
        let addr = util::loopback_addr(&base)?;
        let server = Server {
            kind: Kind::Stacker,
            base,
            addr,
            pids,
            registry: None,
            send_base: None,
            child: Some(child),
            dir: Some(dir),
            log: Some(log),
        };
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    /// The baseline broadcast server at `url`, or this binary's
    /// `baseline-server` spawned on a free port.
    pub async fn baseline(url: Option<&str>) -> Result<Server> {
        if let Some(url) = url {
            let addr = util::loopback_addr(url)?;
            return Ok(Server {
                kind: Kind::Baseline,
                base: format!("http://{addr}"),
                addr,
                pids: Vec::new(),
                registry: None,
                send_base: None,
                child: None,
                dir: None,
                log: None,
            });
        }
        let exe = std::env::current_exe().context("cannot find this executable to spawn the baseline server")?;
        let port = util::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(exe)
            .args(["baseline-server", "--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot spawn the baseline server")?;
        let server = Server {
            kind: Kind::Baseline,
            base: format!("http://{addr}"),
            addr,
            pids: child.id().into_iter().collect(),
            registry: None,
            send_base: None,
            child: Some(child),
            dir: None,
            log: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("the baseline server did not start listening on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let url = format!("{}/readyz", self.base);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(200..=299) = http_status(&url).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the server at {} was not ready within {timeout:?}{}", self.base, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails loudly when a spawned server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let tail = self.log_tail();
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("the {} server exited during the run ({status}){tail}", self.kind.name());
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let Some(log) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n--- last lines of {} ---\n{tail}", log.display())
        }
    }

    /// Stops a spawned server (SIGTERM, then kill after 20 s) and removes its data dir.
    pub async fn stop(mut self) -> Result<()> {
        let result = self.stop_child().await;
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        result
    }

    async fn stop_child(&mut self) -> Result<()> {
        let tail = self.log_tail();
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the {} server had already exited ({status}){tail}", self.kind.name());
        }
        if let Some(pid) = child.id() {
            // SAFETY: kill sends a signal to the child we spawned.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("the server exited with {status} on SIGTERM{tail}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = child.kill().await;
                bail!("the server did not stop within 20 s of SIGTERM (killed){tail}")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The HTTP status of a bare `GET url` (no envelope handling; for readiness).
pub async fn http_status(url: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = util::loopback_addr(url)?;
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap_or_else(|| "/".into());
    let mut stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect timeout"))??;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("read timeout"))??;
    let head = String::from_utf8_lossy(&buf);
    Ok(head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
}
