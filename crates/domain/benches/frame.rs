//! Frame encoding: the dispatcher encodes each message once as a `chat` frame
//! and shares the bytes with every connection it goes to.
//!
//! `cargo bench -p stacker-domain --bench frame`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stacker_domain::delivery::Frame;
use stacker_domain::model::Message;
use stacker_proto::http::ChatMessage;
use stacker_proto::ws::ServerFrame;
use stacker_proto::Content;

fn message(content: Content) -> Message {
    Message {
        id: 7_324_000_000_000_000_001,
        room_id: 7_324_000_000_000_000_002,
        seq: 123_456,
        sender_id: 7_324_000_000_000_000_003,
        client_msg_id: Some("c-0123456789".into()),
        content: content.into(),
        created_at: 1_700_000_000_000,
    }
}

fn encode(c: &mut Criterion) {
    let cases = [
        ("text_64B", Content::text("x".repeat(64))),
        ("text_1KiB", Content::text("x".repeat(1024))),
        (
            "custom_small",
            Content::Custom { data: serde_json::json!({"s": 1, "n": 42, "t": 123_456_789, "p": "x".repeat(64)}) },
        ),
    ];
    let mut group = c.benchmark_group("frame_encode");
    for (name, content) in cases {
        let m = message(content);
        let frame = ServerFrame::Chat(ChatMessage::from(&m));
        group.throughput(Throughput::Bytes(Frame::encode(&frame).len() as u64));
        // The encoding alone.
        group.bench_function(format!("chat/{name}"), |b| b.iter(|| Frame::encode(black_box(&frame))));
        // What the dispatcher does per message: domain message → wire type → bytes.
        group.bench_function(format!("message_to_chat_frame/{name}"), |b| {
            b.iter(|| Frame::encode(&ServerFrame::Chat(ChatMessage::from(black_box(&m)))))
        });
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
