//! The server end to end on MariaDB and PostgreSQL (when configured; see
//! stacker-testkit): concurrent sends keep seqs gapless, one connection's
//! pipelined sends keep their order over several writers, and a restart keeps seqs.

mod common;

use common::TestServer;
use stacker_testkit::{fresh_database, DbKind};

async fn on(kind: DbKind) {
    let Some(db) = fresh_database(kind).await else { return };
    let config = common::test_config(Some(db.url.clone()));
    let keep = config.clone();
    let s = TestServer::start_with(config).await;
    common::concurrent_sends(&s, 8, 200).await;
    common::pipelined_sends(&s, 300).await;
    let a = s.user("a").await;
    let room = a.create_group("again", &[], None).await.unwrap();
    a.send_text(room, "one").await.unwrap();
    s.stop_keeping_data().await;
    let s = TestServer::start_with(keep).await;
    let a = s.anon().with_token(a.token().unwrap(), a.user_id());
    assert_eq!(a.send_text(room, "two").await.unwrap().seq, 2, "seq continues after a restart");
    s.stop().await;
    stacker_testkit::announce(&format!("server end to end: passed on {kind}"));
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql() {
    on(DbKind::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    on(DbKind::Postgres).await;
}
