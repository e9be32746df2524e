//! Stacker's server: configuration, the HTTP API, metrics, and the process
//! wiring that turns a config into running services.
//!
//! Tests start it in-process: build an [`App`] from a [`Config`], bind a
//! listener on 127.0.0.1:0 and call [`run`] with a shutdown future.

pub mod app;
pub mod cluster;
pub mod config;
mod error;
pub mod http;
pub mod telemetry;

pub use app::{run, run_parts, App, ClusterContext};
pub use config::Config;
pub use error::ApiError;
