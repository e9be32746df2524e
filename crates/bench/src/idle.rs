//! `idle`: open N authenticated connections and hold them; report how many
//! were held, the server's RSS per connection and its CPU while idle.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use stacker_proto::Id;
use tokio::sync::watch;

use crate::procstat::{self, round, Watches};
use crate::report::Report;
use crate::scenario::{self, Common, MAX_DURATION_S};
use crate::server::{Kind, Server};
use crate::ws::{self, Dialer, Ws};
use crate::{setup, util};

#[derive(Args, Clone, Debug)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Users the connections belong to (each user gets connections/users devices).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Seconds to hold the connections once all are open (the server pings every 30 s).
    #[arg(long, default_value_t = 35.0)]
    pub hold: f64,
    #[command(flatten)]
    pub common: Common,
}

pub async fn run(args: &IdleArgs) -> Result<Report> {
    let mut server = Server::stacker(&args.common.server).await?;
    let report = run_on(args, &mut server).await;
    Report::after_stop(report, server.stop().await)
}

pub async fn run_on(args: &IdleArgs, server: &mut Server) -> Result<Report> {
    if args.connections == 0 || args.users == 0 {
        bail!("--connections and --users must be at least 1");
    }
    if !(args.hold >= 0.0 && args.hold <= MAX_DURATION_S) {
        bail!("--hold must be in [0, {MAX_DURATION_S}] seconds");
    }
    util::check_fds(args.connections, "idle")?;
    let common = &args.common;
    let run = util::run_id();
    let users = setup::users(server, &run, "i", args.users.min(args.connections), common.setup_concurrency).await?;
    let mut dialer = Dialer::new(Kind::Stacker, server.addr, common.source_addrs);
    let ids: Vec<(Id, String)> = users.iter().map(|u| (u.id, u.token.clone())).collect();
    let gateways = scenario::route(&mut dialer, server, &ids, common).await?;
    let mut report = Report::new("idle", "stacker");
    report.param("connections", args.connections);
    report.param("users", users.len());
    report.param("hold_s", args.hold);
    report.param("source_addrs", dialer.sources().len());
    if let Some(gateways) = gateways {
        report.param("users_per_gateway", gateways);
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = (!server.pids.is_empty()).then(|| procstat::sample_all(&server.pids)).transpose()?;
    let gen_before = procstat::sample(std::process::id())?;

    let started = Instant::now();
    let progress = std::sync::atomic::AtomicUsize::new(0);
    let sockets: Vec<Ws> = stream::iter(0..args.connections)
        .map(|k| {
            let user = &users[k % users.len()];
            let path = format!("/api/ws?device_id=idle{}", k / users.len());
            let (dialer, progress) = (&dialer, &progress);
            async move {
                let ws = dialer.open(&path, Some(&user.token)).await?;
                let done = progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if done % 5000 == 0 {
                    eprintln!("idle: {done} connections open");
                }
                anyhow::Ok(ws)
            }
        })
        .buffer_unordered(common.connect_concurrency.max(1))
        .try_collect()
        .await?;
    let connect_time = started.elapsed();

    // Hold: every socket is read (so pings are answered) until told to stop.
    let (stop_tx, stop_rx) = watch::channel(false);
    let holders: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        msg = futures::StreamExt::next(&mut ws) => {
                            if let Err(e) = ws::text_of(msg) {
                                return Some(format!("{e:#}"));
                            }
                        }
                        _ = stop.changed() => return None,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let watches = Watches::start(&server.pids)?;
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let usage = watches.finish()?;
    let after = (!server.pids.is_empty()).then(|| procstat::sample_all(&server.pids)).transpose()?;
    let gen_after = procstat::sample(std::process::id())?;
    let _ = stop_tx.send(true);
    let mut closed = Vec::new();
    for h in holders {
        if let Ok(Some(reason)) = h.await {
            closed.push(reason);
        }
    }
    let held = args.connections - closed.len();

    report.count("held", "connections held", held as u64);
    report.result(
        "connect_s",
        "connect time",
        round(connect_time.as_secs_f64(), 3),
        format!(
            "{:.2} s ({:.0} connections/s)",
            connect_time.as_secs_f64(),
            util::per_sec(args.connections as u64, connect_time)
        ),
    );
    if let (Some(b), Some(a)) = (before, after) {
        let per_conn = (a.rss_kib as f64 - b.rss_kib as f64) / args.connections as f64;
        report.result(
            "server_rss_before_mib",
            "server rss before",
            round(b.rss_kib as f64 / 1024.0, 1),
            format!("{:.1} MiB", b.rss_kib as f64 / 1024.0),
        );
        report.result(
            "server_rss_after_mib",
            "server rss holding",
            round(a.rss_kib as f64 / 1024.0, 1),
            format!("{:.1} MiB", a.rss_kib as f64 / 1024.0),
        );
        report.result(
            "server_rss_per_conn_kib",
            "server rss / connection",
            round(per_conn, 2),
            format!("{per_conn:.2} KiB"),
        );
    }
    if let Some(s) = &usage.server {
        report.result(
            "server_idle_cpu_pct",
            "server cpu while idle",
            round(s.cpu_pct, 2),
            format!("{:.2}% of one core over {:.0} s", s.cpu_pct, s.wall_s),
        );
    }
    let gen_per_conn = (gen_after.rss_kib as f64 - gen_before.rss_kib as f64) / args.connections as f64;
    report.result(
        "generator_rss_per_conn_kib",
        "generator rss / connection",
        round(gen_per_conn, 2),
        format!("{gen_per_conn:.2} KiB"),
    );
    report.usage(&usage);
    if !closed.is_empty() {
        report.fail(format!(
            "{} of {} connections were closed while idle; first: {}",
            closed.len(),
            args.connections,
            closed[0]
        ));
    }
    if let Err(e) = server.check_alive() {
        report.fail(format!("{e:#}"));
    }
    Ok(report)
}
