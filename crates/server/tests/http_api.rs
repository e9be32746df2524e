//! The HTTP API (SPEC §2) over real HTTP against a real server on SQLite:
//! every route, every permission rule, every error code.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{TestServer, PASSWORD};
use serde_json::{json, Value};
use stacker_client::ClientError;
use stacker_proto::http::{JoinPolicy, JoinRequestStatus};
use stacker_proto::{Content, Id};

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Asserts that a call failed with this HTTP status.
#[track_caller]
fn expect_code<T: std::fmt::Debug>(result: Result<T, ClientError>, code: u16) -> String {
    match result {
        Err(ClientError::Api { code: c, msg }) if c == code => msg,
        other => panic!("expected {code}, got {other:?}"),
    }
}

/// A raw request, for bodies the typed client cannot produce. Returns (status, body).
async fn raw(method: &str, url: &str, token: Option<&str>, content_type: Option<&str>, body: &str) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut req = http.request(method.parse().unwrap(), url).body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn ops_endpoints_and_unknown_routes() {
    let s = TestServer::start().await;
    let (status, body) = raw("GET", &format!("{}/ping", s.base), None, None, "").await;
    assert_eq!((status, body.clone()), (200, json!({"code": 0, "msg": "ok", "data": "pong"})));
    let (status, body) = raw("GET", &format!("{}/healthz", s.base), None, None, "").await;
    assert_eq!((status, body["code"].as_i64()), (200, Some(0)));
    let (status, body) = raw("GET", &format!("{}/readyz", s.base), None, None, "").await;
    assert_eq!((status, body["data"]["database"].as_str()), (200, Some("ok")));
    // The sliding-window monitor saw the database calls (migrations, readiness ping).
    let deps = body["data"]["dependencies"].as_array().expect("dependencies");
    let db = deps.iter().find(|d| d["name"] == "database").expect("database in the monitor");
    assert!(db["calls"].as_u64().unwrap() >= 1 && db["success_rate"].as_f64().unwrap() > 0.0, "{db}");
    let (status, body) = raw("GET", &format!("{}/nope", s.base), None, None, "").await;
    assert_eq!((status, body["code"].as_i64()), (404, Some(404)));
    let (status, body) = raw("DELETE", &format!("{}/login", s.base), None, None, "").await;
    assert_eq!((status, body["code"].as_i64()), (405, Some(405)));

    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("stacker_http_requests_total"), "{metrics}");
    assert!(metrics.contains("route=\"/ping\""), "{metrics}");
    assert!(metrics.contains("stacker_dependency_success_ratio{dependency=\"database\"}"), "{metrics}");
    assert!(metrics.contains("stacker_store_seconds"), "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn register_login_and_me() {
    let s = TestServer::start().await;
    let anon = s.anon();
    let name = format!("alice{:x}", rand::random::<u32>());
    let user_id = anon.register(&name, PASSWORD, Some("Alice")).await.unwrap();
    // Ids are JSON strings.
    let (status, body) = raw(
        "POST",
        &format!("{}/register", s.base),
        None,
        Some("application/json"),
        &json!({"username": format!("b{name}"), "password": PASSWORD}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["data"]["user_id"].is_string(), "{body}");

    assert!(expect_code(anon.register(&name, PASSWORD, None).await, 409).contains("taken"));
    expect_code(anon.register(&name.to_uppercase(), PASSWORD, None).await, 409);
    expect_code(anon.register("x", PASSWORD, None).await, 400);
    expect_code(anon.register("bad name", PASSWORD, None).await, 400);
    expect_code(anon.register("shortpw", "1234", None).await, 400);

    let alice = anon.login(&name.to_uppercase(), PASSWORD).await.unwrap();
    assert_eq!(alice.user_id(), user_id);
    let me = alice.me().await.unwrap();
    assert_eq!((me.user_id, me.username.as_str(), me.nickname.as_str()), (user_id, name.as_str(), "Alice"));

    let wrong = expect_code(anon.login(&name, "wrong password").await, 401);
    let unknown = expect_code(anon.login("nobody-here", PASSWORD).await, 401);
    assert_eq!(wrong, unknown, "unknown user and bad password must read the same");

    expect_code(anon.me().await, 401);
    expect_code(anon.with_token("garbage", Id(0)).me().await, 401);
    let (status, _) = raw("GET", &format!("{}/api/me", s.base), Some("a.b.c"), None, "").await;
    assert_eq!(status, 401);

    // Malformed bodies: 400 with an envelope, never a crash.
    let url = format!("{}/register", s.base);
    let (status, body) = raw("POST", &url, None, Some("application/json"), "{not json").await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(400)));
    let (status, body) = raw("POST", &url, None, Some("application/json"), r#"{"username":"abc"}"#).await;
    assert_eq!(status, 400);
    assert!(body["msg"].as_str().unwrap().contains("password"), "{body}");
    let (status, _) = raw("POST", &url, None, Some("text/plain"), "{}").await;
    assert_eq!(status, 400);
    let huge = format!(r#"{{"username":"{}","password":"x"}}"#, "a".repeat(100_000));
    let (status, body) = raw("POST", &url, None, Some("application/json"), &huge).await;
    assert_eq!((status, body["code"].as_i64()), (413, Some(413)));
    s.stop().await;
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let s = TestServer::start_changed(|c| c.auth.max_login_failures_per_minute = 3).await;
    let anon = s.anon();
    anon.register("victim", PASSWORD, None).await.unwrap();
    for _ in 0..3 {
        expect_code(anon.login("victim", "guess-guess").await, 401);
    }
    expect_code(anon.login("victim", "guess-guess").await, 429);
    // Even the right password waits out the window from this address (the
    // limit is per username and client address; see the next test).
    expect_code(anon.login("victim", PASSWORD).await, 429);
    // Other users are unaffected.
    anon.register("bystander", PASSWORD, None).await.unwrap();
    anon.login("bystander", PASSWORD).await.unwrap();
    // Guesses sent all at once count too: no more than the limit get checked.
    anon.register("target", PASSWORD, None).await.unwrap();
    let guesses = (0..12).map(|_| anon.login("target", "guess-guess"));
    let codes: Vec<u16> = futures::future::join_all(guesses).await.into_iter().map(|r| r.unwrap_err().code()).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 401).count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 9, "{codes:?}");
    s.stop().await;

    // Logins with the right password count too (each is an argon2 check):
    // one account's password sent in a loop cannot fill the hashing slots.
    let s = TestServer::start_changed(|c| c.auth.max_logins_per_user_per_minute = 4).await;
    let anon = s.anon();
    anon.register("busy", PASSWORD, None).await.unwrap();
    let logins = (0..10).map(|_| anon.login("busy", PASSWORD));
    let results = futures::future::join_all(logins).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
    let msg = expect_code(results.into_iter().find(|r| r.is_err()).unwrap(), 429);
    assert!(msg.contains("too many logins"), "{msg}");
    anon.register("other", PASSWORD, None).await.unwrap();
    anon.login("other", PASSWORD).await.unwrap();
    s.stop().await;
}

/// Registers (or, with `password`, logs in) as `name` from `from` through
/// the proxy header the server is configured to trust. Returns the status.
async fn auth_from(s: &TestServer, from: &str, path: &str, name: &str, password: &str) -> u16 {
    let body = json!({ "username": name, "password": password });
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", s.base))
        .header("x-forwarded-for", from)
        .json(&body)
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test]
async fn logins_and_registrations_are_limited_per_client_address() {
    let s = TestServer::start_changed(|c| {
        c.auth.max_registrations_per_address_per_minute = 2;
        c.auth.max_login_failures_per_address_per_minute = 3;
        c.auth.max_login_failures_per_minute = 2;
        c.auth.max_logins_per_user_per_minute = 3;
        c.auth.max_login_failures_per_user_from_all_addresses_per_minute = 3;
        c.auth.client_address_header = "x-forwarded-for".into();
    })
    .await;
    // The proxy's entry (the last one) names the client; what the client
    // wrote in front of it does not.
    let a = "203.0.113.9, 10.0.0.1";
    assert_eq!(auth_from(&s, a, "/register", "first", PASSWORD).await, 200);
    assert_eq!(auth_from(&s, "10.0.0.1", "/register", "first", PASSWORD).await, 409, "a taken name is not counted");
    assert_eq!(auth_from(&s, "198.51.100.1, 10.0.0.1", "/register", "second", PASSWORD).await, 200);
    assert_eq!(auth_from(&s, "10.0.0.1", "/register", "third", PASSWORD).await, 429);
    assert_eq!(auth_from(&s, "10.0.0.2", "/register", "third", PASSWORD).await, 200, "another address is not");
    // Failed logins count per address whatever the usernames; successful ones do not.
    assert_eq!(auth_from(&s, "10.0.0.1", "/login", "first", PASSWORD).await, 200);
    for name in ["nobody-1", "nobody-2", "first"] {
        assert_eq!(auth_from(&s, "10.0.0.1", "/login", name, "wrong-password").await, 401);
    }
    assert_eq!(auth_from(&s, "10.0.0.1", "/login", "nobody-3", "wrong-password").await, 429);
    assert_eq!(auth_from(&s, "10.0.0.1", "/login", "second", PASSWORD).await, 429, "the address waits it out");
    assert_eq!(auth_from(&s, "10.0.0.2", "/login", "second", PASSWORD).await, 200);
    // A user's failures and logins count per address: wrong guesses sent
    // from one address do not lock the user out elsewhere.
    assert_eq!(auth_from(&s, "10.0.0.7", "/register", "locked", PASSWORD).await, 200);
    for _ in 0..2 {
        assert_eq!(auth_from(&s, "10.0.0.8", "/login", "locked", "wrong-password").await, 401);
    }
    assert_eq!(auth_from(&s, "10.0.0.8", "/login", "locked", PASSWORD).await, 429);
    assert_eq!(auth_from(&s, "10.0.0.7", "/login", "locked", PASSWORD).await, 200, "not locked out elsewhere");
    for _ in 0..3 {
        assert_eq!(auth_from(&s, "10.0.0.9", "/login", "second", PASSWORD).await, 200);
    }
    assert_eq!(auth_from(&s, "10.0.0.9", "/login", "second", PASSWORD).await, 429, "logins per user and address");
    assert_eq!(auth_from(&s, "10.0.0.10", "/login", "second", PASSWORD).await, 200);
    // Guesses at one account from many addresses meet a cap of their own.
    assert_eq!(auth_from(&s, "10.0.0.20", "/register", "guessed", PASSWORD).await, 200);
    for from in ["10.0.0.21", "10.0.0.21", "10.0.0.22"] {
        assert_eq!(auth_from(&s, from, "/login", "guessed", "wrong-password").await, 401);
    }
    assert_eq!(auth_from(&s, "10.0.0.23", "/login", "guessed", "wrong-password").await, 429, "from all addresses");
    assert_eq!(auth_from(&s, "10.0.0.20", "/login", "guessed", PASSWORD).await, 429, "the price: for a minute");
    // IPv6 clients count per /64.
    assert_eq!(auth_from(&s, "2001:db8::1", "/register", "v6-a", PASSWORD).await, 200);
    assert_eq!(auth_from(&s, "2001:db8::2", "/register", "v6-b", PASSWORD).await, 200);
    assert_eq!(auth_from(&s, "2001:db8::3", "/register", "v6-c", PASSWORD).await, 429);
    assert_eq!(auth_from(&s, "[2001:db8:0:1::3]:443", "/register", "v6-c", PASSWORD).await, 200, "another /64");
    assert_eq!(auth_from(&s, "192.0.2.7:5555", "/register", "with-port", PASSWORD).await, 200);
    assert_eq!(auth_from(&s, "192.0.2.7", "/register", "same-host", PASSWORD).await, 200);
    assert_eq!(auth_from(&s, "192.0.2.7", "/register", "third-time", PASSWORD).await, 429);
    // A request without the header (or with garbage in it) is the TCP peer's.
    let anon = s.anon();
    anon.register("peer-one", PASSWORD, None).await.unwrap();
    assert_eq!(auth_from(&s, "not an address", "/register", "peer-two", PASSWORD).await, 200);
    expect_code(anon.register("peer-three", PASSWORD, None).await, 429);
    s.stop().await;

    // Without a proxy header the TCP peer is the client.
    let s = TestServer::start_changed(|c| c.auth.max_registrations_per_address_per_minute = 1).await;
    let anon = s.anon();
    anon.register("peer-one", PASSWORD, None).await.unwrap();
    let msg = expect_code(anon.register("peer-two", PASSWORD, None).await, 429);
    assert!(msg.contains("address"), "{msg}");
    s.stop().await;
}

#[tokio::test]
async fn room_creation_and_search_are_limited_per_user() {
    let s = TestServer::start_changed(|c| {
        c.rooms.max_creations_per_user_per_minute = 2;
        c.rooms.max_searches_per_user_per_minute = 3;
    })
    .await;
    let (a, b) = (s.user("a").await, s.user("b").await);
    a.create_group("one", &[], None).await.unwrap();
    let direct = a.create_direct(b.user_id()).await.unwrap();
    // Asking for an existing direct room, or a refused request, creates
    // nothing and is not counted.
    assert_eq!(a.create_direct(b.user_id()).await.unwrap(), direct);
    expect_code(a.create_group("", &[], None).await, 400);
    let msg = expect_code(a.create_group("three", &[], None).await, 429);
    assert!(msg.contains("rooms created"), "{msg}");
    b.create_group("b's own", &[], None).await.unwrap();
    for _ in 0..3 {
        a.search("one", None).await.unwrap();
    }
    expect_code(a.search("one", None).await, 429);
    assert_eq!(b.search("one", None).await.unwrap().len(), 1, "per user");
    s.stop().await;

    // Joining and leaving in a loop would announce to every member each time.
    let s = TestServer::start_changed(|c| c.rooms.max_joins_per_user_per_minute = 2).await;
    let (owner, hopper) = (s.user("o").await, s.user("h").await);
    let room = owner.create_group("lobby", &[], None).await.unwrap();
    let strict = owner.create_group("vip", &[], Some(JoinPolicy::Approval)).await.unwrap();
    hopper.join(room).await.unwrap();
    hopper.leave(room).await.unwrap();
    hopper.request_join(strict, None).await.unwrap();
    let msg = expect_code(hopper.join(room).await, 429);
    assert!(msg.contains("joins"), "{msg}");
    s.stop().await;
}

#[tokio::test]
async fn direct_rooms_are_unique_per_pair() {
    let s = TestServer::start().await;
    let (a, b, c) = (s.user("a").await, s.user("b").await, s.user("c").await);
    let room = a.create_direct(b.user_id()).await.unwrap();
    assert_eq!(a.create_direct(b.user_id()).await.unwrap(), room);
    assert_eq!(b.create_direct(a.user_id()).await.unwrap(), room);
    assert_ne!(a.create_direct(c.user_id()).await.unwrap(), room);

    expect_code(a.create_direct(a.user_id()).await, 400);
    expect_code(a.create_direct(Id(12345)).await, 404);
    let both = json!({"name": "", "is_group": false, "member_ids": [b.user_id(), c.user_id()]});
    expect_code(a.call::<_, Value>(reqwest::Method::POST, "/api/chat/group/create", Some(&both)).await, 400);
    // Membership of a direct room is fixed.
    expect_code(a.add_member(room, c.user_id()).await, 400);
    expect_code(c.join(room).await, 400);
    expect_code(a.leave(room).await, 400);
    let members = b.members(room).await.unwrap();
    assert_eq!(members.len(), 2);
    expect_code(c.members(room).await, 403);
    s.stop().await;
}

#[tokio::test]
async fn group_roles_and_permissions() {
    let s = TestServer::start().await;
    let (owner, admin, member, other, outsider) =
        (s.user("own").await, s.user("adm").await, s.user("mem").await, s.user("oth").await, s.user("out").await);
    expect_code(owner.create_group("", &[], None).await, 400);
    expect_code(owner.create_group("team", &[Id(999)], None).await, 404);
    let room = owner.create_group("team", &[admin.user_id(), member.user_id()], None).await.unwrap();
    expect_code(owner.members(Id(4242)).await, 404);

    // Only the owner changes roles.
    expect_code(admin.change_member_role(room, member.user_id(), 1).await, 403);
    expect_code(owner.change_member_role(room, admin.user_id(), 7).await, 400);
    expect_code(owner.change_member_role(room, outsider.user_id(), 1).await, 404);
    owner.change_member_role(room, admin.user_id(), 1).await.unwrap();

    // Members may not moderate; admins may.
    expect_code(member.add_member(room, other.user_id()).await, 403);
    assert_eq!(admin.add_member(room, other.user_id()).await.unwrap(), vec![other.user_id()]);
    assert!(admin.add_members(room, &[other.user_id()]).await.unwrap().is_empty(), "already a member");
    expect_code(admin.add_members(room, &[]).await, 400);
    expect_code(outsider.add_member(room, outsider.user_id()).await, 403);
    expect_code(admin.remove_member(room, owner.user_id()).await, 403);
    expect_code(member.remove_member(room, other.user_id()).await, 403);
    expect_code(admin.remove_member(room, outsider.user_id()).await, 404);
    expect_code(admin.remove_member(room, admin.user_id()).await, 400);
    admin.remove_member(room, other.user_id()).await.unwrap();
    expect_code(other.members(room).await, 403);

    // Mute: admins mute members, not owners; a muted member cannot send until unmuted.
    expect_code(member.mute_member(room, admin.user_id(), now_ms() + 60_000).await, 403);
    expect_code(admin.mute_member(room, owner.user_id(), now_ms() + 60_000).await, 403);
    let before_mute = member.send(room, Content::text("sent"), Some("before-mute")).await.unwrap();
    admin.mute_member(room, member.user_id(), now_ms() + 60_000).await.unwrap();
    assert!(expect_code(member.send_text(room, "hi").await, 403).contains("muted"));
    // A retry of a send stored before the mute still gets its message (its
    // answer may have been lost); nothing new is stored.
    let retried = member.send(room, Content::text("sent"), Some("before-mute")).await.unwrap();
    assert_eq!((retried.msg_id, retried.seq), (before_mute.msg_id, before_mute.seq));
    assert!(expect_code(member.send(room, Content::text("new"), Some("after-mute")).await, 403).contains("muted"));
    // Nor may a muted member reach the room another way: a nickname change
    // (announced to all) or a resend (pushed to all).
    expect_code(member.change_nickname(room, "loud").await, 403);
    expect_code(member.resend(before_mute.msg_id).await, 403);
    // Leaving and rejoining (the room is open) does not end a mute.
    member.leave(room).await.unwrap();
    member.join(room).await.unwrap();
    assert!(expect_code(member.send_text(room, "hi").await, 403).contains("muted"));
    admin.mute_member(room, member.user_id(), 0).await.unwrap();
    member.send_text(room, "hi").await.unwrap();
    let muted = owner.members(room).await.unwrap();
    assert_eq!(muted.iter().find(|m| m.user_id == member.user_id()).unwrap().mute_until, 0);

    // Nicknames.
    member.change_nickname(room, "Mem").await.unwrap();
    expect_code(member.change_nickname(room, &"n".repeat(65)).await, 400);
    expect_code(outsider.change_nickname(room, "x").await, 403);
    let members = owner.members(room).await.unwrap();
    let roles: Vec<(Id, u8, String)> = members.iter().map(|m| (m.user_id, m.role, m.nickname.clone())).collect();
    assert!(roles.contains(&(owner.user_id(), 0, String::new())));
    assert!(roles.contains(&(admin.user_id(), 1, String::new())));
    assert!(roles.contains(&(member.user_id(), 2, "Mem".into())));

    // Ownership transfer: the old owner becomes admin.
    expect_code(owner.change_member_role(room, owner.user_id(), 1).await, 400);
    expect_code(owner.leave(room).await, 409);
    owner.change_member_role(room, admin.user_id(), 0).await.unwrap();
    let roles: Vec<(Id, u8)> = owner.members(room).await.unwrap().iter().map(|m| (m.user_id, m.role)).collect();
    assert!(roles.contains(&(admin.user_id(), 0)) && roles.contains(&(owner.user_id(), 1)));
    expect_code(owner.change_member_role(room, member.user_id(), 1).await, 403);
    expect_code(owner.remove_member(room, admin.user_id()).await, 403);
    admin.remove_member(room, owner.user_id()).await.unwrap();

    // Leaving.
    member.leave(room).await.unwrap();
    expect_code(member.leave(room).await, 403);
    expect_code(member.send_text(room, "still here?").await, 403);
    admin.leave(room).await.unwrap(); // the last member, owner or not, may leave
                                      // The owner gone, nobody could moderate the room: it takes no one in.
    expect_code(outsider.join(room).await, 404);
    expect_code(outsider.request_join(room, None).await, 404);
    s.stop().await;
}

#[tokio::test]
async fn join_policies_requests_and_search() {
    let s = TestServer::start().await;
    let (owner, joiner, admin) = (s.user("own").await, s.user("joi").await, s.user("adm").await);
    let tag = format!("{:06x}", rand::random::<u32>() & 0xffffff);
    let open = owner.create_group(&format!("Open Lounge {tag}"), &[], None).await.unwrap();
    let closed = owner
        .create_group(&format!("closed club {tag}"), &[admin.user_id()], Some(JoinPolicy::Approval))
        .await
        .unwrap();
    owner.change_member_role(closed, admin.user_id(), 1).await.unwrap();

    joiner.join(open).await.unwrap();
    expect_code(joiner.join(open).await, 409);
    expect_code(joiner.request_join(open, None).await, 409);
    expect_code(admin.request_join(open, None).await, 400);
    expect_code(joiner.join(closed).await, 403);
    expect_code(joiner.join(Id(77)).await, 404);

    let request = joiner.request_join(closed, Some("let me in")).await.unwrap();
    expect_code(joiner.request_join(closed, None).await, 409);
    expect_code(joiner.join_requests(closed).await, 403);
    let pending = admin.join_requests(closed).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].request_id, pending[0].user_id, pending[0].message.as_str()),
        (request, joiner.user_id(), "let me in")
    );
    expect_code(joiner.respond_join(request, true).await, 403);
    expect_code(admin.respond_join(Id(1), true).await, 404);
    let decided = admin.respond_join(request, true).await.unwrap();
    assert_eq!(decided.status, JoinRequestStatus::Approved);
    expect_code(owner.respond_join(request, false).await, 409);
    assert!(joiner.members(closed).await.unwrap().iter().any(|m| m.user_id == joiner.user_id() && m.role == 2));
    assert!(admin.join_requests(closed).await.unwrap().is_empty());

    // Rejection leaves the user outside; they may ask again.
    let late = s.user("late").await;
    let r = late.request_join(closed, None).await.unwrap();
    assert_eq!(owner.respond_join(r, false).await.unwrap().status, JoinRequestStatus::Rejected);
    expect_code(late.members(closed).await, 403);
    late.request_join(closed, None).await.unwrap();

    // Search: case-insensitive substring over group rooms, bounded.
    let found = late.search(&format!("LOUNGE {tag}"), None).await.unwrap();
    assert_eq!(found.iter().map(|r| r.room_id).collect::<Vec<_>>(), vec![open]);
    assert_eq!(found[0].join_policy, JoinPolicy::Open);
    assert_eq!(late.search(&tag, Some(10)).await.unwrap().len(), 2);
    assert!(late.search("%", None).await.unwrap().iter().all(|r| r.name.contains('%')));
    expect_code(late.search("", None).await, 400);
    expect_code(late.search("x", Some(0)).await, 400);
    expect_code(late.search("x", Some(1000)).await, 400);
    expect_code(s.anon().search("x", None).await, 401);
    s.stop().await;
}

#[tokio::test]
async fn join_requests_are_paged() {
    let s = TestServer::start().await;
    let owner = s.user("pgo").await;
    let room = owner.create_group("paged requests", &[], Some(JoinPolicy::Approval)).await.unwrap();
    let other = owner.create_group("another", &[], Some(JoinPolicy::Approval)).await.unwrap();
    let mut asked = Vec::new();
    for i in 0..5 {
        let user = s.user(&format!("pg{i}")).await;
        asked.push(user.request_join(room, None).await.unwrap());
    }
    let elsewhere = s.user("pgx").await.request_join(other, None).await.unwrap();

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = owner.join_requests_page(room, after, Some(2)).await.unwrap();
        assert!(page.requests.len() <= 2);
        seen.extend(page.requests.iter().map(|r| r.request_id));
        if !page.has_more {
            break;
        }
        after = page.requests.last().map(|r| r.request_id);
    }
    assert_eq!(seen, asked, "every request once, oldest first");
    let all = owner.join_requests_page(room, None, None).await.unwrap();
    assert_eq!((all.requests.len(), all.has_more), (5, false));
    // A decided request still marks its place.
    owner.respond_join(asked[1], false).await.unwrap();
    let rest = owner.join_requests_page(room, Some(asked[1]), Some(10)).await.unwrap();
    assert_eq!(rest.requests.iter().map(|r| r.request_id).collect::<Vec<_>>(), asked[2..].to_vec());

    for bad in [Some(0), Some(201)] {
        expect_code(owner.join_requests_page(room, None, bad).await, 400);
    }
    expect_code(owner.join_requests_page(room, Some(elsewhere), None).await, 400);
    expect_code(owner.join_requests_page(room, Some(Id(12345)), None).await, 400);
    s.stop().await;
}

#[tokio::test]
async fn messages_history_and_room_list() {
    let s = TestServer::start().await;
    let (a, b, outsider) = (s.user("a").await, s.user("b").await, s.user("o").await);
    let room = a.create_group("chat", &[b.user_id()], None).await.unwrap();

    let contents = [
        Content::text("hello"),
        Content::Image { url: "https://img/x.png".into(), width: 10, height: 20 },
        Content::Voice { url: "https://v/x.ogg".into(), duration: 3 },
        Content::File { url: "https://f/x.pdf".into(), file_name: "x.pdf".into(), size: 1234 },
        Content::Custom { data: json!({"kind": "poll", "options": [1, 2]}) },
    ];
    for (i, content) in contents.iter().enumerate() {
        let sent = a.send(room, content.clone(), None).await.unwrap();
        assert_eq!(sent.seq, i as i64 + 1);
    }
    // Typed validation.
    expect_code(a.send(room, Content::text("   "), None).await, 400);
    expect_code(a.send(room, Content::Image { url: "".into(), width: 1, height: 1 }, None).await, 400);
    let bad_type = json!({"room_id": room, "content": {"type": "video", "url": "x"}});
    expect_code(a.call::<_, Value>(reqwest::Method::POST, "/api/chat/send_message", Some(&bad_type)).await, 400);
    expect_code(a.send(room, Content::text("x".repeat(20_000)), None).await, 413);
    expect_code(a.send(room, Content::text("hi"), Some("has space")).await, 400);
    expect_code(outsider.send_text(room, "let me talk").await, 403);
    expect_code(a.send_text(Id(5), "nowhere").await, 404);
    expect_code(s.anon().send_text(room, "anon").await, 401);

    // Idempotency: the same client_msg_id yields the same message.
    let first = b.send(room, Content::text("once"), Some("cmid-1")).await.unwrap();
    let again = b.send(room, Content::text("once"), Some("cmid-1")).await.unwrap();
    assert_eq!((again.msg_id, again.seq, again.created_at), (first.msg_id, first.seq, first.created_at));
    // The same client_msg_id from another sender is another message.
    let other = a.send(room, Content::text("mine"), Some("cmid-1")).await.unwrap();
    assert_eq!(other.seq, first.seq + 1);

    // Resend: same id and seq, sender only.
    let resent = b.resend(first.msg_id).await.unwrap();
    assert_eq!((resent.msg_id, resent.seq), (first.msg_id, first.seq));
    expect_code(a.resend(first.msg_id).await, 403);
    expect_code(a.resend(Id(31337)).await, 404);

    // History pages.
    for i in 0..20 {
        a.send_text(room, &format!("m{i}")).await.unwrap();
    }
    let last_seq = other.seq + 20; // 27
    let latest = b.history(room, None, None, Some(5)).await.unwrap();
    assert_eq!(
        latest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (last_seq - 4..=last_seq).collect::<Vec<_>>()
    );
    assert!(latest.has_more);
    let before = b.history(room, Some(3), None, Some(10)).await.unwrap();
    assert_eq!(before.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(!before.has_more);
    assert_eq!(*before.messages[0].content, contents[0]);
    assert_eq!(*before.messages[1].content, contents[1]);
    let after = b.history(room, None, Some(20), Some(5)).await.unwrap();
    assert_eq!(after.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![21, 22, 23, 24, 25]);
    assert!(after.has_more);
    let tail = b.history(room, None, Some(25), Some(5)).await.unwrap();
    assert_eq!((tail.messages.len(), tail.has_more), (2, false));
    let by_cmid = b.history(room, None, Some(first.seq - 1), Some(1)).await.unwrap();
    assert_eq!(by_cmid.messages[0].client_msg_id.as_deref(), Some("cmid-1"));
    assert_eq!(by_cmid.messages[0].sender_id, b.user_id());
    expect_code(b.history(room, Some(5), Some(1), None).await, 400);
    expect_code(b.history(room, None, None, Some(0)).await, 400);
    expect_code(b.history(room, None, None, Some(201)).await, 400);
    expect_code(b.history(room, Some(0), None, None).await, 400);
    expect_code(outsider.history(room, None, None, None).await, 403);
    expect_code(b.history(Id(8), None, None, None).await, 404);
    let (status, _) = raw("GET", &format!("{}/api/chat/history?room_id=abc", s.base), b.token(), None, "").await;
    assert_eq!(status, 400);

    // Room list: last_seq, read cursor, unread, last message.
    assert_eq!(b.joined_rooms().await.unwrap(), vec![room]);
    let quiet = b.create_group("quiet", &[], None).await.unwrap();
    let rooms = b.rooms().await.unwrap();
    assert_eq!(rooms.len(), 2);
    let chat = rooms.iter().find(|r| r.room_id == room).unwrap();
    assert_eq!((chat.last_seq, chat.name.as_str(), chat.is_group), (last_seq, "chat", true));
    // b's own send moved b's read cursor to it.
    assert_eq!(chat.read_seq, first.seq);
    assert_eq!(chat.unread, last_seq - first.seq);
    assert_eq!(chat.last_message.as_ref().unwrap().seq, last_seq);
    // Most recent activity first; creating a room counts as activity.
    assert_eq!(rooms[0].room_id, quiet);
    assert!(rooms.iter().any(|r| r.room_id == quiet && r.last_message.is_none() && r.unread == 0));
    assert_eq!(b.mark_read(room, 1_000_000).await.unwrap(), last_seq, "clamped to last_seq");
    assert_eq!(b.rooms().await.unwrap().iter().find(|r| r.room_id == room).unwrap().unread, 0);
    assert_eq!(b.mark_read(room, 1).await.unwrap(), 1);
    assert_eq!(
        b.rooms().await.unwrap().iter().find(|r| r.room_id == room).unwrap().read_seq,
        last_seq,
        "never moves back"
    );
    expect_code(outsider.mark_read(room, 1).await, 403);
    a.send_text(room, "newest").await.unwrap();
    assert_eq!(b.rooms().await.unwrap()[0].room_id, room, "the room with the newest message comes first");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_sqlite() {
    let s = TestServer::start().await;
    common::concurrent_sends(&s, 8, 200).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_and_seq() {
    let config = common::test_config(None);
    let keep = config.clone();
    let s = TestServer::start_with(config).await;
    let a = s.user("a").await;
    let room = a.create_group("persist", &[], None).await.unwrap();
    for i in 0..3 {
        a.send_text(room, &format!("before {i}")).await.unwrap();
    }
    let (token, me) = (a.token().unwrap().to_string(), a.user_id());
    s.stop_keeping_data().await;
    let s2 = TestServer::start_with(keep).await;
    let a2 = s2.anon().with_token(token, me);
    assert_eq!(a2.send_text(room, "after").await.unwrap().seq, 4);
    assert_eq!(a2.history(room, None, None, None).await.unwrap().messages.len(), 4);
    s2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_503_and_nothing_accepted_is_lost() {
    let s = TestServer::start_changed(|c| {
        c.database.queue = 1;
        c.database.max_batch = 1;
        c.database.enqueue_timeout_ms = 0;
    })
    .await;
    let a = s.user("a").await;
    let room = a.create_group("flood", &[], None).await.unwrap();
    let mut refused = 0;
    let mut accepted: Vec<i64> = Vec::new();
    for round in 0..20 {
        let sends = (0..64).map(|i| {
            let a = a.clone();
            async move { a.send(room, Content::text("x"), Some(&format!("r{round}-{i}"))).await }
        });
        for result in futures::future::join_all(sends).await {
            match result {
                Ok(sent) => accepted.push(sent.seq),
                Err(e) => {
                    assert_eq!(e.code(), 503, "{e}");
                    refused += 1;
                }
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "a one-slot queue with no wait must refuse some of 64 concurrent sends");
    accepted.sort_unstable();
    let n = accepted.len() as i64;
    assert_eq!(accepted, (1..=n).collect::<Vec<_>>());
    let history = a.history(room, None, Some(0), Some(200)).await.unwrap();
    assert_eq!(history.messages.len() as i64, n.min(200), "refused sends were not stored; accepted ones were");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stores_every_acknowledged_send() {
    let config = common::test_config(None);
    let keep = config.clone();
    let s = TestServer::start_with(config).await;
    let a = s.user("a").await;
    let room = a.create_group("shutdown", &[], None).await.unwrap();
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100_000 {
                match a.send(room, Content::text("x"), Some(&format!("s{i}"))).await {
                    Ok(sent) => acked.push(sent.seq),
                    Err(_) => break, // the server went away
                }
            }
            acked
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    s.stop_keeping_data().await;
    let acked = sender.await.unwrap();
    assert!(!acked.is_empty());
    let s2 = TestServer::start_with(keep).await;
    let a2 = s2.anon().with_token(a.token().unwrap(), a.user_id());
    let stored = a2.history(room, None, None, Some(1)).await.unwrap().messages[0].seq;
    assert!(stored >= *acked.last().unwrap(), "every acknowledged send survived the shutdown");
    s2.stop().await;
}
