//! Client acks, kept in memory and written to the store in batches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::model::{DeviceCursor, RoomId, UserId};
use crate::store::Store;

/// Entries past which a flush starts at once instead of waiting for the timer.
const FLUSH_AT: usize = 10_000;

type Key = (UserId, Arc<str>, RoomId);

pub struct AckBuffer {
    pending: Arc<Mutex<HashMap<Key, i64>>>,
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
}

impl AckBuffer {
    pub fn start(store: Arc<dyn Store>, interval: Duration) -> Self {
        let buffer = Self { pending: Arc::default(), store, wake: Arc::new(Notify::new()) };
        let (pending, store, wake) = (buffer.pending.clone(), buffer.store.clone(), buffer.wake.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {},
                    _ = wake.notified() => {},
                }
                flush(&pending, &*store).await;
            }
        });
        buffer
    }

    /// Keeps the highest seq per (user, device, room).
    pub fn record(&self, user: UserId, device: &str, room: RoomId, seq: i64) {
        let len = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let entry = pending.entry((user, Arc::from(device), room)).or_insert(seq);
            *entry = (*entry).max(seq);
            pending.len()
        };
        if len >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    pub async fn flush(&self) {
        flush(&self.pending, &*self.store).await;
    }
}

async fn flush(pending: &Mutex<HashMap<Key, i64>>, store: &dyn Store) {
    let batch: Vec<DeviceCursor> = {
        let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .drain()
            .map(|((user_id, device_id, room_id), seq)| DeviceCursor {
                user_id,
                device_id: device_id.to_string(),
                room_id,
                seq,
            })
            .collect()
    };
    if batch.is_empty() {
        return;
    }
    if let Err(e) = store.save_cursors(&batch).await {
        // Put them back (unless newer acks arrived) and try again next time.
        tracing::warn!(error = %e, n = batch.len(), "cannot save delivery cursors; will retry");
        let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
        for c in batch {
            let entry = pending.entry((c.user_id, Arc::from(c.device_id.as_str()), c.room_id)).or_insert(c.seq);
            *entry = (*entry).max(c.seq);
        }
    }
}
