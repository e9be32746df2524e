//! The push engine: a pool of workers that fan stored messages out to online
//! members. A room's member list is split into batches; batch `k` of room `r`
//! always goes to worker `(r + k) % workers`, so every member's messages of a
//! room pass through one worker and stay in order.
//!
//! The sender's ack rides in the batch that holds the sender and is queued
//! right before the message itself, so the sending connection writes both in
//! one go (pushed from separate tasks, they took two socket writes about half
//! the time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{DeliveryConfig, Frame, Hub, Push};
use crate::membership::{MemberCache, MemberList};
use crate::model::{Message, UserId};
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::ServerFrame;

struct Job {
    /// The message's push, built once and shared by its member batches.
    push: Push,
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

    /// Encodes the message once and queues its fan-out, with `ack` for the
    /// sender's connections. Waits while the workers' queues are full
    /// (back-pressure on senders, bounded memory).
    pub async fn dispatch_message(&self, message: &Message, ack: Push) {
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
        let sender_batch = members.binary_search(&sender).ok().map(|i| i / self.batch_size);
        let mut ack = Some(ack);
        if sender_batch.is_none() {
            if let Some(ack) = ack.take() {
                self.hub.push_to_user(sender, &ack, self.enqueue_timeout).await;
            }
        }
        let frame = Frame::encode(&ServerFrame::Chat(ChatMessage::from(message)));
        let push = Push::message(message.room_id, message.seq, frame);
        let workers = self.queues.len();
        let depth: usize = self.queues.iter().map(|q| q.max_capacity() - q.capacity()).sum();
        crate::hot_metric!(gauge, "stacker_dispatch_queue_depth").set(depth as f64);
        for (k, start) in (0..members.len()).step_by(self.batch_size).enumerate() {
            let job = Job {
                push: push.clone(),
                ack: if sender_batch == Some(k) { ack.take().map(|ack| (sender, ack)) } else { None },
                members: members.clone(),
                range: start..(start + self.batch_size).min(members.len()),
                queued_at: Instant::now(),
            };
            let worker = (crate::ids::bucket(message.room_id, workers) + k) % workers;
            if let Err(mpsc::error::SendError(job)) = self.queues[worker].send(job).await {
                // Shutting down: no fan-out, but the sender still hears that it is stored.
                if let Some((sender, ack)) = job.ack {
                    self.hub.push_to_user(sender, &ack, self.enqueue_timeout).await;
                }
                return;
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
            delivered += hub.push_to_user(*user, &job.push, enqueue_timeout).await as u64;
        }
        crate::hot_metric!(counter, "stacker_pushes_total").increment(delivered);
        crate::hot_metric!(histogram, "stacker_enqueue_seconds").record(started.elapsed().as_secs_f64());
    }
}
