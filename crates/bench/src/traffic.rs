//! The engine behind `direct` and `group`: rooms whose members are all online
//! (one WebSocket each), some of them senders. Every connection checks what it
//! receives: its room's seqs in order with no gap (Stacker), every message of
//! every sender exactly once after dropping wire duplicates, and — once the
//! senders are done — exactly as many messages as were acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use futures::SinkExt;
use hdrhistogram::Histogram;
use stacker_proto::Id;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use crate::procstat::{Usages, Watches};
use crate::report::{Latency, Report};
use crate::server::Kind;
use crate::util::{self, now_ns};
use crate::ws::{self, Dialer, In, InChat, Payload, Ws};

/// How hard to push.
#[derive(Clone, Debug)]
pub struct Load {
    /// Messages per second over all senders; 0 = as fast as the window allows.
    pub rate: f64,
    pub duration: Duration,
    /// Sends in flight (not yet acknowledged) per sender.
    pub window: usize,
    /// Padding bytes in each message.
    pub payload: usize,
    /// How long after the sending phase every connection may take to receive the rest.
    pub drain_timeout: Duration,
    pub connect_concurrency: usize,
}

pub struct RoomSpec {
    /// Stacker: the room id; baseline: the room number.
    pub key: i64,
    pub members: Vec<MemberSpec>,
}

pub struct MemberSpec {
    /// Stacker: the member's id and token; baseline: none.
    pub user: Option<(Id, String)>,
    pub sends: bool,
}

/// What a run did, over every connection.
pub struct Outcome {
    pub connections: usize,
    pub senders: usize,
    pub rooms: usize,
    pub connect_time: Duration,
    pub sent: u64,
    pub acked: u64,
    /// 503 answers (the send was retried with the same client_msg_id).
    pub rejected: u64,
    /// Chat messages received by all connections (the sender's own copy included).
    pub deliveries: u64,
    /// Received by members other than the sender (the latency samples).
    pub recipient_deliveries: u64,
    pub wire_duplicates: u64,
    pub reordered: u64,
    /// From the start to the last acknowledgement.
    pub send_elapsed: Duration,
    /// From the start to the last delivery.
    pub deliver_elapsed: Duration,
    pub latency: Histogram<u64>,
    pub failures: Vec<String>,
    /// Server and generator CPU/RSS over the sending and draining.
    pub usage: Result<Usages>,
}

impl Outcome {
    pub fn stored_per_s(&self) -> f64 {
        util::per_sec(self.acked, self.send_elapsed)
    }
    pub fn deliveries_per_s(&self) -> f64 {
        util::per_sec(self.deliveries, self.deliver_elapsed)
    }

    /// Adds the outcome's lines to a report.
    pub fn fill(&self, r: &mut Report) {
        r.count("rooms", "rooms", self.rooms as u64);
        r.count("connections", "connections", self.connections as u64);
        r.count("senders", "senders", self.senders as u64);
        r.result(
            "connect_s",
            "connect time",
            crate::procstat::round(self.connect_time.as_secs_f64(), 3),
            format!("{:.2} s", self.connect_time.as_secs_f64()),
        );
        r.count("sent", "sent", self.sent);
        r.count("stored_acked", "stored + acked", self.acked);
        r.count("rejected_503", "503 answers (retried)", self.rejected);
        r.count("deliveries", "deliveries (all member sockets)", self.deliveries);
        r.count("recipient_deliveries", "deliveries to non-senders", self.recipient_deliveries);
        r.count("wire_duplicates", "wire duplicates (dropped)", self.wire_duplicates);
        r.rate("stored_per_s", "stored + acked / s", self.stored_per_s());
        r.rate("deliveries_per_s", "deliveries / s", self.deliveries_per_s());
        r.latency("latency", "send -> deliver", &self.latency);
        match &self.usage {
            Ok(u) => r.usage(u),
            Err(e) => r.note("processes", format!("not measured: {e:#}")),
        }
        for f in &self.failures {
            r.fail(f.clone());
        }
    }
}

struct RoomState {
    key: i64,
    /// Messages acknowledged by this room's senders that have finished.
    acked: AtomicU64,
    senders_left: AtomicUsize,
    senders: Vec<u32>,
}

struct Ctx {
    kind: Kind,
    run: String,
    load: Load,
    senders: u32,
    start: tokio::time::Instant,
    rooms: Vec<RoomState>,
    sender_acked: Vec<AtomicU64>,
    latency: Latency,
    last_ack_ns: AtomicU64,
    last_delivery_ns: AtomicU64,
    abort: AtomicBool,
}

/// Per-connection results.
#[derive(Default)]
struct ConnOut {
    sent: u64,
    acked: u64,
    rejected: u64,
    received: u64,
    recipient: u64,
    wire_dups: u64,
    reordered: u64,
    per_sender: HashMap<u32, u64>,
    failures: Vec<String>,
}

/// Which messages of one sender a connection has seen.
#[derive(Default)]
struct Track {
    bits: Vec<u64>,
    max: u64,
    count: u64,
}

impl Track {
    /// False when `n` was seen before.
    fn insert(&mut self, n: u64) -> bool {
        let (word, bit) = ((n / 64) as usize, n % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            return false;
        }
        self.bits[word] |= 1 << bit;
        self.count += 1;
        self.max = self.max.max(n);
        true
    }
}

/// Opens every member's connection, runs the load and checks the result.
/// CPU and RSS of the server and the generator are measured from the start of
/// sending until every connection is done.
pub async fn run(dialer: &Dialer, run: &str, rooms: &[RoomSpec], load: &Load, server_pids: &[u32]) -> Result<Outcome> {
    let mut specs = Vec::new();
    let mut sender_count = 0u32;
    for (r, room) in rooms.iter().enumerate() {
        for m in &room.members {
            let sender = m.sends.then(|| {
                sender_count += 1;
                sender_count - 1
            });
            let path = match dialer.kind {
                Kind::Stacker => "/api/ws?device_id=bench".to_string(),
                Kind::Baseline => format!("/?room={}", room.key),
            };
            specs.push((r, sender, path, m.user.as_ref().map(|(_, token)| token.clone())));
        }
    }
    util::check_fds(specs.len(), "this run")?;
    let connect_started = Instant::now();
    let mut sockets: Vec<(usize, Ws)> = stream::iter(specs.iter().enumerate())
        .map(|(i, (_, _, path, token))| async move {
            let ws = dialer.open(path, token.as_deref()).await?;
            anyhow::Ok((i, ws))
        })
        .buffer_unordered(load.connect_concurrency.max(1))
        .try_collect()
        .await?;
    let connect_time = connect_started.elapsed();
    sockets.sort_by_key(|(i, _)| *i);

    let room_states = rooms
        .iter()
        .enumerate()
        .map(|(r, room)| {
            let senders: Vec<u32> = specs.iter().filter(|s| s.0 == r).filter_map(|s| s.1).collect();
            RoomState {
                key: room.key,
                acked: AtomicU64::new(0),
                senders_left: AtomicUsize::new(senders.len()),
                senders,
            }
        })
        .collect();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let ctx = Arc::new(Ctx {
        kind: dialer.kind,
        run: run.to_string(),
        load: load.clone(),
        senders: sender_count,
        start,
        rooms: room_states,
        sender_acked: (0..sender_count).map(|_| AtomicU64::new(0)).collect(),
        latency: Latency::new(),
        last_ack_ns: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        abort: AtomicBool::new(false),
    });
    let start_ns = now_ns() + 50_000_000;
    let watches = Watches::start(server_pids);
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|(i, ws)| {
            let (room, sender, _, _) = specs[i];
            tokio::spawn(connection(ctx.clone(), ws, i, room, sender))
        })
        .collect();
    let mut outs = Vec::with_capacity(tasks.len());
    for t in tasks {
        outs.push(t.await.map_err(|e| anyhow!("connection task failed: {e}"))?);
    }
    let usage = watches.and_then(Watches::finish);

    let mut o = Outcome {
        connections: specs.len(),
        senders: sender_count as usize,
        rooms: rooms.len(),
        connect_time,
        sent: 0,
        acked: 0,
        rejected: 0,
        deliveries: 0,
        recipient_deliveries: 0,
        wire_duplicates: 0,
        reordered: 0,
        send_elapsed: Duration::from_nanos(ctx.last_ack_ns.load(Ordering::Relaxed).saturating_sub(start_ns)),
        deliver_elapsed: Duration::from_nanos(ctx.last_delivery_ns.load(Ordering::Relaxed).saturating_sub(start_ns)),
        latency: ctx.latency.merged(),
        failures: Vec::new(),
        usage,
    };
    for (i, out) in outs.into_iter().enumerate() {
        let (r, _, _, _) = specs[i];
        let room = &ctx.rooms[r];
        o.sent += out.sent;
        o.acked += out.acked;
        o.rejected += out.rejected;
        o.deliveries += out.received;
        o.recipient_deliveries += out.recipient;
        o.wire_duplicates += out.wire_dups;
        o.reordered += out.reordered;
        o.failures.extend(out.failures.into_iter().map(|f| format!("connection {i} (room {}): {f}", room.key)));
        // Every sender's acknowledged messages, each exactly once.
        for s in &room.senders {
            let want = ctx.sender_acked[*s as usize].load(Ordering::Relaxed);
            let got = out.per_sender.get(s).copied().unwrap_or(0);
            if got != want {
                o.failures.push(format!(
                    "connection {i} (room {}): got {got} of the {want} acknowledged messages of sender {s}",
                    room.key
                ));
            }
        }
    }
    if o.acked == 0 {
        o.failures.push("no message was acknowledged".into());
    }
    Ok(o)
}

async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    if let Some(t) = ticker {
        t.tick().await;
    }
}

async fn connection(ctx: Arc<Ctx>, mut ws: Ws, index: usize, room_index: usize, sender: Option<u32>) -> ConnOut {
    let mut out = ConnOut::default();
    if let Err(e) = drive(&ctx, &mut ws, index, room_index, sender, &mut out).await {
        ctx.abort.store(true, Ordering::Relaxed);
        out.failures.push(format!("{e:#}"));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    out
}

async fn drive(
    ctx: &Ctx,
    ws: &mut Ws,
    index: usize,
    room_index: usize,
    sender: Option<u32>,
    out: &mut ConnOut,
) -> Result<()> {
    let room = &ctx.rooms[room_index];
    let load = &ctx.load;
    let deadline = ctx.start + load.duration;
    let drain_deadline = deadline + load.drain_timeout;
    let mut ticker = match (sender, load.rate > 0.0) {
        (Some(s), true) => {
            let period = Duration::from_secs_f64(f64::from(ctx.senders) / load.rate);
            let offset = period.mul_f64(f64::from(s) / f64::from(ctx.senders.max(1)));
            let mut t = tokio::time::interval_at(ctx.start + offset, period);
            t.set_missed_tick_behavior(MissedTickBehavior::Skip);
            Some(t)
        }
        _ => None,
    };
    // Other connections' progress (the abort flag, and once this one is done
    // sending, whether the room is complete) is looked at on every wake-up and
    // on these ticks: often once sending is over, rarely before, since a
    // sending connection wakes for its own traffic anyway and a tick on every
    // connection 50 times a second would cost the generator more than timers
    // that matter.
    let mut check_done = tokio::time::interval(Duration::from_millis(20));
    let mut check_abort = tokio::time::interval(Duration::from_millis(250));
    // Each is idle while the other runs: on its next poll it must not fire
    // every tick it missed meanwhile, back to back.
    check_done.set_missed_tick_behavior(MissedTickBehavior::Skip);
    check_abort.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // Made once: a sleep made afresh in every `select!` is a timer-wheel
    // insert and removal per wake-up.
    let end_of_sending = tokio::time::sleep_until(deadline);
    let end_of_drain = tokio::time::sleep_until(drain_deadline);
    tokio::pin!(end_of_sending, end_of_drain);
    tokio::time::sleep_until(ctx.start).await;
    let mut sending = sender.is_some();
    let mut published = sender.is_none();
    let mut next_n = 1u64;
    // Sends awaiting their ack, in the order the server answers them: (n, sent at).
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut last_seq = 0i64;
    let mut gap_reported = false;
    let mut tracks: HashMap<u32, Track> = HashMap::new();
    let me = sender.unwrap_or(u32::MAX);

    loop {
        if sending && tokio::time::Instant::now() >= deadline {
            sending = false;
        }
        if !sending && !published && inflight.is_empty() {
            published = true;
            ctx.sender_acked[me as usize].store(out.acked, Ordering::Relaxed);
            room.acked.fetch_add(out.acked, Ordering::AcqRel);
            room.senders_left.fetch_sub(1, Ordering::AcqRel);
        }
        if published
            && room.senders_left.load(Ordering::Acquire) == 0
            && out.received >= room.acked.load(Ordering::Acquire)
        {
            if out.received > room.acked.load(Ordering::Acquire) {
                out.failures.push(format!(
                    "received {} messages but only {} were acknowledged",
                    out.received,
                    room.acked.load(Ordering::Acquire)
                ));
            }
            return Ok(());
        }
        if ctx.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let can_send = sending && inflight.len() < load.window.max(1);
        tokio::select! {
            biased;
            msg = futures::StreamExt::next(ws) => {
                let Some(text) = ws::text_of(msg)? else { continue };
                let frame = ws::parse(&text)?;
                let mut state = ChatState { last_seq: &mut last_seq, gap_reported: &mut gap_reported, tracks: &mut tracks };
                match frame {
                    In::Chat(c) => on_chat(ctx, room, index, me, c, out, &mut state, &mut inflight)?,
                    In::Batch(list) => {
                        for c in list {
                            on_chat(ctx, room, index, me, c, out, &mut state, &mut inflight)?;
                        }
                    }
                    In::Ack { client_msg_id, .. } if ctx.kind == Kind::Stacker => {
                        on_ack(ctx, me, client_msg_id, &mut inflight, out)?
                    }
                    In::Error { code: 503, .. } => {
                        // The oldest unanswered send was refused and not stored: send it again.
                        let (n, t) = inflight.pop_front().ok_or_else(|| anyhow!("503 error frame with nothing in flight"))?;
                        out.rejected += 1;
                        send(ctx, ws, room.key, me, n, t).await?;
                        inflight.push_back((n, t));
                    }
                    In::Error { code, msg } => return Err(anyhow!("error frame {code}: {msg}")),
                    _ => {}
                }
            }
            _ = next_tick(&mut ticker), if can_send => {
                let n = next_n;
                next_n += 1;
                let t = now_ns();
                send(ctx, ws, room.key, me, n, t).await?;
                out.sent += 1;
                inflight.push_back((n, t));
            }
            _ = &mut end_of_sending, if sending => sending = false,
            _ = check_done.tick(), if !sending => {}
            _ = check_abort.tick(), if sending => {}
            _ = &mut end_of_drain => {
                let acked = room.acked.load(Ordering::Acquire);
                let left = room.senders_left.load(Ordering::Acquire);
                return Err(anyhow!(
                    "drain timeout: received {} of {acked} acknowledged messages (senders still running: {left}, \
                     my sends still unacknowledged: {})",
                    out.received, inflight.len()
                ));
            }
        }
    }
}

async fn send(ctx: &Ctx, ws: &mut Ws, room: i64, me: u32, n: u64, t: u64) -> Result<()> {
    let p = Payload { s: me, n, t };
    let text = match ctx.kind {
        Kind::Stacker => ws::send_frame(&ctx.run, room, &p, ctx.load.payload),
        Kind::Baseline => ws::baseline_frame(&ctx.run, room, &p, ctx.load.payload),
    };
    ws.send(Message::text(text)).await.map_err(|e| anyhow!("send failed: {e}"))
}

fn on_ack(
    ctx: &Ctx,
    me: u32,
    client_msg_id: Option<String>,
    inflight: &mut VecDeque<(u64, u64)>,
    out: &mut ConnOut,
) -> Result<()> {
    let cmid = client_msg_id.ok_or_else(|| anyhow!("ack without client_msg_id"))?;
    let pos = inflight
        .iter()
        .position(|(n, _)| ws::client_msg_id(&ctx.run, &Payload { s: me, n: *n, t: 0 }) == cmid)
        .ok_or_else(|| anyhow!("ack for {cmid}, which is not in flight (acknowledged twice?)"))?;
    if pos != 0 {
        out.failures.push(format!("ack for {cmid} overtook {} older sends", pos));
    }
    inflight.remove(pos);
    out.acked += 1;
    ctx.last_ack_ns.fetch_max(now_ns(), Ordering::Relaxed);
    Ok(())
}

/// A connection's view of its room's stream.
struct ChatState<'a> {
    last_seq: &'a mut i64,
    gap_reported: &'a mut bool,
    tracks: &'a mut HashMap<u32, Track>,
}

#[allow(clippy::too_many_arguments)]
fn on_chat(
    ctx: &Ctx,
    room: &RoomState,
    index: usize,
    me: u32,
    c: InChat,
    out: &mut ConnOut,
    state: &mut ChatState<'_>,
    inflight: &mut VecDeque<(u64, u64)>,
) -> Result<()> {
    let ChatState { last_seq, gap_reported, tracks } = state;
    let now = now_ns();
    if c.room != room.key {
        return Err(anyhow!("message of room {} on a connection of room {}", c.room, room.key));
    }
    if ctx.kind == Kind::Stacker {
        if c.seq <= **last_seq {
            out.wire_dups += 1;
            return Ok(());
        }
        if c.seq != **last_seq + 1 && !**gap_reported {
            **gap_reported = true;
            out.failures.push(format!("gap: expected seq {}, got {}", **last_seq + 1, c.seq));
        }
        **last_seq = c.seq;
    }
    let p = c.payload.ok_or_else(|| anyhow!("message seq {} without the bench payload", c.seq))?;
    let track = tracks.entry(p.s).or_default();
    let prev_max = track.max;
    if !track.insert(p.n) {
        out.failures.push(format!("message {} of sender {} delivered twice (after dedupe by seq)", p.n, p.s));
        return Ok(());
    }
    if p.n < prev_max {
        out.reordered += 1;
        if ctx.kind == Kind::Baseline {
            out.failures.push(format!("sender {}: message {} after {}", p.s, p.n, prev_max));
        }
    }
    *out.per_sender.entry(p.s).or_insert(0) += 1;
    out.received += 1;
    ctx.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
    if p.s == me {
        if ctx.kind == Kind::Baseline {
            // The baseline's echo is the sender's acknowledgement.
            match inflight.front() {
                Some((n, _)) if *n == p.n => {
                    inflight.pop_front();
                    out.acked += 1;
                    ctx.last_ack_ns.fetch_max(now, Ordering::Relaxed);
                }
                _ => return Err(anyhow!("echo of message {} is not the oldest in flight", p.n)),
            }
        }
    } else {
        out.recipient += 1;
        ctx.latency.record(index, now.saturating_sub(p.t) / 1000);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_finds_duplicates() {
        let mut t = Track::default();
        assert!(t.insert(1));
        assert!(t.insert(200));
        assert!(!t.insert(1));
        assert!(t.insert(64));
        assert_eq!((t.count, t.max), (3, 200));
    }
}
