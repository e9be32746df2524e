//! WebSocket frames (SPEC §3). Every frame is a JSON text message with a `type`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::http::ChatMessage;
use crate::{Content, Id};

/// Server → client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// Sent once, first.
    Hello {
        user_id: Id,
        session_id: String,
        gateway_id: String,
        heartbeat_s: u64,
    },
    /// One live message.
    Chat(ChatMessage),
    /// Catch-up: messages of one room in ascending seq, bounded in size.
    Batch {
        messages: Vec<ChatMessage>,
    },
    /// To every device of the sender, once the message is stored.
    Ack {
        id: Id,
        room_id: Id,
        seq: i64,
        client_msg_id: Option<String>,
    },
    /// A room or membership change.
    Event(Event),
    Error {
        code: u16,
        msg: String,
    },
    Pong,
}

/// Client → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    /// Cumulative: everything up to `seq` in `room_id` arrived.
    Ack {
        room_id: Id,
        seq: i64,
    },
    Send {
        room_id: Id,
        content: Content,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    /// "I have everything up to these seqs": the server replays what follows.
    Sync {
        #[serde(default)]
        cursors: BTreeMap<Id, i64>,
    },
    Ping,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// You were added to a room (created with you, added, join approved).
    RoomJoined,
    /// Someone joined a room you are in.
    MemberJoined,
    /// Several users were added to a room you are in at once (`data.user_ids`).
    MembersJoined,
    /// Someone left or was removed.
    MemberLeft,
    /// You were removed from a room.
    RoomLeft,
    RoleChanged,
    MemberMuted,
    NicknameChanged,
    /// To owners and admins: someone asks to join.
    JoinRequested,
    /// To the requester: the answer.
    JoinApproved,
    JoinRejected,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub room_id: Id,
    /// The user the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Id>,
    /// Who did it, when someone did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<Id>,
    /// Kind-specific detail: `role`, `until`, `nickname`, `request_id`,
    /// `message`, `user_ids` (`members_joined`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_have_the_spec_shape() {
        let hello =
            ServerFrame::Hello { user_id: Id(1), session_id: "s".into(), gateway_id: "g".into(), heartbeat_s: 30 };
        assert_eq!(
            serde_json::to_value(&hello).unwrap(),
            json!({"type": "hello", "user_id": "1", "session_id": "s", "gateway_id": "g", "heartbeat_s": 30})
        );
        let chat = ServerFrame::Chat(ChatMessage {
            id: Id(9),
            room_id: Id(2),
            seq: 3,
            sender_id: Id(1),
            client_msg_id: None,
            content: Content::text("hi").into(),
            created_at: 5,
        });
        let v = serde_json::to_value(&chat).unwrap();
        assert_eq!(v["type"], "chat");
        assert_eq!(v["content"], json!({"type": "text", "text": "hi"}));
        assert_eq!(v["room_id"], "2");
        let back: ServerFrame = serde_json::from_value(v).unwrap();
        assert_eq!(back, chat);

        let sync: ClientFrame = serde_json::from_str(r#"{"type":"sync","cursors":{"12":4}}"#).unwrap();
        assert_eq!(sync, ClientFrame::Sync { cursors: [(Id(12), 4)].into() });
        let ack: ClientFrame = serde_json::from_str(r#"{"type":"ack","room_id":12,"seq":4}"#).unwrap();
        assert_eq!(ack, ClientFrame::Ack { room_id: Id(12), seq: 4 });
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert_eq!(serde_json::to_string(&ServerFrame::Pong).unwrap(), r#"{"type":"pong"}"#);
    }
}
