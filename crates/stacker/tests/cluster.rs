//! Distributed mode end to end: registry, meta, two send instances, two
//! gateways and the flusher as separate `stacker` processes on a real Redis and
//! a real MariaDB or PostgreSQL (when configured; see stacker-testkit).

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stacker_client::{Client, Socket};
use stacker_domain::cluster::Bus;
use stacker_proto::ws::ServerFrame;
use stacker_proto::{Content, Id};
use stacker_redis::{RedisCluster, RedisOptions};
use stacker_testkit::{fresh_database, service_url, DbKind, Service};

const SECRET: &str = "cluster-test-internal-secret";

struct Proc {
    port: u16,
    child: Child,
}

impl Proc {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// kill -9.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Cluster {
    env: Vec<(String, String)>,
    registry: String,
    procs: Vec<Proc>,
    /// Key prefix of this cluster in Redis.
    redis_prefix: String,
}

impl Cluster {
    fn new(db_url: &str, redis_url: &str, data_dir: &std::path::Path) -> Cluster {
        let prefix = format!("stacker-e2e-{}", free_port());
        let redis_prefix = prefix.clone();
        let env: Vec<(String, String)> = [
            ("STACKER_DATABASE__URL", db_url.to_string()),
            ("STACKER_CLUSTER__REDIS_URL", redis_url.to_string()),
            ("STACKER_CLUSTER__REDIS_PREFIX", prefix),
            ("STACKER_CLUSTER__INTERNAL_SECRET", SECRET.to_string()),
            ("STACKER_CLUSTER__HEARTBEAT_MS", "200".to_string()),
            // Generous for a loaded CI machine (four clusters and a build share 2 cores).
            ("STACKER_CLUSTER__GATEWAY_TTL_MS", "2000".to_string()),
            ("STACKER_CLUSTER__FLUSH_INTERVAL_MS", "300".to_string()),
            ("STACKER_AUTH__JWT_SECRET", "cluster-test-jwt-secret-of-32-bytes!!".to_string()),
            ("STACKER_DATA_DIR", data_dir.display().to_string()),
            // The "listening" line tells the test which port each role bound.
            ("STACKER_LOG__LEVEL", "warn,stacker=info".to_string()),
            ("STACKER_LOG__FORMAT", "json".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut cluster = Cluster { env, registry: String::new(), procs: Vec::new(), redis_prefix };
        let registry = cluster.start("registry");
        cluster.registry = cluster.url(registry);
        cluster.env.push(("STACKER_CLUSTER__REGISTRY_URL".into(), cluster.registry.clone()));
        cluster
    }

    /// Starts a role on a port of its own choosing (port 0) and learns the
    /// port from its "listening" log line: no race for a free port.
    fn start(&mut self, role: &str) -> usize {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacker"));
        for (key, _) in std::env::vars() {
            if key.starts_with("STACKER_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .arg(role)
            .envs(self.env.iter().cloned())
            .env("STACKER_SERVER__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let role_name = role.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut sent = false;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("[{role_name}] {line}");
                }
                if !sent {
                    let addr = serde_json::from_str::<Value>(&line)
                        .ok()
                        .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned));
                    if let Some(addr) = addr {
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{role} did not start (exit: {:?})", child.try_wait()));
        let port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the listening line");
        self.procs.push(Proc { port, child });
        self.procs.len() - 1
    }

    fn url(&self, i: usize) -> String {
        self.procs[i].url()
    }

    /// Asks the registry, with the user's token, where `user` should connect:
    /// (gateway id, WebSocket URL).
    async fn available(&self, user: &Client) -> Result<(String, String), stacker_client::ClientError> {
        let gw = user.clone().rebase(&self.registry).available_gateway().await?;
        Ok((gw.gateway_id, gw.ws_url))
    }

    /// Starts a gateway and waits until the registry lists it: a gateway
    /// prints its "listening" line before its first heartbeat registers it.
    async fn start_gateway(&mut self) -> usize {
        let i = self.start("gateway");
        let id = format!("gw-{}", self.procs[i].port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = self.internal_get("/registry/gateways").await["data"]["gateways"]
                .as_array()
                .is_some_and(|gws| gws.iter().any(|g| g["id"] == id.as_str()));
            if listed {
                return i;
            }
            assert!(Instant::now() < deadline, "gateway {id} never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many send instances the registry lists as live.
    async fn live_sends(&self) -> usize {
        let v = self.internal_get("/registry/instances?kind=send").await;
        v["data"]["instances"].as_array().map(Vec::len).unwrap_or(0)
    }

    /// GET an internal registry endpoint with the credential; the JSON body.
    async fn internal_get(&self, path: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.registry))
            .header("x-stacker-internal", SECRET)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

async fn collect(socket: &mut Socket, room: Id, n: usize) -> Vec<i64> {
    socket.room_seqs(room, n, Duration::from_secs(60)).await.unwrap()
}

/// Reads until every seq in `after+1..=upto` of `room` arrived; returns all seqs seen.
async fn collect_through(socket: &mut Socket, room: Id, after: i64, upto: i64) -> Vec<i64> {
    let mut seqs = Vec::new();
    let mut missing: std::collections::BTreeSet<i64> = (after + 1..=upto).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let got: Vec<i64> = match socket.next_frame_within(left).await.unwrap() {
            Some(ServerFrame::Chat(m)) if m.room_id == room => vec![m.seq],
            Some(ServerFrame::Batch { messages }) => {
                messages.iter().filter(|m| m.room_id == room).map(|m| m.seq).collect()
            }
            Some(_) => vec![],
            None => panic!("stream ended with {} seqs still missing (close: {:?})", missing.len(), socket.closed),
        };
        for s in got {
            missing.remove(&s);
            seqs.push(s);
        }
    }
    seqs
}

fn in_order(seqs: &[i64], from: i64) -> bool {
    seqs.iter().enumerate().all(|(i, s)| *s == from + i as i64)
}

async fn end_to_end(kind: DbKind) {
    let Some(redis) = service_url(Service::Redis) else { return };
    let Some(db) = fresh_database(kind).await else { return };
    let dir = std::env::temp_dir().join(format!("stacker-e2e-{}-{}", kind, free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Cluster::new(&db.url, &redis, &dir);
    let meta = c.start("meta");
    let send = [c.start("send"), c.start("send")];
    let gateways = [c.start_gateway().await, c.start_gateway().await];
    c.start("flusher");

    // Internal endpoints refuse calls without the credential.
    let http = reqwest::Client::new();
    let refused = http.get(format!("{}/registry/gateways", c.registry)).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let allowed = http
        .get(format!("{}/registry/gateways", c.registry))
        .header("x-stacker-internal", SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status().as_u16(), 200);
    let bad_heartbeat = http
        .post(format!("{}/registry/gateway/heartbeat", c.registry))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_heartbeat.status().as_u16(), 401);

    // Users log in through meta and connect where the registry sends them,
    // one at a time so heartbeats report the load in between.
    let anon = Client::new(c.url(meta));
    let mut users = Vec::new();
    let mut sockets = Vec::new();
    let mut placed: HashMap<String, usize> = HashMap::new();
    let mut first_gateway = String::new();
    for i in 0..6 {
        let name = format!("u{i}-{}", free_port());
        anon.register(&name, "correct horse", None).await.unwrap();
        let user = anon.login(&name, "correct horse").await.unwrap();
        let (gateway, ws_url) = c.available(&user).await.unwrap();
        if i == 0 {
            first_gateway = gateway.clone();
        }
        *placed.entry(gateway).or_default() += 1;
        sockets.push(user.connect_gateway(&ws_url, "d").await.unwrap());
        users.push(user);
        tokio::time::sleep(Duration::from_millis(450)).await;
    }
    assert_eq!(placed.len(), 2, "the registry spreads users over both gateways: {placed:?}");

    // A connected user is sent back to their own gateway, but only their own
    // token may ask where a named user is (the answer shows they are online):
    // another user's token gets 403, and without a token the user_id is
    // ignored (the least-loaded gateway, as for anyone).
    assert_eq!(c.available(&users[0]).await.unwrap().0, first_gateway);
    let named = format!("/registry/gateway/available?user_id={}", users[0].user_id());
    let someone_else = users[1].clone().rebase(&c.registry);
    let err = someone_else.call::<(), Value>(reqwest::Method::GET, &named, None).await.unwrap_err();
    assert_eq!(err.code(), 403, "{err}");
    let registry = Client::new(&c.registry);
    let anonymous: Value = registry.call::<(), Value>(reqwest::Method::GET, &named, None).await.unwrap().unwrap();
    assert!(anonymous["gateway_id"].is_string(), "{anonymous}");
    assert!(registry.available_gateway().await.is_ok());
    let offline_name = format!("late-{}", free_port());
    anon.register(&offline_name, "correct horse", None).await.unwrap();
    let offline = anon.login(&offline_name, "correct horse").await.unwrap();

    // A group message stream through both send instances reaches every online
    // device on both gateways, in order.
    let mut ids: Vec<Id> = users.iter().map(Client::user_id).collect();
    ids.push(offline.user_id());
    let room = users[0].create_group("everyone", &ids[1..], None).await.unwrap();
    let senders = [users[0].clone().rebase(&c.url(send[0])), users[1].clone().rebase(&c.url(send[1]))];
    for i in 0..40 {
        senders[i % 2].send(room, Content::text(format!("m{i}")), Some(&format!("c{i}"))).await.unwrap();
    }
    for socket in sockets.iter_mut() {
        let seqs = collect(socket, room, 40).await;
        assert!(in_order(&seqs, 1), "{seqs:?}");
    }

    // 1:1.
    let direct = users[2].create_direct(users[5].user_id()).await.unwrap();
    users[2].clone().rebase(&c.url(send[1])).send_text(direct, "psst").await.unwrap();
    assert_eq!(collect(&mut sockets[5], direct, 1).await, vec![1]);

    // The offline user catches up on login, in order.
    let (_, ws_url) = c.available(&offline).await.unwrap();
    let mut late = offline.connect_gateway(&ws_url, "d").await.unwrap();
    assert!(in_order(&collect(&mut late, room, 40).await, 1));

    // A WebSocket send is stored by the gateway that took it, which hands the
    // pushes for its own connections (the sender's included) over in place and
    // puts the rest on the other gateway's stream: everyone gets it.
    let local_entries = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("stacker_local_entries_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let took_it = sockets[0].hello.gateway_id.clone();
    let took_it = c.procs.iter().find(|p| format!("gw-{}", p.port) == took_it).expect("the sender's gateway").url();
    let before = local_entries(&reqwest::get(format!("{took_it}/metrics")).await.unwrap().text().await.unwrap());
    sockets[0].send_message(room, Content::text("over the socket"), Some("ws-1")).await.unwrap();
    for socket in sockets.iter_mut() {
        assert_eq!(collect(socket, room, 1).await, vec![41]);
    }
    assert_eq!(collect(&mut late, room, 1).await, vec![41]);
    let after = local_entries(&reqwest::get(format!("{took_it}/metrics")).await.unwrap().text().await.unwrap());
    assert!(after > before, "the gateway handed its own entries over ({before} → {after})");

    // A stale route still delivers: prime a send instance's route cache, move
    // the user to the other gateway, and send at once.
    let mover = &users[4];
    let via = mover.clone().rebase(&c.url(send[1]));
    let old_gateway = sockets[4].hello.gateway_id.clone();
    let note = users[0].clone().rebase(&c.url(send[1]));
    // The cached route is filled during this send, so its age at any later
    // moment is at most the time since here. An entry filled by an earlier
    // send would expire sooner (a read does not renew it): outwait those first.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let primed_at = Instant::now();
    let primed = note.send_text(room, "prime the route cache").await.unwrap().seq;
    let gateways_list = c.internal_get("/registry/gateways").await;
    let other = gateways_list["data"]["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] != old_gateway.as_str())
        .expect("another gateway")
        .clone();
    let mut moved = mover.connect_gateway(other["ws_url"].as_str().unwrap(), "d2").await.unwrap();
    let left = std::mem::replace(
        &mut sockets[4],
        mover.connect_gateway(other["ws_url"].as_str().unwrap(), "d").await.unwrap(),
    );
    // The old gateway must have let go of the user before the message reaches
    // it (the close handshake, then a moment for it to unregister).
    left.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stale = via.send_text(room, "after the move").await.unwrap().seq;
    // The route cache keeps entries 1 s (cluster.route_cache_ms).
    let stale_cache_used = primed_at.elapsed() < Duration::from_millis(900);
    let got = collect_through(&mut moved, room, primed, stale).await;
    assert!(got.contains(&stale));
    if stale_cache_used {
        let old = c.procs.iter().find(|p| format!("gw-{}", p.port) == old_gateway).expect("old gateway");
        let metrics = reqwest::get(format!("{}/metrics", old.url())).await.unwrap().text().await.unwrap();
        assert!(
            metrics.lines().any(|l| l.starts_with("stacker_pushbacks_total") && !l.ends_with(" 0")),
            "the old gateway should have pushed the entry on"
        );
    }
    let base_seq = stale;

    // Send instances are registered; a dead one leaves the list.
    assert_eq!(c.live_sends().await, 2);

    // A send instance dies: a client retries through the other with the same
    // client_msg_id, and nothing is stored twice.
    c.procs[send[0]].kill();
    let via_dead = users[3].clone().rebase(&c.url(send[0])).send(room, Content::text("retry me"), Some("once")).await;
    assert!(via_dead.is_err());
    let first =
        users[3].clone().rebase(&c.url(send[1])).send(room, Content::text("retry me"), Some("once")).await.unwrap();
    let again =
        users[3].clone().rebase(&c.url(send[1])).send(room, Content::text("retry me"), Some("once")).await.unwrap();
    assert_eq!((first.msg_id, first.seq), (again.msg_id, again.seq));
    assert_eq!(first.seq, base_seq + 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.live_sends().await != 1 {
        assert!(Instant::now() < deadline, "the dead send instance stayed registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A gateway dies (kill -9) in the middle of a stream: its clients reconnect
    // through the registry to the other gateway and end with every message once.
    let victim = gateways[0];
    let victim_id = format!("gw-{}", c.procs[victim].port);
    let bus = RedisCluster::connect(&redis, RedisOptions { prefix: c.redis_prefix.clone(), ..Default::default() })
        .await
        .unwrap();
    assert!(bus.streams().await.unwrap().contains(&victim_id), "each gateway has its stream");
    let sender = senders[1].clone();
    let stream = tokio::spawn(async move {
        for i in 0..60 {
            sender.send(room, Content::text(format!("s{i}")), Some(&format!("s{i}"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.procs[victim].kill();
    stream.await.unwrap();
    let last_seq = base_seq + 1 + 60;
    let before = base_seq + 1;
    for (i, user) in users.iter().enumerate() {
        let mut seen: Vec<i64> = Vec::new();
        // What arrived before the failure (the live socket may have died).
        while let Ok(Some(frame)) = sockets[i].next_frame_within(Duration::from_millis(300)).await {
            match frame {
                ServerFrame::Chat(m) if m.room_id == room => seen.push(m.seq),
                ServerFrame::Batch { messages } => {
                    seen.extend(messages.iter().filter(|m| m.room_id == room).map(|m| m.seq))
                }
                _ => {}
            }
        }
        seen.retain(|s| *s > before);
        let have = seen.iter().copied().filter(|s| *s <= last_seq).max().unwrap_or(before);
        if have < last_seq {
            // Reconnect where the registry says (a dead gateway leaves the ranking).
            let deadline = Instant::now() + Duration::from_secs(15);
            let ws_url = loop {
                if let Ok((gw, url)) = c.available(user).await {
                    if gw != victim_id {
                        break url;
                    }
                }
                assert!(Instant::now() < deadline, "the registry kept sending clients to the dead gateway");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let mut socket = user.connect_gateway(&ws_url, "d").await.unwrap();
            socket.send_frame(&stacker_proto::ws::ClientFrame::Sync { cursors: [(room, have)].into() }).await.unwrap();
            seen.extend(collect_through(&mut socket, room, have, last_seq).await);
        }
        let mut unique: Vec<i64> = seen.iter().copied().filter(|s| *s > before).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique,
            (before + 1..=last_seq).collect::<Vec<_>>(),
            "user {i}: every message once after dedupe, no gap"
        );
    }
    // The flusher reclaimed the dead gateway's stream: its entries went on to
    // the users' live gateways and the stream itself was deleted.
    let deadline = Instant::now() + Duration::from_secs(15);
    while bus.streams().await.unwrap().contains(&victim_id) {
        assert!(Instant::now() < deadline, "the flusher never reclaimed the dead gateway's stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    drop(c);
    db.drop_database().await;
    std::fs::remove_dir_all(&dir).ok();
    stacker_testkit::announce(&format!("cluster end to end: passed on {kind}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_mysql() {
    end_to_end(DbKind::Mysql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_postgres() {
    end_to_end(DbKind::Postgres).await;
}

/// `stacker cluster`, the README's one command for a local cluster: it comes
/// up, serves a message from a send instance to a gateway, and stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_command_runs_a_working_cluster() {
    let Some(redis) = service_url(Service::Redis) else { return };
    let Some(db) = fresh_database(DbKind::Postgres).await else { return };
    // Free ports for the fixed layout (base+1 … base+15), searched below the
    // ephemeral range (32768+) so outgoing connections never take them meanwhile.
    let start = 20_000 + (std::process::id() % 400) as u16 * 30;
    let base = (0..400u16)
        .map(|i| 20_000 + (start - 20_000 + i * 30) % 12_000)
        .find(|b| (*b + 1..*b + 16).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("a free port range");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacker"));
    for (key, _) in std::env::vars() {
        if key.starts_with("STACKER_") {
            cmd.env_remove(key);
        }
    }
    let mut cluster = cmd
        .args(["cluster", "--base-port", &base.to_string()])
        .env("STACKER_DATABASE__URL", &db.url)
        .env("STACKER_CLUSTER__REDIS_URL", &redis)
        .env("STACKER_CLUSTER__REDIS_PREFIX", format!("stacker-cmd-{base}"))
        .env("STACKER_LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = cluster.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("stacker cluster is up") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120)).expect("the cluster came up");
    let (meta, send, registry) = (
        format!("http://127.0.0.1:{}", base + 2),
        format!("http://127.0.0.1:{}", base + 1),
        format!("http://127.0.0.1:{}", base + 3),
    );

    let anon = Client::new(&meta);
    anon.register("carol", "correct horse", None).await.unwrap();
    anon.register("dave", "correct horse", None).await.unwrap();
    let carol = anon.login("carol", "correct horse").await.unwrap();
    let dave = anon.login("dave", "correct horse").await.unwrap();
    let room = carol.create_direct(dave.user_id()).await.unwrap();
    let ws_url = dave.clone().rebase(&registry).available_gateway().await.expect("a gateway").ws_url;
    let mut socket = dave.connect_gateway(&ws_url, "d").await.unwrap();
    carol.rebase(&send).send_text(room, "through the cluster").await.unwrap();
    assert_eq!(collect(&mut socket, room, 1).await, vec![1]);

    let status = Command::new("kill").args(["-TERM", &cluster.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = cluster.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the cluster did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit:?}");
    db.drop_database().await;
}

/// Starts a private Redis (nothing on disk) on `port`; waits until it answers.
fn start_redis(port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc { port, child }
}

/// Redis restarts (losing every key): accepted messages are all stored with
/// gapless seqs, and connected clients still receive what was sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing() {
    // A private Redis, so restarting it disturbs no other test.
    if service_url(Service::Redis).is_none() {
        return;
    }
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(!stacker_testkit::services_required(), "redis-server is needed to test a Redis restart");
        stacker_testkit::announce("SKIPPED: redis restart test — no redis-server binary");
        return;
    }
    let Some(db) = fresh_database(DbKind::Postgres).await else { return };
    let redis_port = free_port();
    let mut redis = start_redis(redis_port);
    let dir = std::env::temp_dir().join(format!("stacker-redis-restart-{redis_port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Cluster::new(&db.url, &format!("redis://127.0.0.1:{redis_port}"), &dir);
    let meta = c.start("meta");
    let send = c.start("send");
    c.start_gateway().await;
    c.start_gateway().await;

    let anon = Client::new(c.url(meta));
    let mut users = Vec::new();
    let mut sockets = Vec::new();
    for name in ["erin", "frank"] {
        anon.register(name, "correct horse", None).await.unwrap();
        let user = anon.login(name, "correct horse").await.unwrap();
        let (_, ws_url) = c.available(&user).await.unwrap();
        sockets.push(user.connect_gateway(&ws_url, "d").await.unwrap());
        users.push(user);
    }
    let room = users[0].create_group("restart", &[users[1].user_id()], None).await.unwrap();
    let sender = users[0].clone().rebase(&c.url(send));
    for i in 0..5 {
        sender.send(room, Content::text(format!("before {i}")), Some(&format!("b{i}"))).await.unwrap();
    }
    for socket in sockets.iter_mut() {
        assert!(in_order(&collect(socket, room, 5).await, 1));
    }
    // Let the connect-time recheck pass, so only the restart handling can help below.
    tokio::time::sleep(Duration::from_millis(3000)).await;

    redis.kill();
    drop(redis);
    // Not ready without Redis, ready again once it is back.
    let readyz = format!("{}/readyz", c.url(meta));
    let http = reqwest::Client::new();
    let down = http.get(&readyz).send().await.unwrap();
    assert_eq!(down.status().as_u16(), 503, "readyz with Redis down");
    let _redis = start_redis(redis_port);
    // Past the send instance's route cache: routes must come back from the gateways.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = http.get(&readyz).send().await.unwrap();
        if up.status().is_success() {
            let body: serde_json::Value = up.json().await.unwrap();
            assert_eq!(body["data"]["redis"], "ok", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "readyz stayed {} after Redis came back", up.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Sends keep working (the database is the source of truth); retried with
    // the same client_msg_id while anything is still reconnecting.
    let mut last = 0;
    for i in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(20);
        last = loop {
            match sender.send(room, Content::text(format!("after {i}")), Some(&format!("a{i}"))).await {
                Ok(sent) => break sent.seq,
                Err(e) => {
                    assert!(Instant::now() < deadline, "sends failed after the Redis restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
    }
    assert_eq!(last, 10, "seqs continue without a gap");
    // Connected clients get them without reconnecting: gateways re-register,
    // restore their routes and recheck their sessions.
    for socket in sockets.iter_mut() {
        let seqs = collect_through(socket, room, 5, 10).await;
        assert!(seqs.iter().all(|s| (6..=10).contains(s)), "{seqs:?}");
    }
    drop(c);
    db.drop_database().await;
    std::fs::remove_dir_all(&dir).ok();
}
