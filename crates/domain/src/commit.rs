//! Group commit: concurrent sends are gathered into batches so that many
//! messages cost one transaction. A send's future resolves only after the
//! transaction holding it has committed.
//!
//! Sends queue in lanes (a room always in the same one, so its messages are
//! numbered and pushed in the order they were submitted). How many
//! transactions run at once follows the load: while the backlog is small,
//! one transaction at a time takes everything queued in every lane (fewer,
//! larger commits, and no two of this process's transactions waiting for
//! each other's row locks); once the backlog reaches `spread_at`, each free
//! lane commits on its own, up to one transaction per lane.
//!
//! Each batch's senders are answered as soon as it has committed, and the
//! batch goes to the fan-out stage, which pushes batches through the
//! [`Fanout`] in commit order (a room's pushes leave in seq order).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};

use crate::fanout::Fanout;
use crate::model::{Appended, NewMessage};
use crate::store::MessageStore;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct CommitConfig {
    /// Lanes, and so the most transactions at once. 1 for SQLite (one writer
    /// at a time anyway).
    pub writers: usize,
    /// Most messages in one transaction.
    pub max_batch: usize,
    /// Sends queued (in all lanes) from which the lanes commit side by side;
    /// below it, one transaction at a time takes them all.
    pub spread_at: usize,
    /// Sends waiting for the writers (split evenly between the lanes); past
    /// it a send waits up to `enqueue_timeout`.
    pub queue: usize,
    pub enqueue_timeout: Duration,
}

impl Default for CommitConfig {
    fn default() -> Self {
        Self {
            writers: 1,
            max_batch: 2048,
            spread_at: DEFAULT_SPREAD_AT,
            queue: 8192,
            enqueue_timeout: Duration::from_millis(200),
        }
    }
}

/// Measured on MariaDB in a two-gateway cluster (BENCHMARKS.md, "The
/// adaptive writers round"): one transaction at a time had the lower latency
/// while batches stayed under ~100 messages, four side by side kept up
/// better once they grew to ~500.
pub const DEFAULT_SPREAD_AT: usize = 256;

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Result<Appended>>,
}

pub struct GroupCommitter {
    /// One queue per lane; a room's messages always go to the same one.
    lanes: Vec<mpsc::Sender<Pending>>,
    /// Wakes the dispatcher when a send has been queued.
    queued: Arc<Notify>,
    enqueue_timeout: Duration,
    /// Set by `shutdown`: new sends are refused, queued ones still commit.
    closing: AtomicBool,
    /// Sends enqueued and not yet answered.
    in_flight: Arc<AtomicUsize>,
    /// Dropped with the committer (after `lanes`): the dispatcher commits
    /// what is queued and stops.
    _stop: oneshot::Sender<()>,
    _tasks: [JoinHandle<()>; 2],
}

impl GroupCommitter {
    pub fn start(store: Arc<dyn MessageStore>, fanout: Arc<dyn Fanout>, config: CommitConfig) -> Self {
        let writers = config.writers.max(1);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (lanes, receivers): (Vec<_>, Vec<_>) =
            (0..writers).map(|_| mpsc::channel((config.queue / writers).max(1))).unzip();
        let queued = Arc::new(Notify::new());
        let (stop_tx, stop) = oneshot::channel();
        // Committed batches go to one fan-out stage, in commit order, while
        // the lanes go on with the next transactions.
        let (committed_tx, committed_rx) = mpsc::channel(FANOUT_STAGE_BATCHES);
        let dispatcher = Dispatcher {
            store,
            lanes: receivers,
            busy: vec![false; writers],
            running: JoinSet::new(),
            running_lanes: HashMap::new(),
            committed: committed_tx,
            max_batch: config.max_batch.max(1),
            spread_at: config.spread_at.max(1),
            first_lane: 0,
        };
        let tasks = [
            tokio::spawn(dispatcher.run(queued.clone(), stop)),
            tokio::spawn(fan_out(fanout, committed_rx, in_flight.clone())),
        ];
        Self {
            lanes,
            queued,
            enqueue_timeout: config.enqueue_timeout,
            closing: AtomicBool::new(false),
            in_flight,
            _stop: stop_tx,
            _tasks: tasks,
        }
    }

    /// Stores one message; resolves once its batch has committed.
    pub async fn append(&self, message: NewMessage) -> Result<Appended> {
        self.submit(message).await?.await
    }

    /// Queues one message (waiting up to the enqueue timeout for room) and
    /// returns what resolves once it is stored. Messages to one room submitted
    /// one after another get seqs in that order (one lane per room), so a
    /// connection can keep several sends in flight without reordering them.
    pub async fn submit(&self, message: NewMessage) -> Result<impl Future<Output = Result<Appended>> + Send + 'static> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Unavailable("the server is shutting down; retry on another one".into()));
        }
        let (reply, done) = oneshot::channel();
        // Counted until a writer has answered it, even if our caller goes away.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let lane = &self.lanes[lane_of(message.room_id, self.lanes.len())];
        if lane.send_timeout(Pending { message, reply }, self.enqueue_timeout).await.is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("stacker_commit_rejected_total").increment(1);
            return Err(Error::Unavailable("the server is busy storing messages; retry shortly".into()));
        }
        self.queued.notify_one();
        Ok(async move { done.await.map_err(|_| Error::Unavailable("the message writer stopped; retry".into()))? })
    }

    /// Refuses new sends and waits until every accepted one is committed.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        while self.in_flight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The lane of a room's messages, of `lanes`.
pub fn lane_of(room: crate::model::RoomId, lanes: usize) -> usize {
    crate::ids::bucket(room, lanes)
}

/// Committed batches waiting for the fan-out stage; past it the dispatcher waits.
const FANOUT_STAGE_BATCHES: usize = 4;

/// A batch's outcomes, or how many sends a failed batch answered.
enum Committed {
    Stored(Vec<Appended>),
    Failed(usize),
}

/// Starts transactions from the lanes' queues and hands their outcomes to the
/// fan-out stage. A lane is in at most one transaction at a time, and its
/// transactions reach the fan-out stage in the order they ran.
struct Dispatcher {
    store: Arc<dyn MessageStore>,
    lanes: Vec<mpsc::Receiver<Pending>>,
    /// Lanes with a transaction running.
    busy: Vec<bool>,
    running: JoinSet<Committed>,
    /// Each running transaction's lanes and size.
    running_lanes: HashMap<tokio::task::Id, (Vec<usize>, usize)>,
    committed: mpsc::Sender<Committed>,
    max_batch: usize,
    spread_at: usize,
    /// Where the next one-at-a-time transaction starts taking lanes, turn
    /// by turn, so that no lane waits behind the others when `max_batch`
    /// cuts a transaction short.
    first_lane: usize,
}

impl Dispatcher {
    async fn run(mut self, queued: Arc<Notify>, mut stop: oneshot::Receiver<()>) {
        let mut stopping = false;
        loop {
            self.start_transactions(stopping);
            if stopping && self.running.is_empty() && self.lanes.iter().all(|lane| lane.is_empty()) {
                return; // the committer is gone and everything it accepted is committed
            }
            tokio::select! {
                _ = queued.notified() => {}
                _ = &mut stop, if !stopping => stopping = true,
                Some(done) = self.running.join_next_with_id() => {
                    let (id, outcome) = match done {
                        Ok((id, outcome)) => (id, Some(outcome)),
                        Err(e) => (e.id(), None),
                    };
                    let (lanes, size) = self.running_lanes.remove(&id).unwrap_or_default();
                    for lane in lanes {
                        self.busy[lane] = false;
                    }
                    // A panic dropped the batch's replies: its senders have
                    // been told the writer stopped.
                    let outcome = outcome.unwrap_or(Committed::Failed(size));
                    if self.committed.send(outcome).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Starts what the backlog calls for: nothing while a transaction runs
    /// and the backlog is small (the next one will take it all), one
    /// transaction per free lane once it is large.
    fn start_transactions(&mut self, stopping: bool) {
        let free: Vec<usize> = (0..self.lanes.len()).filter(|&i| !self.busy[i] && !self.lanes[i].is_empty()).collect();
        if free.is_empty() {
            return;
        }
        let backlog: usize = self.lanes.iter().map(|lane| lane.len()).sum();
        let spread = backlog >= self.spread_at;
        if !(spread || stopping || self.running.is_empty()) {
            return;
        }
        if spread {
            for lane in free {
                self.start_transaction(&[lane]);
            }
        } else {
            let mut lanes = free;
            let turn = self.first_lane % lanes.len();
            lanes.rotate_left(turn);
            self.first_lane = self.first_lane.wrapping_add(1);
            self.start_transaction(&lanes);
        }
    }

    /// One transaction of up to `max_batch` sends from `lanes`, in lane order.
    fn start_transaction(&mut self, lanes: &[usize]) {
        let mut batch = Vec::with_capacity(self.max_batch.min(1024));
        let mut taken = Vec::with_capacity(lanes.len());
        for &lane in lanes {
            let before = batch.len();
            while batch.len() < self.max_batch {
                match self.lanes[lane].try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            if batch.len() > before {
                taken.push(lane);
                self.busy[lane] = true;
            }
        }
        if batch.is_empty() {
            return;
        }
        let size = batch.len();
        let store = self.store.clone();
        let handle = self.running.spawn(async move { commit(&*store, batch).await });
        self.running_lanes.insert(handle.id(), (taken, size));
    }
}

/// Pushes committed messages in commit order (so a room's pushes leave in seq
/// order), then counts their sends as done.
async fn fan_out(fanout: Arc<dyn Fanout>, mut committed: mpsc::Receiver<Committed>, in_flight: Arc<AtomicUsize>) {
    while let Some(batch) = committed.recv().await {
        let answered = match batch {
            Committed::Stored(outcomes) => {
                fanout.batch_stored(&outcomes).await;
                outcomes.len()
            }
            Committed::Failed(n) => n,
        };
        in_flight.fetch_sub(answered, Ordering::AcqRel);
    }
}

/// Stores one batch and answers its senders.
async fn commit(store: &dyn MessageStore, batch: Vec<Pending>) -> Committed {
    let (messages, replies): (Vec<NewMessage>, Vec<_>) = batch.into_iter().map(|p| (p.message, p.reply)).unzip();
    let started = Instant::now();
    let mut result = store.append(&messages).await;
    if matches!(result, Err(Error::Conflict(_))) {
        // A unique key clash the store did not resolve itself: another writer
        // stored one of these client_msg_ids between the store's look-up and its
        // insert. A second try sees it and returns it as a duplicate.
        result = store.append(&messages).await;
    }
    crate::hot_metric!(histogram, "stacker_commit_seconds").record(started.elapsed().as_secs_f64());
    crate::hot_metric!(histogram, "stacker_commit_batch_size").record(messages.len() as f64);
    match result {
        Ok(outcomes) if outcomes.len() == messages.len() => {
            for (reply, outcome) in replies.into_iter().zip(&outcomes) {
                let _ = reply.send(Ok(outcome.clone()));
            }
            Committed::Stored(outcomes)
        }
        other => {
            let reason = match other {
                Err(e) => e.to_string(),
                Ok(o) => format!("store returned {} results for {} messages", o.len(), messages.len()),
            };
            tracing::error!(%reason, size = messages.len(), "message batch failed; senders get 503 and may retry");
            metrics::counter!("stacker_commit_failures_total").increment(1);
            let n = replies.len();
            for reply in replies {
                let _ = reply.send(Err(Error::Unavailable("could not store the message; retry".into())));
            }
            Committed::Failed(n)
        }
    }
}
