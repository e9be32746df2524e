//! Shared set-up for the store benchmarks: a SQLite file in a temporary
//! directory with users and one room.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};

use stacker_domain::model::{JoinPolicy, Member, Role, Room, User};
use stacker_domain::store::{RoomStore, UserStore};
use stacker_store_sql::{SqlOptions, SqlStore};

static NEXT_ID: AtomicI64 = AtomicI64::new(1_000_000);

pub fn next_id() -> i64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A SQLite store in a fresh temporary directory (removed by [`TempDb::drop`]).
pub struct TempDb {
    pub store: SqlStore,
    dir: PathBuf,
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn temp_db(name: &str) -> TempDb {
    let dir = std::env::temp_dir().join(format!("stacker-bench-{name}-{}-{}", std::process::id(), next_id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let url = format!("sqlite://{}/bench.db", dir.display());
    let store = SqlStore::connect(&url, SqlOptions::default()).await.expect("open SQLite");
    TempDb { store, dir }
}

pub async fn users(store: &SqlStore, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = next_id();
        let user = User {
            id,
            username: format!("u{id}x{i}"),
            nickname: String::new(),
            password_hash: "not-a-real-hash".into(),
            created_at: 1,
        };
        store.insert_user(&user).await.expect("insert user");
        ids.push(id);
    }
    ids
}

/// A group room owned by `members[0]` with every user of `members` in it.
pub async fn room(store: &SqlStore, members: &[i64]) -> i64 {
    let id = next_id();
    let room = Room {
        id,
        name: format!("bench{id}"),
        is_group: true,
        join_policy: JoinPolicy::Open,
        owner_id: members[0],
        direct_key: None,
        last_seq: 0,
        created_at: 1,
    };
    let rows: Vec<Member> = members
        .iter()
        .enumerate()
        .map(|(i, u)| Member::new(id, *u, if i == 0 { Role::Owner } else { Role::Member }, 1))
        .collect();
    store.insert_room(&room, &rows).await.expect("insert room");
    id
}
