//! Stacker's domain: accounts, rooms, messages and sequencing.
//!
//! Nothing here knows about HTTP, SQL or Redis. Services talk to storage through
//! the traits in [`store`]; the SQL crate implements them, the server crate maps
//! [`Error`] to HTTP.

pub mod accounts;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod commit;
pub mod delivery;
mod error;
pub mod fanout;
pub mod hot_metric;
pub mod ids;
mod limits;
pub mod membership;
pub mod messages;
pub mod model;
pub mod monitor;
pub mod rooms;
pub mod store;
pub mod validate;

pub use error::{Error, Result};
