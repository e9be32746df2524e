//! Rooms and membership, with the permission rules of SPEC §2:
//! owners and admins add, remove and mute members and answer join requests;
//! only the owner changes roles, and `new_role` 0 hands ownership over.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use serde_json::json;
use stacker_proto::ws::{Event, EventKind};
use stacker_proto::Id;

use crate::clock::now_ms;
use crate::fanout::Fanout;
use crate::ids::IdGenerator;
use crate::limits::AttemptWindow;
use crate::membership::{MemberBrief, MemberCache};
use crate::model::*;
use crate::store::{Removal, Store, ROOM_CLOSED};
use crate::{validate, Error, Result};

/// Most users one create/add_members call may name.
pub const MAX_MEMBERS_PER_CALL: usize = 1000;
pub const SEARCH_LIMIT_MAX: u32 = 100;
/// Pending join requests per page.
pub const JOIN_REQUESTS_LIMIT_DEFAULT: u32 = 50;
pub const JOIN_REQUESTS_LIMIT_MAX: u32 = 200;

/// Only rooms really created count (a request that fails validation, or
/// finds its direct room already there, is not counted).
const TOO_MANY_ROOMS: &str = "too many rooms created; wait a minute";
const TOO_MANY_JOINS: &str = "too many joins and join requests; wait a minute";

pub struct Rooms {
    store: Arc<dyn Store>,
    ids: Arc<IdGenerator>,
    fanout: Arc<dyn Fanout>,
    /// Invalidated here after every membership write (the store first).
    members: Arc<MemberCache>,
    creations: AttemptWindow<UserId>,
    searches: AttemptWindow<UserId>,
    joins: AttemptWindow<UserId>,
}

/// Per-user, per-minute limits on the calls whose cost a user alone
/// decides; 0 means no limit.
#[derive(Clone, Copy, Debug)]
pub struct RoomLimits {
    /// Each new room can name 1,000 members, each of whom then carries it.
    pub creations_per_user: u32,
    /// A search reads every group room's name (a substring match).
    pub searches_per_user: u32,
    /// Joins and join requests: each is announced to the room's members
    /// (or its moderators), so a join-leave loop would be a broadcast.
    pub joins_per_user: u32,
}

pub struct NewRoom<'a> {
    pub name: &'a str,
    pub is_group: bool,
    pub member_ids: &'a [UserId],
    pub join_policy: Option<JoinPolicy>,
}

/// 403 while a mute runs: a muted member reaches no one in the room.
fn refuse_if_muted(mute_until: i64) -> Result<()> {
    if mute_until > now_ms() {
        return Err(Error::forbidden(format!("you are muted in this room until {mute_until}")));
    }
    Ok(())
}

fn direct_key(a: UserId, b: UserId) -> String {
    format!("{}:{}", a.min(b), a.max(b))
}

impl Rooms {
    pub fn new(
        store: Arc<dyn Store>,
        ids: Arc<IdGenerator>,
        fanout: Arc<dyn Fanout>,
        members: Arc<MemberCache>,
        limits: RoomLimits,
    ) -> Self {
        let creations = AttemptWindow::new(limits.creations_per_user);
        let searches = AttemptWindow::new(limits.searches_per_user);
        let joins = AttemptWindow::new(limits.joins_per_user);
        Self { store, ids, fanout, members, creations, searches, joins }
    }

    /// Changeable while running (config reload).
    pub fn set_limits(&self, limits: RoomLimits) {
        self.creations.set_limit(limits.creations_per_user);
        self.searches.set_limit(limits.searches_per_user);
        self.joins.set_limit(limits.joins_per_user);
    }

    pub fn member_cache(&self) -> &Arc<MemberCache> {
        &self.members
    }

    fn event(
        kind: EventKind,
        room: RoomId,
        user: Option<UserId>,
        actor: Option<UserId>,
        data: serde_json::Value,
    ) -> Event {
        Event { kind, room_id: room.into(), user_id: user.map(Into::into), actor_id: actor.map(Into::into), data }
    }

    async fn member_ids(&self, room: RoomId) -> Result<Vec<UserId>> {
        Ok(self.store.members(room).await?.into_iter().map(|m| m.user_id).collect())
    }

    /// After users were added: caches learn, the new members get `room_joined`,
    /// everyone else one `member_joined` (one user) or one `members_joined`
    /// naming them all: an event per added user per member would make one
    /// call of 1,000 users in a big room a million pushes.
    async fn announce_joined(&self, room: RoomId, added: &[UserId], actor: Option<UserId>) -> Result<()> {
        if added.is_empty() {
            return Ok(());
        }
        self.members.invalidate(room).await;
        self.fanout.membership_changed(room, None).await;
        let newcomers: HashSet<UserId> = added.iter().copied().collect();
        let others: Vec<UserId> = self.member_ids(room).await?.into_iter().filter(|u| !newcomers.contains(u)).collect();
        for user in added {
            self.fanout
                .notify(&[*user], Self::event(EventKind::RoomJoined, room, Some(*user), actor, json!(null)))
                .await;
        }
        let joined = match added {
            [one] => Self::event(EventKind::MemberJoined, room, Some(*one), actor, json!(null)),
            many => {
                let ids: Vec<Id> = many.iter().map(|id| Id(*id)).collect();
                Self::event(EventKind::MembersJoined, room, None, actor, json!({ "user_ids": ids }))
            }
        };
        self.fanout.notify(&others, joined).await;
        Ok(())
    }

    /// After a user left or was removed.
    async fn announce_left(&self, room: RoomId, user: UserId, actor: Option<UserId>) -> Result<()> {
        self.members.invalidate(room).await;
        self.fanout.membership_changed(room, Some(user)).await;
        self.fanout.notify(&[user], Self::event(EventKind::RoomLeft, room, Some(user), actor, json!(null))).await;
        let rest = self.member_ids(room).await?;
        self.fanout.notify(&rest, Self::event(EventKind::MemberLeft, room, Some(user), actor, json!(null))).await;
        Ok(())
    }

    /// A change every member hears about.
    async fn announce(
        &self,
        room: RoomId,
        kind: EventKind,
        user: UserId,
        actor: UserId,
        data: serde_json::Value,
    ) -> Result<()> {
        let everyone = self.member_ids(room).await?;
        self.fanout.notify(&everyone, Self::event(kind, room, Some(user), Some(actor), data)).await;
        Ok(())
    }

    pub async fn room(&self, room_id: RoomId) -> Result<Room> {
        self.store.room(room_id).await?.ok_or_else(|| Error::not_found("room not found"))
    }

    async fn group_room(&self, room_id: RoomId) -> Result<Room> {
        let room = self.room(room_id).await?;
        if !room.is_group {
            return Err(Error::bad_request("this is a direct room; its membership cannot change"));
        }
        Ok(room)
    }

    /// May `user` post in `room` now: 404 without the room, 403 for a non-member
    /// or a muted member. Served from the member cache (the send hot path).
    pub async fn require_sender(&self, room_id: RoomId, user: UserId) -> Result<MemberBrief> {
        let me = self
            .members
            .member(room_id, user)
            .await?
            .ok_or_else(|| Error::forbidden("you are not a member of this room"))?;
        refuse_if_muted(me.mute_until)?;
        Ok(me)
    }

    /// The actor's membership, or 403 (read from the store).
    pub async fn require_member(&self, room_id: RoomId, user: UserId) -> Result<Member> {
        self.store.member(room_id, user).await?.ok_or_else(|| Error::forbidden("you are not a member of this room"))
    }

    async fn require_moderator(&self, room_id: RoomId, user: UserId) -> Result<Member> {
        let me = self.require_member(room_id, user).await?;
        if !me.role.is_moderator() {
            return Err(Error::forbidden("only the room's owner or an admin may do this"));
        }
        Ok(me)
    }

    async fn target_member(&self, room_id: RoomId, target: UserId) -> Result<Member> {
        self.store
            .member(room_id, target)
            .await?
            .ok_or_else(|| Error::not_found("that user is not a member of this room"))
    }

    /// Every listed user must exist (404 naming the first missing one).
    async fn require_users(&self, ids: &BTreeSet<UserId>) -> Result<()> {
        if ids.len() > MAX_MEMBERS_PER_CALL {
            return Err(Error::bad_request(format!("at most {MAX_MEMBERS_PER_CALL} users per call")));
        }
        let list: Vec<UserId> = ids.iter().copied().collect();
        let existing: BTreeSet<UserId> = self.store.existing_users(&list).await?.into_iter().collect();
        match ids.iter().find(|id| !existing.contains(id)) {
            Some(missing) => Err(Error::not_found(format!("user {missing} not found"))),
            None => Ok(()),
        }
    }

    /// Creates a group room (the creator is owner), or returns the one direct
    /// room between the creator and the other user.
    pub async fn create(&self, creator: UserId, req: NewRoom<'_>) -> Result<RoomId> {
        let others: BTreeSet<UserId> = req.member_ids.iter().copied().filter(|id| *id != creator).collect();
        let now = now_ms();
        if !req.is_group {
            let [other] = others.iter().copied().collect::<Vec<_>>()[..] else {
                return Err(Error::bad_request("a direct room (is_group: false) needs exactly one other member"));
            };
            if req.join_policy.is_some() {
                return Err(Error::bad_request("join_policy applies to group rooms only"));
            }
            self.require_users(&others).await?;
            let key = direct_key(creator, other);
            if let Some(room) = self.store.direct_room(&key).await? {
                return Ok(room.id);
            }
            let room = Room {
                id: self.ids.next_id(),
                name: validate::short_text("name", req.name, validate::ROOM_NAME_MAX, false)?,
                is_group: false,
                join_policy: JoinPolicy::Approval,
                owner_id: creator,
                direct_key: Some(key.clone()),
                last_seq: 0,
                created_at: now,
            };
            let members =
                [Member::new(room.id, creator, Role::Owner, now), Member::new(room.id, other, Role::Member, now)];
            return match self
                .creations
                .counted(Some(creator), TOO_MANY_ROOMS, self.store.insert_room(&room, &members))
                .await
            {
                Ok(()) => {
                    self.announce_joined(room.id, &[other], Some(creator)).await?;
                    Ok(room.id)
                }
                // Both users created it at once: the other insert won.
                Err(Error::Conflict(_)) => self
                    .store
                    .direct_room(&key)
                    .await?
                    .map(|r| r.id)
                    .ok_or_else(|| Error::Internal("direct room vanished after conflict".into())),
                Err(e) => Err(e),
            };
        }
        let name = validate::short_text("name", req.name, validate::ROOM_NAME_MAX, true)?;
        self.require_users(&others).await?;
        let room = Room {
            id: self.ids.next_id(),
            name,
            is_group: true,
            join_policy: req.join_policy.unwrap_or(JoinPolicy::Open),
            owner_id: creator,
            direct_key: None,
            last_seq: 0,
            created_at: now,
        };
        let mut members = vec![Member::new(room.id, creator, Role::Owner, now)];
        members.extend(others.iter().map(|id| Member::new(room.id, *id, Role::Member, now)));
        self.creations.counted(Some(creator), TOO_MANY_ROOMS, self.store.insert_room(&room, &members)).await?;
        let added: Vec<UserId> = others.into_iter().collect();
        self.announce_joined(room.id, &added, Some(creator)).await?;
        Ok(room.id)
    }

    /// Adds users as members; returns those actually added.
    pub async fn add_members(&self, actor: UserId, room_id: RoomId, user_ids: &[UserId]) -> Result<Vec<UserId>> {
        self.group_room(room_id).await?;
        self.require_moderator(room_id, actor).await?;
        let ids: BTreeSet<UserId> = user_ids.iter().copied().collect();
        if ids.is_empty() {
            return Err(Error::bad_request("member_ids must not be empty"));
        }
        self.require_users(&ids).await?;
        let now = now_ms();
        let members: Vec<Member> = ids.iter().map(|id| Member::new(room_id, *id, Role::Member, now)).collect();
        let added = self.store.add_members(&members).await?;
        self.announce_joined(room_id, &added, Some(actor)).await?;
        Ok(added)
    }

    pub async fn remove_member(&self, actor: UserId, room_id: RoomId, target: UserId) -> Result<()> {
        self.group_room(room_id).await?;
        let me = self.require_moderator(room_id, actor).await?;
        if target == actor {
            return Err(Error::bad_request("use leave to remove yourself"));
        }
        let them = self.target_member(room_id, target).await?;
        if them.role <= me.role {
            return Err(Error::forbidden("you may only remove members of a lower role than yours"));
        }
        match self.store.remove_member(room_id, target).await? {
            Removal::Removed => self.announce_left(room_id, target, Some(actor)).await,
            Removal::NotMember => Ok(()),
            // Ownership moved to them since their role was read.
            Removal::OwnerNotLast => Err(Error::forbidden("you may only remove members of a lower role than yours")),
        }
    }

    pub async fn leave(&self, actor: UserId, room_id: RoomId) -> Result<()> {
        self.group_room(room_id).await?;
        self.require_member(room_id, actor).await?;
        // The store judges by the owner at the time of the removal, not by
        // the role read above (ownership may have moved meanwhile).
        match self.store.remove_member(room_id, actor).await? {
            Removal::Removed => self.announce_left(room_id, actor, None).await,
            Removal::NotMember => Ok(()),
            Removal::OwnerNotLast => Err(Error::conflict(
                "the owner must transfer ownership (change_member_role with new_role 0) before leaving",
            )),
        }
    }

    /// A change every member hears of, so a muted member may not make it
    /// (nor repeat an unchanged name to the room).
    pub async fn change_nickname(&self, actor: UserId, room_id: RoomId, nickname: &str) -> Result<()> {
        let me = self.require_member(room_id, actor).await?;
        let nickname = validate::short_text("nickname", nickname, validate::NICKNAME_MAX, false)?;
        refuse_if_muted(me.mute_until)?;
        if me.nickname == nickname {
            return Ok(());
        }
        self.store.update_member(room_id, actor, &MemberChange::Nickname(nickname.clone())).await?;
        self.announce(room_id, EventKind::NicknameChanged, actor, actor, json!({ "nickname": nickname })).await
    }

    pub async fn change_role(&self, actor: UserId, room_id: RoomId, target: UserId, new_role: u8) -> Result<()> {
        let role = Role::from_code(new_role as i64)
            .ok_or_else(|| Error::bad_request("new_role must be 0 (owner), 1 (admin) or 2 (member)"))?;
        self.group_room(room_id).await?;
        let me = self.require_member(room_id, actor).await?;
        if me.role != Role::Owner {
            return Err(Error::forbidden("only the room's owner may change roles"));
        }
        if target == actor {
            return Err(Error::bad_request("the owner's role changes only by transferring ownership"));
        }
        self.target_member(room_id, target).await?;
        if role == Role::Owner {
            self.store.transfer_ownership(room_id, actor, target).await?;
            self.members.invalidate(room_id).await;
            self.announce(room_id, EventKind::RoleChanged, actor, actor, json!({ "role": Role::Admin.code() })).await?;
        } else {
            self.store.update_member(room_id, target, &MemberChange::Role(role)).await?;
            self.members.invalidate(room_id).await;
        }
        self.announce(room_id, EventKind::RoleChanged, target, actor, json!({ "role": role.code() })).await
    }

    /// Mutes until `until` (Unix ms); a time in the past unmutes.
    pub async fn mute(&self, actor: UserId, room_id: RoomId, target: UserId, until: i64) -> Result<()> {
        self.group_room(room_id).await?;
        let me = self.require_moderator(room_id, actor).await?;
        if until < 0 {
            return Err(Error::bad_request("until must be a Unix time in milliseconds (0 unmutes)"));
        }
        let them = self.target_member(room_id, target).await?;
        if them.role <= me.role {
            return Err(Error::forbidden("you may only mute members of a lower role than yours"));
        }
        self.store.update_member(room_id, target, &MemberChange::MuteUntil(until)).await?;
        self.members.invalidate(room_id).await;
        self.announce(room_id, EventKind::MemberMuted, target, actor, json!({ "until": until })).await
    }

    /// Joins an open group room.
    pub async fn join(&self, actor: UserId, room_id: RoomId) -> Result<()> {
        let room = self.group_room(room_id).await?;
        self.require_open_for_joins(&room).await?;
        if self.store.member(room_id, actor).await?.is_some() {
            return Err(Error::conflict("you are already a member of this room"));
        }
        if room.join_policy != JoinPolicy::Open {
            return Err(Error::forbidden("this room requires approval: send a join request"));
        }
        let member = [Member::new(room_id, actor, Role::Member, now_ms())];
        let added = self.joins.counted(Some(actor), TOO_MANY_JOINS, self.store.add_members(&member)).await?;
        self.announce_joined(room_id, &added, None).await
    }

    /// An owner leaves only as the last member (others need a transfer
    /// first), so a room whose owner is gone has nobody to moderate it:
    /// it takes no one in.
    async fn require_open_for_joins(&self, room: &Room) -> Result<()> {
        if self.store.member(room.id, room.owner_id).await?.is_none() {
            return Err(Error::not_found(ROOM_CLOSED));
        }
        Ok(())
    }

    pub async fn request_join(&self, actor: UserId, room_id: RoomId, message: Option<&str>) -> Result<i64> {
        let room = self.group_room(room_id).await?;
        let message = validate::short_text("message", message.unwrap_or(""), validate::JOIN_MESSAGE_MAX, false)?;
        self.require_open_for_joins(&room).await?;
        if self.store.member(room_id, actor).await?.is_some() {
            return Err(Error::conflict("you are already a member of this room"));
        }
        if room.join_policy == JoinPolicy::Open {
            return Err(Error::bad_request("this room is open: join it directly"));
        }
        if self.store.pending_join_request(room_id, actor).await?.is_some() {
            return Err(Error::conflict("you already have a pending request for this room"));
        }
        let request = JoinRequest {
            id: self.ids.next_id(),
            room_id,
            user_id: actor,
            message,
            status: JoinRequestStatus::Pending,
            created_at: now_ms(),
        };
        self.joins.counted(Some(actor), TOO_MANY_JOINS, self.store.insert_join_request(&request)).await?;
        let moderators: Vec<UserId> = self
            .store
            .members(room_id)
            .await?
            .into_iter()
            .filter(|m| m.role.is_moderator())
            .map(|m| m.user_id)
            .collect();
        let data = json!({ "request_id": request.id.to_string(), "message": request.message });
        self.fanout.notify(&moderators, Self::event(EventKind::JoinRequested, room_id, Some(actor), None, data)).await;
        Ok(request.id)
    }

    /// A page of the room's pending requests, oldest first, after the request
    /// `after` (the last of the previous page); and whether more follow.
    pub async fn join_requests(
        &self,
        actor: UserId,
        room_id: RoomId,
        after: Option<i64>,
        limit: Option<u32>,
    ) -> Result<(Vec<JoinRequest>, bool)> {
        let limit = limit.unwrap_or(JOIN_REQUESTS_LIMIT_DEFAULT);
        if !(1..=JOIN_REQUESTS_LIMIT_MAX).contains(&limit) {
            return Err(Error::bad_request(format!("limit must be 1 to {JOIN_REQUESTS_LIMIT_MAX}")));
        }
        self.group_room(room_id).await?;
        self.require_moderator(room_id, actor).await?;
        let after = match after {
            None => None,
            // Decided since is fine: it still marks a place in the order.
            Some(id) => match self.store.join_request(id).await? {
                Some(r) if r.room_id == room_id => Some((r.created_at, r.id)),
                _ => return Err(Error::bad_request("after must be a join request of this room")),
            },
        };
        let mut requests = self.store.pending_join_requests(room_id, after, limit + 1).await?;
        let has_more = requests.len() > limit as usize;
        requests.truncate(limit as usize);
        Ok((requests, has_more))
    }

    /// Answers a pending request; returns it as decided.
    pub async fn respond(&self, actor: UserId, request_id: i64, approve: bool) -> Result<JoinRequest> {
        let mut request =
            self.store.join_request(request_id).await?.ok_or_else(|| Error::not_found("join request not found"))?;
        self.require_moderator(request.room_id, actor).await?;
        if request.status != JoinRequestStatus::Pending {
            return Err(Error::conflict("this join request was already answered"));
        }
        let member = approve.then(|| Member::new(request.room_id, request.user_id, Role::Member, now_ms()));
        // `joins` is false when the user was added meanwhile (by a
        // moderator): approved, but nobody newly joins.
        let Some(joins) = self.store.decide_join_request(request_id, approve, member.as_ref()).await? else {
            return Err(Error::conflict("this join request was already answered"));
        };
        if joins {
            // Before anyone is told: the new member may post at once.
            self.members.invalidate(request.room_id).await;
        }
        request.status = if approve { JoinRequestStatus::Approved } else { JoinRequestStatus::Rejected };
        let kind = if approve { EventKind::JoinApproved } else { EventKind::JoinRejected };
        let data = json!({ "request_id": request.id.to_string() });
        self.fanout
            .notify(&[request.user_id], Self::event(kind, request.room_id, Some(request.user_id), Some(actor), data))
            .await;
        if joins {
            self.announce_joined(request.room_id, &[request.user_id], Some(actor)).await?;
        }
        Ok(request)
    }

    pub async fn search(&self, actor: UserId, query: &str, limit: Option<u32>) -> Result<Vec<Room>> {
        let query = validate::short_text("q", query, validate::ROOM_NAME_MAX, true)?;
        let limit = limit.unwrap_or(20);
        if !(1..=SEARCH_LIMIT_MAX).contains(&limit) {
            return Err(Error::bad_request(format!("limit must be 1 to {SEARCH_LIMIT_MAX}")));
        }
        self.searches.admit_or(Some(actor), "too many searches; wait a minute")?;
        self.store.search_rooms(&query, limit).await
    }

    pub async fn members(&self, actor: UserId, room_id: RoomId) -> Result<Vec<Member>> {
        self.room(room_id).await?;
        self.require_member(room_id, actor).await?;
        self.store.members(room_id).await
    }

    pub async fn joined_rooms(&self, actor: UserId) -> Result<Vec<RoomId>> {
        self.store.joined_rooms(actor).await
    }

    pub async fn summaries(&self, actor: UserId) -> Result<Vec<RoomSummary>> {
        self.store.room_summaries(actor).await
    }

    /// Moves the actor's read cursor forward (never past the room's last seq).
    pub async fn mark_read(&self, actor: UserId, room_id: RoomId, seq: i64) -> Result<i64> {
        let room = self.room(room_id).await?;
        self.require_member(room_id, actor).await?;
        if seq < 0 {
            return Err(Error::bad_request("seq must not be negative"));
        }
        let seq = seq.min(room.last_seq);
        self.store.update_member(room_id, actor, &MemberChange::ReadSeq(seq)).await?;
        Ok(seq)
    }
}
