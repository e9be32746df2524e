//! Starts a real Stacker server in-process on 127.0.0.1 and a free port.

#![allow(dead_code)]

use std::path::PathBuf;

use stacker_client::Client;
use stacker_proto::{Content, Id};
use stacker_server::{App, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const PASSWORD: &str = "correct horse battery";

pub struct TestServer {
    pub base: String,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn test_config(database_url: Option<String>) -> Config {
    let mut config = Config {
        data_dir: std::env::temp_dir().join(format!("stacker-test-{:016x}", rand::random::<u64>())),
        ..Config::default()
    };
    config.database.url = database_url.unwrap_or_default();
    config.auth.jwt_secret = "test-secret-that-is-at-least-32-bytes-long".into();
    config
}

impl TestServer {
    /// A server on a fresh SQLite database.
    pub async fn start() -> TestServer {
        Self::start_with(test_config(None)).await
    }

    /// A server on a fresh SQLite database with the test config changed by `change`.
    pub async fn start_changed(change: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config(None);
        change(&mut config);
        Self::start_with(config).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let data_dir = config.data_dir.clone();
        let app = App::build(config).await.expect("server builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(stacker_server::run(listener, app, async {
            let _ = stopped.await;
        }));
        TestServer { base, data_dir, stop: Some(stop), task: Some(task) }
    }

    pub fn anon(&self) -> Client {
        Client::new(&self.base)
    }

    /// Registers and logs in a user named `{prefix}{random}`.
    pub async fn user(&self, prefix: &str) -> Client {
        let name = format!("{prefix}{:08x}", rand::random::<u32>());
        let anon = self.anon();
        anon.register(&name, PASSWORD, None).await.expect("register");
        anon.login(&name, PASSWORD).await.expect("login")
    }

    /// Graceful shutdown; returns once the server has stopped. Deletes the data dir.
    pub async fn stop(self) {
        let dir = self.stop_keeping_data().await;
        std::fs::remove_dir_all(dir).ok();
    }

    /// Graceful shutdown that leaves the data dir for a restart; returns it.
    pub async fn stop_keeping_data(mut self) -> PathBuf {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran cleanly");
        }
        self.data_dir.clone()
    }
}

/// Many concurrent senders into one room end with seq exactly 1..=N and nothing lost.
pub async fn concurrent_sends(s: &TestServer, tasks: usize, per_task: usize) {
    let owner = s.user("own").await;
    let mut senders = Vec::new();
    for _ in 0..tasks {
        senders.push(s.user("snd").await);
    }
    let ids: Vec<Id> = senders.iter().map(Client::user_id).collect();
    let room = owner.create_group("busy", &ids, None).await.unwrap();
    let mut handles = Vec::new();
    for (t, sender) in senders.into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..per_task {
                let cmid = format!("t{t}-{i}");
                acked.push(sender.send(room, Content::text(format!("{t}/{i}")), Some(&cmid)).await.unwrap().seq);
            }
            acked
        }));
    }
    let mut acked: Vec<i64> = Vec::new();
    for h in handles {
        acked.extend(h.await.unwrap());
    }
    acked.sort_unstable();
    let total = (tasks * per_task) as i64;
    assert_eq!(acked, (1..=total).collect::<Vec<_>>(), "acked seqs are exactly 1..={total}");
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = owner.history(room, None, Some(after), Some(200)).await.unwrap();
        stored.extend(page.messages.iter().map(|m| m.seq));
        after = stored.last().copied().unwrap_or(0);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(stored, (1..=total).collect::<Vec<_>>(), "history holds every message once, in order");
}

/// One WebSocket sends `n` messages to one room without waiting for acks:
/// they are numbered in the order sent (whatever the number of writers).
pub async fn pipelined_sends(s: &TestServer, n: usize) {
    use stacker_proto::ws::ServerFrame;
    let a = s.user("pipe").await;
    let b = s.user("pipe").await;
    let room = a.create_direct(b.user_id()).await.unwrap();
    let mut socket = a.connect("d").await.unwrap();
    for i in 0..n {
        socket.send_message(room, Content::text(format!("p{i}")), Some(&format!("p{i}"))).await.unwrap();
    }
    let mut acks = Vec::new();
    while acks.len() < n {
        match socket.next_frame_within(std::time::Duration::from_secs(10)).await.unwrap() {
            Some(ServerFrame::Ack { seq, client_msg_id, .. }) => acks.push((client_msg_id.unwrap_or_default(), seq)),
            Some(ServerFrame::Error { code, msg }) => panic!("send refused: {code} {msg}"),
            Some(_) => {}
            None => panic!("only {} of {n} acks arrived", acks.len()),
        }
    }
    let expected: Vec<(String, i64)> = (0..n).map(|i| (format!("p{i}"), i as i64 + 1)).collect();
    if let Some(i) = acks.iter().zip(&expected).position(|(got, want)| got != want) {
        let around = &acks[i.saturating_sub(2)..(i + 3).min(n)];
        panic!("pipelined sends must be acked in order with seqs 1..={n}; first wrong at {i}: {around:?}");
    }
}
