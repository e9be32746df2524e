//! Seq allocation and group commit on SQLite: `SqlStore::append` of a batch
//! of 1, 64 and 512 messages (one transaction each) on a temporary file, in
//! one room and spread over 64 rooms.
//!
//! `cargo bench -p stacker-store-sql --bench append`

mod common;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use stacker_domain::model::{Content, NewMessage};
use stacker_domain::store::MessageStore;

fn batch(rooms: &[i64], sender: i64, n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage {
            id: common::next_id(),
            room_id: rooms[i % rooms.len()],
            sender_id: sender,
            client_msg_id: Some(format!("c{}", common::next_id())),
            content: Content::text("a message of about sixty-four bytes, as chat messages often are").into(),
            created_at: 1_700_000_000_000,
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db = rt.block_on(common::temp_db("append"));
    let store = &db.store;
    let (users, one_room, many_rooms) = rt.block_on(async {
        let users = common::users(store, 2).await;
        let one = vec![common::room(store, &users).await];
        let mut many = Vec::new();
        for _ in 0..64 {
            many.push(common::room(store, &users).await);
        }
        (users, one, many)
    });
    let mut group = c.benchmark_group("sqlite_append");
    for (label, rooms) in [("1_room", &one_room), ("64_rooms", &many_rooms)] {
        for n in [1usize, 64, 512] {
            if rooms.len() > n {
                continue;
            }
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, &n| {
                b.iter_batched(
                    || batch(rooms, users[0], n),
                    |msgs| rt.block_on(store.append(&msgs)).expect("append"),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
    rt.block_on(store.close());
}

criterion_group!(benches, append);
criterion_main!(benches);
