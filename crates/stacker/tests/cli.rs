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
fn roles_not_built_yet_say_so() {
    let out = stacker().arg("gateway").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"));
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

/// No config file, no services: `stacker` in an empty directory serves the API
/// with SQLite under ./data, and stops cleanly on SIGTERM.
#[test]
fn starts_with_no_config_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("stacker-cli-{:016x}", rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut child = stacker()
        .current_dir(&dir)
        .env("STACKER_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(body) = http_get(port, "/ping") {
            break body;
        }
        assert!(Instant::now() < deadline, "server did not answer /ping");
        std::thread::sleep(Duration::from_millis(100));
    };
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
