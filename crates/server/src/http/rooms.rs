use std::future::Future;

use axum::extract::State;
use serde::Deserialize;
use stacker_domain::rooms::NewRoom;
use stacker_proto::http::*;
use stacker_proto::Id;

use super::extract::{done, ok, ApiResult, Body, Caller, Params};
use super::{views, AppState};

fn ids(list: &[Id]) -> Vec<i64> {
    list.iter().map(|id| id.0).collect()
}

/// Runs a membership change to completion even if the client goes away: its
/// store write and the member-cache invalidation after it must not be split
/// by a dropped request (the cache decides who may post).
async fn to_completion<T: Send + 'static>(
    change: impl Future<Output = stacker_domain::Result<T>> + Send + 'static,
) -> stacker_domain::Result<T> {
    tokio::spawn(change).await.map_err(|e| stacker_domain::Error::Internal(format!("membership change task: {e}")))?
}

pub async fn create(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<CreateRoomRequest>,
) -> ApiResult<RoomIdResponse> {
    let room_id = to_completion(async move {
        let member_ids = ids(&req.member_ids);
        let new =
            NewRoom { name: &req.name, is_group: req.is_group, member_ids: &member_ids, join_policy: req.join_policy };
        app.rooms.create(me, new).await
    })
    .await?;
    ok(RoomIdResponse { room_id: room_id.into() })
}

pub async fn add_member(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<AddMemberRequest>,
) -> ApiResult<AddedMembersResponse> {
    let added =
        to_completion(async move { app.rooms.add_members(me, req.room_id.0, &[req.member_id.0]).await }).await?;
    ok(AddedMembersResponse { added: added.into_iter().map(Id).collect() })
}

pub async fn add_members(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<AddMembersRequest>,
) -> ApiResult<AddedMembersResponse> {
    let added =
        to_completion(async move { app.rooms.add_members(me, req.room_id.0, &ids(&req.member_ids)).await }).await?;
    ok(AddedMembersResponse { added: added.into_iter().map(Id).collect() })
}

pub async fn remove_member(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<TargetRequest>,
) -> ApiResult<()> {
    to_completion(async move { app.rooms.remove_member(me, req.room_id.0, req.target_user_id.0).await }).await?;
    done()
}

pub async fn leave(State(app): State<AppState>, Caller(me): Caller, Body(req): Body<RoomRequest>) -> ApiResult<()> {
    to_completion(async move { app.rooms.leave(me, req.room_id.0).await }).await?;
    done()
}

pub async fn change_nickname(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<ChangeNicknameRequest>,
) -> ApiResult<()> {
    app.rooms.change_nickname(me, req.room_id.0, &req.nickname).await?;
    done()
}

pub async fn change_member_role(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<ChangeMemberRoleRequest>,
) -> ApiResult<()> {
    to_completion(async move { app.rooms.change_role(me, req.room_id.0, req.target_user_id.0, req.new_role).await })
        .await?;
    done()
}

pub async fn mute_member(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<MuteMemberRequest>,
) -> ApiResult<()> {
    to_completion(async move { app.rooms.mute(me, req.room_id.0, req.target_user_id.0, req.until).await }).await?;
    done()
}

pub async fn join(State(app): State<AppState>, Caller(me): Caller, Body(req): Body<RoomRequest>) -> ApiResult<()> {
    to_completion(async move { app.rooms.join(me, req.room_id.0).await }).await?;
    done()
}

pub async fn join_request(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<JoinRequestRequest>,
) -> ApiResult<JoinRequestIdResponse> {
    let request_id = app.rooms.request_join(me, req.room_id.0, req.message.as_deref()).await?;
    ok(JoinRequestIdResponse { request_id: request_id.into() })
}

#[derive(Deserialize)]
pub struct RoomQuery {
    room_id: Id,
}

#[derive(Deserialize)]
pub struct JoinRequestsQuery {
    room_id: Id,
    after: Option<Id>,
    limit: Option<u32>,
}

pub async fn join_requests(
    State(app): State<AppState>,
    Caller(me): Caller,
    Params(q): Params<JoinRequestsQuery>,
) -> ApiResult<JoinRequestsResponse> {
    let (requests, has_more) = app.rooms.join_requests(me, q.room_id.0, q.after.map(|id| id.0), q.limit).await?;
    ok(JoinRequestsResponse { requests: requests.iter().map(views::join_request).collect(), has_more })
}

pub async fn join_respond(
    State(app): State<AppState>,
    Caller(me): Caller,
    Body(req): Body<JoinRespondRequest>,
) -> ApiResult<JoinRequestView> {
    let request = to_completion(async move { app.rooms.respond(me, req.request_id.0, req.approve).await }).await?;
    ok(views::join_request(&request))
}

#[derive(Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
    limit: Option<u32>,
}

pub async fn search(
    State(app): State<AppState>,
    Caller(me): Caller,
    Params(q): Params<SearchQuery>,
) -> ApiResult<SearchResponse> {
    let rooms = app.rooms.search(me, &q.q, q.limit).await?;
    ok(SearchResponse { rooms: rooms.iter().map(views::room).collect() })
}

pub async fn members(
    State(app): State<AppState>,
    Caller(me): Caller,
    Params(q): Params<RoomQuery>,
) -> ApiResult<MembersResponse> {
    let members = app.rooms.members(me, q.room_id.0).await?;
    ok(MembersResponse { members: members.iter().map(views::member).collect() })
}

pub async fn joined_rooms(State(app): State<AppState>, Caller(me): Caller) -> ApiResult<JoinedRoomsResponse> {
    let room_ids = app.rooms.joined_rooms(me).await?;
    ok(JoinedRoomsResponse { room_ids: room_ids.into_iter().map(Id).collect() })
}

pub async fn summaries(State(app): State<AppState>, Caller(me): Caller) -> ApiResult<RoomsResponse> {
    let rooms = app.rooms.summaries(me).await?;
    ok(RoomsResponse { rooms: rooms.iter().map(views::summary).collect() })
}
