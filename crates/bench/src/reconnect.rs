//! `reconnect`: N clients each miss K messages, then all reconnect at once;
//! report the time until every client has caught up, and check that each got
//! exactly the messages it missed, in order, with no gap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use futures::SinkExt;
use stacker_proto::Id;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::procstat::{round, Watches};
use crate::report::{new_histogram, Report};
use crate::scenario::{self, Common, MAX_DURATION_S};
use crate::server::{Kind, Server};
use crate::setup::{self, User};
use crate::util;
use crate::ws::{self, Dialer, In, Ws};

#[derive(Args, Clone, Debug)]
pub struct ReconnectArgs {
    /// Users; clients = users × devices.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Devices (connections) per user.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Users per group room (each user is in one room).
    #[arg(long, default_value_t = 100)]
    pub room_size: usize,
    /// Messages each client misses while offline (sent to each room).
    #[arg(long, default_value_t = 100)]
    pub missed: usize,
    /// Messages each client receives live and acknowledges before going offline.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Do not send `sync` after reconnecting (rely on the acknowledged cursors the server stored).
    #[arg(long)]
    pub no_sync: bool,
    /// Reconnects in flight at once; 0 = all at once.
    #[arg(long, default_value_t = 0)]
    pub storm_concurrency: usize,
    /// Seconds the storm may take before the run fails.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub common: Common,
}

struct ClientSpec {
    user: usize,
    device: usize,
    room: usize,
}

pub async fn run(args: &ReconnectArgs) -> Result<Report> {
    let mut server = Server::stacker(&args.common.server).await?;
    let report = run_on(args, &mut server).await;
    Report::after_stop(report, server.stop().await)
}

pub async fn run_on(args: &ReconnectArgs, server: &mut Server) -> Result<Report> {
    if args.users < 2 || args.devices == 0 || args.room_size < 2 || args.missed == 0 {
        bail!("need --users >= 2, --devices >= 1, --room-size >= 2, --missed >= 1");
    }
    if !(args.timeout > 0.0 && args.timeout <= MAX_DURATION_S) {
        bail!("--timeout must be in (0, {MAX_DURATION_S}] seconds");
    }
    let common = &args.common;
    let clients = args.users * args.devices;
    util::check_fds(clients, "reconnect")?;
    let run = util::run_id();
    let users = setup::users(server, &run, "r", args.users, common.setup_concurrency).await?;
    // Rooms of room_size users; a last room of one user joins the previous one.
    let mut groups: Vec<Vec<User>> = users.chunks(args.room_size).map(<[_]>::to_vec).collect();
    if groups.len() > 1 && groups.last().is_some_and(|g| g.len() < 2) {
        let last = groups.pop().unwrap_or_default();
        if let Some(prev) = groups.last_mut() {
            prev.extend(last);
        }
    }
    let rooms = setup::groups(&groups, "bench-reconnect-", common.setup_concurrency).await?;
    let mut specs = Vec::with_capacity(clients);
    let mut user_index = 0;
    for (r, g) in groups.iter().enumerate() {
        for _ in g {
            for d in 0..args.devices {
                specs.push(ClientSpec { user: user_index, device: d, room: r });
            }
            user_index += 1;
        }
    }
    let mut dialer = Dialer::new(Kind::Stacker, server.addr, common.source_addrs);
    let ids: Vec<(Id, String)> = users.iter().map(|u| (u.id, u.token.clone())).collect();
    let gateways = scenario::route(&mut dialer, server, &ids, common).await?;
    let path = |s: &ClientSpec| format!("/api/ws?device_id=rc{}", s.device);
    let warmup = args.warmup as i64;
    let missed = args.missed as i64;

    // Phase 1: everyone online; the warm-up messages arrive live and are acknowledged.
    let sockets: Vec<(usize, Ws)> = stream::iter(specs.iter().enumerate())
        .map(|(i, s)| {
            let (dialer, token, path) = (&dialer, users[s.user].token.clone(), path(s));
            async move { anyhow::Ok((i, dialer.open(&path, Some(&token)).await?)) }
        })
        .buffer_unordered(common.connect_concurrency.max(1))
        .try_collect()
        .await?;
    send_to_rooms(&groups, &rooms, &run, "w", args.warmup, 0, common.setup_concurrency).await?;
    let warm: Vec<_> = sockets
        .into_iter()
        .map(|(i, mut ws)| {
            let room = rooms[specs[i].room].0;
            tokio::spawn(async move {
                let r = async {
                    if warmup > 0 {
                        let mut got =
                            Got { last: 0, duplicates: 0, frames: 0, failures: Vec::new(), retries: Vec::new() };
                        read_until(&mut ws, room, warmup, Duration::from_secs(60), &mut got).await?;
                        ws.send(Message::text(ws::ack_frame(room, warmup))).await?;
                    }
                    let _ = ws.close(None).await;
                    anyhow::Ok(())
                }
                .await;
                r.map_err(|e| anyhow!("client {i}: {e:#}"))
            })
        })
        .collect();
    for w in warm {
        w.await.map_err(|e| anyhow!("warm-up task: {e}"))??;
    }
    // Offline: acknowledged cursors are written every 500 ms; then the missed messages are sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send_to_rooms(&groups, &rooms, &run, "m", args.missed, args.warmup, common.setup_concurrency).await?;

    // Phase 2: the storm.
    let watches = Watches::start(&server.pids);
    let t0 = Instant::now();
    let timeout = Duration::from_secs_f64(args.timeout);
    let gate = Arc::new(Semaphore::new(if args.storm_concurrency == 0 { clients } else { args.storm_concurrency }));
    let dialer = Arc::new(dialer);
    let tasks: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (dialer, gate) = (dialer.clone(), gate.clone());
            let (token, path, room, sync) = (users[s.user].token.clone(), path(s), rooms[s.room].0, !args.no_sync);
            tokio::spawn(async move {
                let _permit = gate.acquire().await.map_err(|e| anyhow!("client {i}: {e}"))?;
                let mut got = Got { last: warmup, duplicates: 0, frames: 0, failures: Vec::new(), retries: Vec::new() };
                let mut connected = None;
                let mut backoff = Duration::from_millis(20);
                let deadline = Instant::now() + timeout;
                // Like the project's Subscriber: on a close or a refused upgrade, back off,
                // reconnect and sync from the last seq held. Retries are reported, not failures.
                loop {
                    let attempt = async {
                        let mut ws = dialer.open(&path, Some(&token)).await?;
                        connected.get_or_insert(t0.elapsed());
                        if sync || !got.retries.is_empty() {
                            ws.send(Message::text(ws::sync_frame(&[(room, got.last)]))).await?;
                        }
                        let left = deadline.saturating_duration_since(Instant::now());
                        read_until(&mut ws, room, warmup + missed, left, &mut got).await?;
                        let _ = ws.close(None).await;
                        anyhow::Ok(())
                    };
                    match attempt.await {
                        Ok(()) => break,
                        Err(e) if Instant::now() + backoff < deadline && got.failures.is_empty() => {
                            got.retries.push(format!("{e:#}"));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                        Err(e) => {
                            return Err(anyhow!("client {i}: {e:#} (at seq {} of {})", got.last, warmup + missed))
                        }
                    }
                }
                anyhow::Ok((connected.unwrap_or_default(), t0.elapsed(), got))
            })
        })
        .collect();
    let mut connect_ms = new_histogram();
    let mut caught_up_ms = new_histogram();
    let mut failures = Vec::new();
    let (mut dups, mut frames, mut all_done, mut reconnected) = (0u64, 0u64, Duration::ZERO, 0u64);
    let mut retries: std::collections::BTreeMap<String, u64> = Default::default();
    for t in tasks {
        match t.await.map_err(|e| anyhow!("client task: {e}"))? {
            Ok((connected, done, got)) => {
                reconnected += 1;
                connect_ms.saturating_record(connected.as_micros() as u64);
                caught_up_ms.saturating_record(done.as_micros() as u64);
                all_done = all_done.max(done);
                dups += got.duplicates;
                frames += got.frames;
                for r in got.retries {
                    // Group by reason without the client-specific parts.
                    let reason =
                        if r.starts_with("websocket ") { r.split_once(": ").map_or(r.as_str(), |x| x.1) } else { &r };
                    let key: String = reason.chars().take(120).collect();
                    *retries.entry(key).or_insert(0) += 1;
                }
                if got.last != warmup + missed {
                    failures.push(format!("caught up to seq {} of {}", got.last, warmup + missed));
                }
                failures.extend(got.failures);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let usage = watches.and_then(Watches::finish);

    let mut report = Report::new("reconnect", "stacker");
    report.param("users", args.users);
    report.param("devices", args.devices);
    report.param("clients", clients);
    report.param("rooms", rooms.len());
    report.param("missed", args.missed);
    report.param("warmup", args.warmup);
    report.param("sync", !args.no_sync);
    report.param("storm_concurrency", args.storm_concurrency);
    report.param("source_addrs", dialer.sources().len());
    if let Some(gateways) = gateways {
        report.param("users_per_gateway", gateways);
    }
    report.count("clients", "clients reconnected and caught up", reconnected);
    report.count("missed_messages", "messages replayed (clients × missed)", (clients as u64) * missed as u64);
    report.result(
        "all_caught_up_s",
        "all caught up after",
        round(all_done.as_secs_f64(), 3),
        format!("{:.3} s", all_done.as_secs_f64()),
    );
    report.rate("replayed_per_s", "messages replayed / s", util::per_sec((clients as u64) * missed as u64, all_done));
    report.latency("connect", "reconnect (from storm start)", &connect_ms);
    report.latency("caught_up", "caught up (from storm start)", &caught_up_ms);
    report.count("frames", "frames received", frames);
    report.count("wire_duplicates", "wire duplicates (dropped)", dups);
    let total_retries: u64 = retries.values().sum();
    report.count("retries", "reconnects after a close or refusal", total_retries);
    for (reason, n) in &retries {
        report.note("  retried", format!("{n} × {reason}"));
    }
    report.data("retry_reasons", serde_json::json!(retries));
    match usage {
        Ok(u) => report.usage(&u),
        Err(e) => report.note("processes", format!("not measured: {e:#}")),
    }
    for f in failures {
        report.fail(f);
    }
    if let Err(e) = server.check_alive() {
        report.fail(format!("{e:#}"));
    }
    Ok(report)
}

/// Sends `count` text messages to every room (from its first member, over
/// HTTP, rooms in parallel), checking that seqs continue from `after`.
async fn send_to_rooms(
    groups: &[Vec<User>],
    rooms: &[Id],
    run: &str,
    tag: &str,
    count: usize,
    after: usize,
    concurrency: usize,
) -> Result<()> {
    stream::iter(groups.iter().zip(rooms))
        .map(|(g, room)| async move {
            let owner = g.first().ok_or_else(|| anyhow!("empty room"))?;
            for k in 0..count {
                let seq =
                    setup::send_text(owner, *room, &format!("{tag} {k}"), &format!("{run}{tag}{room}-{k}")).await?;
                if seq != (after + k + 1) as i64 {
                    bail!("room {room}: message {k} got seq {seq}, expected {}", after + k + 1);
                }
            }
            anyhow::Ok(())
        })
        .buffer_unordered(concurrency.max(1) * 4)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// What one client read.
struct Got {
    last: i64,
    duplicates: u64,
    frames: u64,
    failures: Vec<String>,
    /// Why each earlier attempt ended.
    retries: Vec<String>,
}

/// Reads `room`'s messages after `got.last` until seq `to`, dropping
/// duplicates; a gap is a failure. Progress stays in `got` if it fails.
async fn read_until(ws: &mut Ws, room: i64, to: i64, timeout: Duration, got: &mut Got) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while got.last < to {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = ws::next_in(ws, left).await?.ok_or_else(|| anyhow!("timed out at seq {} of {to}", got.last))?;
        got.frames += 1;
        let chats = match frame {
            In::Chat(c) => vec![c],
            In::Batch(list) => list,
            In::Error { code, msg } => bail!("error frame {code}: {msg}"),
            _ => continue,
        };
        for c in chats {
            if c.room != room {
                bail!("message of room {} (expected room {room})", c.room);
            }
            if c.seq <= got.last {
                got.duplicates += 1;
            } else if c.seq == got.last + 1 {
                got.last = c.seq;
            } else {
                got.failures.push(format!("gap: expected seq {}, got {}", got.last + 1, c.seq));
                bail!("gap");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn chat(room: i64, seq: i64) -> String {
        format!(
            r#"{{"type":"chat","id":"{seq}","room_id":"{room}","seq":{seq},"sender_id":"1","client_msg_id":null,"content":{{"type":"text","text":"x"}},"created_at":1}}"#
        )
    }

    /// Serves `seqs` of room 5 on a loopback WebSocket and reads them with `read_until(…, to)`.
    async fn read(seqs: Vec<i64>, to: i64) -> (Result<()>, Got) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            for seq in seqs {
                ws.send(Message::text(chat(5, seq))).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), stream).await.unwrap();
        let mut got = Got { last: 0, duplicates: 0, frames: 0, failures: Vec::new(), retries: Vec::new() };
        let r = read_until(&mut ws, 5, to, Duration::from_secs(1), &mut got).await;
        (r, got)
    }

    #[tokio::test]
    async fn duplicates_are_dropped_and_gaps_fail() {
        let (r, got) = read(vec![1, 2, 2, 1, 3], 3).await;
        assert!(r.is_ok());
        assert_eq!((got.last, got.duplicates), (3, 2));

        let (r, got) = read(vec![1, 2, 4], 4).await;
        assert!(r.is_err());
        assert_eq!(got.failures, vec!["gap: expected seq 3, got 4".to_string()]);

        let (r, got) = read(vec![1, 2], 3).await;
        assert!(r.is_err(), "a missing tail times out");
        assert_eq!(got.last, 2);
    }
}
