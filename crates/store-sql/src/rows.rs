//! Decoding `AnyRow`s into domain records, by column position.
//!
//! Columns are read by index so joins need no aliases. Strings are read
//! leniently: MySQL reports `TEXT`/`MEDIUMTEXT` columns as blobs through sqlx's
//! `Any` driver, so a string column may arrive as bytes.

use std::sync::Arc;

use sqlx::any::AnyRow;
use sqlx::Row;
use stacker_domain::model::*;
use stacker_domain::Error;

pub(crate) type R<T> = Result<T, Error>;

fn decode_err(what: &str, i: usize, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("cannot decode {what} column {i}: {e}"))
}

pub(crate) fn int(row: &AnyRow, i: usize) -> R<i64> {
    row.try_get::<i64, _>(i).map_err(|e| decode_err("integer", i, e))
}

pub(crate) fn opt_int(row: &AnyRow, i: usize) -> R<Option<i64>> {
    row.try_get::<Option<i64>, _>(i).map_err(|e| decode_err("integer", i, e))
}

pub(crate) fn opt_text(row: &AnyRow, i: usize) -> R<Option<String>> {
    match row.try_get::<Option<String>, _>(i) {
        Ok(v) => Ok(v),
        Err(first) => match row.try_get::<Option<Vec<u8>>, _>(i) {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => String::from_utf8(bytes).map(Some).map_err(|e| decode_err("text", i, e)),
            Err(_) => Err(decode_err("text", i, first)),
        },
    }
}

pub(crate) fn text(row: &AnyRow, i: usize) -> R<String> {
    opt_text(row, i)?.ok_or_else(|| decode_err("text", i, "unexpected NULL"))
}

pub(crate) fn bool_int(b: bool) -> i64 {
    i64::from(b)
}

pub(crate) fn join_policy_code(p: JoinPolicy) -> i64 {
    match p {
        JoinPolicy::Open => 0,
        JoinPolicy::Approval => 1,
    }
}

fn join_policy_from(code: i64) -> R<JoinPolicy> {
    match code {
        0 => Ok(JoinPolicy::Open),
        1 => Ok(JoinPolicy::Approval),
        _ => Err(Error::Store(format!("unknown join policy code {code}"))),
    }
}

pub(crate) fn status_code(s: JoinRequestStatus) -> i64 {
    match s {
        JoinRequestStatus::Pending => 0,
        JoinRequestStatus::Approved => 1,
        JoinRequestStatus::Rejected => 2,
    }
}

fn status_from(code: i64) -> R<JoinRequestStatus> {
    match code {
        0 => Ok(JoinRequestStatus::Pending),
        1 => Ok(JoinRequestStatus::Approved),
        2 => Ok(JoinRequestStatus::Rejected),
        _ => Err(Error::Store(format!("unknown join request status code {code}"))),
    }
}

fn role_from(code: i64) -> R<Role> {
    Role::from_code(code).ok_or_else(|| Error::Store(format!("unknown role code {code}")))
}

pub(crate) fn content_json(content: &Content) -> R<String> {
    serde_json::to_string(content).map_err(|e| Error::Store(format!("cannot encode message content: {e}")))
}

pub(crate) fn content_from(json: &str) -> R<Arc<Content>> {
    serde_json::from_str(json).map_err(|e| Error::Store(format!("stored message content is not valid: {e}")))
}

pub(crate) const USER_COLS: &str = "id, username, nickname, password_hash, created_at";

pub(crate) fn user(row: &AnyRow) -> R<User> {
    Ok(User {
        id: int(row, 0)?,
        username: text(row, 1)?,
        nickname: text(row, 2)?,
        password_hash: text(row, 3)?,
        created_at: int(row, 4)?,
    })
}

/// `ROOM_COLS` with a table alias prefix, e.g. `r.`.
pub(crate) fn room_cols(prefix: &str) -> String {
    ["id", "name", "is_group", "join_policy", "owner_id", "direct_key", "last_seq", "created_at"]
        .iter()
        .map(|c| format!("{prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}
pub(crate) const ROOM_NCOLS: usize = 8;

pub(crate) fn room(row: &AnyRow, at: usize) -> R<Room> {
    Ok(Room {
        id: int(row, at)?,
        name: text(row, at + 1)?,
        is_group: int(row, at + 2)? != 0,
        join_policy: join_policy_from(int(row, at + 3)?)?,
        owner_id: int(row, at + 4)?,
        direct_key: opt_text(row, at + 5)?,
        last_seq: int(row, at + 6)?,
        created_at: int(row, at + 7)?,
    })
}

pub(crate) const MEMBER_COLS: &str = "room_id, user_id, role, nickname, mute_until, joined_at, read_seq";

pub(crate) fn member(row: &AnyRow) -> R<Member> {
    Ok(Member {
        room_id: int(row, 0)?,
        user_id: int(row, 1)?,
        role: role_from(int(row, 2)?)?,
        nickname: text(row, 3)?,
        mute_until: int(row, 4)?,
        joined_at: int(row, 5)?,
        read_seq: int(row, 6)?,
    })
}

pub(crate) const JOIN_REQUEST_COLS: &str = "id, room_id, user_id, message, status, created_at";

pub(crate) fn join_request(row: &AnyRow) -> R<JoinRequest> {
    Ok(JoinRequest {
        id: int(row, 0)?,
        room_id: int(row, 1)?,
        user_id: int(row, 2)?,
        message: text(row, 3)?,
        status: status_from(int(row, 4)?)?,
        created_at: int(row, 5)?,
    })
}

/// Message columns with a table alias prefix, e.g. `m.`.
pub(crate) fn message_cols(prefix: &str) -> String {
    ["id", "room_id", "seq", "sender_id", "client_msg_id", "content", "created_at"]
        .iter()
        .map(|c| format!("{prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn message(row: &AnyRow, at: usize) -> R<Message> {
    Ok(Message {
        id: int(row, at)?,
        room_id: int(row, at + 1)?,
        seq: int(row, at + 2)?,
        sender_id: int(row, at + 3)?,
        client_msg_id: opt_text(row, at + 4)?,
        content: content_from(&text(row, at + 5)?)?,
        created_at: int(row, at + 6)?,
    })
}

/// A message from a `LEFT JOIN`: `None` when its id column is NULL.
pub(crate) fn opt_message(row: &AnyRow, at: usize) -> R<Option<Message>> {
    match opt_int(row, at)? {
        None => Ok(None),
        Some(_) => message(row, at).map(Some),
    }
}
