//! The WebSocket gateway and push engine (SPEC §3–4) over real sockets
//! against a real in-process server.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestServer;
use stacker_client::{Client, Delivered, Socket, Subscriber};
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::{ClientFrame, EventKind, ServerFrame};
use stacker_proto::{Content, Id};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// Reads frames until `n` chat messages (live or batched) of `room` arrived;
/// returns their seqs in arrival order.
async fn collect_seqs(socket: &mut Socket, room: Id, n: usize) -> Vec<i64> {
    socket.room_seqs(room, n, Duration::from_secs(60)).await.unwrap()
}

/// Collects `n` distinct messages of `room` through a subscriber.
async fn collect_messages(sub: &mut Subscriber, room: Id, n: usize) -> Vec<ChatMessage> {
    let mut got = Vec::new();
    while got.len() < n {
        match sub.next_within(Duration::from_secs(60)).await.unwrap() {
            Some(Delivered::Message(m)) if m.room_id == room => got.push(m),
            Some(_) => {}
            None => panic!("timed out after {} of {n} messages", got.len()),
        }
    }
    got
}

/// Seqs run `from`, `from + 1`, … with no gap or duplicate (reports the first break only).
fn assert_in_order(seqs: &[i64], from: i64) {
    if let Some(i) = seqs.iter().enumerate().position(|(i, s)| *s != from + i as i64) {
        let around = &seqs[i.saturating_sub(3)..(i + 3).min(seqs.len())];
        panic!(
            "seq {} at position {i} (expected {}); around it: {around:?}; {} seqs",
            seqs[i],
            from + i as i64,
            seqs.len()
        );
    }
}

/// Nothing more arrives for `room` within `wait`.
async fn assert_quiet(socket: &mut Socket, room: Id, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match socket.next_frame_within(left).await.unwrap() {
            Some(ServerFrame::Chat(m)) if m.room_id == room => panic!("unexpected replay of seq {}", m.seq),
            Some(ServerFrame::Batch { messages }) if messages.iter().any(|m| m.room_id == room) => {
                let seqs: Vec<i64> = messages.iter().map(|m| m.seq).collect();
                panic!("unexpected replay of {seqs:?}")
            }
            Some(_) => {}
            None => return,
        }
    }
}

/// The next `error` frame.
async fn expect_error(socket: &mut Socket) -> (u16, String) {
    loop {
        if let ServerFrame::Error { code, msg } = socket.next_frame_within(WAIT).await.unwrap().expect("error frame") {
            return (code, msg);
        }
    }
}

/// Reads until the message `seq` arrives; panics on any event frame before it.
async fn no_event_before(socket: &mut Socket, seq: i64) {
    loop {
        match socket.next_frame_within(WAIT).await.unwrap().expect("the message") {
            ServerFrame::Event(e) => panic!("unexpected event before seq {seq}: {e:?}"),
            ServerFrame::Chat(m) if m.seq == seq => return,
            ServerFrame::Batch { messages } if messages.iter().any(|m| m.seq == seq) => return,
            _ => {}
        }
    }
}

/// The next `event` frame.
async fn next_event(socket: &mut Socket) -> stacker_proto::ws::Event {
    loop {
        if let ServerFrame::Event(e) = socket.next_frame_within(WAIT).await.unwrap().expect("event frame") {
            return e;
        }
    }
}

fn fast_acks_config() -> stacker_server::Config {
    let mut config = common::test_config(None);
    config.delivery.ack_flush_ms = 20;
    config
}

#[tokio::test]
async fn hello_auth_and_connection_limit() {
    let mut config = common::test_config(None);
    config.ws.max_connections = 2;
    let s = TestServer::start_with(config).await;
    let alice = s.user("a").await;
    let socket = alice.connect("phone").await.unwrap();
    assert_eq!(socket.hello.user_id, alice.user_id());
    assert!(socket.hello.heartbeat_s > 0 && !socket.hello.session_id.is_empty() && !socket.hello.gateway_id.is_empty());

    // ?token= works for browsers.
    let url = format!("{}&token={}", alice.ws_url("browser"), alice.token().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures::StreamExt;
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"hello\""));

    // Past the limit: 503.
    let err = alice.connect("third").await.err().expect("limit");
    assert_eq!(err.code(), 503, "{err}");
    drop(ws);
    socket.close().await;

    // No or bad token: 401.
    let anon = s.anon();
    assert_eq!(anon.with_token("nope", Id(1)).connect("x").await.err().unwrap().code(), 401);
    let no_token = tokio_tungstenite::connect_async(s.anon().ws_url("x")).await.err().unwrap();
    assert!(no_token.to_string().contains("401"), "{no_token}");

    // A plain GET (no WebSocket handshake) gets the JSON envelope too.
    let plain = reqwest::Client::new()
        .get(format!("{}/api/ws", s.base))
        .bearer_auth(alice.token().unwrap())
        .send()
        .await
        .unwrap();
    let status = plain.status().as_u16();
    assert!(status == 400 || status == 426, "status {status}");
    let body: serde_json::Value = plain.json().await.expect("a JSON envelope");
    assert_eq!(body["code"], status, "{body}");
    assert!(body["msg"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    s.stop().await;
}

/// One account cannot take every connection: past `ws.max_connections_per_user`
/// its connects get 429, other users' are unaffected, and a closed
/// connection frees its place.
#[tokio::test]
async fn one_user_cannot_take_every_connection() {
    let mut config = common::test_config(None);
    config.ws.max_connections_per_user = 2;
    let s = TestServer::start_with(config).await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    let one = alice.connect("one").await.unwrap();
    let _two = alice.connect("two").await.unwrap();
    let err = alice.connect("three").await.err().expect("past the per-user limit");
    assert_eq!(err.code(), 429, "{err}");
    let _bobs = bob.connect("phone").await.unwrap();
    one.close().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match alice.connect("three").await {
            Ok(_three) => break,
            Err(e) => {
                assert_eq!(e.code(), 429, "{e}");
                assert!(std::time::Instant::now() < deadline, "the closed connection never freed its place");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_and_every_device_gets_every_message() {
    let s = TestServer::start().await;
    let (alice, bob, carol) = (s.user("a").await, s.user("b").await, s.user("c").await);
    let room = alice.create_group("all", &[bob.user_id(), carol.user_id()], None).await.unwrap();
    let mut alice_phone = alice.connect("phone").await.unwrap();
    let mut alice_laptop = alice.connect("laptop").await.unwrap();
    let mut bob_phone = bob.connect("phone").await.unwrap();

    // HTTP send: pushed to everyone, acked to both of alice's devices.
    let sent = alice.send(room, Content::text("over http"), Some("h1")).await.unwrap();
    for socket in [&mut alice_phone, &mut alice_laptop] {
        let mut saw_ack = false;
        let mut saw_chat = false;
        while !(saw_ack && saw_chat) {
            match socket.next_frame_within(WAIT).await.unwrap().expect("frame") {
                ServerFrame::Ack { id, seq, client_msg_id, .. } => {
                    assert_eq!((id, seq, client_msg_id.as_deref()), (sent.msg_id, 1, Some("h1")));
                    saw_ack = true;
                }
                ServerFrame::Chat(m) => {
                    assert_eq!((m.seq, (*m.content).clone()), (1, Content::text("over http")));
                    saw_chat = true;
                }
                _ => {}
            }
        }
    }
    assert_eq!(collect_seqs(&mut bob_phone, room, 1).await, vec![1]);

    // WebSocket send: ack to bob, chat to everyone (bob included).
    bob_phone.send_message(room, Content::text("over ws"), Some("w1")).await.unwrap();
    let mut got = (false, false);
    while !(got.0 && got.1) {
        match bob_phone.next_frame_within(WAIT).await.unwrap().expect("frame") {
            ServerFrame::Ack { seq, client_msg_id, .. } => {
                assert_eq!((seq, client_msg_id.as_deref()), (2, Some("w1")));
                got.0 = true;
            }
            ServerFrame::Chat(m) => {
                assert_eq!(m.seq, 2);
                got.1 = true;
            }
            _ => {}
        }
    }
    assert_eq!(collect_seqs(&mut alice_laptop, room, 1).await, vec![2]);
    assert_eq!(collect_seqs(&mut alice_phone, room, 1).await, vec![2]);

    // Carol was offline: she gets both, in order, when she connects.
    let mut carol_socket = carol.connect("tablet").await.unwrap();
    assert_eq!(collect_seqs(&mut carol_socket, room, 2).await, vec![1, 2]);

    // The realtime metrics are exported.
    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    for name in [
        "stacker_connections",
        "stacker_frames_written_total",
        "stacker_bytes_written_total",
        "stacker_dispatch_queue_depth",
        "stacker_connection_queue_depth",
        "stacker_enqueue_seconds",
        "stacker_pushes_total",
        "stacker_catch_ups_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }

    // Errors on a WS send come back as error frames.
    bob_phone.send_message(Id(999), Content::text("nowhere"), None).await.unwrap();
    assert_eq!(expect_error(&mut bob_phone).await.0, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_arrive_in_order_on_next_login() {
    let s = TestServer::start().await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    let room = alice.create_direct(bob.user_id()).await.unwrap();
    let group = alice.create_group("g", &[bob.user_id()], None).await.unwrap();
    for i in 0..120 {
        alice.send_text(room, &format!("direct {i}")).await.unwrap();
        if i % 3 == 0 {
            alice.send_text(group, &format!("group {i}")).await.unwrap();
        }
    }
    let mut sub = Subscriber::connect(&bob, "phone").await.unwrap();
    let mut direct = Vec::new();
    let mut grouped = Vec::new();
    while direct.len() < 120 || grouped.len() < 40 {
        match sub.next_within(WAIT).await.unwrap().expect("catch-up") {
            Delivered::Message(m) if m.room_id == room => direct.push(m.seq),
            Delivered::Message(m) if m.room_id == group => grouped.push(m.seq),
            _ => {}
        }
    }
    assert_in_order(&direct, 1);
    assert_in_order(&grouped, 1);
    assert_eq!((sub.duplicates, sub.gaps), (0, 0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_in_the_middle_of_a_stream_loses_nothing() {
    let s = TestServer::start().await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    let room = alice.create_group("stream", &[bob.user_id()], None).await.unwrap();
    let mut sub = Subscriber::connect(&bob, "phone").await.unwrap().ack_every(50);
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 0..1000 {
                alice.send(room, Content::text(format!("m{i}")), Some(&format!("c{i}"))).await.unwrap();
            }
        })
    };
    let mut seqs: Vec<i64> = collect_messages(&mut sub, room, 300).await.iter().map(|m| m.seq).collect();
    sub.drop_connection(); // the network fails mid-stream
    tokio::time::sleep(Duration::from_millis(200)).await;
    seqs.extend(collect_messages(&mut sub, room, 700).await.iter().map(|m| m.seq));
    sender.await.unwrap();
    assert!(sub.reconnects >= 1);
    assert_in_order(&seqs, 1);
    assert_eq!(sub.gaps, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_move_the_device_cursor() {
    let s = TestServer::start_with(fast_acks_config()).await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    let room = alice.create_group("acks", &[bob.user_id()], None).await.unwrap();
    for i in 0..10 {
        alice.send_text(room, &format!("m{i}")).await.unwrap();
    }
    let mut socket = bob.connect("phone").await.unwrap();
    assert_in_order(&collect_seqs(&mut socket, room, 10).await, 1);
    socket.ack(room, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // acks are written in batches
    socket.close().await;

    // Same device: nothing old is replayed, new messages continue at 11.
    let mut again = bob.connect("phone").await.unwrap();
    assert_quiet(&mut again, room, Duration::from_millis(500)).await;
    alice.send_text(room, "new").await.unwrap();
    assert_eq!(collect_seqs(&mut again, room, 1).await, vec![11]);

    // Another device that never acked starts from the user's delivered cursor (10).
    let mut laptop = bob.connect("laptop").await.unwrap();
    assert_eq!(collect_seqs(&mut laptop, room, 1).await, vec![11]);
    assert_quiet(&mut laptop, room, Duration::from_millis(300)).await;

    // sync asks for a replay after the given cursor.
    again.send_frame(&ClientFrame::Sync { cursors: [(room, 5)].into() }).await.unwrap();
    assert_eq!(collect_seqs(&mut again, room, 6).await, vec![6, 7, 8, 9, 10, 11]);

    // Acks for rooms the user is not in are refused.
    let other = alice.create_group("private", &[], None).await.unwrap();
    again.ack(other, 1).await.unwrap();
    assert_eq!(expect_error(&mut again).await.0, 403);

    // A sync naming more than 1,000 rooms is refused whole.
    again.send_frame(&ClientFrame::Sync { cursors: (1..=1001).map(|i| (Id(i), 0)).collect() }).await.unwrap();
    let (code, msg) = expect_error(&mut again).await;
    assert_eq!(code, 400, "{msg}");

    // A device id is trimmed: `phone ` is the phone, whose cursor (10) is
    // behind the laptop's ack (11), which a new device would start from.
    laptop.ack(room, 11).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut padded = bob.connect("phone ").await.unwrap();
    assert_eq!(collect_seqs(&mut padded, room, 1).await, vec![11]);
    s.stop().await;
}

/// A device that was offline when its user joined a room gets every message
/// since the join on its next login, those another device acknowledged
/// included; a device new to the user starts at the user's delivered seq; and
/// after a rejoin nothing posted while the user was away is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_start_where_the_user_joined() {
    let s = TestServer::start_with(fast_acks_config()).await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    // The laptop is a known device: it acknowledged another room.
    let first = alice.create_group("first", &[bob.user_id()], None).await.unwrap();
    alice.send_text(first, "hello").await.unwrap();
    let mut laptop = bob.connect("laptop").await.unwrap();
    assert_eq!(collect_seqs(&mut laptop, first, 1).await, vec![1]);
    laptop.ack(first, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // acks are written in batches
    laptop.close().await;

    // Bob joins at seq 1 while the laptop is off; the phone gets 2-4 and acks them.
    let room = alice.create_group("later", &[], None).await.unwrap();
    alice.send_text(room, "before bob").await.unwrap();
    alice.add_member(room, bob.user_id()).await.unwrap();
    for i in 0..3 {
        alice.send_text(room, &format!("m{i}")).await.unwrap();
    }
    let mut phone = bob.connect("phone").await.unwrap();
    assert_eq!(collect_seqs(&mut phone, room, 3).await, vec![2, 3, 4]);
    phone.ack(room, 4).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut laptop = bob.connect("laptop").await.unwrap();
    assert_eq!(collect_seqs(&mut laptop, room, 3).await, vec![2, 3, 4], "the laptop gets what it missed");
    let mut tablet = bob.connect("tablet").await.unwrap();
    assert_quiet(&mut tablet, room, Duration::from_millis(300)).await;
    laptop.ack(room, 4).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for socket in [laptop, phone, tablet] {
        socket.close().await;
    }

    // Removed, two messages posted, added back: the laptop's cursor (4) is
    // behind, but only what follows the rejoin at seq 6 comes.
    alice.remove_member(room, bob.user_id()).await.unwrap();
    alice.send_text(room, "while bob is away").await.unwrap();
    alice.send_text(room, "still away").await.unwrap();
    alice.add_member(room, bob.user_id()).await.unwrap();
    alice.send_text(room, "welcome back").await.unwrap();
    let mut laptop = bob.connect("laptop").await.unwrap();
    assert_eq!(collect_seqs(&mut laptop, room, 1).await, vec![7]);
    assert_quiet(&mut laptop, room, Duration::from_millis(300)).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_unknown_frames_get_errors() {
    let mut config = common::test_config(None);
    config.ws.max_frame_bytes = 4096;
    let s = TestServer::start_with(config).await;
    let alice = s.user("a").await;
    let mut socket = alice.connect("d").await.unwrap();
    socket.send_raw(Message::text("not json")).await.unwrap();
    assert_eq!(expect_error(&mut socket).await.0, 400);
    socket.send_raw(Message::text(r#"{"type":"launch_missiles"}"#)).await.unwrap();
    assert_eq!(expect_error(&mut socket).await.0, 400);
    socket.send_raw(Message::text(r#"{"type":"send","room_id":"x"}"#)).await.unwrap();
    assert_eq!(expect_error(&mut socket).await.0, 400);
    socket.send_raw(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(expect_error(&mut socket).await.0, 400);
    // Still alive: ping → pong.
    socket.send_frame(&ClientFrame::Ping).await.unwrap();
    loop {
        if socket.next_frame_within(WAIT).await.unwrap().expect("pong") == ServerFrame::Pong {
            break;
        }
    }
    // Oversized: closed with 1009.
    socket.send_raw(Message::text("x".repeat(10_000))).await.unwrap();
    while socket.next_frame_within(WAIT).await.unwrap().is_some() {}
    assert_eq!(socket.closed.as_ref().map(|c| c.0), Some(1009), "{:?}", socket.closed);
    // The server is fine.
    let again = alice.connect("d").await.unwrap();
    again.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_and_join_requests_are_events() {
    let s = TestServer::start().await;
    let (owner, bob, carol) = (s.user("o").await, s.user("b").await, s.user("c").await);
    let room =
        owner.create_group("events", &[bob.user_id()], Some(stacker_proto::http::JoinPolicy::Approval)).await.unwrap();
    let mut owner_socket = owner.connect("d").await.unwrap();
    let mut carol_socket = carol.connect("d").await.unwrap();
    let request = carol.request_join(room, Some("hi")).await.unwrap();
    let e = next_event(&mut owner_socket).await;
    assert_eq!((e.kind, e.room_id, e.user_id), (EventKind::JoinRequested, room, Some(carol.user_id())));
    assert_eq!(e.data["request_id"], request.to_string());
    owner.respond_join(request, true).await.unwrap();
    let kinds: HashSet<EventKind> =
        [next_event(&mut carol_socket).await.kind, next_event(&mut carol_socket).await.kind].into();
    assert_eq!(kinds, [EventKind::JoinApproved, EventKind::RoomJoined].into());
    assert_eq!(next_event(&mut owner_socket).await.kind, EventKind::MemberJoined);

    // A member added while connected receives the room's messages live from then on.
    owner.send_text(room, "welcome").await.unwrap();
    assert_eq!(collect_seqs(&mut carol_socket, room, 1).await, vec![1]);

    owner.remove_member(room, carol.user_id()).await.unwrap();
    assert_eq!(next_event(&mut carol_socket).await.kind, EventKind::RoomLeft);
    owner.send_text(room, "carol is gone").await.unwrap();
    assert_quiet(&mut carol_socket, room, Duration::from_millis(300)).await;

    // Several users added by one call: each hears `room_joined`, and each
    // member already there one `members_joined` naming them all.
    assert_eq!(next_event(&mut owner_socket).await.kind, EventKind::MemberLeft, "carol's removal");
    let (dave, erin) = (s.user("d").await, s.user("e").await);
    let mut dave_socket = dave.connect("d").await.unwrap();
    owner.add_members(room, &[dave.user_id(), erin.user_id()]).await.unwrap();
    let e = next_event(&mut dave_socket).await;
    assert_eq!((e.kind, e.user_id), (EventKind::RoomJoined, Some(dave.user_id())));
    let e = next_event(&mut owner_socket).await;
    assert_eq!((e.kind, e.user_id), (EventKind::MembersJoined, None));
    let mut named: Vec<String> =
        e.data["user_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    named.sort();
    let mut expected = vec![dave.user_id().to_string(), erin.user_id().to_string()];
    expected.sort();
    assert_eq!(named, expected);
    let sent = owner.send_text(room, "welcome both").await.unwrap();
    no_event_before(&mut owner_socket, sent.seq).await; // one event per call
    no_event_before(&mut dave_socket, sent.seq).await; // newcomers hear only room_joined

    // A request answered after its sender was added anyway is approved, but
    // nobody hears of a second join.
    let frank = s.user("f").await;
    let request = frank.request_join(room, None).await.unwrap();
    assert_eq!(next_event(&mut owner_socket).await.kind, EventKind::JoinRequested);
    owner.add_member(room, frank.user_id()).await.unwrap();
    assert_eq!(next_event(&mut owner_socket).await.kind, EventKind::MemberJoined);
    owner.respond_join(request, true).await.unwrap();
    let sent = owner.send_text(room, "welcome frank").await.unwrap();
    no_event_before(&mut owner_socket, sent.seq).await;
    s.stop().await;
}

/// Past 100 devices, a new device makes the one that acknowledged least
/// recently forget its cursors: back, it starts as a device new to the user
/// (at the user's delivered seq) instead of replaying from its old cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recent_device_is_forgotten_past_a_hundred() {
    let mut config = fast_acks_config();
    config.delivery.device_prune_every_s = 0;
    config.delivery.device_forget_idle_s = 0;
    let s = TestServer::start_with(config).await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    let room = alice.create_direct(bob.user_id()).await.unwrap();
    alice.send_text(room, "one").await.unwrap();
    let mut old = bob.connect("old").await.unwrap();
    assert_eq!(collect_seqs(&mut old, room, 1).await, vec![1]);
    old.ack(room, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // flushed
    drop(old);
    alice.send_text(room, "two").await.unwrap();
    alice.send_text(room, "three").await.unwrap();
    // 99 more devices acknowledge everything, later than `old` did.
    let mut devices = Vec::new();
    for i in 0..99 {
        let mut device = bob.connect(&format!("d{i}")).await.unwrap();
        device.ack(room, 3).await.unwrap();
        devices.push(device);
    }
    drop(devices);
    // A device with no cursors prunes in the background, once the 99 acks
    // are flushed (every 20 ms here; later on a busy machine): new devices
    // until one has made `old` the 101st.
    let forgotten = || async {
        let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
        metrics.lines().find_map(|l| l.strip_prefix("stacker_devices_forgotten_total ")?.parse::<f64>().ok())
    };
    let mut newest = Vec::new();
    for i in 0.. {
        assert!(i < 100, "old was never forgotten");
        newest.push(bob.connect(&format!("newest{i}")).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        if forgotten().await.is_some_and(|n| n >= 1.0) {
            break;
        }
    }
    assert_eq!(forgotten().await, Some(1.0), "only old");
    let mut back = bob.connect("old").await.unwrap();
    assert_quiet(&mut back, room, Duration::from_millis(300)).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_senders_reach_three_listeners_complete_and_in_order() {
    let s = TestServer::start().await;
    let owner = s.user("o").await;
    let mut senders = Vec::new();
    for _ in 0..10 {
        senders.push(s.user("s").await);
    }
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(s.user("l").await);
    }
    let ids: Vec<Id> = senders.iter().chain(&listeners).map(Client::user_id).collect();
    let room = owner.create_group("busy", &ids, None).await.unwrap();
    let mut sockets = Vec::new();
    for l in &listeners {
        sockets.push(l.connect("d").await.unwrap());
    }
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| tokio::spawn(async move { collect_seqs(&mut socket, room, 5000).await }))
        .collect();
    let sends: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(t, c)| {
            tokio::spawn(async move {
                let mut socket = c.connect("d").await.unwrap();
                for i in 0..500 {
                    socket
                        .send_message(room, Content::text(format!("{t}:{i}")), Some(&format!("{t}-{i}")))
                        .await
                        .unwrap();
                }
                // Every send is acknowledged once stored.
                let mut acked = 0;
                while acked < 500 {
                    if let ServerFrame::Ack { .. } =
                        socket.next_frame_within(Duration::from_secs(60)).await.unwrap().expect("ack")
                    {
                        acked += 1;
                    }
                }
            })
        })
        .collect();
    for s in sends {
        s.await.unwrap();
    }
    for r in readers {
        assert_in_order(&r.await.unwrap(), 1);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_caught_up_or_dropped_and_a_fast_one_is_unaffected() {
    let mut config = common::test_config(None);
    config.ws.connection_queue = 8;
    config.ws.write_timeout_ms = 1500;
    config.delivery.enqueue_timeout_ms = 5;
    let s = TestServer::start_with(config).await;
    let (alice, fast, slow) = (s.user("a").await, s.user("f").await, s.user("s").await);
    let room = alice.create_group("burst", &[fast.user_id(), slow.user_id()], None).await.unwrap();

    // The slow reader: a tiny receive buffer and no reads for a while.
    let mut slow_socket = slow.connect("d").await.unwrap();
    let mut fast_socket = fast.connect("d").await.unwrap();
    let fast_reader = tokio::spawn(async move { collect_seqs(&mut fast_socket, room, 3000).await });
    let payload = "x".repeat(3000);
    let sends: Vec<_> = (0..6)
        .map(|t| {
            let (alice, payload) = (alice.clone(), payload.clone());
            tokio::spawn(async move {
                for i in 0..500 {
                    alice.send(room, Content::text(payload.clone()), Some(&format!("{t}-{i}"))).await.unwrap();
                }
            })
        })
        .collect();
    for s in sends {
        s.await.unwrap();
    }
    assert_in_order(&fast_reader.await.unwrap(), 1);

    // The server switched the slow connection to catch-up or dropped it.
    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    let overflowed = metrics.lines().any(|l| {
        (l.starts_with("stacker_connection_overflows_total")
            || l.starts_with("stacker_slow_consumer_disconnects_total"))
            && !l.ends_with(" 0")
    });
    assert!(overflowed, "expected an overflow or slow-consumer disconnect:\n{metrics}");

    // Whatever happened, the slow member ends with every message once, in order.
    let mut seqs = Vec::new();
    while let Ok(Some(frame)) = slow_socket.next_frame_within(Duration::from_secs(5)).await {
        match frame {
            ServerFrame::Chat(m) => seqs.push(m.seq),
            ServerFrame::Batch { messages } => seqs.extend(messages.iter().map(|m| m.seq)),
            _ => {}
        }
        if seqs.len() >= 3000 {
            break;
        }
    }
    if seqs.len() < 3000 {
        // Dropped: reconnect and resume after what arrived.
        let last = seqs.last().copied().unwrap_or(0);
        let mut sub = Subscriber::resume(&slow, "d", [(room, last)].into()).await.unwrap();
        seqs.extend(collect_messages(&mut sub, room, (3000 - last) as usize).await.iter().map(|m| m.seq));
    }
    assert_in_order(&seqs, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_closes_silent_connections() {
    let mut config = common::test_config(None);
    config.ws.heartbeat_s = 1;
    config.ws.heartbeat_timeout_s = 2;
    let s = TestServer::start_with(config).await;
    let alice = s.user("a").await;
    let mut socket = alice.connect("d").await.unwrap();
    // Not reading means not answering pings; after the timeout the server closes.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Reading now answers the queued pings, which may meet the closed socket
    // before the close frame is read: either way the connection must be gone.
    let ended = tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = socket.next_frame().await {} }).await;
    assert!(ended.is_ok(), "the server kept a silent connection open");
    if let Some((code, _)) = &socket.closed {
        assert_eq!(*code, 1001);
    }
    // A connection that answers pings stays open past the timeout.
    let mut live = alice.connect("live").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < deadline {
        assert!(live.next_frame_within(Duration::from_millis(200)).await.is_ok());
        assert!(live.closed.is_none(), "closed a responsive connection: {:?}", live.closed);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_sockets_with_1012_and_loses_nothing() {
    let config = fast_acks_config();
    let keep = config.clone();
    let s = TestServer::start_with(config).await;
    let (alice, bob) = (s.user("a").await, s.user("b").await);
    let room = alice.create_group("restart", &[bob.user_id()], None).await.unwrap();
    let mut socket = bob.connect("d").await.unwrap();
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(alice.send_text(room, &format!("m{i}")).await.unwrap().seq);
    }
    let first = collect_seqs(&mut socket, room, 5).await;
    s.stop_keeping_data().await;
    let mut rest = Vec::new();
    while let Some(frame) = socket.next_frame_within(WAIT).await.unwrap() {
        match frame {
            ServerFrame::Chat(m) => rest.push(m.seq),
            ServerFrame::Batch { messages } => rest.extend(messages.iter().map(|m| m.seq)),
            _ => {}
        }
    }
    assert_eq!(socket.closed.as_ref().map(|c| c.0), Some(1012), "{:?}", socket.closed);
    // After the restart the client catches up on whatever it missed.
    let s2 = TestServer::start_with(keep).await;
    let bob2 = s2.anon().with_token(bob.token().unwrap(), bob.user_id());
    let mut socket = bob2.connect("d").await.unwrap();
    let mut all: Vec<i64> = first.into_iter().chain(rest).collect();
    assert_in_order(&all, 1); // up to the close: no gap, no duplicate
    if all.len() < 20 {
        // A bare socket never acknowledges, so the new session may replay
        // from the start before it reads the sync: duplicates are dropped,
        // as a client does (exactly once after dedupe).
        socket.send_frame(&ClientFrame::Sync { cursors: [(room, *all.last().unwrap())].into() }).await.unwrap();
        while all.len() < 20 {
            for seq in collect_seqs(&mut socket, room, 1).await {
                if seq > *all.last().unwrap() {
                    all.push(seq);
                }
            }
        }
    }
    assert_in_order(&all, 1);
    assert_eq!(all.last(), sent.last());
    s2.stop().await;
}
