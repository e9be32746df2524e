//! The registry of open connections, by user.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};

use super::{Close, Frame};
use crate::model::{RoomId, UserId};
use crate::{Error, Result};

const SHARDS: usize = 64;

/// What a connection's session is asked to write or do. Two words: every
/// connection's queue allocates its entries 32 at a time, idle or not.
#[derive(Clone, Debug)]
pub enum Push {
    /// A stored message, shared by every connection it goes to.
    Message(Arc<Chat>),
    /// A frame outside seq order: ack, event, error, pong.
    Frame(Frame),
    /// The client's `sync`: it holds everything up to these seqs; replay the rest.
    Sync(Box<Vec<(RoomId, i64)>>),
    /// The user is no longer in `room`.
    Left(RoomId),
    /// Compare every room's cursor with the store and catch up where behind
    /// (after a connect in distributed mode, once route caches have expired).
    Recheck,
    Close(Box<Close>),
}

/// A stored message of `room`, encoded once as a `chat` frame.
#[derive(Debug)]
pub struct Chat {
    pub room: RoomId,
    pub seq: i64,
    pub frame: Frame,
}

impl Push {
    pub fn message(room: RoomId, seq: i64, frame: Frame) -> Push {
        Push::Message(Arc::new(Chat { room, seq, frame }))
    }
}

/// Connection health as the dispatcher sees it.
const OK: u8 = 0;
/// A message did not fit: the session must catch up from the store.
const LAGGING: u8 = 1;
/// A frame that cannot be replayed did not fit: the session must close.
const DOOMED: u8 = 2;

/// A cheap, cloneable handle to one connection's queue.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub user_id: UserId,
    pub device_id: Arc<str>,
    tx: mpsc::Sender<Push>,
    state: Arc<AtomicU8>,
}

impl ConnHandle {
    /// Offers a push, waiting up to `timeout` for room. A message that does not
    /// fit switches the connection to catch-up; any other frame that does not
    /// fit dooms it (it will be closed and the client reconnects).
    pub async fn offer(&self, push: Push, timeout: Duration) {
        let state = self.state.load(Ordering::Acquire);
        let is_message = matches!(push, Push::Message(_));
        if state == DOOMED || (state == LAGGING && is_message) {
            return; // it will read these from the store
        }
        let full = match self.tx.try_send(push) {
            Ok(()) => return,
            Err(TrySendError::Closed(_)) => return,
            Err(TrySendError::Full(push)) if !timeout.is_zero() => {
                metrics::counter!("stacker_enqueue_waits_total").increment(1);
                matches!(self.tx.send_timeout(push, timeout).await, Err(SendTimeoutError::Timeout(_)))
            }
            Err(TrySendError::Full(_)) => true,
        };
        if full {
            let next = if is_message { LAGGING } else { DOOMED };
            if self.state.fetch_max(next, Ordering::AcqRel) < next {
                metrics::counter!("stacker_connection_overflows_total", "to" => if is_message { "catch_up" } else { "close" })
                    .increment(1);
            }
        }
    }

    /// Takes the lagging mark (the session is about to catch up).
    pub(crate) fn take_lagging(&self) -> bool {
        self.state.compare_exchange(LAGGING, OK, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    pub(crate) fn is_doomed(&self) -> bool {
        self.state.load(Ordering::Acquire) == DOOMED
    }

    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

type Shard = RwLock<HashMap<UserId, Arc<[ConnHandle]>>>;

pub struct Hub {
    shards: Vec<Shard>,
    next_id: AtomicU64,
    count: AtomicUsize,
    max_connections: usize,
    /// One user's connections at most, so one account cannot take the whole
    /// `max_connections` (and every push to a user walks all of theirs).
    max_per_user: usize,
    queue: usize,
}

impl Hub {
    pub fn new(max_connections: usize, max_per_user: usize, queue: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            max_connections,
            max_per_user: max_per_user.max(1),
            queue: queue.max(1),
        }
    }

    fn shard(&self, user: UserId) -> &Shard {
        &self.shards[(user as u64 % SHARDS as u64) as usize]
    }

    pub fn connections(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Adds a connection; `Unavailable` past the connection limit,
    /// `RateLimited` past the user's.
    pub fn register(&self, user_id: UserId, device_id: &str) -> Result<(ConnHandle, mpsc::Receiver<Push>)> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Unavailable("connection limit reached; try another gateway".into()));
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let handle = ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user_id,
            device_id: Arc::from(device_id),
            tx,
            state: Arc::new(AtomicU8::new(OK)),
        };
        let mut shard = self.shard(user_id).write().unwrap_or_else(|e| e.into_inner());
        if shard.get(&user_id).is_some_and(|l| l.len() >= self.max_per_user) {
            drop(shard);
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::RateLimited(format!(
                "this user has {} connections open here already; close one first",
                self.max_per_user
            )));
        }
        let mut list: Vec<ConnHandle> = shard.get(&user_id).map(|l| l.to_vec()).unwrap_or_default();
        list.push(handle.clone());
        shard.insert(user_id, list.into());
        metrics::gauge!("stacker_connections").increment(1.0);
        Ok((handle, rx))
    }

    pub fn unregister(&self, handle: &ConnHandle) {
        let mut shard = self.shard(handle.user_id).write().unwrap_or_else(|e| e.into_inner());
        let Some(list) = shard.get(&handle.user_id) else { return };
        if !list.iter().any(|c| c.id == handle.id) {
            return;
        }
        let rest: Vec<ConnHandle> = list.iter().filter(|c| c.id != handle.id).cloned().collect();
        if rest.is_empty() {
            shard.remove(&handle.user_id);
        } else {
            shard.insert(handle.user_id, rest.into());
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("stacker_connections").decrement(1.0);
    }

    /// The user's open connections.
    pub fn user_connections(&self, user: UserId) -> Option<Arc<[ConnHandle]>> {
        self.shard(user).read().unwrap_or_else(|e| e.into_inner()).get(&user).cloned()
    }

    pub fn is_online(&self, user: UserId) -> bool {
        self.user_connections(user).is_some()
    }

    /// Offers `push` to every connection of `user`; returns how many it reached
    /// (0: the user is not connected here).
    pub async fn push_to_user(&self, user: UserId, push: &Push, timeout: Duration) -> usize {
        let Some(conns) = self.user_connections(user) else { return 0 };
        for conn in conns.iter() {
            conn.offer(push.clone(), timeout).await;
        }
        conns.len()
    }

    /// Every connection (a snapshot).
    pub fn all_connections(&self) -> Vec<ConnHandle> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read().unwrap_or_else(|e| e.into_inner()).values().flat_map(|l| l.to_vec()).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Open connections per user.
    pub fn connection_counts(&self) -> Vec<(UserId, usize)> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(u, l)| (*u, l.len())).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Asks every connection to close (each gets the close after what it has queued).
    pub async fn close_all(&self, code: u16, reason: &str) {
        let all: Vec<ConnHandle> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.read().unwrap_or_else(|e| e.into_inner()).values().flat_map(|l| l.to_vec()).collect::<Vec<_>>()
            })
            .collect();
        for conn in all {
            let close = Push::Close(Box::new(Close { code, reason: reason.to_string() }));
            if conn.tx.send_timeout(close, Duration::from_millis(100)).await.is_err() {
                conn.state.store(DOOMED, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_two_words() {
        // Each connection's queue allocates 32 pushes at a time, idle or not:
        // 512 bytes at this size, 1.8 KiB when a push held a message inline.
        assert_eq!(std::mem::size_of::<Push>(), 2 * std::mem::size_of::<usize>());
    }
}
