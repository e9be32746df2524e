//! Group commit: concurrent sends are gathered into batches so that many
//! messages cost one transaction. A send's future resolves only after the
//! transaction holding it has committed.
//!
//! Each writer answers the batch's senders as soon as it has committed and
//! hands the batch to its fan-out stage, which pushes it through the
//! [`Fanout`] in commit order (a room's pushes leave in seq order) while the
//! writer runs the next transaction.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::fanout::Fanout;
use crate::model::{Appended, NewMessage};
use crate::store::MessageStore;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct CommitConfig {
    /// Concurrent writer tasks. 1 for SQLite (one writer at a time anyway).
    pub writers: usize,
    /// Most messages in one transaction.
    pub max_batch: usize,
    /// Sends waiting for the writers (split evenly between their queues); past
    /// it a send waits up to `enqueue_timeout`.
    pub queue: usize,
    pub enqueue_timeout: Duration,
}

impl Default for CommitConfig {
    fn default() -> Self {
        Self { writers: 1, max_batch: 2048, queue: 8192, enqueue_timeout: Duration::from_millis(200) }
    }
}

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Result<Appended>>,
}

pub struct GroupCommitter {
    /// One queue per writer; a room's messages always go to the same one, so
    /// they are numbered, committed and pushed in the order they were submitted.
    queues: Vec<mpsc::Sender<Pending>>,
    enqueue_timeout: Duration,
    /// Set by `shutdown`: new sends are refused, queued ones still commit.
    closing: AtomicBool,
    /// Sends enqueued and not yet answered.
    in_flight: Arc<AtomicUsize>,
    _writers: Vec<JoinHandle<()>>,
}

impl GroupCommitter {
    pub fn start(store: Arc<dyn MessageStore>, fanout: Arc<dyn Fanout>, config: CommitConfig) -> Self {
        let writers = config.writers.max(1);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut queues = Vec::with_capacity(writers);
        let mut tasks = Vec::with_capacity(2 * writers);
        for _ in 0..writers {
            let (tx, rx) = mpsc::channel((config.queue / writers).max(1));
            // Each writer hands its committed batches to a fan-out stage of its
            // own, in commit order, and goes on with the next transaction.
            let (committed_tx, committed_rx) = mpsc::channel(FANOUT_STAGE_BATCHES);
            tasks.push(tokio::spawn(writer(store.clone(), rx, committed_tx, config.max_batch.max(1))));
            tasks.push(tokio::spawn(fan_out(fanout.clone(), committed_rx, in_flight.clone())));
            queues.push(tx);
        }
        Self {
            queues,
            enqueue_timeout: config.enqueue_timeout,
            closing: AtomicBool::new(false),
            in_flight,
            _writers: tasks,
        }
    }

    /// Stores one message; resolves once its batch has committed.
    pub async fn append(&self, message: NewMessage) -> Result<Appended> {
        self.submit(message).await?.await
    }

    /// Queues one message (waiting up to the enqueue timeout for room) and
    /// returns what resolves once it is stored. Messages to one room submitted
    /// one after another get seqs in that order (one writer per room), so a
    /// connection can keep several sends in flight without reordering them.
    pub async fn submit(&self, message: NewMessage) -> Result<impl Future<Output = Result<Appended>> + Send + 'static> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Unavailable("the server is shutting down; retry on another one".into()));
        }
        let (reply, done) = oneshot::channel();
        // Counted until a writer has answered it, even if our caller goes away.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let queue = &self.queues[crate::ids::bucket(message.room_id, self.queues.len())];
        if queue.send_timeout(Pending { message, reply }, self.enqueue_timeout).await.is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("stacker_commit_rejected_total").increment(1);
            return Err(Error::Unavailable("the server is busy storing messages; retry shortly".into()));
        }
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

/// Committed batches waiting for the fan-out stage; past it the writer waits.
const FANOUT_STAGE_BATCHES: usize = 4;

/// A batch's outcomes, or how many sends a failed batch answered.
enum Committed {
    Stored(Vec<Appended>),
    Failed(usize),
}

async fn writer(
    store: Arc<dyn MessageStore>,
    mut rx: mpsc::Receiver<Pending>,
    committed: mpsc::Sender<Committed>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut batch, max_batch).await == 0 {
            return; // every sender is gone and the queue is empty
        }
        let outcome = commit(&*store, &mut batch).await;
        if committed.send(outcome).await.is_err() {
            return;
        }
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
async fn commit(store: &dyn MessageStore, batch: &mut Vec<Pending>) -> Committed {
    let (messages, replies): (Vec<NewMessage>, Vec<_>) = batch.drain(..).map(|p| (p.message, p.reply)).unzip();
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
