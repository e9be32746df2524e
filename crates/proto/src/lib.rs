//! Wire types shared by the Stacker server and its clients.
//!
//! Everything here is plain data with serde derives: HTTP request and response
//! bodies ([`http`]), message content ([`content`]), WebSocket frames ([`ws`]) and
//! the 64-bit id that travels as a JSON string ([`Id`]).

pub mod content;
pub mod http;
mod id;
pub mod ws;

pub use content::Content;
pub use id::Id;
