//! The Redis registry, routes, node-id leases, streams and member-list cache against a real
//! Redis (STACKER_TEST_REDIS_URL; see stacker-testkit). Each test works under
//! its own key prefix and deletes it afterwards.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use stacker_domain::cluster::{Bus, BusEntry, BusPush, GatewayInfo, Registry};
use stacker_domain::delivery::remote::{BusFanout, LocalGateway};
use stacker_domain::delivery::{Delivery, DeliveryConfig};
use stacker_domain::fanout::Fanout;
use stacker_domain::membership::{MemberBrief, MemberCache, RoomMembers, SharedMemberCache};
use stacker_domain::model::{Content, JoinPolicy, Member, MemberChange, NewMessage, Role, Room, User};
use stacker_domain::store::Store;
use stacker_domain::Error;
use stacker_redis::{RedisCluster, RedisOptions};
use stacker_store_sql::{SqlOptions, SqlStore};
use stacker_testkit::{frames_until_quiet, fresh_database, service_url, DbKind, Service, TestDb};

async fn cluster() -> Option<RedisCluster> {
    let url = service_url(Service::Redis)?;
    let prefix = format!("stacker-test-{:016x}", rand::random::<u64>());
    Some(
        RedisCluster::connect(&url, RedisOptions { prefix, stream_max_len: 1000, ..Default::default() })
            .await
            .expect("connect to redis"),
    )
}

/// [`cluster`], its key prefix, and a plain connection to the same Redis
/// (to write what the cluster never would).
async fn cluster_and_raw() -> Option<(RedisCluster, String, redis::aio::MultiplexedConnection)> {
    let url = service_url(Service::Redis)?;
    let prefix = format!("stacker-test-{:016x}", rand::random::<u64>());
    let options = RedisOptions { prefix: prefix.clone(), stream_max_len: 1000, ..Default::default() };
    let c = RedisCluster::connect(&url, options).await.expect("connect to redis");
    let client = redis::Client::open(url.as_str()).expect("a redis url");
    let raw = client.get_multiplexed_async_connection().await.expect("connect to redis");
    Some((c, prefix, raw))
}

fn gw(id: &str, connections: u64, capacity: u64) -> GatewayInfo {
    GatewayInfo {
        id: id.into(),
        ws_url: format!("ws://127.0.0.1/{id}"),
        internal_url: format!("http://127.0.0.1/{id}"),
        capacity,
        connections,
    }
}

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn ranking_capacity_and_dead_gateways() {
    let Some(c) = cluster().await else { return };
    assert!(c.heartbeat_gateway(&gw("a", 50, 100), TTL).await.unwrap(), "first registration is new");
    assert!(!c.heartbeat_gateway(&gw("a", 50, 100), TTL).await.unwrap(), "a heartbeat is not");
    c.heartbeat_gateway(&gw("b", 10, 100), TTL).await.unwrap();
    c.heartbeat_gateway(&gw("full", 5, 5), TTL).await.unwrap();
    let ids: Vec<String> = c.live_gateways().await.unwrap().into_iter().map(|g| g.id).collect();
    assert_eq!(ids, ["b", "a", "full"], "least loaded first");
    assert_eq!(c.pick_gateway(None).await.unwrap().unwrap().id, "b");

    // Capacity: a gateway at capacity is never picked.
    c.heartbeat_gateway(&gw("b", 100, 100), TTL).await.unwrap();
    assert_eq!(c.pick_gateway(None).await.unwrap().unwrap().id, "a");

    // A gateway that stops heartbeating is dead and leaves the ranking.
    c.heartbeat_gateway(&gw("short", 0, 100), Duration::from_millis(200)).await.unwrap();
    assert_eq!(c.pick_gateway(None).await.unwrap().unwrap().id, "short");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ids: HashSet<String> = c.live_gateways().await.unwrap().into_iter().map(|g| g.id).collect();
    assert!(!ids.contains("short"), "{ids:?}");
    assert_eq!(c.pick_gateway(None).await.unwrap().unwrap().id, "a");

    // Send and meta instances.
    c.heartbeat_instance("send", "s1", "http://127.0.0.1:1", TTL).await.unwrap();
    c.heartbeat_instance("send", "s2", "http://127.0.0.1:2", Duration::from_millis(150)).await.unwrap();
    c.heartbeat_instance("meta", "m1", "http://127.0.0.1:3", TTL).await.unwrap();
    assert_eq!(c.live_instances("send").await.unwrap().len(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.live_instances("send").await.unwrap(), [("s1".to_string(), "http://127.0.0.1:1".to_string())]);
    c.deregister_instance("send", "s1").await.unwrap();
    assert!(c.live_instances("send").await.unwrap().is_empty());
    assert_eq!(c.live_instances("meta").await.unwrap().len(), 1);

    c.deregister_gateway("a").await.unwrap();
    assert!(c.pick_gateway(None).await.unwrap().is_none(), "only full gateways left");
    c.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn routes_survive_while_connected_and_lease_after() {
    let Some(c) = cluster().await else { return };
    c.heartbeat_gateway(&gw("busy", 60, 100), TTL).await.unwrap();
    c.heartbeat_gateway(&gw("idle", 0, 100), TTL).await.unwrap();
    let user = 42;
    c.route_connected(user, "busy").await.unwrap();
    c.route_connected(user, "busy").await.unwrap(); // a second device
    assert_eq!(c.routes(&[user, 7]).await.unwrap().get(&user).unwrap(), &vec!["busy".to_string()]);
    assert!(!c.routes(&[7]).await.unwrap().contains_key(&7));
    // The user's current gateway wins over a less loaded one.
    assert_eq!(c.pick_gateway(Some(user)).await.unwrap().unwrap().id, "busy");

    // One device leaves: still connected, still routed.
    c.route_disconnected(user, "busy", Duration::from_millis(300)).await.unwrap();
    assert!(c.routes(&[user]).await.unwrap().contains_key(&user));
    // A connected route does not expire.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(c.routes(&[user]).await.unwrap().contains_key(&user));

    // The last device leaves: no route for delivery, but a lease brings a quick reconnect back.
    c.route_disconnected(user, "busy", Duration::from_millis(300)).await.unwrap();
    assert!(!c.routes(&[user]).await.unwrap().contains_key(&user));
    assert_eq!(c.pick_gateway(Some(user)).await.unwrap().unwrap().id, "busy");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.pick_gateway(Some(user)).await.unwrap().unwrap().id, "idle", "lease over: least loaded");

    // Connected on two gateways at once: both are routes.
    c.route_connected(user, "busy").await.unwrap();
    c.route_connected(user, "idle").await.unwrap();
    let mut both = c.routes(&[user]).await.unwrap().remove(&user).unwrap();
    both.sort();
    assert_eq!(both, ["busy", "idle"]);

    // Restoring after the registry lost its state.
    c.restore_routes("idle", &[(99, 2), (100, 1)]).await.unwrap();
    let routes = c.routes(&[99, 100]).await.unwrap();
    assert_eq!((routes[&99].clone(), routes[&100].clone()), (vec!["idle".to_string()], vec!["idle".to_string()]));
    c.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn node_ids_are_distinct_and_renewable() {
    let Some(c) = cluster().await else { return };
    let mut ids = HashSet::new();
    for i in 0..50 {
        assert!(ids.insert(c.lease_node_id(&format!("send-{i}"), TTL).await.unwrap()), "node ids must be distinct");
    }
    let mine = c.lease_node_id("send-7", TTL).await.unwrap();
    assert_eq!(c.lease_node_id("send-7", TTL).await.unwrap(), mine, "renewal keeps the id");
    let short = c.lease_node_id("short-lived", Duration::from_millis(150)).await.unwrap();
    assert!(!ids.contains(&short));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The expired id may be handed out again; a live one never is.
    let next = c.lease_node_id("newcomer", TTL).await.unwrap();
    assert!(!ids.contains(&next));
    c.delete_all_keys().await.unwrap();
}

#[tokio::test]
async fn streams_deliver_in_order_ack_and_reclaim() {
    let Some(c) = cluster().await else { return };
    let entry = |seq: i64| BusEntry {
        users: vec![1, 2],
        push: BusPush::Message { room: 9, seq, frame: format!("{{\"seq\":{seq}}}") },
        hops: 0,
    };
    for seq in 1..=3 {
        c.publish("gw1", &entry(seq)).await.unwrap();
    }
    let got = c.consume("gw1", "gw1", 10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(), vec![entry(1), entry(2), entry(3)]);
    // Nothing new.
    assert!(c.consume("gw1", "gw1", 10, Duration::from_millis(50)).await.unwrap().is_empty());
    // Acked entries are not reclaimable; pending ones are, by another consumer.
    c.ack("gw1", &[got[0].0.clone()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reclaimed = c.reclaim("gw1", "flusher", Duration::from_millis(20), 10).await.unwrap();
    assert_eq!(reclaimed.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(), vec![entry(2), entry(3)]);
    let ids: Vec<String> = reclaimed.into_iter().map(|(id, _)| id).collect();
    c.ack("gw1", &ids).await.unwrap();
    assert!(c.reclaim("gw1", "flusher", Duration::ZERO, 10).await.unwrap().is_empty());
    // A blocking read returns as soon as an entry arrives.
    let reader = {
        let c = c.clone();
        tokio::spawn(async move { c.consume("gw1", "gw1", 10, Duration::from_secs(5)).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.publish("gw1", &entry(4)).await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(2), reader).await.expect("woke up").unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(c.streams().await.unwrap(), ["gw1"]);
    c.drop_stream("gw1").await.unwrap();
    assert!(c.streams().await.unwrap().is_empty());
    c.delete_all_keys().await.unwrap();
}

/// An entry that does not decode (a bad write, another version's format)
/// is acknowledged and skipped: the entries around it are delivered, and it
/// comes back neither to a read nor to a reclaim.
#[tokio::test]
async fn an_unreadable_stream_entry_is_skipped_not_fatal() {
    let Some((c, prefix, mut raw)) = cluster_and_raw().await else { return };
    let entry = |seq: i64| BusEntry {
        users: vec![5],
        push: BusPush::Message { room: 3, seq, frame: format!("{{\"seq\":{seq}}}") },
        hops: 0,
    };
    let stream = format!("{prefix}:stream:gw3");
    c.publish("gw3", &entry(1)).await.unwrap();
    let _: String =
        redis::cmd("XADD").arg(&stream).arg("*").arg("e").arg("not json").query_async(&mut raw).await.unwrap();
    let _: String =
        redis::cmd("XADD").arg(&stream).arg("*").arg("x").arg("no body").query_async(&mut raw).await.unwrap();
    c.publish("gw3", &entry(2)).await.unwrap();

    let got = c.consume("gw3", "gw3", 10, Duration::from_millis(100)).await.expect("the read succeeds");
    assert_eq!(got.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(), vec![entry(1), entry(2)]);
    let ids: Vec<String> = got.into_iter().map(|(id, _)| id).collect();
    c.ack("gw3", &ids).await.unwrap();
    // Nothing pending: the unreadable two were acknowledged.
    assert!(c.reclaim("gw3", "flusher", Duration::ZERO, 10).await.unwrap().is_empty());
    let pending: redis::Value = redis::cmd("XPENDING").arg(&stream).arg("gateway").query_async(&mut raw).await.unwrap();
    let redis::Value::Array(summary) = pending else { panic!("XPENDING summary: {pending:?}") };
    assert_eq!(summary.first(), Some(&redis::Value::Int(0)), "{summary:?}");
    c.delete_all_keys().await.unwrap();
}

/// A gateway record that does not decode is left out of the live gateways;
/// the others are still served.
#[tokio::test]
async fn an_unreadable_gateway_record_is_left_out() {
    let Some((c, prefix, mut raw)) = cluster_and_raw().await else { return };
    assert!(c.heartbeat_gateway(&gw("good", 0, 10), TTL).await.unwrap());
    let _: () = redis::cmd("SET").arg(format!("{prefix}:gw:bad")).arg("not json").query_async(&mut raw).await.unwrap();
    let _: () =
        redis::cmd("ZADD").arg(format!("{prefix}:gw:rank")).arg(0).arg("bad").query_async(&mut raw).await.unwrap();
    let live = c.live_gateways().await.expect("one bad record does not fail the rest");
    assert_eq!(live.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["good"]);
    c.delete_all_keys().await.unwrap();
}

/// A stream deleted under its consumer (say, the flusher took its gateway for
/// dead): the consumer's group is made sure of once per connection, so the
/// next read fails at most once, and the one after has the group back and
/// reads everything published meanwhile.
#[tokio::test]
async fn a_consumer_gets_its_group_back_after_its_stream_was_deleted() {
    let Some(c) = cluster().await else { return };
    let entry = |seq: i64| BusEntry {
        users: vec![3],
        push: BusPush::Message { room: 7, seq, frame: format!("{{\"seq\":{seq}}}") },
        hops: 0,
    };
    c.publish("gw2", &entry(1)).await.unwrap();
    assert_eq!(c.consume("gw2", "gw2", 10, Duration::from_millis(100)).await.unwrap().len(), 1);
    c.drop_stream("gw2").await.unwrap();
    c.publish("gw2", &entry(2)).await.unwrap();
    c.publish("gw2", &entry(3)).await.unwrap();
    let mut got = Vec::new();
    let mut failures = 0;
    for _ in 0..3 {
        match c.consume("gw2", "gw2", 10, Duration::from_millis(100)).await {
            Ok(entries) => got.extend(entries.into_iter().map(|(_, e)| e)),
            Err(_) => failures += 1,
        }
        if got.len() >= 2 {
            break;
        }
    }
    assert!(failures <= 1, "{failures} reads failed");
    assert_eq!(got, vec![entry(2), entry(3)]);
    c.delete_all_keys().await.unwrap();
}

fn brief(user: i64, role: Role) -> MemberBrief {
    MemberBrief { user_id: user, role, mute_until: 0 }
}

/// The versioned fill: a list loaded before an invalidation is refused.
#[tokio::test]
async fn member_lists_fill_only_under_their_version() {
    let Some(c) = cluster().await else { return };
    let room = 42;
    assert_eq!(SharedMemberCache::get(&c, room).await.unwrap(), None);
    let v0 = c.version(room).await.unwrap();
    let old = RoomMembers::new(vec![brief(1, Role::Owner), brief(2, Role::Member)]);
    assert!(c.fill(room, v0, &old).await.unwrap());
    assert_eq!(SharedMemberCache::get(&c, room).await.unwrap(), Some(old.clone()));

    // A loader reads the version, then a change lands and invalidates…
    let loader_version = c.version(room).await.unwrap();
    SharedMemberCache::invalidate(&c, room).await.unwrap();
    assert_eq!(SharedMemberCache::get(&c, room).await.unwrap(), None, "invalidation drops the list");
    // …so the loader's (possibly old) list is not stored.
    assert!(!c.fill(room, loader_version, &old).await.unwrap(), "a fill under an old version is refused");
    assert_eq!(SharedMemberCache::get(&c, room).await.unwrap(), None);

    let fresh = RoomMembers::new(vec![brief(1, Role::Owner)]);
    let v1 = c.version(room).await.unwrap();
    assert!(v1 > loader_version);
    assert!(c.fill(room, v1, &fresh).await.unwrap());
    assert_eq!(SharedMemberCache::get(&c, room).await.unwrap(), Some(fresh));
    c.delete_all_keys().await.unwrap();
}

/// A fresh SQLite store with users 1..=`users` and group room 100 of `members`.
async fn store_with_room_100(users: i64, members: &[Member]) -> (TestDb, Arc<dyn Store>) {
    let db = fresh_database(DbKind::Sqlite).await.expect("sqlite");
    let store: Arc<dyn Store> = Arc::new(SqlStore::connect(&db.url, SqlOptions::default()).await.expect("store"));
    for id in 1..=users {
        let user =
            User { id, username: format!("u{id}"), nickname: String::new(), password_hash: "x".into(), created_at: 0 };
        store.insert_user(&user).await.unwrap();
    }
    let room = Room {
        id: 100,
        name: "r".into(),
        is_group: true,
        join_policy: JoinPolicy::Open,
        owner_id: 1,
        direct_key: None,
        last_seq: 0,
        created_at: 0,
    };
    store.insert_room(&room, members).await.unwrap();
    (db, store)
}

/// Two processes' member caches over one SQL store and one Redis: the Redis
/// tier serves lists in front of SQL, and a change made by one process is seen
/// by the other once its short local copy expires.
#[tokio::test]
async fn member_cache_reads_through_redis_and_sees_other_processes_changes() {
    let Some(c) = cluster().await else { return };
    let (db, store) =
        store_with_room_100(3, &[Member::new(100, 1, Role::Owner, 0), Member::new(100, 2, Role::Member, 0)]).await;

    let shared: Arc<dyn SharedMemberCache> = Arc::new(c.clone());
    let local_ttl = Duration::from_millis(200);
    let meta = MemberCache::new(store.clone(), Some(shared.clone()), local_ttl);
    let send = MemberCache::new(store.clone(), Some(shared.clone()), local_ttl);

    assert_eq!(&send.get(100).await.unwrap().ids()[..], [1, 2]);
    assert!(SharedMemberCache::get(&c, 100).await.unwrap().is_some(), "the first load fills Redis");
    assert!(matches!(send.get(999).await, Err(Error::NotFound(_))), "a missing room is 404");

    // Served from Redis, not SQL: a row written behind the cache's back is not
    // seen by a process that has no local copy.
    store.add_members(&[Member::new(100, 3, Role::Member, 0)]).await.unwrap();
    assert_eq!(&meta.get(100).await.unwrap().ids()[..], [1, 2], "meta's first read comes from Redis");

    // Meta records the change (SQL first, then invalidate): meta sees it at
    // once, the send process after its local copy expires.
    meta.invalidate(100).await;
    assert_eq!(&meta.get(100).await.unwrap().ids()[..], [1, 2, 3]);
    store.update_member(100, 2, &MemberChange::MuteUntil(i64::MAX)).await.unwrap();
    meta.invalidate(100).await;
    tokio::time::sleep(local_ttl + Duration::from_millis(100)).await;
    let seen = send.get(100).await.unwrap();
    assert_eq!(&seen.ids()[..], [1, 2, 3]);
    assert_eq!(seen.get(2).map(|m| m.mute_until), Some(i64::MAX), "mutes travel with the list");

    c.delete_all_keys().await.unwrap();
    db.drop_database().await;
}

/// Clients asking between two heartbeats are spread, not all sent to the
/// gateway that was least loaded at the last heartbeat; a heartbeat then
/// puts back the real load.
#[tokio::test]
async fn placements_count_until_the_next_heartbeat() {
    let Some(c) = cluster().await else { return };
    c.heartbeat_gateway(&gw("x", 0, 10), TTL).await.unwrap();
    c.heartbeat_gateway(&gw("y", 0, 10), TTL).await.unwrap();
    let mut placed: std::collections::HashMap<String, usize> = Default::default();
    for _ in 0..10 {
        *placed.entry(c.pick_gateway(None).await.unwrap().unwrap().id).or_default() += 1;
    }
    assert_eq!((placed["x"], placed["y"]), (5, 5), "{placed:?}");
    c.heartbeat_gateway(&gw("x", 6, 10), TTL).await.unwrap();
    assert_eq!(c.pick_gateway(None).await.unwrap().unwrap().id, "y", "x reports 6 connections, y counts 5 placed");
    c.heartbeat_gateway(&gw("y", 8, 10), TTL).await.unwrap();
    assert_eq!(c.pick_gateway(None).await.unwrap().unwrap().id, "x", "y reports 8");
    c.delete_all_keys().await.unwrap();
}

/// Many clients asking at once (a reconnect storm) are spread evenly, not
/// all sent to the gateway that looked least loaded when they asked; a
/// gateway that is full or dead gets nobody.
#[tokio::test]
async fn concurrent_placements_are_spread_evenly() {
    let Some(c) = cluster().await else { return };
    c.heartbeat_gateway(&gw("x", 0, 1000), TTL).await.unwrap();
    c.heartbeat_gateway(&gw("y", 0, 1000), TTL).await.unwrap();
    c.heartbeat_gateway(&gw("full", 10, 10), TTL).await.unwrap();
    c.heartbeat_gateway(&gw("dead", 0, 1000), Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let picks = (0..200).map(|_| {
        let c = c.clone();
        tokio::spawn(async move { c.pick_gateway(None).await.unwrap().unwrap().id })
    });
    let mut placed: std::collections::HashMap<String, usize> = Default::default();
    for pick in picks.collect::<Vec<_>>() {
        *placed.entry(pick.await.unwrap()).or_default() += 1;
    }
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert_eq!((placed["x"], placed["y"]), (100, 100), "{placed:?}");
    assert_eq!(
        c.live_gateways().await.unwrap().into_iter().map(|g| g.id).collect::<HashSet<_>>(),
        ["x", "y", "full"].into_iter().map(String::from).collect::<HashSet<_>>(),
        "the dead gateway left the ranking"
    );
    c.delete_all_keys().await.unwrap();
}

/// A pipelined batch lands on each gateway's stream in the order given.
#[tokio::test]
async fn publish_many_keeps_order_per_stream() {
    let Some(c) = cluster().await else { return };
    let entry = |seq: i64| BusEntry {
        users: vec![seq],
        push: BusPush::Message { room: 9, seq, frame: format!("{{\"seq\":{seq}}}") },
        hops: 0,
    };
    let batch: Vec<(String, BusEntry)> =
        (1..=6).map(|seq| (if seq % 2 == 0 { "even" } else { "odd" }.to_string(), entry(seq))).collect();
    c.publish_many(&batch).await.unwrap();
    for (gw, want) in [("odd", [1, 3, 5]), ("even", [2, 4, 6])] {
        let got = c.consume(gw, gw, 10, Duration::from_millis(100)).await.unwrap();
        assert_eq!(got.into_iter().map(|(_, e)| e).collect::<Vec<_>>(), want.map(entry).to_vec());
    }
    c.delete_all_keys().await.unwrap();
}

/// On a gateway, the pushes for its own connections skip its stream: a
/// stored message reaches the sender (ack and copy) and a member connected
/// there at once, while the members on other gateways get stream entries, and
/// a member whose cached route still names this gateway is pushed on to where
/// they are now. A send instance (no local gateway) puts everything on the
/// streams.
#[tokio::test]
async fn a_gateway_hands_its_own_pushes_over_without_its_stream() {
    let Some(c) = cluster().await else { return };
    let members: Vec<Member> = (1..=4).map(|u| Member::new(100, u, Role::Member, 0)).collect();
    let (db, store) = store_with_room_100(4, &members).await;
    // 1 and 2 are connected here (gw-a), 3 on gw-b, 4 on gw-c.
    for (user, gateway) in [(1, "gw-a"), (2, "gw-a"), (3, "gw-b"), (4, "gw-c")] {
        c.route_connected(user, gateway).await.unwrap();
    }
    let shared: Arc<dyn SharedMemberCache> = Arc::new(c.clone());
    let cache = Arc::new(MemberCache::new(store.clone(), Some(shared), Duration::from_secs(1)));
    let delivery = Delivery::start(store.clone(), cache.clone(), DeliveryConfig::default());
    let (_h1, mut sender) = delivery.connect(1, "d").await.unwrap();
    let (_h2, mut member) = delivery.connect(2, "d").await.unwrap();
    let fanout_on = |local: Option<LocalGateway>| {
        BusFanout::new(Arc::new(c.clone()), Arc::new(c.clone()), cache.clone(), Duration::from_secs(60), 100, local)
    };
    let gateway = fanout_on(Some(LocalGateway {
        id: "gw-a".into(),
        hub: delivery.hub().clone(),
        enqueue_timeout: Duration::from_millis(100),
    }));
    let store_one = |id: i64| {
        let store = store.clone();
        let message = NewMessage {
            id,
            room_id: 100,
            sender_id: 1,
            client_msg_id: Some(format!("c{id}")),
            content: Arc::new(Content::text("hi")),
            created_at: 1,
        };
        async move { store.append(&[message]).await.unwrap() }
    };
    let read = |gw: &'static str| {
        let c = c.clone();
        async move {
            c.consume(gw, gw, 10, Duration::from_millis(50))
                .await
                .unwrap()
                .into_iter()
                .map(|(_, e)| e)
                .collect::<Vec<_>>()
        }
    };
    let chat = |e: &BusEntry, users: &[i64], hops: u8, seq: i64| {
        assert_eq!((&e.users[..], e.hops), (users, hops), "{e:?}");
        assert!(matches!(e.push, BusPush::Message { room: 100, seq: s, .. } if s == seq), "{e:?}");
    };
    let seqs = |frames: &[serde_json::Value]| -> Vec<(String, i64)> {
        frames.iter().map(|f| (f["type"].as_str().unwrap_or("").to_string(), f["seq"].as_i64().unwrap_or(0))).collect()
    };

    gateway.batch_stored(&store_one(1000).await).await;
    let got = frames_until_quiet(&mut sender, Duration::from_millis(300)).await.0;
    assert_eq!(seqs(&got), [("ack".into(), 1), ("chat".into(), 1)], "the sender's ack and copy");
    let got = frames_until_quiet(&mut member, Duration::from_millis(300)).await.0;
    assert_eq!(seqs(&got), [("chat".into(), 1)]);
    assert!(read("gw-a").await.is_empty(), "nothing went through this gateway's own stream");
    let on_b = read("gw-b").await;
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    chat(&on_b[0], &[3], 0, 1);
    let on_c = read("gw-c").await;
    assert_eq!(on_c.len(), 1, "{on_c:?}");
    chat(&on_c[0], &[4], 0, 1);

    // 3 moves here after the gateway cached its route: the entry is handed
    // over here, 3 is not connected, and it goes on to 3's gateway now.
    c.route_disconnected(3, "gw-b", Duration::ZERO).await.unwrap();
    c.route_connected(3, "gw-a").await.unwrap();
    gateway.forget_routes(&[3]).await;
    gateway.batch_stored(&store_one(1001).await).await;
    // The gateway's hand-off task runs on its own; let it finish with 1001.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.route_disconnected(3, "gw-a", Duration::ZERO).await.unwrap();
    c.route_connected(3, "gw-b").await.unwrap();
    gateway.batch_stored(&store_one(1002).await).await;
    assert_eq!(
        seqs(&frames_until_quiet(&mut member, Duration::from_millis(300)).await.0),
        [("chat".into(), 2), ("chat".into(), 3)]
    );
    let on_b = read("gw-b").await;
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    chat(&on_b[0], &[3], 1, 3);
    assert!(read("gw-a").await.is_empty());

    // The control: a send instance has no connections, so gw-a's entries
    // (the ack, and the copies for 1 and 2) go to gw-a's stream.
    let control = fanout_on(None);
    control.batch_stored(&store_one(1003).await).await;
    let on_a = read("gw-a").await;
    assert_eq!(on_a.len(), 2, "{on_a:?}");
    assert!(matches!(on_a[0].push, BusPush::Frame { .. }) && on_a[0].users == [1], "the ack: {on_a:?}");
    chat(&on_a[1], &[1, 2], 0, 4);
    assert!(frames_until_quiet(&mut member, Duration::from_millis(100)).await.0.is_empty(), "no relay runs here");

    c.delete_all_keys().await.unwrap();
    db.drop_database().await;
}
