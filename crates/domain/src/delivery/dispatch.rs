//! The push engine: a pool of workers that fan stored messages out to online
//! members. A room's member list is split into batches; batch `k` of room `r`
//! always goes to worker `(r + k) % workers`, so every member's messages of a
//! room pass through one worker and stay in order.
//!
//! The sender's ack rides in the batch that holds the sender and is queued
//! right before the message itself, so the sending connection writes both in
//! one go (pushed from separate tasks, they took two socket writes about half
//! the time). The ack of a repeated send, which pushes nothing, takes the same
//! worker, so a connection's acks keep their order.

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
    /// The sender and its ack, for the batch that holds the sender.
    ack: Option<(UserId, Push)>,
    members: MemberList,
    range: std::ops::Range<usize>,
    queued_at: Instant,
}

pub struct Dispatcher {
    queues: Vec<mpsc::Sender<Job>>,
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
        let members = match self.members.get(message.room_id).await {
            Ok(m) => m.ids().clone(),
            Err(e) => {
                // Stored but not pushed: members get it from the store on their next
                // catch-up (reconnect, sync, or the next message's gap).
                tracing::warn!(room = message.room_id, error = %e, "cannot load members; skipping live push");
                metrics::counter!("stacker_dispatch_failures_total").increment(1);
                self.hub.push_to_user(sender, &ack, self.enqueue_timeout).await;
                return;
            }
        };
        // Member ids are sorted. A sender who left the room meanwhile is
        // acknowledged at once.
        let Ok(sender_index) = members.binary_search(&sender) else {
            self.hub.push_to_user(sender, &ack, self.enqueue_timeout).await;
            if push {
                self.queue_fan_out(message, members, None).await;
            }
            return;
        };
        if push {
            self.queue_fan_out(message, members, Some((sender_index, ack))).await;
        } else {
            // The sender's batch alone, with nothing but the ack.
            let job = Job {
                push: None,
                ack: Some((sender, ack)),
                members,
                range: sender_index..sender_index + 1,
                queued_at: Instant::now(),
            };
            self.queue(message, sender_index / self.batch_size, job).await;
        }
    }

    /// Queues one job per batch of `members`; the batch holding `ack`'s
    /// member index carries it.
    async fn queue_fan_out(&self, message: &Message, members: MemberList, mut ack: Option<(usize, Push)>) {
        let frame = Frame::encode(&ServerFrame::Chat(ChatMessage::from(message)));
        let push = Push::message(message.room_id, message.seq, frame);
        let depth: usize = self.queues.iter().map(|q| q.max_capacity() - q.capacity()).sum();
        crate::hot_metric!(gauge, "stacker_dispatch_queue_depth").set(depth as f64);
        let ack_batch = ack.as_ref().map(|(index, _)| index / self.batch_size);
        for (k, start) in (0..members.len()).step_by(self.batch_size).enumerate() {
            let range = start..(start + self.batch_size).min(members.len());
            let ack = if ack_batch == Some(k) { ack.take().map(|(index, ack)| (members[index], ack)) } else { None };
            let job = Job { push: Some(push.clone()), ack, members: members.clone(), range, queued_at: Instant::now() };
            if !self.queue(message, k, job).await {
                return;
            }
        }
    }

    /// Queues batch `k` of the message's room on its worker; false when the
    /// workers are gone (shutting down), after pushing the job's ack, if
    /// any, directly: no fan-out then, but the sender still hears that its
    /// message is stored.
    async fn queue(&self, message: &Message, k: usize, job: Job) -> bool {
        let workers = self.queues.len();
        let worker = (crate::ids::bucket(message.room_id, workers) + k) % workers;
        match self.queues[worker].send(job).await {
            Ok(()) => true,
            Err(mpsc::error::SendError(job)) => {
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

async fn worker(mut rx: mpsc::Receiver<Job>, hub: Arc<Hub>, enqueue_timeout: Duration) {
    while let Some(job) = rx.recv().await {
        crate::hot_metric!(histogram, "stacker_dispatch_queue_seconds").record(job.queued_at.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut delivered = 0u64;
        for user in &job.members[job.range.clone()] {
            if let Some((sender, ack)) = &job.ack {
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
