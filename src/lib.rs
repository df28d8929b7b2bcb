//! corral: one port in front of many Socket.IO / Engine.IO worker processes.
//!
//! The data path runs one way: [`server`] (listeners, connection limits, shutdown) →
//! [`strict`] (request heads) and [`proxy`] (limits, auth, headers, choice of worker
//! through [`router`] on the Engine.IO path, [`pool`] elsewhere) → [`forward`] (the
//! request as a worker gets it, one exchange, the retry rule) → [`upstream`]
//! (keep-alive connections to each worker) — or, for websockets, [`tunnel`], which
//! sends its upgrade through [`forward`] too and never reaches back into [`proxy`].
//! [`answer`] holds corral's own answers, [`body`] the body adapters. [`config`]
//! reads the file and [`engineio`] holds the protocol knowledge. [`supervisor`]
//! starts and watches the worker processes and [`admin`] takes commands for it from
//! `corral reload`.
pub mod access;
pub mod admin;
pub mod answer;
pub mod auth;
pub mod body;
pub mod broker;
pub mod config;
pub mod engineio;
pub mod forward;
pub mod lanes;
pub mod metrics;
pub mod notify;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod router;
pub mod server;
pub mod sidtag;
pub mod status;
pub mod strict;
pub mod supervisor;
pub mod tasks;
pub mod tls;
pub mod tunnel;
pub mod upstream;
