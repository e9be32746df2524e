//! The `stacker` binary as a user runs it.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stacker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacker"));
    // The test harness's own variables are not config; keep the environment clean anyway.
    for (key, _) in std::env::vars() {
        if key.starts_with("STACKER_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn help_lists_every_role() {
    let out = stacker().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for role in ["standalone", "meta", "send", "registry", "gateway", "flusher"] {
        assert!(help.contains(role), "--help lacks {role}:\n{help}");
    }
}

#[test]
fn distributed_roles_demand_redis_and_a_shared_secret() {
    let out = stacker().arg("gateway").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster.redis_url"));
    let out = stacker().arg("send").env("STACKER_CLUSTER__REDIS_URL", "redis://127.0.0.1:1").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster.internal_secret"));
}

#[test]
fn wrong_config_values_fail_naming_the_key() {
    let out = stacker().env("STACKER_SERVER__LISTEN", "not-an-address").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("listen"), "{err}");

    let out = stacker().env("STACKER_MODE", "production").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret"));

    let out = stacker().args(["--config", "/nonexistent/stacker.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Starts `stacker` with no config in an empty directory; returns it, its port and the directory.
fn start_server() -> (std::process::Child, u16, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("stacker-cli-{:016x}", rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let child = stacker()
        .current_dir(&dir)
        .env("STACKER_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/ping").is_err() {
        assert!(Instant::now() < deadline, "server did not answer /ping");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, port, dir)
}

/// No config file, no services: `stacker` in an empty directory serves the API
/// with SQLite under ./data, and stops cleanly on SIGTERM.
#[test]
fn starts_with_no_config_and_stops_on_sigterm() {
    let (mut child, port, dir) = start_server();
    let body = http_get(port, "/ping").unwrap();
    assert!(body.contains(r#""data":"pong""#), "{body}");
    assert!(dir.join("data/stacker.db").exists(), "SQLite database under ./data");
    assert!(dir.join("data/jwt_secret").exists(), "generated development secret");

    kill_term(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_to_string(&mut logs).unwrap();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        logs.push_str(&line.unwrap());
    }
    assert!(logs.contains("jwt_secret"), "warns about the generated secret:\n{logs}");
    std::fs::remove_dir_all(&dir).ok();
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn kill_term(pid: u32) {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// SIGHUP applies the live keys of an edited config file.
#[test]
fn sighup_reloads_live_config_keys() {
    let dir = std::env::temp_dir().join(format!("stacker-reload-{:016x}", rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stacker.yaml");
    let port = free_port();
    let write_config = |max: usize| {
        let yaml = format!("server:\n  listen: 127.0.0.1:{port}\nmessages:\n  max_content_bytes: {max}\n");
        std::fs::write(&file, yaml).unwrap();
    };
    write_config(500);
    let mut server = stacker()
        .current_dir(&dir)
        .arg("--config")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/ping").is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let session = dir.join("s.json");
    cli(port, &session, &["register", "reloader", "correct horse"]);
    cli(port, &session, &["login", "reloader", "correct horse"]);
    let room = cli(port, &session, &["create", "r"]);
    let room = room.trim().rsplit(' ').next().unwrap().to_string();
    let long = "x".repeat(1000);
    let send = |text: &str| {
        Command::new(env!("CARGO_BIN_EXE_stacker-cli"))
            .args(["--server", &format!("http://127.0.0.1:{port}"), "--session"])
            .arg(&session)
            .args(["send", &room, text])
            .output()
            .unwrap()
    };
    let refused = send(&long);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("413"), "{}", String::from_utf8_lossy(&refused.stderr));

    write_config(4000);
    let status = Command::new("kill").args(["-HUP", &server.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !send(&long).status.success() {
        assert!(Instant::now() < deadline, "the new limit was not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_term(server.id());
    assert!(server.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}

fn cli(port: u16, session: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stacker-cli"))
        .args(["--server", &format!("http://127.0.0.1:{port}"), "--session"])
        .arg(session)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "stacker-cli {args:?} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The README's realtime walk-through: one terminal listens, another sends.
#[test]
fn cli_listen_prints_what_another_user_sends() {
    let (mut server, port, dir) = start_server();
    let (alice, bob) = (dir.join("alice.json"), dir.join("bob.json"));
    cli(port, &alice, &["register", "alice", "correct horse"]);
    let bob_id = cli(port, &bob, &["register", "bob", "correct horse"]);
    let bob_id = bob_id.trim().rsplit(' ').next().unwrap().to_string();
    cli(port, &alice, &["login", "alice", "correct horse"]);
    cli(port, &bob, &["login", "bob", "correct horse"]);
    let room = cli(port, &alice, &["create", "friends", "--member", &bob_id]);
    let room = room.trim().rsplit(' ').next().unwrap().to_string();

    let listener = Command::new(env!("CARGO_BIN_EXE_stacker-cli"))
        .args(["--server", &format!("http://127.0.0.1:{port}"), "--session"])
        .arg(&bob)
        .args(["listen", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cli(port, &alice, &["send", &room, "hello", "bob"]);
    cli(port, &alice, &["send", &room, "second"]);
    let out = listener.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let lines: Vec<&str> = printed.lines().filter(|l| l.starts_with("[room")).collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert!(lines[0].contains("#1") && lines[0].ends_with("hello bob"), "{printed}");
    assert!(lines[1].contains("#2") && lines[1].ends_with("second"), "{printed}");
    assert!(cli(port, &bob, &["history", &room]).contains("hello bob"));
    assert!(cli(port, &bob, &["rooms"]).contains("friends"));

    kill_term(server.id());
    assert!(server.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).ok();
}

/// The count of store calls of `op` so far, from the server's /metrics.
fn store_calls(port: u16, op: &str) -> u64 {
    let metrics = http_get(port, "/metrics").unwrap();
    let prefix = format!("stacker_store_seconds_count{{op=\"{op}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0, |n| n.trim().parse().unwrap())
}

/// The (room, seq) of the next batch or chat frame.
async fn replayed(socket: &mut stacker_client::Socket) -> Vec<(stacker_proto::Id, i64)> {
    use stacker_proto::ws::ServerFrame;
    let messages = loop {
        match socket.next_frame_within(Duration::from_secs(10)).await.unwrap().expect("a replay") {
            ServerFrame::Batch { messages } => break messages,
            ServerFrame::Chat(m) => break vec![m],
            _ => {}
        }
    };
    messages.iter().map(|m| (m.room_id, m.seq)).collect()
}

/// A `sync` naming rooms the user is not in costs one store read for them
/// all, not one each. (Its own process, so the metrics are this test's.)
#[tokio::test]
async fn a_sync_of_other_peoples_rooms_costs_one_read() {
    use stacker_proto::ws::ClientFrame;
    let (child, port, dir) = start_server();
    let mut server = StopOnDrop(child);
    let anon = stacker_client::Client::new(format!("http://127.0.0.1:{port}"));
    anon.register("syncer", "correct horse", None).await.unwrap();
    let me = anon.login("syncer", "correct horse").await.unwrap();
    let room = me.create_group("mine", &[], None).await.unwrap();
    me.send_text(room, "one").await.unwrap();
    let mut socket = me.connect("d").await.unwrap();
    assert_eq!(replayed(&mut socket).await, vec![(room, 1)], "the catch-up on connect");
    let before = store_calls(port, "member");
    assert!(before > 0, "the metric is there (the connect's catch-up read membership)");
    let mut cursors: std::collections::BTreeMap<_, _> = (1..=999).map(|i| (stacker_proto::Id(i), 0)).collect();
    cursors.insert(room, 0);
    socket.send_frame(&ClientFrame::Sync { cursors }).await.unwrap();
    // The room the user is in is replayed; the 999 others are dropped.
    assert_eq!(replayed(&mut socket).await, vec![(room, 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads = store_calls(port, "member") - before;
    assert!(reads <= 3, "{reads} membership reads for one sync");
    kill_term(server.0.id());
    server.0.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Kills the server if the test ends early (a failed assertion), so that no
/// server outlives its test.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
