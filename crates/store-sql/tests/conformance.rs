//! Runs the store conformance suite (`suite/`) on every backend:
//! SQLite always; MySQL/MariaDB and PostgreSQL when their test service is
//! configured (`STACKER_TEST_MYSQL_URL`, `STACKER_TEST_POSTGRES_URL`; see
//! `stacker-testkit`, which prints `SKIPPED` or, with
//! `STACKER_TEST_REQUIRE_SERVICES=1`, fails).

mod suite;

use std::sync::Arc;

use stacker_domain::model::*;
use stacker_domain::store::{MessageStore, RoomStore, Store};
use stacker_domain::Error;
use stacker_store_sql::{Dialect, SqlOptions, SqlStore};
use stacker_testkit::{fresh_database, DbKind, TestDb};
use suite::{append_retrying, assert_gapless, make_room, make_user, msg, DynStore};

async fn connect(db: &TestDb) -> SqlStore {
    SqlStore::connect(&db.url, SqlOptions::default()).await.unwrap_or_else(|e| panic!("connect to {}: {e}", db.kind))
}

/// The suite on one backend, then the backend-specific checks.
async fn conformance(kind: DbKind) {
    let Some(db) = fresh_database(kind).await else { return };
    if kind != DbKind::Sqlite {
        concurrent_first_connects(&db).await;
    }
    let store = connect(&db).await;
    let expected = match kind {
        DbKind::Sqlite => Dialect::Sqlite,
        DbKind::Mysql => Dialect::Mysql,
        DbKind::Postgres => Dialect::Postgres,
    };
    assert_eq!(store.dialect(), expected);
    assert_eq!(store.recommended_writers(), if kind == DbKind::Sqlite { 1 } else { 4 });
    assert_eq!(store.recommended_max_batch(), if kind == DbKind::Sqlite { 2048 } else { 512 });
    let dyn_store: DynStore = Arc::new(store.clone());
    let mut checks = suite::run(dyn_store.clone()).await;

    // Connecting again (migrations already applied) keeps the data and the seqs
    // continue: a restart.
    checks += restart_survival(&db, &dyn_store).await;
    if kind != DbKind::Sqlite {
        checks += two_instances(&db).await;
    }
    checks += closed_pool_is_unavailable(&db).await;
    checks += id_clash_is_a_conflict(&dyn_store).await;

    // Straight to stderr (past the harness's capture): CI logs show which backends ran.
    stacker_testkit::announce(&format!("conformance: {checks} checks passed on {kind}"));
    store.close().await;
    db.drop_database().await;
}

/// Several instances starting at once against an empty database all come up:
/// migrations run once, the others wait for them.
async fn concurrent_first_connects(db: &TestDb) {
    let starts = (0..4).map(|_| SqlStore::connect(&db.url, SqlOptions::default()));
    for result in futures::future::join_all(starts).await {
        result.unwrap_or_else(|e| panic!("a concurrent first connect failed on {}: {e}", db.kind));
    }
}

async fn restart_survival(db: &TestDb, first: &DynStore) -> usize {
    let owner = make_user(first, "restart").await;
    let room = make_room(first, "restart", owner.id, &[], 1).await;
    let batch: Vec<NewMessage> = (0..5).map(|i| msg(room.id, owner.id, Some(&format!("r-{i}")), "before")).collect();
    first.append(&batch).await.unwrap();

    let second: DynStore = Arc::new(connect(db).await);
    assert_eq!(second.room(room.id).await.unwrap().unwrap().last_seq, 5, "data survives a reconnect");
    let out = second.append(&[msg(room.id, owner.id, None, "after"), batch[2].clone()]).await.unwrap();
    assert_eq!(out[0].message().seq, 6, "seqs continue after a restart");
    assert!(matches!(out[1], Appended::Duplicate(_)), "client ids are remembered across a restart");
    assert_gapless(&second, room.id, 6).await;
    1
}

/// Two pools (two "send instances") appending to one room at once.
async fn two_instances(db: &TestDb) -> usize {
    let a: DynStore = Arc::new(connect(db).await);
    let b: DynStore = Arc::new(connect(db).await);
    let owner = make_user(&a, "two").await;
    let room = make_room(&a, "two-instances", owner.id, &[], 1).await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        let sender = owner.id;
        tasks.spawn(async move {
            for i in 0..50 {
                // Every message is sent through both instances: one stores it, the other gets the duplicate.
                let m = msg(room.id, sender, Some(&format!("two-{}-{i}", t / 2)), "x");
                append_retrying(&s, std::slice::from_ref(&m)).await;
                if i % 10 == 0 {
                    let batch: Vec<NewMessage> = (0..5).map(|_| msg(room.id, sender, None, "batch")).collect();
                    append_retrying(&s, &batch).await;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("append task panicked");
    }
    // 4 distinct client-id streams × 50, plus 8 tasks × 5 batches × 5.
    assert_gapless(&a, room.id, 4 * 50 + 8 * 5 * 5).await;
    let ids: std::collections::BTreeSet<Option<String>> = a
        .history(room.id, HistoryPage::Latest { limit: 1_000 })
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.client_msg_id.is_some())
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(ids.len(), 4 * 50, "each client_msg_id stored once across instances");
    1
}

/// A new client_msg_id under a message id that is already stored: the first
/// run fails on the primary key, the run that looks ids up fails the same way,
/// and the append reports a conflict without storing anything.
async fn id_clash_is_a_conflict(store: &DynStore) -> usize {
    let owner = make_user(store, "clash").await;
    let room = make_room(store, "clash", owner.id, &[], 1).await;
    let first = msg(room.id, owner.id, Some("clash-1"), "first");
    store.append(std::slice::from_ref(&first)).await.unwrap();
    let clash = NewMessage { client_msg_id: Some("clash-2".into()), ..first.clone() };
    match store.append(&[clash]).await {
        Err(Error::Conflict(_)) => {}
        other => panic!("a message id clash must be a conflict, got {other:?}"),
    }
    assert_gapless(store, room.id, 1).await;
    1
}

async fn closed_pool_is_unavailable(db: &TestDb) -> usize {
    let store = connect(db).await;
    store.close().await;
    match store.ping().await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("a closed pool must report Unavailable, got {other:?}"),
    }
    match store.room(1).await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("a closed pool must report Unavailable, got {other:?}"),
    }
    // Appends too (on SQLite they run on a connection of their own).
    match store.append(&[msg(1, 1, Some("after-close"), "x")]).await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("an append to a closed store must report Unavailable, got {other:?}"),
    }
    2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite() {
    conformance(DbKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql() {
    conformance(DbKind::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres() {
    conformance(DbKind::Postgres).await;
}

/// An in-memory SQLite database works with its single connection.
#[tokio::test]
async fn sqlite_in_memory() {
    let store = SqlStore::connect("sqlite::memory:", SqlOptions::default()).await.expect("in-memory store");
    let s: DynStore = Arc::new(store);
    let u = make_user(&s, "mem").await;
    let room = make_room(&s, "mem", u.id, &[], 1).await;
    s.append(&[msg(room.id, u.id, None, "a"), msg(room.id, u.id, None, "b")]).await.unwrap();
    assert_gapless(&s, room.id, 2).await;
}

/// Committed pages reach the SQLite database file without a writer
/// checkpointing: the background checkpointer copies them out of the WAL (a
/// writer would only do it at `wal_autocheckpoint` pages, far more than these).
#[tokio::test]
async fn sqlite_wal_is_checkpointed_in_the_background() {
    let Some(db) = fresh_database(DbKind::Sqlite).await else { return };
    let store = connect(&db).await;
    let path = db.sqlite_path().expect("a SQLite test database is a file");
    let file_len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let wal_pages: (i64,) = sqlx::query_as("PRAGMA wal_autocheckpoint").fetch_one(store.pool()).await.unwrap();
    assert_eq!(wal_pages.0, 32_768, "writers checkpoint only at a large WAL");
    let s: DynStore = Arc::new(store.clone());
    let u = make_user(&s, "ckpt").await;
    let room = make_room(&s, "ckpt", u.id, &[], 1).await;
    // Let the checkpointer catch up with the migrations, then write ~100 pages.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = file_len();
    let text = "x".repeat(2_000);
    for chunk in 0..4 {
        let batch: Vec<NewMessage> =
            (0..50).map(|i| msg(room.id, u.id, Some(&format!("ckpt-{chunk}-{i}")), &text)).collect();
        s.append(&batch).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while file_len() <= before + 100_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {} bytes (was {before}): nothing was checkpointed",
            file_len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_gapless(&s, room.id, 200).await;
    store.close().await;
    db.drop_database().await;
}

/// A SQLite file in a directory that does not exist yet, without `mode=rwc`.
#[tokio::test]
async fn sqlite_creates_directory() {
    let dir = std::env::temp_dir().join(format!("stacker-store-test-{}", suite::id() ^ std::process::id() as i64));
    // A percent-escaped space: the directory created is the decoded one,
    // which is where sqlx opens the file.
    let path = dir.join("nested/with space/stacker.db");
    let url = format!("sqlite://{}", path.display()).replace(' ', "%20");
    let store = SqlStore::connect(&url, SqlOptions::default()).await.expect("connect creates the file");
    store.ping().await.unwrap();
    assert!(path.exists());
    let mode: (String,) = sqlx::query_as("PRAGMA journal_mode").fetch_one(store.pool()).await.unwrap();
    assert_eq!(mode.0.to_lowercase(), "wal");
    let fk: (i64,) = sqlx::query_as("PRAGMA foreign_keys").fetch_one(store.pool()).await.unwrap();
    assert_eq!(fk.0, 1);
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_urls_are_errors() {
    assert!(matches!(SqlStore::connect("redis://localhost", SqlOptions::default()).await, Err(Error::Store(_))));
    // Nothing listens on port 1.
    let opts = SqlOptions { acquire_timeout: std::time::Duration::from_secs(2), ..SqlOptions::default() };
    assert!(matches!(SqlStore::connect("postgres://nobody@127.0.0.1:1/none", opts).await, Err(Error::Unavailable(_))));
}
