//! Domain records as the wire types of `stacker-proto`.

use stacker_domain::model::{JoinRequest, Member, Message, Room, RoomSummary};
use stacker_proto::http::{ChatMessage, JoinRequestView, MemberView, RoomSummaryView, RoomView};

pub fn chat(m: &Message) -> ChatMessage {
    ChatMessage::from(m)
}

pub fn room(r: &Room) -> RoomView {
    RoomView {
        room_id: r.id.into(),
        name: r.name.clone(),
        is_group: r.is_group,
        join_policy: r.join_policy,
        owner_id: r.owner_id.into(),
        created_at: r.created_at,
    }
}

pub fn member(m: &Member) -> MemberView {
    MemberView {
        user_id: m.user_id.into(),
        role: m.role.code() as u8,
        nickname: m.nickname.clone(),
        mute_until: m.mute_until,
        joined_at: m.joined_at,
    }
}

pub fn join_request(r: &JoinRequest) -> JoinRequestView {
    JoinRequestView {
        request_id: r.id.into(),
        room_id: r.room_id.into(),
        user_id: r.user_id.into(),
        message: r.message.clone(),
        status: r.status,
        created_at: r.created_at,
    }
}

pub fn summary(s: &RoomSummary) -> RoomSummaryView {
    RoomSummaryView {
        room_id: s.room.id.into(),
        name: s.room.name.clone(),
        is_group: s.room.is_group,
        last_seq: s.room.last_seq,
        read_seq: s.read_seq,
        unread: (s.room.last_seq - s.read_seq).max(0),
        last_message: s.last_message.as_ref().map(chat),
    }
}
