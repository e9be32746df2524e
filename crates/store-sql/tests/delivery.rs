//! The push engine over a real SQLite store: what each connection's queue
//! gets when a message is stored (the member list comes from the store).

#[path = "../benches/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use stacker_domain::delivery::{Delivery, DeliveryConfig, Frame, Push, Session};
use stacker_domain::fanout::Fanout;
use stacker_domain::membership::MemberCache;
use stacker_domain::model::{Content, Message, NewMessage};
use stacker_domain::store::{MessageStore, Removal, RoomStore, Store};
use tokio::sync::mpsc::Receiver;

const WAIT: Duration = Duration::from_secs(5);

fn message(room: i64, sender: i64, seq: i64) -> Message {
    Message {
        id: common::next_id(),
        room_id: room,
        seq,
        sender_id: sender,
        client_msg_id: Some(format!("c{seq}")),
        content: Content::text("hello").into(),
        created_at: 1_700_000_000_000,
    }
}

/// A message to store, with `client_msg_id` `{tag}{seq}` and content `m{seq}`.
fn new_message(room: i64, sender: i64, tag: &str, seq: i64) -> NewMessage {
    NewMessage {
        id: common::next_id(),
        room_id: room,
        sender_id: sender,
        client_msg_id: Some(format!("{tag}{seq}")),
        content: Content::text(format!("m{seq}")).into(),
        created_at: 1_700_000_000_000,
    }
}

/// The next push, as `("ack", seq)` or `("chat", seq)`.
async fn next(queue: &mut Receiver<Push>) -> (&'static str, i64) {
    let push = tokio::time::timeout(WAIT, queue.recv()).await.expect("a push within 5 s").expect("queue open");
    match push {
        Push::Message(chat) => ("chat", chat.seq),
        Push::Frame(frame) => {
            let json: serde_json::Value = serde_json::from_slice(frame.bytes()).expect("a JSON frame");
            assert_eq!(json["type"], "ack", "unexpected frame {json}");
            ("ack", json["seq"].as_i64().expect("an ack names its seq"))
        }
        other => panic!("unexpected push {other:?}"),
    }
}

/// A SQLite store with `n` users, all in one room, and a push engine over it.
/// The `TempDb` keeps the database for as long as it lives.
async fn room_of(name: &str, n: usize, config: DeliveryConfig) -> (common::TempDb, Vec<i64>, i64, Arc<Delivery>) {
    let db = common::temp_db(name).await;
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    let users = common::users(&db.store, n).await;
    let room = common::room(&db.store, &users).await;
    let members = Arc::new(MemberCache::new(store.clone(), None, Duration::from_secs(600)));
    let delivery = Delivery::start(store, members, config);
    (db, users, room, delivery)
}

async fn nothing_more(queue: &mut Receiver<Push>) {
    // The workers have nothing else queued for it: give them a moment to prove it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(queue.try_recv().is_err(), "an extra push arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_gets_its_ack_just_before_its_own_copy() {
    let (db, users, room, delivery) = room_of("delivery", 2, DeliveryConfig::default()).await;
    let (sender, recipient) = (users[0], users[1]);
    let outsider = common::users(&db.store, 1).await[0];
    let (_s, mut sender_queue) = delivery.hub().register(sender, "phone").expect("register");
    let (_r, mut recipient_queue) = delivery.hub().register(recipient, "phone").expect("register");
    let (_o, mut outsider_queue) = delivery.hub().register(outsider, "phone").expect("register");

    // Stored and pushed: the ack, then the sender's own copy; the message alone
    // to the other member.
    delivery.message_stored(&message(room, sender, 1), true).await;
    assert_eq!(next(&mut sender_queue).await, ("ack", 1));
    assert_eq!(next(&mut sender_queue).await, ("chat", 1));
    assert_eq!(next(&mut recipient_queue).await, ("chat", 1));
    nothing_more(&mut sender_queue).await;
    nothing_more(&mut recipient_queue).await;

    // A repeated send (stored before, not pushed again): the ack alone.
    delivery.message_stored(&message(room, sender, 1), false).await;
    assert_eq!(next(&mut sender_queue).await, ("ack", 1));
    nothing_more(&mut sender_queue).await;
    nothing_more(&mut recipient_queue).await;

    // A sender no longer in the member list is still acknowledged; the
    // members get the message.
    delivery.message_stored(&message(room, outsider, 2), true).await;
    assert_eq!(next(&mut outsider_queue).await, ("ack", 2));
    assert_eq!(next(&mut sender_queue).await, ("chat", 2));
    assert_eq!(next(&mut recipient_queue).await, ("chat", 2));
    nothing_more(&mut outsider_queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_in_a_later_batch_of_a_large_room_gets_one_ack() {
    // Batches of 4 members: the room's 25 go out as 7 jobs over 3 workers.
    let config = DeliveryConfig { batch_size: 4, workers: 3, ..DeliveryConfig::default() };
    let (_db, users, room, delivery) = room_of("delivery-batches", 25, config).await;
    let mut queues = Vec::new();
    for u in &users {
        queues.push(delivery.hub().register(*u, "phone").expect("register").1);
    }
    // Member ids are sorted; the last user is in the last batch (6). Its ack
    // is a job of its own on batch 0's worker, and with 3 workers batch 6
    // runs on that worker too, after it: so the ack comes first here.
    let sender_index = users.len() - 1;
    delivery.message_stored(&message(room, users[sender_index], 1), true).await;
    for (i, queue) in queues.iter_mut().enumerate() {
        if i == sender_index {
            assert_eq!(next(queue).await, ("ack", 1));
        }
        assert_eq!(next(queue).await, ("chat", 1), "member {i}");
        nothing_more(queue).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_keep_their_order_when_a_repeated_send_follows_a_new_one() {
    // One worker, small batches and one-push queues: the new message's
    // fan-out is 50 jobs in a row, and the first of them waits the enqueue
    // timeout (100 ms) on a member whose queue is full. The sender (the
    // highest id) is in the last batch.
    let config = DeliveryConfig { batch_size: 10, workers: 1, connection_queue: 1, ..DeliveryConfig::default() };
    let (_db, users, room, delivery) = room_of("delivery-order", 500, config).await;
    let (_slow, _full) = delivery.hub().register(users[0], "slow").expect("register");
    let filler = Push::Frame(Frame::from_string("{}".into()));
    delivery.hub().push_to_user(users[0], &filler, Duration::ZERO).await;
    let sender = users[users.len() - 1];
    let (_s, mut queue) = delivery.hub().register(sender, "phone").expect("register");
    delivery.message_stored(&message(room, sender, 2), true).await;
    // Seq 1 sent again: stored before, so acknowledged but not pushed.
    delivery.message_stored(&message(room, sender, 1), false).await;
    assert_eq!(next(&mut queue).await, ("ack", 2));
    assert_eq!(next(&mut queue).await, ("chat", 2));
    assert_eq!(next(&mut queue).await, ("ack", 1));
    nothing_more(&mut queue).await;
}

/// Frames a session writes until `wait` passes with nothing new, as
/// `("chat", seq)` or `("batch", seq)` for each message of a batch.
async fn written(session: &mut Session, wait: Duration) -> Vec<(String, i64)> {
    let (frames, close) = stacker_testkit::frames_until_quiet(session, wait).await;
    assert!(close.is_none(), "the session closed: {close:?}");
    let mut seen = Vec::new();
    for json in frames {
        match json["type"].as_str() {
            Some("chat") => seen.push(("chat".into(), json["seq"].as_i64().expect("a seq"))),
            Some("batch") => seen.extend(
                json["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .map(|m| ("batch".into(), m["seq"].as_i64().expect("a seq"))),
            ),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    seen
}

/// Pushes of one room can cross on their way (in a cluster, different
/// processes store them). A message that arrives ahead of a missing one is
/// held for `gap_wait`: when the missing one arrives live, both are written in
/// order without reading the store; when it does not, the room is read from
/// the store once the wait is over. With no wait, the store is read at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_ahead_of_a_missing_one_waits_for_it_then_for_the_store() {
    for gap_wait in [Duration::from_millis(300), Duration::ZERO] {
        let mut config = DeliveryConfig::default();
        config.session.gap_wait = gap_wait;
        let (db, users, room, delivery) = room_of("gap-wait", 2, config).await;
        let (sender, reader) = (users[0], users[1]);
        let (handle, mut session) = delivery.connect(reader, "phone").await.expect("connect");
        let stored = |seq: i64| new_message(room, sender, "g", seq);
        db.store.append(&(1..=5).map(stored).collect::<Vec<_>>()).await.expect("stored");
        let live = |seq: i64| Push::message(room, seq, Frame::from_string(format!(r#"{{"type":"chat","seq":{seq}}}"#)));
        let quiet = Duration::from_millis(150);

        handle.offer(live(2), WAIT).await;
        handle.offer(live(3), WAIT).await;
        if gap_wait.is_zero() {
            let got = written(&mut session, quiet).await;
            assert_eq!(
                got,
                (1..=5).map(|s| ("batch".to_string(), s)).collect::<Vec<_>>(),
                "read from the store at once"
            );
            delivery.disconnect(&handle);
            continue;
        }
        assert_eq!(written(&mut session, Duration::from_millis(50)).await, [], "2 and 3 wait for 1");
        handle.offer(live(1), WAIT).await;
        let in_order: Vec<(String, i64)> = (1..=3).map(|s| ("chat".to_string(), s)).collect();
        assert_eq!(written(&mut session, quiet).await, in_order, "1 arrived: all three live, in order");

        // 4 never arrives live: once the wait is over, the store has 4 and 5.
        let started = std::time::Instant::now();
        handle.offer(live(5), WAIT).await;
        let got = written(&mut session, gap_wait + quiet).await;
        assert_eq!(got, [("batch".to_string(), 4), ("batch".to_string(), 5)]);
        assert!(started.elapsed() >= gap_wait, "read from the store only after the wait");
        // 4 and 5 late, live: already written.
        handle.offer(live(4), WAIT).await;
        handle.offer(live(5), WAIT).await;
        assert_eq!(written(&mut session, quiet).await, []);
        delivery.disconnect(&handle);
    }
}

/// The connection's writer polls its session inside a `select!` (heartbeats,
/// shutdown), so a call can be dropped while a push waits on the store, here
/// the first message of a room joined after connecting. That push is handled
/// on the next call, not lost.
///
/// Whether the first poll is still waiting depends on how fast the store's
/// thread answers, so each try joins a new room until a call was cut short;
/// a try whose first poll finished must have written the message already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_short_by_a_dropped_call_is_handled_on_the_next() {
    let (db, users, _room, delivery) = room_of("cut-short", 2, DeliveryConfig::default()).await;
    let (handle, mut session) = delivery.connect(users[1], "phone").await.expect("connect");
    let mut cut_short = false;
    for _ in 0..20 {
        let joined = common::room(&db.store, &users).await;
        let first = NewMessage {
            id: common::next_id(),
            room_id: joined,
            sender_id: users[0],
            client_msg_id: None,
            content: Content::text("first").into(),
            created_at: 1_700_000_000_000,
        };
        db.store.append(&[first]).await.expect("stored");
        let chat = Frame::from_string(r#"{"type":"chat","seq":1}"#.to_string());
        handle.offer(Push::message(joined, 1, chat), WAIT).await;

        let mut frames = Vec::new();
        let finished = tokio::select! {
            biased;
            _ = session.next(&mut frames) => true,
            _ = std::future::ready(()) => false,
        };
        if finished {
            assert_eq!(frames.len(), 1, "a call that finished wrote the message");
            continue;
        }
        assert!(frames.is_empty());
        assert_eq!(written(&mut session, Duration::from_millis(300)).await, [("chat".to_string(), 1)]);
        cut_short = true;
        break;
    }
    assert!(cut_short, "no first poll waited on the store in 20 tries");
    delivery.disconnect(&handle);
}

/// `next` appends to its buffer and returns once it added something: frames
/// the caller left in it do not make it return at once (a caller looping on
/// it would spin without ever yielding).
#[tokio::test]
async fn next_waits_for_new_frames_whatever_its_buffer_holds() {
    let (_db, users, _room, delivery) = room_of("next-buffer", 2, DeliveryConfig::default()).await;
    let (handle, mut session) = delivery.connect(users[1], "phone").await.expect("connect");
    let mut frames = vec![Frame::from_string(r#"{"type":"pong"}"#.to_string())];
    let waited = tokio::time::timeout(Duration::from_millis(200), session.next(&mut frames)).await;
    assert!(waited.is_err(), "nothing new to write, yet next returned: {waited:?}");
    assert_eq!(frames.len(), 1);
    let chat = Frame::from_string(r#"{"type":"chat","seq":1}"#.to_string());
    handle.offer(Push::Frame(chat), WAIT).await;
    tokio::time::timeout(Duration::from_secs(5), session.next(&mut frames))
        .await
        .expect("the frame offered is written")
        .expect("the session stays open");
    assert_eq!(frames.len(), 2);
    assert_eq!(&frames[1].bytes()[..], br#"{"type":"chat","seq":1}"#);
    delivery.disconnect(&handle);
}

/// A member removed without the session hearing of it (in a cluster the
/// `Left` push can be late or lost) reads nothing more of the room from the
/// store: not by `sync`, not by a gap's catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_reads_nothing_more_from_the_store() {
    let (db, users, room, delivery) = room_of("removed", 2, DeliveryConfig::default()).await;
    let (sender, reader) = (users[0], users[1]);
    let stored = |seq: i64| new_message(room, sender, "r", seq);
    db.store.append(&[stored(1)]).await.expect("stored");
    let quiet = Duration::from_millis(150);
    let (phone, mut on_phone) = delivery.connect(reader, "phone").await.expect("connect");
    let (laptop, mut on_laptop) = delivery.connect(reader, "laptop").await.expect("connect");
    for session in [&mut on_phone, &mut on_laptop] {
        assert_eq!(written(session, quiet).await, [("batch".to_string(), 1)], "a member catches up");
    }

    // Removed in the store only: no Left push reaches the sessions.
    assert_eq!(db.store.remove_member(room, reader).await.expect("removed"), Removal::Removed);
    db.store.append(&(2..=3).map(stored).collect::<Vec<_>>()).await.expect("stored");
    // A message ahead of the cursor: after the gap wait the room would be read from the store.
    phone.offer(Push::message(room, 3, Frame::from_string(r#"{"type":"chat","seq":3}"#.into())), WAIT).await;
    assert_eq!(written(&mut on_phone, Duration::from_millis(400)).await, [], "a gap of a room left reads nothing");
    laptop.offer(Push::Sync(Box::new(vec![(room, 0)])), WAIT).await;
    assert_eq!(written(&mut on_laptop, quiet).await, [], "a sync of a room left reads nothing");
    // Nor does a sync of a room the reader was never in.
    let others = common::room(&db.store, &[sender]).await;
    db.store.append(&[new_message(others, sender, "o", 1)]).await.expect("stored");
    laptop.offer(Push::Sync(Box::new(vec![(others, 0)])), WAIT).await;
    assert_eq!(written(&mut on_laptop, quiet).await, [], "a sync of a room never joined reads nothing");
    delivery.disconnect(&phone);
    delivery.disconnect(&laptop);
}

/// A member list that cannot be loaded answers 503 with a plain reason: the
/// database's own error text (table names, SQL) stays in the log.
#[tokio::test]
async fn a_failed_member_list_load_keeps_storage_detail_from_clients() {
    let db = common::temp_db("members-fail").await;
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    let users = common::users(&db.store, 2).await;
    let room = common::room(&db.store, &users).await;
    let members = MemberCache::new(store, None, Duration::from_secs(600));
    sqlx::query("DROP TABLE room_members").execute(db.store.pool()).await.expect("drop the table");
    let err = members.get(room).await.expect_err("the load fails");
    assert!(matches!(err, stacker_domain::Error::Unavailable(_)), "503: {err:?}");
    let text = err.to_string();
    assert!(!text.contains("room_members") && !text.to_lowercase().contains("sql"), "no storage detail: {text}");
}
