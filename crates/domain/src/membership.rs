//! Room membership as the hot paths need it (may this user send here, who gets
//! this push), cached in front of the store.
//!
//! SQL stays the source of truth: every membership change is written to the
//! store first and then invalidates the cache (write-through), so no cached
//! state ever needs writing back and none can be lost with a cache.
//!
//! Two tiers: an in-process cache (every mode) and, in distributed mode, a
//! [`SharedMemberCache`] (Redis) that all processes fill and invalidate. Both
//! tiers are versioned so that a load which read the store before a change
//! cannot put the old list back after the change invalidated it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::future::Cache;
use serde::{Deserialize, Serialize};

use crate::model::{Role, RoomId, UserId};
use crate::store::Store;
use crate::{Error, Result};

/// Sorted member ids of a room.
pub type MemberList = Arc<[UserId]>;

/// What the send and push paths need of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberBrief {
    pub user_id: UserId,
    pub role: Role,
    /// Unix ms; the member may not send before then.
    pub mute_until: i64,
}

/// A room's members, sorted by user id. Serialized as `[[user, role, mute_until], …]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "Vec<(UserId, i64, i64)>", try_from = "Vec<(UserId, i64, i64)>")]
pub struct RoomMembers {
    members: Vec<MemberBrief>,
    ids: MemberList,
}

impl RoomMembers {
    pub fn new(mut members: Vec<MemberBrief>) -> Self {
        members.sort_unstable_by_key(|m| m.user_id);
        members.dedup_by_key(|m| m.user_id);
        let ids = members.iter().map(|m| m.user_id).collect();
        Self { members, ids }
    }

    pub fn ids(&self) -> &MemberList {
        &self.ids
    }

    pub fn get(&self, user: UserId) -> Option<&MemberBrief> {
        self.ids.binary_search(&user).ok().map(|i| &self.members[i])
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl From<RoomMembers> for Vec<(UserId, i64, i64)> {
    fn from(room: RoomMembers) -> Self {
        room.members.iter().map(|m| (m.user_id, m.role.code(), m.mute_until)).collect()
    }
}

impl TryFrom<Vec<(UserId, i64, i64)>> for RoomMembers {
    type Error = String;

    fn try_from(rows: Vec<(UserId, i64, i64)>) -> std::result::Result<Self, String> {
        let members = rows
            .into_iter()
            .map(|(user_id, role, mute_until)| {
                let role = Role::from_code(role).ok_or_else(|| format!("unknown role {role}"))?;
                Ok(MemberBrief { user_id, role, mute_until })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(RoomMembers::new(members))
    }
}

/// A member-list cache shared by every process of a cluster (Redis).
///
/// Filling is versioned: a loader reads [`version`](Self::version) before it
/// reads the store, and [`fill`](Self::fill) stores its list only if no
/// [`invalidate`](Self::invalidate) happened in between.
#[async_trait]
pub trait SharedMemberCache: Send + Sync {
    async fn get(&self, room: RoomId) -> Result<Option<RoomMembers>>;
    async fn version(&self, room: RoomId) -> Result<u64>;
    /// Stores `members` if the room's version is still `version`; true if stored.
    async fn fill(&self, room: RoomId, version: u64, members: &RoomMembers) -> Result<bool>;
    /// Drops the room's list and moves its version on.
    async fn invalidate(&self, room: RoomId) -> Result<()>;
}

/// Version stripes of the in-process tier (rooms share a stripe by hash; a
/// change in one costs its stripe-mates one extra load, never a stale read).
const STRIPES: usize = 1024;
/// Loads retried because a change landed meanwhile, before one is served uncached.
const MAX_RELOADS: usize = 3;

/// Read-through member cache: in-process, then the shared tier if any, then the store.
pub struct MemberCache {
    store: Arc<dyn Store>,
    shared: Option<Arc<dyn SharedMemberCache>>,
    /// Each entry remembers the stripe version it was loaded under.
    local: Cache<RoomId, (Arc<RoomMembers>, u64)>,
    versions: Box<[AtomicU64]>,
}

impl MemberCache {
    /// `ttl` bounds how long this process keeps a list; in distributed mode it
    /// is also how stale a list may be here after another process changed it.
    pub fn new(store: Arc<dyn Store>, shared: Option<Arc<dyn SharedMemberCache>>, ttl: Duration) -> Self {
        let local = Cache::builder().max_capacity(100_000).time_to_live(ttl).build();
        let versions = (0..STRIPES).map(|_| AtomicU64::new(0)).collect();
        Self { store, shared, local, versions }
    }

    fn stripe(&self, room: RoomId) -> &AtomicU64 {
        &self.versions[crate::ids::bucket(room, STRIPES)]
    }

    /// The room's members; 404 if the room does not exist.
    pub async fn get(&self, room: RoomId) -> Result<Arc<RoomMembers>> {
        for _ in 0..MAX_RELOADS {
            let version = self.stripe(room).load(Ordering::Acquire);
            let (members, loaded_at) = self
                .local
                .try_get_with(room, async move { Ok::<_, Error>((Arc::new(self.load(room).await?), version)) })
                .await
                .map_err(|e: Arc<Error>| match &*e {
                    Error::NotFound(m) => Error::NotFound(m.clone()),
                    Error::Unavailable(m) => Error::Unavailable(m.clone()),
                    // Storage detail goes to the log, never to a client.
                    other => {
                        tracing::warn!(room, error = %other, "cannot load a room's member list");
                        Error::Unavailable("member list unavailable; retry".into())
                    }
                })?;
            if loaded_at == self.stripe(room).load(Ordering::Acquire) {
                return Ok(members);
            }
            // Loaded before a change to this stripe: it may miss the change.
            self.local.invalidate(&room).await;
        }
        // Changes keep landing in this stripe: serve a fresh load uncached.
        Ok(Arc::new(self.load(room).await?))
    }

    async fn load(&self, room: RoomId) -> Result<RoomMembers> {
        let Some(shared) = &self.shared else {
            return self.load_from_store(room).await;
        };
        match shared.get(room).await {
            Ok(Some(members)) => return Ok(members),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(room, error = %e, "shared member cache unavailable; reading the store");
                return self.load_from_store(room).await;
            }
        }
        let version = shared.version(room).await;
        let members = self.load_from_store(room).await?;
        if let Ok(version) = version {
            if let Err(e) = shared.fill(room, version, &members).await {
                tracing::warn!(room, error = %e, "cannot fill the shared member cache");
            }
        }
        Ok(members)
    }

    async fn load_from_store(&self, room: RoomId) -> Result<RoomMembers> {
        if self.store.room(room).await?.is_none() {
            return Err(Error::not_found("room not found"));
        }
        let rows = self.store.members(room).await?;
        Ok(RoomMembers::new(
            rows.into_iter()
                .map(|m| MemberBrief { user_id: m.user_id, role: m.role, mute_until: m.mute_until })
                .collect(),
        ))
    }

    pub async fn member(&self, room: RoomId, user: UserId) -> Result<Option<MemberBrief>> {
        Ok(self.get(room).await?.get(user).copied())
    }

    pub async fn is_member(&self, room: RoomId, user: UserId) -> Result<bool> {
        Ok(self.member(room, user).await?.is_some())
    }

    /// Forgets a room's members after a change was written to the store. The
    /// shared tier goes first: a local load in between that still read the old
    /// shared list is caught by the version bump that follows.
    pub async fn invalidate(&self, room: RoomId) {
        if let Some(shared) = &self.shared {
            if let Err(e) = shared.invalidate(room).await {
                // Other processes keep their lists until the shared entry's TTL.
                tracing::warn!(room, error = %e, "cannot invalidate the shared member cache");
                metrics::counter!("stacker_member_cache_invalidate_failures_total").increment(1);
            }
        }
        self.stripe(room).fetch_add(1, Ordering::AcqRel);
        self.local.invalidate(&room).await;
    }
}
