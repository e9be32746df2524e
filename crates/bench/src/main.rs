//! `stacker-bench`: a load generator for Stacker. It drives a running server
//! (or one it spawns) over real sockets from several loopback source
//! addresses, checks everything it receives, and reports throughput, latency
//! percentiles and the server's CPU and RSS. See BENCHMARKS.md.
//!
//! Load goes only to loopback addresses (127.0.0.0/8), and every phase is
//! bounded in count and time.

mod baseline;
mod history;
mod idle;
mod procstat;
mod reconnect;
mod report;
mod scenario;
mod server;
mod setup;
mod smoke;
mod traffic;
mod util;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use report::Report;

#[derive(Parser)]
#[command(
    name = "stacker-bench",
    version,
    about = "Load generator and benchmarks for Stacker (loopback only)",
    long_about = "Load generator and benchmarks for Stacker. Point it at a running server with --url \
                  (and --server-pid to measure it), or let it start one with --spawn target/release/stacker. \
                  Every scenario checks what it received and exits non-zero if anything was lost."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N authenticated connections and hold them: connections held, server RSS per connection, idle CPU.
    Idle(idle::IdleArgs),
    /// Pairs of users sending 1:1 messages: stored/s, delivered, send→deliver latency.
    Direct(scenario::DirectArgs),
    /// Rooms of M members all online, some sending: deliveries/s and fan-out latency.
    Group(scenario::GroupArgs),
    /// N clients miss K messages, then reconnect at once: time until all caught up, no gaps.
    Reconnect(reconnect::ReconnectArgs),
    /// Random pages of a room with many stored messages: latency percentiles.
    History(history::HistoryArgs),
    /// The bare broadcast WebSocket server (no auth, no storage) used as the baseline.
    BaselineServer(baseline::BaselineArgs),
    /// Every scenario, tiny, against a spawned server: correctness in seconds (CI).
    Smoke(smoke::SmokeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    util::raise_nofile();
    util::now_ns();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stacker-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("stacker-bench: FAILED: a check did not pass (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("stacker-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false) when a run finished but a check failed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let (reports, json, comparison): (Vec<Report>, Option<PathBuf>, _) = match cli.cmd {
        Cmd::BaselineServer(args) => {
            baseline::serve(&args).await?;
            return Ok(true);
        }
        Cmd::Idle(args) => (vec![idle::run(&args).await?], args.common.json.clone(), None),
        Cmd::Reconnect(args) => (vec![reconnect::run(&args).await?], args.common.json.clone(), None),
        Cmd::History(args) => (vec![history::run(&args).await?], args.common.json.clone(), None),
        Cmd::Direct(args) => {
            let reports = scenario::direct(&args).await?;
            let cmp = scenario::comparison(&reports);
            (reports, args.common.json.clone(), cmp)
        }
        Cmd::Group(args) => {
            let reports = scenario::group(&args).await?;
            let cmp = scenario::comparison(&reports);
            (reports, args.common.json.clone(), cmp)
        }
        Cmd::Smoke(args) => {
            let reports = smoke::run(&args).await?;
            let passed = reports.iter().filter(|r| r.ok()).count();
            let failed = reports.len() - passed;
            if let Some(path) = &args.json {
                report::write_json(path, &reports, None)?;
            }
            println!();
            println!("smoke: {passed} passed, {failed} failed");
            return Ok(failed == 0);
        }
    };
    for r in &reports {
        r.print();
    }
    if let Some(c) = &comparison {
        scenario::print_comparison(c);
    }
    if let Some(path) = json {
        report::write_json(&path, &reports, comparison)?;
        println!("\nwrote {}", path.display());
    }
    Ok(reports.iter().all(Report::ok))
}
