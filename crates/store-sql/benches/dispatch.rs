//! Dispatch of one message to a 1,000-member room: a real `Delivery` over a
//! SQLite store, 1,000 registered hub connections (one per member), and the
//! time from `Fanout::message_stored` until every connection's queue holds
//! the message (the queues are drained as it arrives).
//!
//! `cargo bench -p stacker-store-sql --bench dispatch`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stacker_domain::delivery::{Delivery, DeliveryConfig, Push};
use stacker_domain::fanout::Fanout;
use stacker_domain::membership::MemberCache;
use stacker_domain::model::{Content, Message};
use stacker_domain::store::Store;

const MEMBERS: usize = 1000;

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db = rt.block_on(common::temp_db("dispatch"));
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    let (delivery, room, users, mut queues) = rt.block_on(async {
        let users = common::users(&db.store, MEMBERS).await;
        let room = common::room(&db.store, &users).await;
        let members = Arc::new(MemberCache::new(store.clone(), None, Duration::from_secs(600)));
        let delivery = Delivery::start(store.clone(), members, DeliveryConfig::default());
        let mut queues = Vec::with_capacity(MEMBERS);
        let mut handles = Vec::with_capacity(MEMBERS);
        for u in &users {
            let (handle, rx) = delivery.hub().register(*u, "bench").expect("register");
            handles.push(handle);
            queues.push(rx);
        }
        // The hub keeps its own handles; ours are not needed past registration.
        drop(handles);
        (delivery, room, users, queues)
    });
    let mut seq = 0i64;
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(MEMBERS as u64));
    group.bench_function("one_message_to_1000_members", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    seq += 1;
                    let message = Message {
                        id: common::next_id(),
                        room_id: room,
                        seq,
                        sender_id: users[0],
                        client_msg_id: Some(format!("c{seq}")),
                        content: Content::text("a message of about sixty-four bytes, as chat messages often are")
                            .into(),
                        created_at: 1_700_000_000_000,
                    };
                    let started = Instant::now();
                    delivery.message_stored(&message, true).await;
                    for q in queues.iter_mut() {
                        // The sender's devices get its ack first; everyone gets the message.
                        loop {
                            match q.recv().await.expect("connection queue open") {
                                Push::Message(chat) if chat.seq == seq => break,
                                Push::Message(chat) => panic!("got seq {}, expected {seq}", chat.seq),
                                _ => continue,
                            }
                        }
                    }
                    total += started.elapsed();
                }
                total
            })
        })
    });
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
