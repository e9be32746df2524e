//! `smoke`: every scenario, tiny, against one spawned server (and the
//! baseline), asserting correctness rather than speed. Seconds, for CI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::history::HistoryArgs;
use crate::idle::IdleArgs;
use crate::reconnect::ReconnectArgs;
use crate::report::Report;
use crate::scenario::{self, Common, Shape};
use crate::server::{Server, ServerArgs};
use crate::traffic::Load;
use crate::{history, idle, reconnect};

#[derive(Args, Clone, Debug)]
pub struct SmokeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Also write every run as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

fn common(server: &ServerArgs) -> Common {
    Common { server: server.clone(), source_addrs: 4, connect_concurrency: 32, setup_concurrency: 4, json: None }
}

fn load(rate: f64, secs: f64, window: usize) -> Load {
    Load {
        rate,
        duration: Duration::from_secs_f64(secs),
        window,
        payload: 16,
        drain_timeout: Duration::from_secs(30),
        connect_concurrency: 32,
    }
}

/// Runs the smoke suite; returns the reports (a scenario that could not run
/// at all becomes a failed report).
pub async fn run(args: &SmokeArgs) -> Result<Vec<Report>> {
    let c = common(&args.server);
    let mut reports = Vec::new();
    let mut push = |name: &str, target: &str, r: Result<Report>| {
        let report = r.unwrap_or_else(|e| {
            let mut failed = Report::new(name, target);
            failed.fail(format!("{e:#}"));
            failed
        });
        report.print();
        reports.push(report);
    };

    let mut stacker = Server::stacker(&args.server).await?;
    let idle_args = IdleArgs { connections: 24, users: 4, hold: 1.0, common: c.clone() };
    push("idle", "stacker", idle::run_on(&idle_args, &mut stacker).await);
    let direct = Shape::Direct { pairs: 3 };
    push("direct", "stacker", scenario::run_shape(direct, &load(300.0, 2.0, 8), &c, &mut stacker).await);
    push(
        "direct",
        "stacker",
        scenario::run_shape(Shape::Direct { pairs: 2 }, &load(0.0, 1.0, 8), &c, &mut stacker).await,
    );
    let group = Shape::Group { rooms: 2, members: 6, senders: 2 };
    push("group", "stacker", scenario::run_shape(group, &load(200.0, 2.0, 8), &c, &mut stacker).await);
    let rc = ReconnectArgs {
        users: 6,
        devices: 2,
        room_size: 3,
        missed: 150,
        warmup: 2,
        no_sync: false,
        storm_concurrency: 0,
        timeout: 30.0,
        common: c.clone(),
    };
    push("reconnect", "stacker", reconnect::run_on(&rc, &mut stacker).await);
    let rc_stored = ReconnectArgs { users: 4, missed: 20, no_sync: true, ..rc };
    push("reconnect", "stacker", reconnect::run_on(&rc_stored, &mut stacker).await);
    let h = HistoryArgs {
        messages: 600,
        fill_concurrency: 16,
        readers: 2,
        reads: 100,
        page: 50,
        max_read_time: 30.0,
        common: c.clone(),
    };
    push("history", "stacker", history::run_on(&h, &mut stacker).await);
    if let Err(e) = stacker.stop().await {
        push("shutdown", "stacker", Err(e));
    }

    let mut baseline = Server::baseline(None).await?;
    push("direct", "baseline", scenario::run_shape(direct, &load(300.0, 2.0, 8), &c, &mut baseline).await);
    push("group", "baseline", scenario::run_shape(group, &load(200.0, 2.0, 8), &c, &mut baseline).await);
    if let Err(e) = baseline.stop().await {
        push("shutdown", "baseline", Err(e));
    }
    Ok(reports)
}
