//! The push engine: a pool of workers that fan stored messages out to online
//! members. A room's member list is split into batches; batch `k` of room `r`
//! always goes to worker `(r + k) % workers`, so every member's messages of a
//! room pass through one worker and stay in order.
//!
//! Every ack of a room goes through the worker of the room's first batch, in
//! commit order, so a connection's acks keep their order whatever happens to
//! the member list. A sender in that batch gets its ack right before its own
//! copy of the message, and its connection writes both in one go (pushed from
//! separate tasks, they took two socket writes about half the time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{DeliveryConfig, Frame, Hub, Push};
use crate::membership::{MemberCache, MemberList};
use crate::model::{Message, UserId};
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::ServerFrame;

struct Job {
    /// The message's push, built once and shared by its member batches;
    /// `None` for the ack of a send that pushes nothing.
    push: Option<Push>,
    /// The sender and its ack: pushed right before the sender's own copy
    /// when the sender is in `range`, else before the batch.
    ack: Option<(UserId, Push)>,
    members: MemberList,
    range: std::ops::Range<usize>,
}

pub struct Dispatcher {
    /// Each job with the time it was queued.
    queues: Vec<mpsc::Sender<(Job, Instant)>>,
    hub: Arc<Hub>,
    members: Arc<MemberCache>,
    batch_size: usize,
    enqueue_timeout: Duration,
}

impl Dispatcher {
    pub fn start(hub: Arc<Hub>, members: Arc<MemberCache>, config: &DeliveryConfig) -> Self {
        let mut queues = Vec::new();
        for _ in 0..config.workers.max(1) {
            let (tx, rx) = mpsc::channel(config.worker_queue.max(1));
            queues.push(tx);
            tokio::spawn(worker(rx, hub.clone(), config.enqueue_timeout));
        }
        Self { queues, hub, members, batch_size: config.batch_size.max(1), enqueue_timeout: config.enqueue_timeout }
    }

    /// Queues `ack` for the sender's connections and, if `push`, the
    /// message's fan-out (encoded once) to the room's members. Waits while the
    /// workers' queues are full (back-pressure on senders, bounded memory).
    pub async fn dispatch_stored(&self, message: &Message, ack: Push, push: bool) {
        let sender = message.sender_id;
        let members = if push { self.members_to_push(message).await } else { None };
        // Member ids are sorted. A sender in the first batch gets the ack with
        // its own copy; any other ack (nothing to push, a sender in a later
        // batch or gone meanwhile) is a job of its own on that batch's worker,
        // ahead of the fan-out.
        let mut ack = Some((sender, ack));
        let with_copy = members.as_ref().is_some_and(|m| m.binary_search(&sender).is_ok_and(|i| i < self.batch_size));
        if !with_copy {
            let job = Job { push: None, ack: ack.take(), members: MemberList::from([]), range: 0..0 };
            if !self.queue(message, 0, job).await {
                return;
            }
        }
        let Some(members) = members else { return };
        let frame = Frame::encode(&ServerFrame::Chat(ChatMessage::from(message)));
        let push = Push::message(message.room_id, message.seq, frame);
        let depth: usize = self.queues.iter().map(|q| q.max_capacity() - q.capacity()).sum();
        crate::hot_metric!(gauge, "stacker_dispatch_queue_depth").set(depth as f64);
        for (k, start) in (0..members.len()).step_by(self.batch_size).enumerate() {
            let range = start..(start + self.batch_size).min(members.len());
            let job = Job { push: Some(push.clone()), ack: ack.take(), members: members.clone(), range };
            if !self.queue(message, k, job).await {
                return;
            }
        }
    }

    /// The member ids to push `message` to; None, after logging it, when the
    /// list cannot be loaded.
    async fn members_to_push(&self, message: &Message) -> Option<MemberList> {
        match self.members.get(message.room_id).await {
            Ok(m) => Some(m.ids().clone()),
            Err(e) => {
                // Stored but not pushed: members get it from the store on their next
                // catch-up (reconnect, sync, or the next message's gap).
                tracing::warn!(room = message.room_id, error = %e, "cannot load members; skipping live push");
                metrics::counter!("stacker_dispatch_failures_total").increment(1);
                None
            }
        }
    }

    /// Queues batch `k` of the message's room on its worker; false when the
    /// workers are gone (a worker task ended), after pushing the job's ack,
    /// if any, directly: no fan-out then, but the sender still hears that its
    /// message is stored.
    async fn queue(&self, message: &Message, k: usize, job: Job) -> bool {
        let workers = self.queues.len();
        let worker = (crate::ids::bucket(message.room_id, workers) + k) % workers;
        match self.queues[worker].send((job, Instant::now())).await {
            Ok(()) => true,
            Err(mpsc::error::SendError((job, _))) => {
                if let Some((sender, ack)) = job.ack {
                    self.hub.push_to_user(sender, &ack, self.enqueue_timeout).await;
                }
                false
            }
        }
    }

    /// Waits until the queued fan-outs have been taken by the workers.
    pub async fn shutdown(&self) {
        for q in &self.queues {
            while q.capacity() < q.max_capacity() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

async fn worker(mut rx: mpsc::Receiver<(Job, Instant)>, hub: Arc<Hub>, enqueue_timeout: Duration) {
    while let Some((job, queued_at)) = rx.recv().await {
        crate::hot_metric!(histogram, "stacker_dispatch_queue_seconds").record(queued_at.elapsed().as_secs_f64());
        let started = Instant::now();
        let batch = &job.members[job.range.clone()];
        // The ack goes right before the sender's own copy, or first when the
        // sender is not in this batch (member ids are sorted).
        let ack_with_copy = match &job.ack {
            Some((sender, ack)) if batch.binary_search(sender).is_err() => {
                hub.push_to_user(*sender, ack, enqueue_timeout).await;
                None
            }
            other => other.as_ref(),
        };
        let mut delivered = 0u64;
        for user in batch {
            if let Some((sender, ack)) = ack_with_copy {
                if sender == user {
                    hub.push_to_user(*user, ack, enqueue_timeout).await;
                }
            }
            if let Some(push) = &job.push {
                delivered += hub.push_to_user(*user, push, enqueue_timeout).await as u64;
            }
        }
        crate::hot_metric!(counter, "stacker_pushes_total").increment(delivered);
        crate::hot_metric!(histogram, "stacker_enqueue_seconds").record(started.elapsed().as_secs_f64());
    }
}
