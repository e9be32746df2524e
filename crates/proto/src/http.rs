//! Bodies of the HTTP API (SPEC §2). Every response is wrapped in [`Envelope`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Content, Id};

/// `{"code": 0, "msg": "ok", "data": …}`; on error `code` is the HTTP status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub code: u16,
    pub msg: String,
    pub data: Option<T>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub username: String,
    pub password: String,
    #[serde(default)]
    pub nickname: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub user_id: Id,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub user_id: Id,
    pub expires_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeResponse {
    pub user_id: Id,
    pub username: String,
    pub nickname: String,
    pub created_at: i64,
}

/// `open`: anyone may `join`; `approval`: users `join/request` and an owner or
/// admin answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinPolicy {
    Open,
    Approval,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateRoomRequest {
    #[serde(default)]
    pub name: String,
    pub is_group: bool,
    #[serde(default)]
    pub member_ids: Vec<Id>,
    /// Group rooms only; `open` when absent.
    #[serde(default)]
    pub join_policy: Option<JoinPolicy>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomIdResponse {
    pub room_id: Id,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomRequest {
    pub room_id: Id,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMemberRequest {
    pub room_id: Id,
    pub member_id: Id,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMembersRequest {
    pub room_id: Id,
    pub member_ids: Vec<Id>,
}

/// The users actually added (those already in the room are left out).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddedMembersResponse {
    pub added: Vec<Id>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetRequest {
    pub room_id: Id,
    pub target_user_id: Id,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeNicknameRequest {
    pub room_id: Id,
    pub nickname: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeMemberRoleRequest {
    pub room_id: Id,
    pub target_user_id: Id,
    /// 0 owner (transfers ownership), 1 admin, 2 member.
    pub new_role: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MuteMemberRequest {
    pub room_id: Id,
    pub target_user_id: Id,
    /// Unix ms until which the member may not send; 0 (or any past time) unmutes.
    pub until: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequestRequest {
    pub room_id: Id,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequestIdResponse {
    pub request_id: Id,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinRequestStatus {
    Pending,
    Approved,
    Rejected,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequestView {
    pub request_id: Id,
    pub room_id: Id,
    pub user_id: Id,
    pub message: String,
    pub status: JoinRequestStatus,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequestsResponse {
    pub requests: Vec<JoinRequestView>,
    /// More pending requests follow the last one (ask with `after` = its id).
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRespondRequest {
    pub request_id: Id,
    pub approve: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomView {
    pub room_id: Id,
    pub name: String,
    pub is_group: bool,
    pub join_policy: JoinPolicy,
    pub owner_id: Id,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchResponse {
    pub rooms: Vec<RoomView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberView {
    pub user_id: Id,
    pub role: u8,
    pub nickname: String,
    pub mute_until: i64,
    pub joined_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MembersResponse {
    pub members: Vec<MemberView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinedRoomsResponse {
    pub room_ids: Vec<Id>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomSummaryView {
    pub room_id: Id,
    pub name: String,
    pub is_group: bool,
    pub last_seq: i64,
    pub read_seq: i64,
    pub unread: i64,
    pub last_message: Option<ChatMessage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomsResponse {
    pub rooms: Vec<RoomSummaryView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendMessageRequest {
    pub room_id: Id,
    pub content: Content,
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendMessageResponse {
    pub msg_id: Id,
    pub seq: i64,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResendMessageRequest {
    pub message_id: Id,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MarkReadRequest {
    pub room_id: Id,
    pub seq: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub messages: Vec<ChatMessage>,
    pub has_more: bool,
}

/// A stored message as clients see it (HTTP history and the `chat` frame).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub id: Id,
    pub room_id: Id,
    pub seq: i64,
    pub sender_id: Id,
    pub client_msg_id: Option<String>,
    /// Shared: one stored message's content goes into many frames.
    pub content: Arc<Content>,
    pub created_at: i64,
}

/// `GET /registry/gateway/available[?user_id=]` (distributed mode): where
/// the user should open their WebSocket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AvailableGatewayResponse {
    pub gateway_id: String,
    pub ws_url: String,
}
