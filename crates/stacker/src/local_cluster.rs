//! `stacker cluster`: a whole distributed deployment on this machine, each
//! role its own process (registry, meta, send ×N, gateway ×N, flusher), for
//! trying distributed mode and for tests. Ctrl-C or SIGTERM stops them all.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stacker_server::Config;

pub struct Layout {
    pub send: usize,
    pub gateways: usize,
    /// SPEC §1's ports with base 8080: send base+1 (+10 for each further one),
    /// meta base+2, registry base+3, gateways base+4 (+10 each), flusher base+5.
    pub base_port: u16,
}

struct Member {
    role: &'static str,
    port: u16,
    child: Child,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

pub async fn run(
    config: Config,
    layout: Layout,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if config.database.url.is_empty() || config.database.url.starts_with("sqlite") {
        anyhow::bail!(
            "config: database.url: a cluster needs MySQL/MariaDB or PostgreSQL, e.g. \
             STACKER_DATABASE__URL=mysql://root@127.0.0.1:3306/test"
        );
    }
    let redis = if config.cluster.redis_url.is_empty() {
        "redis://127.0.0.1:6379".to_string()
    } else {
        config.cluster.redis_url.clone()
    };
    let internal =
        if config.cluster.internal_secret.is_empty() { random_hex(24) } else { config.cluster.internal_secret.clone() };
    let jwt = if config.auth.jwt_secret.is_empty() { random_hex(32) } else { config.auth.jwt_secret.clone() };
    let base = layout.base_port;
    let registry_port = base + 3;
    let mut plan: Vec<(&'static str, u16)> = vec![("registry", registry_port), ("meta", base + 2)];
    plan.extend((0..layout.send).map(|i| ("send", base + 1 + 10 * i as u16)));
    plan.extend((0..layout.gateways).map(|i| ("gateway", base + 4 + 10 * i as u16)));
    plan.push(("flusher", base + 5));

    let exe = std::env::current_exe()?;
    let mut members: Vec<Member> = Vec::new();
    for (role, port) in plan {
        let child = Command::new(&exe)
            .arg(role)
            .env("STACKER_DATABASE__URL", &config.database.url)
            .env("STACKER_CLUSTER__REDIS_URL", &redis)
            .env("STACKER_CLUSTER__INTERNAL_SECRET", &internal)
            .env("STACKER_AUTH__JWT_SECRET", &jwt)
            .env("STACKER_CLUSTER__REGISTRY_URL", format!("http://127.0.0.1:{registry_port}"))
            .env("STACKER_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .spawn()?;
        members.push(Member { role, port, child });
        // One at a time: the first start applies migrations, the registry must be up for gateways.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Some(m) = members.last_mut() {
                if let Some(status) = m.child.try_wait()? {
                    stop_all(&mut members);
                    anyhow::bail!("{role} on port {port} exited at start ({status})");
                }
            }
            if Instant::now() > deadline {
                stop_all(&mut members);
                anyhow::bail!("{role} on port {port} did not start within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A gateway accepts TCP connections before its first heartbeat registers
    // it; "up" means the registry can already place a user.
    let registry = stacker_client::Client::new(format!("http://127.0.0.1:{registry_port}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry.available_gateway().await.is_err() {
        if Instant::now() > deadline {
            stop_all(&mut members);
            anyhow::bail!("no gateway registered with the registry within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("stacker cluster is up:");
    for m in &members {
        println!("  {:<9} http://127.0.0.1:{}", m.role, m.port);
    }
    println!("clients: log in at meta, send at any send instance, ask the registry where to connect:");
    println!(
        "  curl -H 'Authorization: Bearer <token>' 'http://127.0.0.1:{registry_port}/registry/gateway/available?user_id=<id>'"
    );

    // Stop on signal, or when any member dies on its own.
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for m in members.iter_mut() {
                if let Ok(Some(status)) = m.child.try_wait() {
                    return format!("{} on port {} exited ({status})", m.role, m.port);
                }
            }
        }
    };
    let died = tokio::select! {
        _ = shutdown => None,
        why = watch => Some(why),
    };
    stop_all(&mut members);
    match died {
        Some(why) => anyhow::bail!("{why}; stopped the others"),
        None => Ok(()),
    }
}

/// SIGTERM to every member (gateways close sockets with 1012), then wait.
fn stop_all(members: &mut [Member]) {
    for m in members.iter().rev() {
        let _ = Command::new("kill").args(["-TERM", &m.child.id().to_string()]).status();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for m in members.iter_mut() {
        while matches!(m.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = m.child.kill();
        let _ = m.child.wait();
    }
}
