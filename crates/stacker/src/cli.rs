//! `stacker-cli`: try a Stacker server from a terminal.
//!
//! ```text
//! stacker-cli register alice 'correct horse'
//! stacker-cli login alice 'correct horse'        # keeps the token in the session file
//! stacker-cli create friends --member 12345
//! stacker-cli send 67890 hello there
//! stacker-cli listen                             # prints messages as they arrive
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use stacker_client::{Client, Delivered, Subscriber};
use stacker_proto::http::{ChatMessage, JoinPolicy};
use stacker_proto::{Content, Id};

#[derive(Parser)]
#[command(name = "stacker-cli", version, about = "Terminal client for a Stacker server")]
struct Cli {
    /// Server base URL.
    #[arg(long, env = "STACKER_CLI_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// Where `login` keeps the token (default: ~/.stacker-cli.json).
    #[arg(long, env = "STACKER_CLI_SESSION", global = true)]
    session: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account.
    Register {
        username: String,
        password: String,
        #[arg(long)]
        nickname: Option<String>,
    },
    /// Log in and keep the token in the session file.
    Login { username: String, password: String },
    /// Who the session belongs to.
    Me,
    /// Create a group room.
    Create {
        name: String,
        /// A user id to add (repeatable).
        #[arg(long = "member")]
        members: Vec<String>,
        /// Joining needs an owner's or admin's approval.
        #[arg(long)]
        approval: bool,
    },
    /// Open (or find) the direct room with a user.
    Direct { user_id: String },
    /// Join an open group room.
    Join { room_id: String },
    /// Your rooms with unread counts.
    Rooms,
    /// A room's members.
    Members { room_id: String },
    /// Send a text message.
    Send {
        room_id: String,
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Recent messages of a room.
    History {
        room_id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Stay connected and print messages and events as they arrive (Ctrl-C stops).
    Listen {
        #[arg(long, default_value = "cli")]
        device: String,
        /// Stop after this many messages (default: never).
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Serialize, Deserialize)]
struct Session {
    server: String,
    token: String,
    user_id: Id,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stacker-cli: {e}");
            ExitCode::FAILURE
        }
    }
}

fn session_path(cli: &Cli) -> PathBuf {
    cli.session
        .clone()
        .unwrap_or_else(|| std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".stacker-cli.json"))
}

fn parse_id(s: &str) -> Result<Id, String> {
    s.trim().parse::<i64>().map(Id).map_err(|_| format!("{s:?} is not an id"))
}

fn load_session(cli: &Cli) -> Result<Client, String> {
    let path = session_path(cli);
    let text = std::fs::read_to_string(&path)
        .map_err(|_| format!("not logged in (no {}): run `stacker-cli login`", path.display()))?;
    let session: Session = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Client::new(session.server).with_token(session.token, session.user_id))
}

fn print_message(m: &ChatMessage) {
    let body = match &*m.content {
        Content::Text { text } => text.clone(),
        other => serde_json::to_string(other).unwrap_or_default(),
    };
    println!("[room {} #{}] {}: {}", m.room_id, m.seq, m.sender_id, body);
}

async fn run(cli: Cli) -> Result<(), String> {
    let anon = Client::new(&cli.server);
    let err = |e: stacker_client::ClientError| e.to_string();
    match &cli.command {
        Command::Register { username, password, nickname } => {
            let id = anon.register(username, password, nickname.as_deref()).await.map_err(err)?;
            println!("registered {username}: user_id {id}");
        }
        Command::Login { username, password } => {
            let client = anon.login(username, password).await.map_err(err)?;
            let session = Session {
                server: cli.server.clone(),
                token: client.token().unwrap_or_default().to_string(),
                user_id: client.user_id(),
            };
            let path = session_path(&cli);
            let json = serde_json::to_string_pretty(&session).map_err(|e| e.to_string())?;
            std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("logged in as {username} (user_id {}); session in {}", client.user_id(), path.display());
        }
        Command::Me => {
            let me = load_session(&cli)?.me().await.map_err(err)?;
            println!("{} ({}), user_id {}", me.username, me.nickname, me.user_id);
        }
        Command::Create { name, members, approval } => {
            let ids = members.iter().map(|m| parse_id(m)).collect::<Result<Vec<_>, _>>()?;
            let policy = approval.then_some(JoinPolicy::Approval);
            let room = load_session(&cli)?.create_group(name, &ids, policy).await.map_err(err)?;
            println!("room_id {room}");
        }
        Command::Direct { user_id } => {
            let room = load_session(&cli)?.create_direct(parse_id(user_id)?).await.map_err(err)?;
            println!("room_id {room}");
        }
        Command::Join { room_id } => {
            load_session(&cli)?.join(parse_id(room_id)?).await.map_err(err)?;
            println!("joined {room_id}");
        }
        Command::Rooms => {
            for r in load_session(&cli)?.rooms().await.map_err(err)? {
                println!("{}  {:<24} last_seq {:<6} unread {}", r.room_id, r.name, r.last_seq, r.unread);
            }
        }
        Command::Members { room_id } => {
            for m in load_session(&cli)?.members(parse_id(room_id)?).await.map_err(err)? {
                println!("{}  role {}  {}", m.user_id, m.role, m.nickname);
            }
        }
        Command::Send { room_id, text } => {
            let sent = load_session(&cli)?.send_text(parse_id(room_id)?, &text.join(" ")).await.map_err(err)?;
            println!("sent: seq {} msg_id {}", sent.seq, sent.msg_id);
        }
        Command::History { room_id, limit } => {
            let page = load_session(&cli)?.history(parse_id(room_id)?, None, None, Some(*limit)).await.map_err(err)?;
            for m in &page.messages {
                print_message(m);
            }
        }
        Command::Listen { device, count } => {
            let client = load_session(&cli)?;
            let mut sub = Subscriber::connect(&client, device).await.map_err(err)?;
            eprintln!("listening as user {} on device {device} (Ctrl-C to stop)", client.user_id());
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    next = sub.next_within(Duration::from_secs(3600)) => match next.map_err(err)? {
                        Some(Delivered::Message(m)) => {
                            print_message(&m);
                            seen += 1;
                            if count.is_some_and(|c| seen >= c) {
                                sub.ack_all().await.map_err(err)?;
                                return Ok(());
                            }
                        }
                        Some(Delivered::Event(e)) => println!("[event] {}", serde_json::to_string(&e).unwrap_or_default()),
                        Some(Delivered::Error { code, msg }) => println!("[error {code}] {msg}"),
                        Some(Delivered::Ack { .. }) | None => {}
                    },
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(())
}
