//! The store conformance suite: every contract of `stacker_domain::store`,
//! checked through `Arc<dyn Store>` so any implementation can be run through it.
//!
//! Each check builds its own users and rooms, so checks do not depend on one
//! another's data, only on starting from an empty database.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use stacker_domain::model::*;
use stacker_domain::store::{Removal, Store, ROOM_CLOSED};
use stacker_domain::Error;

pub type DynStore = Arc<dyn Store>;

static NEXT_ID: AtomicI64 = AtomicI64::new(1_000);

/// A fresh id, unique in this process.
pub fn id() -> i64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub async fn make_user(s: &DynStore, name: &str) -> User {
    let id = id();
    let user = User {
        id,
        username: format!("{name}_{id}"),
        nickname: format!("Nick {name}"),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        created_at: 1_700_000_000_000 + id,
    };
    s.insert_user(&user).await.expect("insert_user");
    user
}

pub async fn make_room(s: &DynStore, name: &str, owner: UserId, others: &[UserId], created_at: i64) -> Room {
    let room = Room {
        id: id(),
        name: name.to_string(),
        is_group: true,
        join_policy: JoinPolicy::Open,
        owner_id: owner,
        direct_key: None,
        last_seq: 0,
        created_at,
    };
    let mut members = vec![Member::new(room.id, owner, Role::Owner, created_at)];
    members.extend(others.iter().map(|u| Member::new(room.id, *u, Role::Member, created_at)));
    s.insert_room(&room, &members).await.expect("insert_room");
    room
}

pub fn msg(room: RoomId, sender: UserId, client_msg_id: Option<&str>, text: &str) -> NewMessage {
    NewMessage {
        id: id(),
        room_id: room,
        sender_id: sender,
        client_msg_id: client_msg_id.map(str::to_string),
        content: Content::text(text).into(),
        created_at: 1_700_000_000_000,
    }
}

fn stored(a: &Appended) -> &Message {
    match a {
        Appended::Stored(m) => m,
        Appended::Duplicate(m) => panic!("expected Stored, got Duplicate({m:?})"),
    }
}

fn duplicate(a: &Appended) -> &Message {
    match a {
        Appended::Duplicate(m) => m,
        Appended::Stored(m) => panic!("expected Duplicate, got Stored({m:?})"),
    }
}

/// Appends like the group committer does: a `Conflict` (a concurrent writer
/// stored the same client_msg_id) is retried once.
pub async fn append_retrying(s: &DynStore, batch: &[NewMessage]) -> Vec<Appended> {
    match s.append(batch).await {
        Err(Error::Conflict(_)) => s.append(batch).await.expect("append retried after Conflict"),
        other => other.expect("append"),
    }
}

async fn all_seqs(s: &DynStore, room: RoomId) -> Vec<i64> {
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let page = s.history(room, HistoryPage::After { seq: after, limit: 200 }).await.expect("history");
        if page.is_empty() {
            return seqs;
        }
        after = page.last().map(|m| m.seq).unwrap_or(after);
        seqs.extend(page.iter().map(|m| m.seq));
    }
}

/// Asserts the room holds exactly seqs 1..=n and its last_seq is n.
pub async fn assert_gapless(s: &DynStore, room: RoomId, n: i64) {
    let seqs = all_seqs(s, room).await;
    let expected: Vec<i64> = (1..=n).collect();
    assert_eq!(seqs.len(), expected.len(), "room {room}: {} messages, expected {n}", seqs.len());
    assert_eq!(seqs, expected, "room {room}: seqs must be exactly 1..={n}");
    let last_seq = s.room(room).await.expect("room").expect("room exists").last_seq;
    assert_eq!(last_seq, n, "room {room}: last_seq");
}

// ---------------------------------------------------------------- users

async fn users(s: DynStore) {
    let alice = make_user(&s, "alice").await;
    assert_eq!(s.user_by_name(&alice.username).await.unwrap(), Some(alice.clone()));
    assert_eq!(s.user_by_id(alice.id).await.unwrap(), Some(alice.clone()));
    assert_eq!(s.user_by_name("nobody_here").await.unwrap(), None);
    assert_eq!(s.user_by_id(-42).await.unwrap(), None);

    // Same username, new id: Conflict.
    let clash = User { id: id(), ..alice.clone() };
    assert!(matches!(s.insert_user(&clash).await, Err(Error::Conflict(_))), "taken username must be Conflict");
    assert_eq!(s.user_by_id(clash.id).await.unwrap(), None);
    // Usernames are stored as given (the domain lower-cases); a different case is a different row.
    let upper = User { id: id(), username: alice.username.to_uppercase(), ..alice.clone() };
    s.insert_user(&upper).await.expect("usernames compare byte-wise (binary collation on MySQL)");

    // Unicode round trip.
    let uni = User {
        id: id(), username: format!("zoë_{}", id()), nickname: "Zoë 😀 ünïcödé".into(), ..alice.clone()
    };
    s.insert_user(&uni).await.unwrap();
    assert_eq!(s.user_by_name(&uni.username).await.unwrap(), Some(uni.clone()));
}

async fn existing_users(s: DynStore) {
    let a = make_user(&s, "ex_a").await;
    let b = make_user(&s, "ex_b").await;
    let found = s.existing_users(&[a.id, -1, b.id, a.id, -2]).await.unwrap();
    assert_eq!(found.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([a.id, b.id]));
    assert_eq!(found.len(), 2, "each existing id once");
    assert!(s.existing_users(&[]).await.unwrap().is_empty());
    assert!(s.existing_users(&[-5, -6]).await.unwrap().is_empty());
    // More ids than one IN list holds.
    let mut many: Vec<UserId> = (0..1200).map(|i| -10_000 - i).collect();
    many.push(b.id);
    assert_eq!(s.existing_users(&many).await.unwrap(), vec![b.id]);
}

// ---------------------------------------------------------------- rooms

async fn rooms_and_members(s: DynStore) {
    let owner = make_user(&s, "own").await;
    let m1 = make_user(&s, "m1").await;
    let m2 = make_user(&s, "m2").await;
    let room = Room {
        id: id(),
        name: "Rust Lovers".into(),
        is_group: true,
        join_policy: JoinPolicy::Approval,
        owner_id: owner.id,
        direct_key: None,
        last_seq: 0,
        created_at: 5_000,
    };
    let members = [
        Member::new(room.id, owner.id, Role::Owner, 5_000),
        Member { nickname: "first".into(), mute_until: 77, ..Member::new(room.id, m2.id, Role::Admin, 5_001) },
        Member::new(room.id, m1.id, Role::Member, 5_002),
    ];
    s.insert_room(&room, &members).await.unwrap();
    assert_eq!(s.room(room.id).await.unwrap(), Some(room.clone()));
    assert_eq!(s.room(-1).await.unwrap(), None);
    // Members in join order.
    assert_eq!(s.members(room.id).await.unwrap(), members.to_vec());
    assert_eq!(s.member(room.id, m2.id).await.unwrap(), Some(members[1].clone()));
    assert_eq!(s.member(room.id, -1).await.unwrap(), None);
    assert_eq!(s.member(-1, owner.id).await.unwrap(), None);
    assert!(s.members(-1).await.unwrap().is_empty());

    // A room whose members clash is not created at all (one transaction).
    let bad = Room { id: id(), ..room.clone() };
    let dup_members = [Member::new(bad.id, owner.id, Role::Owner, 1), Member::new(bad.id, owner.id, Role::Member, 1)];
    assert!(s.insert_room(&bad, &dup_members).await.is_err());
    assert_eq!(s.room(bad.id).await.unwrap(), None, "insert_room must be atomic");
}

async fn direct_rooms(s: DynStore) {
    let a = make_user(&s, "dm_a").await;
    let b = make_user(&s, "dm_b").await;
    let key = format!("{}:{}", a.id.min(b.id), a.id.max(b.id));
    let room = Room {
        id: id(),
        name: String::new(),
        is_group: false,
        join_policy: JoinPolicy::Approval,
        owner_id: a.id,
        direct_key: Some(key.clone()),
        last_seq: 0,
        created_at: 9,
    };
    let members = [Member::new(room.id, a.id, Role::Owner, 9), Member::new(room.id, b.id, Role::Member, 9)];
    s.insert_room(&room, &members).await.unwrap();
    assert_eq!(s.direct_room(&key).await.unwrap(), Some(room.clone()));
    assert_eq!(s.direct_room("1:2-nope").await.unwrap(), None);

    let again = Room { id: id(), ..room.clone() };
    let again_members = [Member::new(again.id, b.id, Role::Owner, 10), Member::new(again.id, a.id, Role::Member, 10)];
    match s.insert_room(&again, &again_members).await {
        Err(Error::Conflict(_)) => {}
        other => panic!("second direct room with the same key must be Conflict, got {other:?}"),
    }
    assert_eq!(s.room(again.id).await.unwrap(), None);
    assert!(s.members(again.id).await.unwrap().is_empty(), "no members of the rejected room");
    // Several group rooms have no direct key: NULLs never clash.
    let o = make_user(&s, "dm_o").await;
    make_room(&s, "g1", o.id, &[], 1).await;
    make_room(&s, "g2", o.id, &[], 1).await;
}

async fn member_updates(s: DynStore) {
    let owner = make_user(&s, "up_o").await;
    let u = make_user(&s, "up_u").await;
    let room = make_room(&s, "updates", owner.id, &[u.id], 1).await;

    assert!(s.update_member(room.id, u.id, &MemberChange::Nickname("nick".into())).await.unwrap());
    // Setting the same value still reports a member (rows matched, not changed).
    assert!(s.update_member(room.id, u.id, &MemberChange::Nickname("nick".into())).await.unwrap());
    assert!(s.update_member(room.id, u.id, &MemberChange::Role(Role::Admin)).await.unwrap());
    assert!(s.update_member(room.id, u.id, &MemberChange::MuteUntil(123_456)).await.unwrap());
    assert!(s.update_member(room.id, u.id, &MemberChange::ReadSeq(7)).await.unwrap());
    // Backwards: no change, but still a member.
    assert!(s.update_member(room.id, u.id, &MemberChange::ReadSeq(3)).await.unwrap());
    let m = s.member(room.id, u.id).await.unwrap().unwrap();
    assert_eq!((m.nickname.as_str(), m.role, m.mute_until, m.read_seq), ("nick", Role::Admin, 123_456, 7));
    assert!(s.update_member(room.id, u.id, &MemberChange::ReadSeq(9)).await.unwrap());
    assert_eq!(s.member(room.id, u.id).await.unwrap().unwrap().read_seq, 9);

    let stranger = make_user(&s, "up_x").await;
    for change in [
        MemberChange::Nickname("x".into()),
        MemberChange::Role(Role::Member),
        MemberChange::MuteUntil(1),
        MemberChange::ReadSeq(1),
    ] {
        assert!(!s.update_member(room.id, stranger.id, &change).await.unwrap(), "{change:?} on a non-member");
    }
    assert_eq!(s.member(room.id, stranger.id).await.unwrap(), None);
    // The owner's role moves only by a transfer.
    let owned = s.update_member(room.id, owner.id, &MemberChange::Role(Role::Member)).await;
    assert!(matches!(owned, Err(Error::Forbidden(_))), "{owned:?}");
    assert_eq!(s.member(room.id, owner.id).await.unwrap().unwrap().role, Role::Owner);
    assert!(!s.update_member(-1, u.id, &MemberChange::Role(Role::Member)).await.unwrap(), "no such room");
}

async fn add_and_remove_members(s: DynStore) {
    let owner = make_user(&s, "am_o").await;
    let a = make_user(&s, "am_a").await;
    let b = make_user(&s, "am_b").await;
    let c = make_user(&s, "am_c").await;
    let room = make_room(&s, "add-remove", owner.id, &[a.id], 1).await;

    let batch = [
        Member::new(room.id, a.id, Role::Member, 2),
        Member::new(room.id, b.id, Role::Member, 2),
        Member::new(room.id, c.id, Role::Member, 3),
        Member::new(room.id, b.id, Role::Member, 2),
    ];
    assert_eq!(s.add_members(&batch).await.unwrap(), vec![b.id, c.id], "only those not yet members");
    assert!(s.add_members(&batch).await.unwrap().is_empty(), "adding again adds nobody");
    assert!(s.add_members(&[]).await.unwrap().is_empty());
    // The existing member's row is untouched.
    assert_eq!(s.member(room.id, a.id).await.unwrap().unwrap().joined_at, 1);
    let ids: Vec<UserId> = s.members(room.id).await.unwrap().iter().map(|m| m.user_id).collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(&ids[2..], &[b.id, c.id][..], "join order: later joiners last");

    assert_eq!(s.remove_member(room.id, b.id).await.unwrap(), Removal::Removed);
    assert_eq!(s.remove_member(room.id, b.id).await.unwrap(), Removal::NotMember, "second removal: not a member");
    assert_eq!(s.remove_member(-1, a.id).await.unwrap(), Removal::NotMember);
    assert_eq!(s.member(room.id, b.id).await.unwrap(), None);
    // Removed members may be added back; their cursors, and where they
    // joined, start at the room's last seq then.
    s.append(&[msg(room.id, a.id, None, "while b was away"), msg(room.id, a.id, None, "and again")]).await.unwrap();
    assert_eq!(s.add_members(&[Member::new(room.id, b.id, Role::Member, 9)]).await.unwrap(), vec![b.id]);
    s.append(&[msg(room.id, a.id, None, "after b is back")]).await.unwrap();
    let cursor = |cursors: Vec<stacker_domain::model::MemberCursor>| {
        cursors.into_iter().find(|c| c.room_id == room.id).map(|c| (c.joined_seq, c.delivered_seq, c.last_seq))
    };
    assert_eq!(cursor(s.member_cursors(b.id).await.unwrap()), Some((2, 2, 3)), "b rejoined at seq 2");
    assert_eq!(cursor(s.member_cursors(a.id).await.unwrap()), Some((0, 0, 3)), "a joined the empty room");

    // Many members at once (more than one multi-row INSERT).
    let room2 = make_room(&s, "big", owner.id, &[], 1).await;
    let mut many = Vec::new();
    for i in 0..150 {
        let u = make_user(&s, &format!("bulk{i}")).await;
        many.push(Member::new(room2.id, u.id, Role::Member, 10 + i));
    }
    let added = s.add_members(&many).await.unwrap();
    assert_eq!(added, many.iter().map(|m| m.user_id).collect::<Vec<_>>());
    assert_eq!(s.members(room2.id).await.unwrap().len(), 151);
}

/// A mute still running when a member leaves (or is removed) comes back
/// with them, by add_members or an approved join request; one that ended
/// does not, and one put back is not put back twice.
async fn mutes_outlast_leaving(s: DynStore) {
    let owner = make_user(&s, "mu_o").await;
    let a = make_user(&s, "mu_a").await;
    let b = make_user(&s, "mu_b").await;
    let room = make_room(&s, "mutes", owner.id, &[a.id, b.id], 1).await;
    let later = stacker_domain::clock::now_ms() + 3_600_000;
    let mute_until = |user: UserId| {
        let s = s.clone();
        async move { s.member(room.id, user).await.unwrap().expect("a member").mute_until }
    };
    s.update_member(room.id, a.id, &MemberChange::MuteUntil(later)).await.unwrap();
    s.update_member(room.id, b.id, &MemberChange::MuteUntil(5)).await.unwrap(); // long over
    assert_eq!(s.remove_member(room.id, a.id).await.unwrap(), Removal::Removed);
    assert_eq!(s.remove_member(room.id, b.id).await.unwrap(), Removal::Removed);
    assert_eq!(s.add_members(&[Member::new(room.id, a.id, Role::Member, 2)]).await.unwrap(), vec![a.id]);
    assert_eq!(mute_until(a.id).await, later, "the running mute came back");
    let request = JoinRequest {
        id: id(),
        room_id: room.id,
        user_id: b.id,
        message: String::new(),
        status: JoinRequestStatus::Pending,
        created_at: 3,
    };
    s.insert_join_request(&request).await.unwrap();
    assert_eq!(
        s.decide_join_request(request.id, true, Some(&Member::new(room.id, b.id, Role::Member, 3))).await.unwrap(),
        Some(true)
    );
    assert_eq!(mute_until(b.id).await, 0, "an ended mute is not kept");
    // Put back once: unmuted after coming back, it stays unmuted while
    // others join, and leaving and rejoining again keeps no mute.
    s.update_member(room.id, a.id, &MemberChange::MuteUntil(0)).await.unwrap();
    let c = make_user(&s, "mu_c").await;
    s.add_members(&[Member::new(room.id, c.id, Role::Member, 4), Member::new(room.id, a.id, Role::Member, 4)])
        .await
        .unwrap();
    assert_eq!(mute_until(a.id).await, 0);
    // Two removals of one muted member at once: one removes, neither fails.
    s.update_member(room.id, c.id, &MemberChange::MuteUntil(later)).await.unwrap();
    let (first, second) = tokio::join!(s.remove_member(room.id, c.id), s.remove_member(room.id, c.id));
    assert_eq!([first.unwrap(), second.unwrap()].iter().filter(|r| **r == Removal::Removed).count(), 1);
    s.add_members(&[Member::new(room.id, c.id, Role::Member, 5)]).await.unwrap();
    assert_eq!(mute_until(c.id).await, later);
    assert_eq!(s.remove_member(room.id, a.id).await.unwrap(), Removal::Removed);
    s.add_members(&[Member::new(room.id, a.id, Role::Member, 4)]).await.unwrap();
    assert_eq!(mute_until(a.id).await, 0);
}

/// An owner leaves only last, and a room whose owner left takes no one in;
/// both are checked in the write's own transaction, so a join racing the
/// owner's last leave never leaves members with no owner.
async fn owner_leaves_last(s: DynStore) {
    let o = make_user(&s, "ol_o").await;
    let a = make_user(&s, "ol_a").await;
    let room = make_room(&s, "owner-leaves", o.id, &[a.id], 1).await;
    assert_eq!(s.remove_member(room.id, o.id).await.unwrap(), Removal::OwnerNotLast, "a is still a member");
    assert!(s.member(room.id, o.id).await.unwrap().is_some(), "nothing removed");
    assert_eq!(s.remove_member(room.id, a.id).await.unwrap(), Removal::Removed);
    assert_eq!(s.remove_member(-1, o.id).await.unwrap(), Removal::NotMember, "no such room");
    assert_eq!(s.remove_member(room.id, o.id).await.unwrap(), Removal::Removed, "alone: removed");
    assert_eq!(s.remove_member(room.id, o.id).await.unwrap(), Removal::NotMember);
    assert_eq!(s.member(room.id, o.id).await.unwrap(), None);

    let closed = |r: &Result<Vec<UserId>, Error>| matches!(r, Err(Error::NotFound(why)) if why == ROOM_CLOSED);
    assert!(closed(&s.add_members(&[Member::new(room.id, a.id, Role::Member, 2)]).await), "closed room");
    assert!(s.members(room.id).await.unwrap().is_empty());
    let unknown = s.add_members(&[Member::new(-1, a.id, Role::Member, 2)]).await;
    assert!(matches!(&unknown, Err(Error::NotFound(why)) if why != ROOM_CLOSED), "{unknown:?}");

    // An approval into a closed room fails whole: the request stays pending.
    let open = make_room(&s, "owner-leaves-2", o.id, &[], 1).await;
    let request = JoinRequest {
        id: id(),
        room_id: open.id,
        user_id: a.id,
        message: String::new(),
        status: JoinRequestStatus::Pending,
        created_at: 3,
    };
    s.insert_join_request(&request).await.unwrap();
    assert_eq!(s.remove_member(open.id, o.id).await.unwrap(), Removal::Removed);
    let approved = s.decide_join_request(request.id, true, Some(&Member::new(open.id, a.id, Role::Member, 4))).await;
    assert!(matches!(&approved, Err(Error::NotFound(why)) if why == ROOM_CLOSED), "{approved:?}");
    assert_eq!(s.join_request(request.id).await.unwrap().unwrap().status, JoinRequestStatus::Pending);

    // Races, in many rooms. A join and the owner's last leave at once: one
    // of the two wins, never a member without the owner.
    for i in 0..20 {
        let owner = make_user(&s, &format!("olr_o{i}")).await;
        let joiner = make_user(&s, &format!("olr_j{i}")).await;
        let room = make_room(&s, "owner-leaves-race", owner.id, &[], 1).await;
        let join = [Member::new(room.id, joiner.id, Role::Member, 5)];
        let (left, joined) = tokio::join!(s.remove_member(room.id, owner.id), s.add_members(&join));
        let members: Vec<UserId> = s.members(room.id).await.unwrap().iter().map(|m| m.user_id).collect();
        match (left.unwrap(), joined) {
            (Removal::Removed, ref joined) if closed(joined) => assert!(members.is_empty(), "{members:?}"),
            (Removal::OwnerNotLast, Ok(added)) => {
                assert_eq!(added, vec![joiner.id]);
                assert_eq!(members, vec![owner.id, joiner.id]);
            }
            other => panic!("race {i}: {other:?}, members {members:?}"),
        }
    }
    // A member removed while ownership moves to them: either the transfer
    // finds them gone, or the removal finds them the owner (not last).
    for i in 0..20 {
        let owner = make_user(&s, &format!("olt_o{i}")).await;
        let heir = make_user(&s, &format!("olt_h{i}")).await;
        let room = make_room(&s, "owner-moves-race", owner.id, &[heir.id], 1).await;
        let (moved, removed) =
            tokio::join!(s.transfer_ownership(room.id, owner.id, heir.id), s.remove_member(room.id, heir.id));
        let owner_now = s.room(room.id).await.unwrap().unwrap().owner_id;
        assert!(s.member(room.id, owner_now).await.unwrap().is_some(), "race {i}: {moved:?} {removed:?}");
        match (moved, removed.unwrap()) {
            (Ok(()), Removal::OwnerNotLast) => assert_eq!(owner_now, heir.id),
            (Err(_), Removal::Removed) => assert_eq!(owner_now, owner.id),
            other => panic!("race {i}: {other:?}"),
        }
    }
    // A role change racing a transfer to its target: the owner keeps the
    // owner's role either way.
    for i in 0..20 {
        let owner = make_user(&s, &format!("olc_o{i}")).await;
        let heir = make_user(&s, &format!("olc_h{i}")).await;
        let room = make_room(&s, "owner-role-race", owner.id, &[heir.id], 1).await;
        let demote = MemberChange::Role(Role::Member);
        let (moved, changed) =
            tokio::join!(s.transfer_ownership(room.id, owner.id, heir.id), s.update_member(room.id, heir.id, &demote));
        moved.unwrap();
        let owner_now = s.room(room.id).await.unwrap().unwrap().owner_id;
        assert_eq!(owner_now, heir.id);
        assert_eq!(s.member(room.id, heir.id).await.unwrap().unwrap().role, Role::Owner, "race {i}: {changed:?}");
    }
}

/// Device cursors: saved per device and room (members only), and all but
/// the most recently acknowledging devices of a user can be forgotten.
async fn device_cursors_and_stale_devices(s: DynStore) {
    let u = make_user(&s, "dc_u").await;
    let o = make_user(&s, "dc_o").await;
    let room = make_room(&s, "devices", o.id, &[u.id], 1).await;
    let other = make_room(&s, "not-mine", o.id, &[], 1).await;
    s.append(&[msg(room.id, o.id, None, "one"), msg(room.id, o.id, None, "two")]).await.unwrap();
    let cursor = |device: &str, room_id: RoomId, seq: i64| DeviceCursor {
        user_id: u.id,
        device_id: device.to_string(),
        room_id,
        seq,
    };
    for (i, device) in ["d0", "d1", "d2", "d3"].iter().enumerate() {
        // Not a member of `other`: ignored.
        s.save_cursors(&[cursor(device, room.id, i as i64), cursor(device, other.id, 1)]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(3)).await; // distinct updated_at
    }
    assert_eq!(s.device_cursors(u.id, "d2").await.unwrap(), vec![(room.id, 2)]);
    assert_eq!(s.device_cursors(u.id, "d3").await.unwrap(), vec![(room.id, 2)], "clamped to the last seq");
    assert!(s.device_cursors(u.id, "nope").await.unwrap().is_empty());
    // d0 acknowledges again: now the most recent.
    s.save_cursors(&[cursor("d0", room.id, 1)]).await.unwrap();
    let now = stacker_domain::clock::now_ms();
    assert_eq!(s.forget_stale_devices(u.id, 10, i64::MAX, &[]).await.unwrap(), 0, "few devices");
    assert_eq!(s.forget_stale_devices(u.id, 2, now - 3_600_000, &[]).await.unwrap(), 0, "none silent an hour");
    assert_eq!(s.forget_stale_devices(u.id, 2, i64::MAX, &["d1"]).await.unwrap(), 1, "d1 spared");
    assert!(!s.device_cursors(u.id, "d1").await.unwrap().is_empty());
    assert_eq!(s.forget_stale_devices(u.id, 2, i64::MAX, &[]).await.unwrap(), 1);
    let kept: Vec<bool> = {
        let mut kept = Vec::new();
        for device in ["d0", "d1", "d2", "d3"] {
            kept.push(!s.device_cursors(u.id, device).await.unwrap().is_empty());
        }
        kept
    };
    assert_eq!(kept, vec![true, false, false, true], "d0 and d3 acknowledged last");
    assert_eq!(s.forget_stale_devices(o.id, 0, i64::MAX, &[]).await.unwrap(), 0, "a user without devices");
}

async fn ownership(s: DynStore) {
    let owner = make_user(&s, "tr_o").await;
    let heir = make_user(&s, "tr_h").await;
    let outsider = make_user(&s, "tr_x").await;
    let room = make_room(&s, "transfer", owner.id, &[heir.id], 1).await;

    // To a non-member: an error, and nothing changes.
    assert!(s.transfer_ownership(room.id, owner.id, outsider.id).await.is_err());
    assert_eq!(s.room(room.id).await.unwrap().unwrap().owner_id, owner.id, "atomic: owner_id unchanged");
    assert_eq!(s.member(room.id, owner.id).await.unwrap().unwrap().role, Role::Owner, "atomic: role unchanged");

    s.transfer_ownership(room.id, owner.id, heir.id).await.unwrap();
    assert_eq!(s.room(room.id).await.unwrap().unwrap().owner_id, heir.id);
    assert_eq!(s.member(room.id, heir.id).await.unwrap().unwrap().role, Role::Owner);
    assert_eq!(s.member(room.id, owner.id).await.unwrap().unwrap().role, Role::Admin);
    assert!(s.transfer_ownership(-1, owner.id, heir.id).await.is_err(), "missing room");

    // A transfer by a former owner (say, racing one that went first) is
    // refused and changes nothing: one owner, always.
    let err = s.transfer_ownership(room.id, owner.id, outsider.id).await.expect_err("no longer the owner");
    assert!(matches!(err, Error::Forbidden(_)), "{err:?}");
    s.add_members(&[Member::new(room.id, outsider.id, Role::Member, 2)]).await.unwrap();
    assert!(matches!(s.transfer_ownership(room.id, owner.id, outsider.id).await, Err(Error::Forbidden(_))));
    assert_eq!(s.room(room.id).await.unwrap().unwrap().owner_id, heir.id);
    let owners = s.members(room.id).await.unwrap().iter().filter(|m| m.role == Role::Owner).count();
    assert_eq!(owners, 1);
}

async fn joined_rooms(s: DynStore) {
    let u = make_user(&s, "jr_u").await;
    let o = make_user(&s, "jr_o").await;
    let r1 = make_room(&s, "jr1", u.id, &[], 1).await;
    let r2 = make_room(&s, "jr2", o.id, &[u.id], 2).await;
    let _r3 = make_room(&s, "jr3", o.id, &[], 3).await;
    let joined: BTreeSet<RoomId> = s.joined_rooms(u.id).await.unwrap().into_iter().collect();
    assert_eq!(joined, BTreeSet::from([r1.id, r2.id]));
    assert!(s.joined_rooms(-1).await.unwrap().is_empty());
    s.remove_member(r2.id, u.id).await.unwrap();
    assert_eq!(s.joined_rooms(u.id).await.unwrap(), vec![r1.id]);
}

async fn search(s: DynStore) {
    let o = make_user(&s, "se_o").await;
    let tag = format!("srch{}", id());
    let old = make_room(&s, &format!("{tag} Rust Club"), o.id, &[], 100).await;
    let new = make_room(&s, &format!("{tag} rusty BOLTS"), o.id, &[], 200).await;
    let pct = make_room(&s, &format!("{tag} 100% rust"), o.id, &[], 150).await;
    let under = make_room(&s, &format!("{tag} snake_case"), o.id, &[], 160).await;
    let bang = make_room(&s, &format!("{tag} wow!x"), o.id, &[], 170).await;
    let uni = make_room(&s, &format!("{tag} ÜBER Straße"), o.id, &[], 180).await;
    // A direct room never shows up.
    let p = make_user(&s, "se_p").await;
    let direct = Room {
        id: id(),
        name: format!("{tag} rust direct"),
        is_group: false,
        join_policy: JoinPolicy::Approval,
        owner_id: o.id,
        direct_key: Some(format!("{}:{}", o.id, p.id)),
        last_seq: 0,
        created_at: 300,
    };
    s.insert_room(&direct, &[Member::new(direct.id, o.id, Role::Owner, 300)]).await.unwrap();

    let ids = |rooms: Vec<Room>| rooms.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.search_rooms(&format!("{tag} RUST"), 10).await.unwrap()),
        vec![new.id, old.id],
        "case-insensitive, newest first"
    );
    assert_eq!(ids(s.search_rooms(&format!("{tag} rust"), 1).await.unwrap()), vec![new.id], "limit");
    assert_eq!(ids(s.search_rooms(&format!("{tag} 100%"), 10).await.unwrap()), vec![pct.id]);
    assert_eq!(ids(s.search_rooms(&format!("{tag} 100% r"), 10).await.unwrap()), vec![pct.id], "% is literal");
    assert!(s.search_rooms(&format!("{tag}%club"), 10).await.unwrap().is_empty(), "% is not a wildcard");
    assert_eq!(ids(s.search_rooms(&format!("{tag} snake_c"), 10).await.unwrap()), vec![under.id], "_ is literal");
    assert_eq!(ids(s.search_rooms(&format!("{tag} snake_"), 10).await.unwrap()), vec![under.id]);
    assert!(s.search_rooms(&format!("{tag} r_st"), 10).await.unwrap().is_empty(), "_ is not a wildcard");
    assert_eq!(
        ids(s.search_rooms(&format!("{tag} wow!x"), 10).await.unwrap()),
        vec![bang.id],
        "the escape character itself is literal"
    );
    assert_eq!(
        ids(s.search_rooms(&format!("{tag} über straße"), 10).await.unwrap()),
        vec![uni.id],
        "non-ASCII case-insensitive"
    );
    let all = ids(s.search_rooms(&tag, 100).await.unwrap());
    assert_eq!(
        all,
        vec![new.id, uni.id, bang.id, under.id, pct.id, old.id],
        "all matches, newest first, no direct room"
    );
    assert!(!all.contains(&direct.id));
    assert!(s.search_rooms(&tag, 0).await.unwrap().is_empty());
    assert!(s.search_rooms("no such room name anywhere", 10).await.unwrap().is_empty());
    // A room its owner left (closed: it takes no one in) is not listed.
    assert_eq!(s.remove_member(bang.id, o.id).await.unwrap(), Removal::Removed);
    assert!(!ids(s.search_rooms(&tag, 100).await.unwrap()).contains(&bang.id));
}

// ---------------------------------------------------------------- join requests

async fn join_requests(s: DynStore) {
    let o = make_user(&s, "jq_o").await;
    let a = make_user(&s, "jq_a").await;
    let b = make_user(&s, "jq_b").await;
    let room = make_room(&s, "approval", o.id, &[], 1).await;
    let req = |user: UserId, created_at: i64| JoinRequest {
        id: id(),
        room_id: room.id,
        user_id: user,
        message: "let me in ✋".into(),
        status: JoinRequestStatus::Pending,
        created_at,
    };
    let ra = req(a.id, 20);
    let rb = req(b.id, 10);
    s.insert_join_request(&ra).await.unwrap();
    s.insert_join_request(&rb).await.unwrap();
    match s.insert_join_request(&ra).await {
        Err(Error::Conflict(why)) => assert!(!why.contains("pending"), "same request id twice: {why}"),
        other => panic!("same request id twice: {other:?}"),
    }
    // One pending request per user and room, whatever its id: two sent at
    // once both pass the domain's "already pending?" read.
    match s.insert_join_request(&req(a.id, 21)).await {
        Err(Error::Conflict(why)) => assert!(why.contains("pending join request"), "{why}"),
        other => panic!("a second pending request: {other:?}"),
    }
    assert_eq!(s.join_request(ra.id).await.unwrap(), Some(ra.clone()));
    assert_eq!(s.join_request(-1).await.unwrap(), None);
    assert_eq!(s.pending_join_request(room.id, a.id).await.unwrap(), Some(ra.clone()));
    assert_eq!(s.pending_join_request(room.id, o.id).await.unwrap(), None);
    assert_eq!(s.pending_join_requests(room.id, None, 10).await.unwrap(), vec![rb.clone(), ra.clone()], "oldest first");
    // Keyset pages: after a request's (created_at, id), at most `limit`.
    assert_eq!(s.pending_join_requests(room.id, None, 1).await.unwrap(), vec![rb.clone()]);
    assert_eq!(s.pending_join_requests(room.id, Some((rb.created_at, rb.id)), 1).await.unwrap(), vec![ra.clone()]);
    assert!(s.pending_join_requests(room.id, Some((ra.created_at, ra.id)), 10).await.unwrap().is_empty());
    // Same created_at: the id breaks the tie.
    let c = make_user(&s, "jq_c").await;
    let rc = JoinRequest { id: ra.id + 1_000_000, ..req(c.id, 20) };
    s.insert_join_request(&rc).await.unwrap();
    assert_eq!(s.pending_join_requests(room.id, Some((ra.created_at, ra.id)), 10).await.unwrap(), vec![rc.clone()]);
    assert_eq!(
        s.pending_join_requests(room.id, Some((rb.created_at, rb.id)), 10).await.unwrap(),
        vec![ra.clone(), rc.clone()]
    );
    assert_eq!(s.decide_join_request(rc.id, false, None).await.unwrap(), Some(false));

    // Approve: the member is added in the same transaction.
    let member = Member::new(room.id, a.id, Role::Member, 30);
    assert_eq!(s.decide_join_request(ra.id, true, Some(&member)).await.unwrap(), Some(true), "approved and added");
    assert_eq!(s.member(room.id, a.id).await.unwrap(), Some(member.clone()));
    assert_eq!(s.join_request(ra.id).await.unwrap().unwrap().status, JoinRequestStatus::Approved);
    assert_eq!(s.decide_join_request(ra.id, true, Some(&member)).await.unwrap(), None, "deciding twice");
    assert_eq!(s.decide_join_request(ra.id, false, None).await.unwrap(), None, "deciding twice");
    assert_eq!(
        s.join_request(ra.id).await.unwrap().unwrap().status,
        JoinRequestStatus::Approved,
        "first decision stands"
    );
    assert_eq!(s.pending_join_request(room.id, a.id).await.unwrap(), None);

    // Reject: nobody is added.
    assert_eq!(s.decide_join_request(rb.id, false, None).await.unwrap(), Some(false), "rejected");
    assert_eq!(s.join_request(rb.id).await.unwrap().unwrap().status, JoinRequestStatus::Rejected);
    assert_eq!(s.member(room.id, b.id).await.unwrap(), None);
    assert!(s.pending_join_requests(room.id, None, 10).await.unwrap().is_empty());
    assert_eq!(s.decide_join_request(-1, true, None).await.unwrap(), None, "unknown request");

    // Approving someone who meanwhile became a member still succeeds, and
    // says that nobody was added.
    let rb2 = req(b.id, 40);
    s.insert_join_request(&rb2).await.unwrap();
    s.add_members(&[Member::new(room.id, b.id, Role::Member, 41)]).await.unwrap();
    assert_eq!(
        s.decide_join_request(rb2.id, true, Some(&Member::new(room.id, b.id, Role::Member, 42))).await.unwrap(),
        Some(false)
    );
    assert_eq!(s.member(room.id, b.id).await.unwrap().unwrap().joined_at, 41);
}

// ---------------------------------------------------------------- messages

async fn append_basics(s: DynStore) {
    let a = make_user(&s, "ap_a").await;
    let b = make_user(&s, "ap_b").await;
    let room = make_room(&s, "appends", a.id, &[b.id], 1).await;
    assert!(s.append(&[]).await.unwrap().is_empty());

    let contents = [
        Content::text("hello ünïcödé 😀 'quotes' \"double\" \\ back"),
        Content::Image { url: "https://x/y.png".into(), width: 640, height: 480 },
        Content::Voice { url: "https://x/v.ogg".into(), duration: 12 },
        Content::File { url: "https://x/f.pdf".into(), file_name: "f.pdf".into(), size: 1 << 40 },
        Content::Custom { data: serde_json_value() },
    ];
    let batch: Vec<NewMessage> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| NewMessage {
            content: c.clone().into(),
            created_at: 1_000 + i as i64,
            ..msg(room.id, a.id, None, "")
        })
        .collect();
    let out = s.append(&batch).await.unwrap();
    assert_eq!(out.len(), batch.len(), "one result per message, in batch order");
    for (i, (o, n)) in out.iter().zip(&batch).enumerate() {
        let m = stored(o);
        assert_eq!(m.seq, i as i64 + 1, "seqs 1..n");
        assert_eq!(
            (m.id, m.room_id, m.sender_id, &m.content, m.created_at),
            (n.id, n.room_id, n.sender_id, &n.content, n.created_at)
        );
        assert_eq!(s.message(m.id).await.unwrap().as_ref(), Some(m), "message(id) round trip");
    }
    assert_eq!(s.message(-1).await.unwrap(), None);
    assert_eq!(s.room(room.id).await.unwrap().unwrap().last_seq, 5);

    // The next batch continues where the last one ended.
    let out = s.append(&[msg(room.id, b.id, None, "x"), msg(room.id, a.id, None, "y")]).await.unwrap();
    assert_eq!(out.iter().map(|o| stored(o).seq).collect::<Vec<_>>(), vec![6, 7]);
    assert_gapless(&s, room.id, 7).await;
}

fn serde_json_value() -> serde_json::Value {
    serde_json::json!({"kind": "poll", "options": ["a", "b"], "n": 3, "nested": {"ok": true, "none": null}})
}

async fn append_duplicates(s: DynStore) {
    let a = make_user(&s, "du_a").await;
    let b = make_user(&s, "du_b").await;
    let room = make_room(&s, "dups", a.id, &[b.id], 1).await;
    let other = make_room(&s, "dups-other", a.id, &[b.id], 1).await;

    let first = s.append(&[msg(room.id, a.id, Some("c-1"), "one")]).await.unwrap();
    let original = stored(&first[0]).clone();
    assert_eq!(s.message_by_client_id(a.id, "c-1").await.unwrap().as_ref(), Some(&original));
    assert_eq!(s.message_by_client_id(b.id, "c-1").await.unwrap(), None, "another sender's id space");
    assert_eq!(s.message_by_client_id(a.id, "c-9").await.unwrap(), None);

    // Across batches: the earlier message, and nothing stored.
    let retry = s.append(&[msg(room.id, a.id, Some("c-1"), "one again")]).await.unwrap();
    assert_eq!(duplicate(&retry[0]), &original);
    assert_eq!(s.room(room.id).await.unwrap().unwrap().last_seq, 1, "a duplicate takes no seq");
    // Same client_msg_id aimed at another room: still the same message.
    let elsewhere = s.append(&[msg(other.id, a.id, Some("c-1"), "x")]).await.unwrap();
    assert_eq!(duplicate(&elsewhere[0]), &original);
    assert_eq!(s.room(other.id).await.unwrap().unwrap().last_seq, 0);

    // Within one batch, mixed with new messages, another sender's equal id, and stored ones.
    let batch = vec![
        msg(room.id, a.id, Some("c-2"), "two"),   // new → 2
        msg(room.id, b.id, Some("c-2"), "b two"), // other sender, same id: new → 3
        msg(room.id, a.id, Some("c-1"), "dup"),   // stored earlier
        msg(room.id, a.id, Some("c-2"), "again"), // repeats item 0
        msg(room.id, a.id, None, "no id"),        // new → 4
        msg(room.id, a.id, None, "no id"),        // new → 5 (no id, never deduped)
        msg(room.id, b.id, Some("c-2"), "again"), // repeats item 1
    ];
    let out = s.append(&batch).await.unwrap();
    assert_eq!(out.len(), 7);
    let two = stored(&out[0]).clone();
    let b_two = stored(&out[1]).clone();
    assert_eq!((two.seq, b_two.seq), (2, 3));
    assert_eq!(duplicate(&out[2]), &original);
    assert_eq!(duplicate(&out[3]), &two, "a repeat within the batch yields the earlier item's message");
    assert_eq!(stored(&out[4]).seq, 4);
    assert_eq!(stored(&out[5]).seq, 5);
    assert_eq!(duplicate(&out[6]), &b_two);
    assert_eq!(stored(&out[4]).client_msg_id, None);
    assert_gapless(&s, room.id, 5).await;

    // The whole batch sent again (new message ids, as a retried send gets).
    let resent: Vec<NewMessage> = batch.iter().map(|m| NewMessage { id: id(), ..m.clone() }).collect();
    let again = s.append(&resent).await.unwrap();
    assert_eq!(again.iter().filter(|o| matches!(o, Appended::Stored(_))).count(), 2, "only the id-less ones are new");
    assert_eq!(duplicate(&again[0]), &two);
    assert_eq!(duplicate(&again[3]), &two);
    assert_gapless(&s, room.id, 7).await;

    // Ids with quotes, backslashes and non-ASCII text are matched exactly.
    let odd = "c-'q' \\ \"d\" ✓ 😀";
    let first = s.append(&[msg(room.id, a.id, Some(odd), "odd")]).await.unwrap();
    assert_eq!(stored(&first[0]).client_msg_id.as_deref(), Some(odd));
    let retry = s.append(&[msg(room.id, a.id, Some(odd), "odd again")]).await.unwrap();
    assert_eq!(duplicate(&retry[0]), stored(&first[0]));
    assert_eq!(s.message_by_client_id(a.id, odd).await.unwrap().as_ref(), Some(stored(&first[0])));
    assert_gapless(&s, room.id, 8).await;
}

async fn append_rooms_and_cursors(s: DynStore) {
    let a = make_user(&s, "cu_a").await;
    let b = make_user(&s, "cu_b").await;
    let r1 = make_room(&s, "cursor-1", a.id, &[b.id], 1).await;
    let r2 = make_room(&s, "cursor-2", b.id, &[a.id], 1).await;
    // Rooms interleaved, given in descending id order: each room's seqs still follow batch order.
    let batch = vec![
        msg(r2.id, a.id, None, "r2-1"),
        msg(r1.id, a.id, None, "r1-1"),
        msg(r2.id, b.id, None, "r2-2"),
        msg(r1.id, a.id, None, "r1-2"),
        msg(r2.id, a.id, None, "r2-3"),
        msg(r1.id, b.id, None, "r1-3"),
    ];
    let out = s.append(&batch).await.unwrap();
    let got: Vec<(RoomId, i64)> = out.iter().map(|o| (o.message().room_id, o.message().seq)).collect();
    assert_eq!(got, vec![(r2.id, 1), (r1.id, 1), (r2.id, 2), (r1.id, 2), (r2.id, 3), (r1.id, 3)]);
    // Each sender has read up to their own last message in each room.
    assert_eq!(s.member(r1.id, a.id).await.unwrap().unwrap().read_seq, 2);
    assert_eq!(s.member(r1.id, b.id).await.unwrap().unwrap().read_seq, 3);
    assert_eq!(s.member(r2.id, a.id).await.unwrap().unwrap().read_seq, 3);
    assert_eq!(s.member(r2.id, b.id).await.unwrap().unwrap().read_seq, 2);
    // A cursor never moves back.
    s.update_member(r1.id, b.id, &MemberChange::ReadSeq(50)).await.unwrap();
    s.append(&[msg(r1.id, b.id, None, "late")]).await.unwrap();
    assert_eq!(s.member(r1.id, b.id).await.unwrap().unwrap().read_seq, 50);
    // A non-member sender (the domain forbids it; the store just has no cursor to move).
    let c = make_user(&s, "cu_c").await;
    let out = s.append(&[msg(r1.id, c.id, None, "ghost")]).await.unwrap();
    assert_eq!(stored(&out[0]).seq, 5);
    assert_gapless(&s, r1.id, 5).await;
    assert_gapless(&s, r2.id, 3).await;
}

/// One batch across more rooms (and sender cursors) than one statement takes.
async fn append_many_rooms(s: DynStore) {
    let a = make_user(&s, "many_a").await;
    let b = make_user(&s, "many_b").await;
    let mut rooms = Vec::new();
    for i in 0..260 {
        rooms.push(make_room(&s, &format!("many-{i}"), a.id, &[b.id], 1).await.id);
    }
    let batch: Vec<NewMessage> =
        rooms.iter().flat_map(|r| [msg(*r, a.id, None, "from a"), msg(*r, b.id, None, "from b")]).collect();
    let out = s.append(&batch).await.unwrap();
    for (k, room) in rooms.iter().enumerate() {
        assert_eq!((stored(&out[2 * k]).seq, stored(&out[2 * k + 1]).seq), (1, 2), "room {k}");
        assert_eq!(s.room(*room).await.unwrap().unwrap().last_seq, 2);
        assert_eq!(s.member(*room, a.id).await.unwrap().unwrap().read_seq, 1, "room {k}");
        assert_eq!(s.member(*room, b.id).await.unwrap().unwrap().read_seq, 2, "room {k}");
    }
}

/// A batch whose contents add up to several MiB (the insert is split by bytes
/// as well as by rows, and a statement must fit the database's packet limit).
async fn append_large_contents(s: DynStore) {
    let a = make_user(&s, "big_a").await;
    let room = make_room(&s, "big", a.id, &[], 1).await;
    let batch: Vec<NewMessage> = (0..150)
        .map(|i| msg(room.id, a.id, Some(&format!("big-{i}")), &format!("{i:03} {}", "✓ big ".repeat(1800))))
        .collect();
    let out = s.append(&batch).await.unwrap();
    assert_eq!(out.iter().map(|o| stored(o).seq).collect::<Vec<_>>(), (1..=150).collect::<Vec<i64>>());
    for i in [0, 67, 149] {
        let m = s.message(stored(&out[i]).id).await.unwrap().expect("stored");
        assert_eq!(m.content, batch[i].content, "content {i} round trip");
    }
    assert_gapless(&s, room.id, 150).await;
}

async fn append_missing_room(s: DynStore) {
    let a = make_user(&s, "mr_a").await;
    let room = make_room(&s, "exists", a.id, &[], 1).await;
    let batch = vec![msg(room.id, a.id, Some("m-1"), "ok"), msg(-77, a.id, Some("m-2"), "nowhere")];
    match s.append(&batch).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("append to a missing room must fail with NotFound, got {other:?}"),
    }
    // One transaction: nothing of the batch was stored.
    assert_eq!(s.room(room.id).await.unwrap().unwrap().last_seq, 0);
    assert!(s.history(room.id, HistoryPage::Latest { limit: 10 }).await.unwrap().is_empty());
    let retry = s.append(&batch[..1]).await.unwrap();
    assert_eq!(stored(&retry[0]).seq, 1, "m-1 was not stored by the failed batch");
}

async fn history(s: DynStore) {
    let a = make_user(&s, "hi_a").await;
    let room = make_room(&s, "history", a.id, &[], 1).await;
    let empty = make_room(&s, "history-empty", a.id, &[], 1).await;
    let batch: Vec<NewMessage> = (1..=25).map(|i| msg(room.id, a.id, None, &format!("m{i}"))).collect();
    s.append(&batch).await.unwrap();
    let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    let range = |a: i64, b: i64| (a..=b).collect::<Vec<_>>();
    let room_id = room.id;
    let h = |page| {
        let s = s.clone();
        async move { seqs(s.history(room_id, page).await.unwrap()) }
    };

    assert_eq!(h(HistoryPage::Latest { limit: 10 }).await, range(16, 25), "newest 10, ascending");
    assert_eq!(h(HistoryPage::Latest { limit: 100 }).await, range(1, 25));
    assert_eq!(h(HistoryPage::Latest { limit: 0 }).await, Vec::<i64>::new());
    assert_eq!(h(HistoryPage::Before { seq: 16, limit: 10 }).await, range(6, 15));
    assert_eq!(h(HistoryPage::Before { seq: 6, limit: 10 }).await, range(1, 5), "short page at the start");
    assert_eq!(h(HistoryPage::Before { seq: 1, limit: 10 }).await, Vec::<i64>::new(), "nothing before seq 1");
    assert_eq!(h(HistoryPage::Before { seq: 26, limit: 3 }).await, range(23, 25));
    assert_eq!(h(HistoryPage::Before { seq: 1_000, limit: 2 }).await, range(24, 25));
    assert_eq!(h(HistoryPage::After { seq: 0, limit: 10 }).await, range(1, 10), "oldest 10");
    assert_eq!(h(HistoryPage::After { seq: 10, limit: 10 }).await, range(11, 20));
    assert_eq!(h(HistoryPage::After { seq: 20, limit: 10 }).await, range(21, 25), "short page at the end");
    assert_eq!(h(HistoryPage::After { seq: 25, limit: 10 }).await, Vec::<i64>::new(), "nothing after the last");
    assert_eq!(h(HistoryPage::After { seq: 24, limit: 1 }).await, vec![25]);
    assert!(s.history(empty.id, HistoryPage::Latest { limit: 10 }).await.unwrap().is_empty());
    assert!(s.history(-1, HistoryPage::After { seq: 0, limit: 10 }).await.unwrap().is_empty());
    let page = s.history(room.id, HistoryPage::After { seq: 0, limit: 1 }).await.unwrap();
    assert_eq!(*page[0].content, Content::text("m1"));
}

async fn room_summaries(s: DynStore) {
    let me = make_user(&s, "rs_me").await;
    let o = make_user(&s, "rs_o").await;
    // Created oldest to newest; activity reorders them.
    let quiet = make_room(&s, "rs-quiet", o.id, &[me.id], 1_000).await; // no messages, created 1000
    let busy = make_room(&s, "rs-busy", o.id, &[me.id], 500).await;
    let older = make_room(&s, "rs-older", me.id, &[o.id], 600).await;
    let fresh = make_room(&s, "rs-fresh", o.id, &[me.id], 2_000).await; // no messages, created 2000
    let _not_mine = make_room(&s, "rs-other", o.id, &[], 9_000).await;

    let at = |m: NewMessage, t: i64| NewMessage { created_at: t, ..m };
    s.append(&[at(msg(older.id, o.id, None, "older"), 700)]).await.unwrap();
    s.append(&[
        at(msg(busy.id, o.id, None, "b1"), 1_500),
        at(msg(busy.id, me.id, None, "b2"), 1_600),
        at(msg(busy.id, o.id, None, "b3"), 1_700),
    ])
    .await
    .unwrap();

    let list = s.room_summaries(me.id).await.unwrap();
    let order: Vec<RoomId> = list.iter().map(|r| r.room.id).collect();
    assert_eq!(order, vec![fresh.id, busy.id, quiet.id, older.id], "most recently active first");
    let busy_row = &list[1];
    assert_eq!(busy_row.room.last_seq, 3);
    assert_eq!(busy_row.read_seq, 2, "my own message moved my cursor; one unread");
    let last = busy_row.last_message.as_ref().expect("last message");
    assert_eq!((last.seq, (*last.content).clone()), (3, Content::text("b3")));
    assert_eq!(list[0].last_message, None);
    assert_eq!(list[0].read_seq, 0);
    assert_eq!(list[0].room, fresh);
    let older_row = &list[3];
    assert_eq!(older_row.read_seq, 0);
    assert_eq!(older_row.last_message.as_ref().map(|m| m.seq), Some(1));

    // New activity moves a room to the top; reading moves the cursor.
    s.append(&[at(msg(older.id, o.id, None, "ping"), 3_000)]).await.unwrap();
    s.update_member(older.id, me.id, &MemberChange::ReadSeq(2)).await.unwrap();
    let list = s.room_summaries(me.id).await.unwrap();
    assert_eq!(list[0].room.id, older.id);
    assert_eq!((list[0].read_seq, list[0].room.last_seq), (2, 2));
    assert!(s.room_summaries(-1).await.unwrap().is_empty());
}

// ---------------------------------------------------------------- concurrency

/// 8 tasks × 100 single-message appends and 4 tasks × 25 batches of 8 into one
/// room, at the same time: seqs end exactly 1..=N, nothing lost.
async fn concurrent_appends(s: DynStore) {
    let owner = make_user(&s, "cc_o").await;
    let mut senders = Vec::new();
    for i in 0..12 {
        senders.push(make_user(&s, &format!("cc_{i}")).await);
    }
    let ids: Vec<UserId> = senders.iter().map(|u| u.id).collect();
    let room = make_room(&s, "concurrent", owner.id, &ids, 1).await;
    let side = make_room(&s, "concurrent-side", owner.id, &ids, 1).await;

    let mut tasks = tokio::task::JoinSet::new();
    for (t, sender) in senders.iter().take(8).enumerate() {
        let s = s.clone();
        let sender = sender.id;
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in 0..100 {
                let m = msg(room.id, sender, Some(&format!("single-{t}-{i}")), "x");
                let out = append_retrying(&s, std::slice::from_ref(&m)).await;
                ids.push(stored(&out[0]).id);
            }
            ids
        });
    }
    for (t, sender) in senders.iter().skip(8).enumerate() {
        let s = s.clone();
        let sender = sender.id;
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                let mut batch: Vec<NewMessage> =
                    (0..8).map(|k| msg(room.id, sender, Some(&format!("batch-{t}-{i}-{k}")), "y")).collect();
                batch.push(msg(side.id, sender, None, "side"));
                let out = append_retrying(&s, &batch).await;
                ids.extend(out.iter().take(8).map(|o| stored(o).id));
            }
            ids
        });
    }
    let mut all_ids = BTreeSet::new();
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        let ids = done.expect("append task panicked");
        total += ids.len();
        all_ids.extend(ids);
    }
    assert_eq!(total, 8 * 100 + 4 * 25 * 8);
    assert_eq!(all_ids.len(), total, "every message stored once");
    assert_gapless(&s, room.id, total as i64).await;
    assert_gapless(&s, side.id, 4 * 25).await;
    // Per sender, seqs follow send order (each task waited for its previous append).
    let all = s.history(room.id, HistoryPage::Latest { limit: 2_000 }).await.unwrap();
    for (i, sender) in senders.iter().enumerate() {
        let mine: Vec<&Message> = all.iter().filter(|m| m.sender_id == sender.id).collect();
        let cids: Vec<&str> = mine.iter().filter_map(|m| m.client_msg_id.as_deref()).collect();
        // "single-{task}-{i}" / "batch-{task}-{i}-{k}": the numbers must rise.
        let keys: Vec<Vec<u32>> =
            cids.iter().map(|c| c.split('-').skip(2).map(|n| n.parse::<u32>().unwrap_or(0)).collect()).collect();
        assert_eq!(keys.len(), if i < 8 { 100 } else { 25 * 8 });
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "sender {}: messages in send order", sender.id);
    }
}

/// Several tasks send the same `(sender, client_msg_id)` at once: exactly one
/// is stored, every other gets it as a duplicate (after at most one retry).
async fn concurrent_duplicates(s: DynStore) {
    let a = make_user(&s, "cd_a").await;
    let room = make_room(&s, "concurrent-dups", a.id, &[], 1).await;
    for round in 0..10 {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..6 {
            let s = s.clone();
            let a = a.id;
            tasks.spawn(async move {
                let batch = vec![
                    msg(room.id, a, Some(&format!("same-{round}")), "x"),
                    msg(room.id, a, Some(&format!("own-{round}-{t}")), "y"),
                ];
                append_retrying(&s, &batch).await
            });
        }
        let mut stored_count = 0;
        let mut ids = BTreeSet::new();
        while let Some(done) = tasks.join_next().await {
            let out = done.expect("task panicked");
            if matches!(out[0], Appended::Stored(_)) {
                stored_count += 1;
            }
            ids.insert(out[0].message().id);
            assert!(matches!(out[1], Appended::Stored(_)), "the task's own message is stored");
        }
        assert_eq!(stored_count, 1, "round {round}: exactly one send stored");
        assert_eq!(ids.len(), 1, "round {round}: everyone got the same message");
    }
    assert_gapless(&s, room.id, 10 * 7).await;
}

async fn ping(s: DynStore) {
    s.ping().await.expect("ping");
}

/// Runs every check; returns how many passed (a failure panics).
pub async fn run(s: DynStore) -> usize {
    macro_rules! checks {
        ($($check:ident),* $(,)?) => {{
            let mut n = 0;
            $(
                $check(s.clone()).await;
                n += 1;
            )*
            n
        }};
    }
    checks!(
        ping,
        users,
        existing_users,
        rooms_and_members,
        direct_rooms,
        member_updates,
        add_and_remove_members,
        mutes_outlast_leaving,
        owner_leaves_last,
        device_cursors_and_stale_devices,
        ownership,
        joined_rooms,
        search,
        join_requests,
        append_basics,
        append_duplicates,
        append_rooms_and_cursors,
        append_many_rooms,
        append_large_contents,
        append_missing_room,
        history,
        room_summaries,
        concurrent_appends,
        concurrent_duplicates,
    )
}
