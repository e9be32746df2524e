//! Room member lists for fan-out, cached in front of the store.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use crate::model::{RoomId, UserId};
use crate::store::Store;
use crate::{Error, Result};

/// Sorted member ids of a room.
pub type MemberList = Arc<[UserId]>;

pub struct MemberCache {
    store: Arc<dyn Store>,
    cache: Cache<RoomId, MemberList>,
}

impl MemberCache {
    /// `ttl` bounds how stale a list can be when invalidations cannot reach
    /// this process (distributed mode: membership changes happen in meta).
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        let cache = Cache::builder().max_capacity(100_000).time_to_live(ttl).build();
        Self { store, cache }
    }

    pub async fn get(&self, room: RoomId) -> Result<MemberList> {
        let store = self.store.clone();
        self.cache
            .try_get_with(room, async move {
                let mut ids: Vec<UserId> = store.members(room).await?.into_iter().map(|m| m.user_id).collect();
                ids.sort_unstable();
                Ok::<_, Error>(MemberList::from(ids))
            })
            .await
            .map_err(|e: Arc<Error>| Error::Unavailable(format!("member list: {e}")))
    }

    pub async fn is_member(&self, room: RoomId, user: UserId) -> Result<bool> {
        Ok(self.get(room).await?.binary_search(&user).is_ok())
    }

    /// Forgets a room's members after a change. A load that started before the
    /// change may still insert the old list, so the entry is dropped once more
    /// shortly after.
    pub async fn invalidate(&self, room: RoomId) {
        self.cache.invalidate(&room).await;
        let cache = self.cache.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cache.invalidate(&room).await;
        });
    }
}
