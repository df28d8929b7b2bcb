//! corral: one port in front of many Socket.IO / Engine.IO worker processes.
//!
//! The data path runs one way: [`server`] (listener) → [`proxy`] (limits, headers,
//! choice of worker through [`router`] on the Engine.IO path) → [`pool`] (workers and
//! their health) → [`upstream`] (keep-alive connections to each worker) →
//! [`tunnel`] for websockets. [`config`] reads the file and
//! [`engineio`] holds the protocol knowledge. [`supervisor`] starts and watches the
//! worker processes and [`admin`] takes commands for it from `corral reload`.

pub mod access;
pub mod admin;
pub mod auth;
pub mod body;
pub mod broker;
pub mod config;
pub mod engineio;
pub mod lanes;
pub mod metrics;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod router;
pub mod server;
pub mod status;
pub mod strict;
pub mod supervisor;
pub mod tls;
pub mod tunnel;
pub mod upstream;
