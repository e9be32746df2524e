//! A Rust client for Stacker's HTTP API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), stacker_client::ClientError> {
//! use stacker_client::Client;
//! let anon = Client::new("http://127.0.0.1:8080");
//! anon.register("alice", "correct horse", None).await?;
//! let alice = anon.login("alice", "correct horse").await?;
//! # Ok(()) }
//! ```

mod ws;

pub use ws::{Delivered, Hello, Socket, Subscriber};

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stacker_proto::http::*;
use stacker_proto::{Content, Id};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error envelope.
    #[error("{code}: {msg}")]
    Api { code: u16, msg: String },
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The HTTP status of an API error (0 for other errors).
    pub fn code(&self) -> u16 {
        match self {
            ClientError::Api { code, .. } => *code,
            _ => 0,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// An HTTP client; with a token after [`Client::login`].
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    user_id: Option<Id>,
}

impl Client {
    pub fn new(base_url: impl Into<String>) -> Self {
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap_or_default();
        Self { http, base: base_url.into().trim_end_matches('/').to_string(), token: None, user_id: None }
    }

    /// The same identity against another server (e.g. a send instance).
    pub fn rebase(self, base_url: &str) -> Self {
        Self { base: base_url.trim_end_matches('/').to_string(), ..self }
    }

    /// A client that sends this bearer token.
    pub fn with_token(&self, token: impl Into<String>, user_id: Id) -> Self {
        Self { token: Some(token.into()), user_id: Some(user_id), ..self.clone() }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The logged-in user (panics on an anonymous client: a programming error).
    pub fn user_id(&self) -> Id {
        self.user_id.expect("user_id() on a client that has not logged in")
    }

    /// Sends a request and unwraps the envelope.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let env: Envelope<T> = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("{status}: {e}: {}", String::from_utf8_lossy(&bytes))))?;
        if env.code != 0 || !status.is_success() {
            return Err(ClientError::Api { code: status.as_u16(), msg: env.msg });
        }
        Ok(env.data)
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(Method::POST, path, Some(body))
            .await?
            .ok_or_else(|| ClientError::Protocol(format!("{path}: no data")))
    }

    async fn post_unit<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        self.call::<B, serde_json::Value>(Method::POST, path, Some(body)).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path, None)
            .await?
            .ok_or_else(|| ClientError::Protocol(format!("{path}: no data")))
    }

    /// Distributed mode, on a client whose base URL is the registry (see
    /// [`Client::rebase`]): the gateway to connect to. A logged-in client asks
    /// for its own user (the gateway it is already on, or was on a moment
    /// ago); an anonymous one gets the least-loaded gateway.
    pub async fn available_gateway(&self) -> Result<AvailableGatewayResponse> {
        match self.user_id {
            Some(user) => self.get(&format!("/registry/gateway/available?user_id={user}")).await,
            None => self.get("/registry/gateway/available").await,
        }
    }

    pub async fn register(&self, username: &str, password: &str, nickname: Option<&str>) -> Result<Id> {
        let req = RegisterRequest {
            username: username.into(),
            password: password.into(),
            nickname: nickname.map(Into::into),
        };
        Ok(self.post::<_, RegisterResponse>("/register", &req).await?.user_id)
    }

    /// Logs in and returns a client carrying the token.
    pub async fn login(&self, username: &str, password: &str) -> Result<Client> {
        let req = LoginRequest { username: username.into(), password: password.into() };
        let resp: LoginResponse = self.post("/login", &req).await?;
        Ok(self.with_token(resp.token, resp.user_id))
    }

    pub async fn me(&self) -> Result<MeResponse> {
        self.get("/api/me").await
    }

    pub async fn create_group(&self, name: &str, member_ids: &[Id], join_policy: Option<JoinPolicy>) -> Result<Id> {
        let req = CreateRoomRequest { name: name.into(), is_group: true, member_ids: member_ids.to_vec(), join_policy };
        Ok(self.post::<_, RoomIdResponse>("/api/chat/group/create", &req).await?.room_id)
    }

    pub async fn create_direct(&self, other: Id) -> Result<Id> {
        let req =
            CreateRoomRequest { name: String::new(), is_group: false, member_ids: vec![other], join_policy: None };
        Ok(self.post::<_, RoomIdResponse>("/api/chat/group/create", &req).await?.room_id)
    }

    pub async fn add_member(&self, room_id: Id, member_id: Id) -> Result<Vec<Id>> {
        let r: AddedMembersResponse =
            self.post("/api/chat/group/add_member", &AddMemberRequest { room_id, member_id }).await?;
        Ok(r.added)
    }

    pub async fn add_members(&self, room_id: Id, member_ids: &[Id]) -> Result<Vec<Id>> {
        let req = AddMembersRequest { room_id, member_ids: member_ids.to_vec() };
        Ok(self.post::<_, AddedMembersResponse>("/api/chat/group/add_members", &req).await?.added)
    }

    pub async fn remove_member(&self, room_id: Id, target_user_id: Id) -> Result<()> {
        self.post_unit("/api/chat/group/remove_member", &TargetRequest { room_id, target_user_id }).await
    }

    pub async fn leave(&self, room_id: Id) -> Result<()> {
        self.post_unit("/api/chat/group/leave", &RoomRequest { room_id }).await
    }

    pub async fn change_nickname(&self, room_id: Id, nickname: &str) -> Result<()> {
        self.post_unit("/api/chat/group/change_nickname", &ChangeNicknameRequest { room_id, nickname: nickname.into() })
            .await
    }

    pub async fn change_member_role(&self, room_id: Id, target_user_id: Id, new_role: u8) -> Result<()> {
        let req = ChangeMemberRoleRequest { room_id, target_user_id, new_role };
        self.post_unit("/api/chat/group/change_member_role", &req).await
    }

    pub async fn mute_member(&self, room_id: Id, target_user_id: Id, until: i64) -> Result<()> {
        self.post_unit("/api/chat/group/mute_member", &MuteMemberRequest { room_id, target_user_id, until }).await
    }

    pub async fn join(&self, room_id: Id) -> Result<()> {
        self.post_unit("/api/chat/group/join", &RoomRequest { room_id }).await
    }

    pub async fn request_join(&self, room_id: Id, message: Option<&str>) -> Result<Id> {
        let req = JoinRequestRequest { room_id, message: message.map(Into::into) };
        Ok(self.post::<_, JoinRequestIdResponse>("/api/chat/group/join/request", &req).await?.request_id)
    }

    /// The first page (50) of the room's pending requests, oldest first.
    pub async fn join_requests(&self, room_id: Id) -> Result<Vec<JoinRequestView>> {
        Ok(self.join_requests_page(room_id, None, None).await?.requests)
    }

    /// A page of pending requests after the request `after`, at most `limit`.
    pub async fn join_requests_page(
        &self,
        room_id: Id,
        after: Option<Id>,
        limit: Option<u32>,
    ) -> Result<JoinRequestsResponse> {
        let mut path = format!("/api/chat/group/join/requests?room_id={room_id}");
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        self.get::<JoinRequestsResponse>(&path).await
    }

    pub async fn respond_join(&self, request_id: Id, approve: bool) -> Result<JoinRequestView> {
        self.post("/api/chat/group/join/respond", &JoinRespondRequest { request_id, approve }).await
    }

    pub async fn search(&self, q: &str, limit: Option<u32>) -> Result<Vec<RoomView>> {
        let mut path = format!("/api/chat/group/search?q={}", encode(q));
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        Ok(self.get::<SearchResponse>(&path).await?.rooms)
    }

    pub async fn members(&self, room_id: Id) -> Result<Vec<MemberView>> {
        Ok(self.get::<MembersResponse>(&format!("/api/chat/group/members?room_id={room_id}")).await?.members)
    }

    pub async fn joined_rooms(&self) -> Result<Vec<Id>> {
        Ok(self.get::<JoinedRoomsResponse>("/api/joined_rooms").await?.room_ids)
    }

    pub async fn rooms(&self) -> Result<Vec<RoomSummaryView>> {
        Ok(self.get::<RoomsResponse>("/api/rooms").await?.rooms)
    }

    pub async fn send(
        &self,
        room_id: Id,
        content: Content,
        client_msg_id: Option<&str>,
    ) -> Result<SendMessageResponse> {
        let req = SendMessageRequest { room_id, content, client_msg_id: client_msg_id.map(Into::into) };
        self.post("/api/chat/send_message", &req).await
    }

    pub async fn send_text(&self, room_id: Id, text: &str) -> Result<SendMessageResponse> {
        self.send(room_id, Content::text(text), None).await
    }

    pub async fn resend(&self, message_id: Id) -> Result<SendMessageResponse> {
        self.post("/api/chat/resend_message", &ResendMessageRequest { message_id }).await
    }

    pub async fn mark_read(&self, room_id: Id, seq: i64) -> Result<i64> {
        Ok(self.post::<_, MarkReadRequest>("/api/chat/mark_read", &MarkReadRequest { room_id, seq }).await?.seq)
    }

    /// One page of history; give at most one of `before_seq` / `after_seq`.
    pub async fn history(
        &self,
        room_id: Id,
        before_seq: Option<i64>,
        after_seq: Option<i64>,
        limit: Option<u32>,
    ) -> Result<HistoryResponse> {
        let mut path = format!("/api/chat/history?room_id={room_id}");
        for (key, value) in [("before_seq", before_seq), ("after_seq", after_seq), ("limit", limit.map(i64::from))] {
            if let Some(v) = value {
                path.push_str(&format!("&{key}={v}"));
            }
        }
        self.get(&path).await
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
