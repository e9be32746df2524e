//! The group committer over a real store (SQLite always; MariaDB when its
//! test service is configured, see `stacker-testkit`): bursts of sends to
//! many rooms are numbered and pushed in submission order per room, one
//! transaction at a time while the backlog is under `spread_at`, and several
//! side by side, one lane each, once it is over.

#[path = "../benches/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use stacker_domain::commit::{lane_of, CommitConfig, GroupCommitter};
use stacker_domain::fanout::Fanout;
use stacker_domain::model::{Appended, Content, Message, MessageId, NewMessage, RoomId, UserId};
use stacker_domain::store::MessageStore;
use stacker_domain::Result;
use stacker_proto::ws::Event;
use stacker_store_sql::{SqlOptions, SqlStore};
use stacker_testkit::{fresh_database, DbKind};

const LANES: usize = 4;
const ROOMS: usize = 24;
const ROUNDS: i64 = 40;

/// The real store, counting the transactions running at once.
struct Counted {
    store: SqlStore,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

#[async_trait]
impl MessageStore for Counted {
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        let result = self.store.append(batch).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn message(&self, id: MessageId) -> Result<Option<Message>> {
        self.store.message(id).await
    }

    async fn message_by_client_id(&self, sender: UserId, client_msg_id: &str) -> Result<Option<Message>> {
        self.store.message_by_client_id(sender, client_msg_id).await
    }

    async fn history(&self, room: RoomId, page: stacker_domain::model::HistoryPage) -> Result<Vec<Message>> {
        self.store.history(room, page).await
    }
}

/// Each batch the fan-out stage was handed, as (room, seq) in its order.
#[derive(Default)]
struct Recorder {
    batches: Mutex<Vec<Vec<(RoomId, i64)>>>,
}

#[async_trait]
impl Fanout for Recorder {
    async fn message_stored(&self, _: &Message, _: bool) {}

    async fn batch_stored(&self, outcomes: &[Appended]) {
        let batch = outcomes.iter().map(|o| (o.message().room_id, o.message().seq)).collect();
        self.batches.lock().expect("recorder lock").push(batch);
    }

    async fn membership_changed(&self, _: RoomId, _: Option<UserId>) {}

    async fn notify(&self, _: &[UserId], _: Event) {}
}

struct Burst {
    batches: Vec<Vec<(RoomId, i64)>>,
    most_running: usize,
}

/// `ROUNDS` sends to each of `ROOMS` rooms, all queued before any answer is
/// awaited; checks every room's seqs follow submission order, in the
/// answers and in the fan-out.
async fn burst(kind: DbKind, spread_at: usize) -> Option<Burst> {
    let db = fresh_database(kind).await?;
    let store = SqlStore::connect(&db.url, SqlOptions::default()).await.expect("connect");
    let users = common::users(&store, 2).await;
    let mut rooms = Vec::new();
    for _ in 0..ROOMS {
        rooms.push(common::room(&store, &users).await);
    }
    let counted = Arc::new(Counted { store, running: AtomicUsize::new(0), most_running: AtomicUsize::new(0) });
    let recorder = Arc::new(Recorder::default());
    let config =
        CommitConfig { writers: LANES, max_batch: 64, spread_at, queue: 8192, enqueue_timeout: Duration::from_secs(5) };
    let committer = GroupCommitter::start(counted.clone(), recorder.clone(), config);
    let mut answers = Vec::new();
    for round in 1..=ROUNDS {
        for (i, room) in rooms.iter().enumerate() {
            let message = NewMessage {
                id: common::next_id(),
                room_id: *room,
                sender_id: users[i % 2],
                client_msg_id: Some(format!("{room}-{round}")),
                content: Arc::new(Content::text("hello")),
                created_at: 1_700_000_000_000,
            };
            answers.push((*room, round, committer.submit(message).await.expect("queued")));
        }
    }
    for (room, round, answer) in answers {
        let appended = tokio::time::timeout(Duration::from_secs(30), answer).await.expect("answered").expect("stored");
        assert!(matches!(appended, Appended::Stored(_)), "{appended:?}");
        assert_eq!((appended.message().room_id, appended.message().seq), (room, round), "seq follows submission order");
    }
    committer.shutdown().await; // every batch has been through the fan-out stage
    let batches = recorder.batches.lock().expect("recorder lock").clone();
    for room in &rooms {
        let seqs: Vec<i64> = batches.iter().flatten().filter(|(r, _)| r == room).map(|(_, seq)| *seq).collect();
        assert_eq!(seqs, (1..=ROUNDS).collect::<Vec<_>>(), "room {room} pushed in seq order, each once");
    }
    let most_running = counted.most_running.load(Ordering::SeqCst);
    db.drop_database().await;
    Some(Burst { batches, most_running })
}

fn lanes_of(batch: &[(RoomId, i64)]) -> Vec<usize> {
    let mut lanes: Vec<usize> = batch.iter().map(|(room, _)| lane_of(*room, LANES)).collect();
    lanes.sort_unstable();
    lanes.dedup();
    lanes
}

/// Under `spread_at` one transaction at a time takes every lane's sends.
async fn small_backlog_commits_one_at_a_time(kind: DbKind) {
    let Some(run) = burst(kind, usize::MAX).await else { return };
    assert_eq!(run.most_running, 1, "one transaction at a time");
    assert!(run.batches.iter().any(|b| lanes_of(b).len() > 1), "a transaction took several lanes' sends");
}

/// Over `spread_at` the lanes commit side by side, each transaction one lane's.
async fn large_backlog_commits_side_by_side(kind: DbKind) {
    let Some(run) = burst(kind, 1).await else { return };
    assert!(run.most_running > 1, "transactions ran side by side");
    assert!(run.most_running <= LANES, "at most one transaction per lane");
    for batch in &run.batches {
        assert_eq!(lanes_of(batch).len(), 1, "a spread transaction holds one lane's sends: {batch:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_small_backlog_commits_one_at_a_time() {
    small_backlog_commits_one_at_a_time(DbKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_large_backlog_commits_side_by_side() {
    large_backlog_commits_side_by_side(DbKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_small_backlog_commits_one_at_a_time() {
    small_backlog_commits_one_at_a_time(DbKind::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_large_backlog_commits_side_by_side() {
    large_backlog_commits_side_by_side(DbKind::Mysql).await;
}
