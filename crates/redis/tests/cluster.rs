//! The Redis registry, routes, node-id leases and streams against a real
//! Redis (STACKER_TEST_REDIS_URL; see stacker-testkit). Each test works under
//! its own key prefix and deletes it afterwards.

use std::collections::HashSet;
use std::time::Duration;

use stacker_domain::cluster::{Bus, BusEntry, BusPush, GatewayInfo, Registry};
use stacker_redis::{RedisCluster, RedisOptions};
use stacker_testkit::{service_url, Service};

async fn cluster() -> Option<RedisCluster> {
    let url = service_url(Service::Redis)?;
    let prefix = format!("stacker-test-{:016x}", rand::random::<u64>());
    Some(RedisCluster::connect(&url, RedisOptions { prefix, stream_max_len: 1000 }).await.expect("connect to redis"))
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
