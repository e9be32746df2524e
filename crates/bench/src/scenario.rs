//! Options every scenario shares, and the `direct` and `group` scenarios.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use crate::procstat::round;
use crate::report::Report;
use crate::server::{Kind, Server, ServerArgs};
use crate::traffic::{self, Load, MemberSpec, RoomSpec};
use crate::ws::Dialer;
use crate::{setup, util};
use stacker_proto::Id;

/// Longest any load phase may be asked to run.
pub const MAX_DURATION_S: f64 = 600.0;

#[derive(Args, Clone, Debug)]
pub struct Common {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Spread client sockets over this many loopback source addresses (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub source_addrs: u8,
    /// WebSocket connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Users registered (two argon2 hashes each) / rooms created at once during setup.
    #[arg(long, default_value_t = 8)]
    pub setup_concurrency: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct TrafficArgs {
    /// Messages per second over all senders; 0 = flat out (each sender keeps --window sends in flight).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of sending (at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Sends in flight (unacknowledged) per sender.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Padding bytes in each message's content.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Seconds after the sending phase within which every connection must have everything.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Which server to load: Stacker, or the built-in bare broadcast server.
    #[arg(long, value_enum, default_value = "stacker")]
    pub target: Kind,
    /// ws://127.0.0.1:PORT of a running `stacker-bench baseline-server`; spawned from this binary when absent.
    #[arg(long)]
    pub baseline_url: Option<String>,
    /// Run the same load against Stacker and then the baseline, and report Stacker as a fraction of it.
    #[arg(long)]
    pub vs_baseline: bool,
}

impl TrafficArgs {
    pub fn load(&self, common: &Common) -> Result<Load> {
        if !(self.duration > 0.0 && self.duration <= MAX_DURATION_S) {
            bail!("--duration must be in (0, {MAX_DURATION_S}] seconds");
        }
        if !(self.rate >= 0.0 && self.rate <= 10_000_000.0) {
            bail!("--rate must be between 0 (flat out) and 10,000,000");
        }
        if !(self.drain_timeout > 0.0 && self.drain_timeout <= MAX_DURATION_S) {
            bail!("--drain-timeout must be in (0, {MAX_DURATION_S}] seconds");
        }
        Ok(Load {
            rate: self.rate,
            duration: Duration::from_secs_f64(self.duration),
            window: self.window.clamp(1, 4096),
            payload: self.payload.min(8192),
            drain_timeout: Duration::from_secs_f64(self.drain_timeout),
            connect_concurrency: common.connect_concurrency,
        })
    }

    fn targets(&self) -> Vec<Kind> {
        if self.vs_baseline {
            vec![Kind::Stacker, Kind::Baseline]
        } else {
            vec![self.target]
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct DirectArgs {
    /// Pairs of users, each pair in its direct room; both users send.
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Clone, Debug)]
pub struct GroupArgs {
    /// Group rooms.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Members per room, all online.
    #[arg(long, default_value_t = 500)]
    pub members: usize,
    /// Members of each room that send.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Clone, Copy, Debug)]
pub enum Shape {
    Direct { pairs: usize },
    Group { rooms: usize, members: usize, senders: usize },
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Direct { .. } => "direct",
            Shape::Group { .. } => "group",
        }
    }
}

pub async fn direct(args: &DirectArgs) -> Result<Vec<Report>> {
    if args.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    traffic_scenario(Shape::Direct { pairs: args.pairs }, &args.traffic, &args.common).await
}

pub async fn group(args: &GroupArgs) -> Result<Vec<Report>> {
    if args.rooms == 0 || args.members < 2 || args.senders == 0 || args.senders > args.members {
        bail!("need --rooms >= 1, --members >= 2 and 1 <= --senders <= --members");
    }
    let shape = Shape::Group { rooms: args.rooms, members: args.members, senders: args.senders };
    traffic_scenario(shape, &args.traffic, &args.common).await
}

/// Runs the shape against each target in turn (each server stopped before the next starts).
pub async fn traffic_scenario(shape: Shape, t: &TrafficArgs, common: &Common) -> Result<Vec<Report>> {
    let load = t.load(common)?;
    let mut reports = Vec::new();
    for kind in t.targets() {
        let mut server = match kind {
            Kind::Stacker => Server::stacker(&common.server).await?,
            Kind::Baseline => Server::baseline(t.baseline_url.as_deref()).await?,
        };
        let report = run_shape(shape, &load, common, &mut server).await;
        reports.push(Report::after_stop(report, server.stop().await)?);
    }
    Ok(reports)
}

/// Distributed mode (`--registry-url`): points each user's sockets at the
/// gateway the registry names for them; returns how many users each got.
pub async fn route(
    dialer: &mut Dialer,
    server: &Server,
    users: &[(Id, String)],
    common: &Common,
) -> Result<Option<serde_json::Value>> {
    let Some(registry) = &server.registry else { return Ok(None) };
    let spread = dialer.route_via_registry(registry, users, common.connect_concurrency).await?;
    Ok(Some(json!(spread)))
}

/// One run of `shape` against `server`.
pub async fn run_shape(shape: Shape, load: &Load, common: &Common, server: &mut Server) -> Result<Report> {
    let kind = server.kind;
    let run = util::run_id();
    let rooms = build_rooms(shape, kind, server, &run, common).await?;
    let mut dialer = Dialer::new(kind, server.addr, common.source_addrs);
    let users: Vec<(Id, String)> = rooms.iter().flat_map(|r| r.members.iter().filter_map(|m| m.user.clone())).collect();
    let gateways = route(&mut dialer, server, &users, common).await?;
    let mut report = Report::new(shape.name(), kind.name());
    match shape {
        Shape::Direct { pairs } => report.param("pairs", pairs),
        Shape::Group { rooms, members, senders } => {
            report.param("rooms", rooms);
            report.param("members", members);
            report.param("senders_per_room", senders);
        }
    }
    report.param("rate", load.rate);
    report.param("duration_s", load.duration.as_secs_f64());
    report.param("window", load.window);
    report.param("payload_bytes", load.payload);
    report.param("source_addrs", dialer.sources().len());
    if let Some(gateways) = gateways {
        report.param("users_per_gateway", gateways);
    }

    let outcome = traffic::run(&dialer, &run, &rooms, load, &server.pids).await;
    let alive = server.check_alive();
    outcome?.fill(&mut report);
    if let Err(e) = alive {
        report.fail(format!("{e:#}"));
    }
    Ok(report)
}

async fn build_rooms(shape: Shape, kind: Kind, server: &Server, run: &str, common: &Common) -> Result<Vec<RoomSpec>> {
    let conc = common.setup_concurrency;
    Ok(match (shape, kind) {
        (Shape::Direct { pairs }, Kind::Stacker) => {
            let users = setup::users(server, run, "d", pairs * 2, conc).await?;
            let pairs: Vec<_> = users.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect();
            let ids = setup::directs(&pairs, conc).await?;
            ids.iter()
                .zip(&pairs)
                .map(|(id, (a, b))| RoomSpec {
                    key: id.0,
                    members: vec![
                        MemberSpec { user: Some((a.id, a.token.clone())), sends: true },
                        MemberSpec { user: Some((b.id, b.token.clone())), sends: true },
                    ],
                })
                .collect()
        }
        (Shape::Direct { pairs }, Kind::Baseline) => (0..pairs)
            .map(|i| RoomSpec {
                key: i as i64 + 1,
                members: vec![MemberSpec { user: None, sends: true }, MemberSpec { user: None, sends: true }],
            })
            .collect(),
        (Shape::Group { rooms, members, senders }, Kind::Stacker) => {
            let users = setup::users(server, run, "g", rooms * members, conc).await?;
            let groups: Vec<Vec<setup::User>> = users.chunks(members).map(<[_]>::to_vec).collect();
            let ids = setup::groups(&groups, "bench-group-", conc).await?;
            ids.iter()
                .zip(&groups)
                .map(|(id, g)| RoomSpec {
                    key: id.0,
                    members: g
                        .iter()
                        .enumerate()
                        .map(|(i, u)| MemberSpec { user: Some((u.id, u.token.clone())), sends: i < senders })
                        .collect(),
                })
                .collect()
        }
        (Shape::Group { rooms, members, senders }, Kind::Baseline) => (0..rooms)
            .map(|r| RoomSpec {
                key: r as i64 + 1,
                members: (0..members).map(|i| MemberSpec { user: None, sends: i < senders }).collect(),
            })
            .collect(),
    })
}

/// Stacker as a fraction of the baseline, when both ran.
pub fn comparison(reports: &[Report]) -> Option<serde_json::Value> {
    let find = |t: &str| reports.iter().find(|r| r.target == t);
    let (s, b) = (find("stacker")?, find("baseline")?);
    let num = |r: &Report, k: &str| r.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let ratio = |k: &str| {
        let base = num(b, k);
        if base > 0.0 {
            round(num(s, k) / base, 3)
        } else {
            0.0
        }
    };
    Some(json!({
        "deliveries_per_s_ratio": ratio("deliveries_per_s"),
        "stored_per_s_ratio": ratio("stored_per_s"),
    }))
}

pub fn print_comparison(c: &serde_json::Value) {
    println!();
    println!(
        "== stacker vs bare-socket baseline: deliveries/s {:.1}%, messages/s {:.1}% ==",
        c["deliveries_per_s_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        c["stored_per_s_ratio"].as_f64().unwrap_or(0.0) * 100.0
    );
}
