//! `history`: fill one room with many messages (concurrent HTTP sends, group
//! committed), then read random pages of it over HTTP; latency percentiles,
//! every page checked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use rand::Rng;

use crate::procstat::{round, Watches};
use crate::report::{Latency, Report};
use crate::scenario::{Common, MAX_DURATION_S};
use crate::server::Server;
use crate::{setup, util};

#[derive(Args, Clone, Debug)]
pub struct HistoryArgs {
    /// Messages stored in the room before reading.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// HTTP sends in flight while filling the room (nobody is online, so
    /// filling costs storage only, group-committed).
    #[arg(long, default_value_t = 128)]
    pub fill_concurrency: usize,
    /// Concurrent readers.
    #[arg(long, default_value_t = 8)]
    pub readers: usize,
    /// Pages to read in total.
    #[arg(long, default_value_t = 5000)]
    pub reads: u64,
    /// Messages per page (before_seq pages at random positions).
    #[arg(long, default_value_t = 50)]
    pub page: u32,
    /// Seconds the reading phase may last at most.
    #[arg(long, default_value_t = 120.0)]
    pub max_read_time: f64,
    #[command(flatten)]
    pub common: Common,
}

pub async fn run(args: &HistoryArgs) -> Result<Report> {
    let mut server = Server::stacker(&args.common.server).await?;
    let report = run_on(args, &mut server).await;
    Report::after_stop(report, server.stop().await)
}

pub async fn run_on(args: &HistoryArgs, server: &mut Server) -> Result<Report> {
    let page = args.page.clamp(1, 200);
    if args.messages < u64::from(page) || args.fill_concurrency == 0 || args.readers == 0 {
        bail!("need --messages >= --page, --fill-concurrency >= 1, --readers >= 1");
    }
    if args.messages > 10_000_000 {
        bail!("--messages is capped at 10,000,000");
    }
    if !(args.max_read_time > 0.0 && args.max_read_time <= MAX_DURATION_S) {
        bail!("--max-read-time must be in (0, {MAX_DURATION_S}] seconds");
    }
    let run = util::run_id();
    let users = setup::users(server, &run, "h", 2, 2).await?;
    let room = setup::groups(std::slice::from_ref(&users), "bench-history-", 1).await?[0];
    let owner = users[0].clone();
    let mut report = Report::new("history", "stacker");
    report.param("messages", args.messages);
    report.param("page", page);
    report.param("readers", args.readers);
    report.param("reads", args.reads);
    report.param("fill_concurrency", args.fill_concurrency);

    // Fill.
    let fill_started = Instant::now();
    let progress = AtomicU64::new(0);
    stream::iter(0..args.messages)
        .map(|k| {
            let (owner, run, progress) = (&owner, &run, &progress);
            async move {
                setup::send_text(
                    owner,
                    room,
                    &format!("history message {k} of a room with many"),
                    &format!("{run}h{k}"),
                )
                .await?;
                let done = progress.fetch_add(1, Ordering::Relaxed) + 1;
                if done % 100_000 == 0 {
                    eprintln!("history: {done} messages stored");
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.fill_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let fill_time = fill_started.elapsed();
    let latest = owner.client.history(room, None, None, Some(1)).await?;
    let last = latest.messages.last().map(|m| m.seq).unwrap_or(0);
    if last != args.messages as i64 {
        bail!("after filling, the room's last seq is {last}, expected {}", args.messages);
    }
    report.count("stored", "messages stored", args.messages);
    report.result(
        "fill_s",
        "fill time",
        round(fill_time.as_secs_f64(), 2),
        format!(
            "{:.1} s ({:.0} messages/s, HTTP sends, {} in flight)",
            fill_time.as_secs_f64(),
            util::per_sec(args.messages, fill_time),
            args.fill_concurrency
        ),
    );

    // Read.
    let latency = Arc::new(Latency::new());
    let next = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs_f64(args.max_read_time);
    let watches = Watches::start(&server.pids);
    let read_started = Instant::now();
    let readers: Vec<_> = (0..args.readers)
        .map(|r| {
            let (client, latency, next) = (owner.client.clone(), latency.clone(), next.clone());
            let (messages, reads) = (args.messages as i64, args.reads);
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < reads && Instant::now() < stop_at {
                    let before = rand::thread_rng().gen_range(i64::from(page) + 1..=messages + 1);
                    let t = Instant::now();
                    let resp = setup::retry_busy(|| client.history(room, Some(before), None, Some(page))).await;
                    latency.record(r, t.elapsed().as_micros() as u64);
                    match resp {
                        Err(e) => failures.push(format!("history before {before}: {e}")),
                        Ok(h) => {
                            let seqs: Vec<i64> = h.messages.iter().map(|m| m.seq).collect();
                            let want: Vec<i64> = (before - i64::from(page)..before).collect();
                            if seqs != want || h.messages.iter().any(|m| m.room_id != room) {
                                failures.push(format!(
                                    "page before {before}: got seqs {:?}…, expected {}..{}",
                                    &seqs[..seqs.len().min(5)],
                                    before - i64::from(page),
                                    before - 1
                                ));
                            }
                            if h.has_more != (before - i64::from(page) > 1) {
                                failures.push(format!("page before {before}: has_more {}", h.has_more));
                            }
                        }
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for r in readers {
        failures.extend(r.await.map_err(|e| anyhow!("reader task: {e}"))?);
    }
    let read_time = read_started.elapsed();
    let usage = watches.and_then(Watches::finish);
    let hist = latency.merged();
    report.count("pages_read", "pages read", hist.len());
    report.rate("pages_per_s", "pages / s", util::per_sec(hist.len(), read_time));
    report.latency("latency", "page latency (HTTP round trip)", &hist);
    match usage {
        Ok(u) => report.usage(&u),
        Err(e) => report.note("processes", format!("not measured: {e:#}")),
    }
    if hist.len() < args.reads {
        report.note("note", format!("stopped after --max-read-time {} s", args.max_read_time));
    }
    for f in failures {
        report.fail(f);
    }
    if let Err(e) = server.check_alive() {
        report.fail(format!("{e:#}"));
    }
    Ok(report)
}
