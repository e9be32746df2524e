//! Creating the users and rooms a scenario needs, over Stacker's HTTP API.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use stacker_client::{Client, ClientError};
use stacker_proto::{Content, Id};

use crate::server::Server;

pub const PASSWORD: &str = "stacker-bench-password";

/// A registered, logged-in user.
#[derive(Clone)]
pub struct User {
    pub id: Id,
    pub token: String,
    /// Accounts, rooms, history (standalone: the server; a cluster: meta).
    pub client: Client,
    /// `send_message` (standalone: the server; a cluster: a send instance).
    pub sender: Client,
}

/// Registers and logs in `n` users named `b{run}{label}{i}`, `concurrency` at
/// a time (each costs two argon2 hashes on the server).
pub async fn users(server: &Server, run: &str, label: &str, n: usize, concurrency: usize) -> Result<Vec<User>> {
    let started = Instant::now();
    let anon = Client::new(&server.base);
    let send_base = server.send_base.clone().unwrap_or_else(|| server.base.clone());
    let users: Vec<User> = stream::iter(0..n)
        .map(|i| {
            let (anon, send_base) = (anon.clone(), &send_base);
            let name = format!("b{run}{label}{i}");
            async move {
                retry_busy(|| async { anon.register(&name, PASSWORD, None).await.map_err(registration_hint) })
                    .await
                    .with_context(|| format!("register {name}"))?;
                let client =
                    retry_busy(|| anon.login(&name, PASSWORD)).await.with_context(|| format!("login {name}"))?;
                let token = client.token().unwrap_or_default().to_string();
                let sender = client.clone().rebase(send_base);
                anyhow::Ok(User { id: client.user_id(), token, client, sender })
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    if n >= 50 {
        eprintln!("setup: {n} users registered and logged in in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(users)
}

/// Creates one group room per member list (the first member creates it),
/// `concurrency` at a time.
pub async fn groups(rooms: &[Vec<User>], name: &str, concurrency: usize) -> Result<Vec<Id>> {
    stream::iter(rooms.iter().enumerate())
        .map(|(i, members)| async move {
            let (owner, rest) = members.split_first().context("a room needs members")?;
            let ids: Vec<Id> = rest.iter().map(|u| u.id).collect();
            let room_name = format!("{name}{i}");
            retry_busy(|| owner.client.create_group(&room_name, &ids, None))
                .await
                .with_context(|| format!("create room {name}{i}"))
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Creates the direct room of each pair.
pub async fn directs(pairs: &[(User, User)], concurrency: usize) -> Result<Vec<Id>> {
    stream::iter(pairs)
        .map(|(a, b)| async move { retry_busy(|| a.client.create_direct(b.id)).await.context("create direct room") })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Sends a text message over HTTP with a client_msg_id, retrying 503s.
pub async fn send_text(user: &User, room: Id, text: &str, client_msg_id: &str) -> Result<i64> {
    let r = retry_busy(|| user.sender.send(room, Content::text(text), Some(client_msg_id)))
        .await
        .with_context(|| format!("send {client_msg_id} to room {room}"))?;
    Ok(r.seq)
}

/// A 429 at registration is the server's per-address limit, which waiting
/// does not lift while the bench keeps registering: say how to lift it.
fn registration_hint(e: ClientError) -> ClientError {
    if e.code() != 429 {
        return e;
    }
    ClientError::Protocol(format!(
        "{e}: the server limits registrations per client address, and every bench user registers from \
         this one; start it with STACKER_AUTH__MAX_REGISTRATIONS_PER_ADDRESS_PER_MINUTE=0 (--spawn does)"
    ))
}

/// Retries a call while the server answers 503 or 429 (busy), for up to 30 s.
pub async fn retry_busy<T, F, Fut>(mut call: F) -> std::result::Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut backoff = Duration::from_millis(20);
    loop {
        match call().await {
            Err(e) if matches!(e.code(), 503 | 429) && Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}
