//! corral: one port in front of many Socket.IO / Engine.IO worker processes.
//!
//! The folders follow the data path, one way, each part using only the parts below
//! it (`tests/layers.rs` fails on a `use` that goes back up):
//!
//! ```text
//! run            the App: wires the parts together, owns startup, reloads and shutdown
//!  └ admin       the admin socket: reload, scale, status
//!  └ edge        listeners, TLS, serving threads' accept loops, the gate:
//!  │             head rules, redirect, path normalisation, limits, auth
//!  └ proxy       the request path: choice of worker, header policy, one exchange
//!  │             with the retry rule, corral's own answers, websocket tunnels
//!  └ observe     views that read counters, pool, router and broker: Prometheus,
//!  │             status JSON, access log
//!  └ engineio    the protocol, tagged sids, the session table (router)
//!  └ workers     the pool (state, load, health) and the supervisor (processes)
//!  └ broker      the embedded Redis-protocol pub/sub broker
//!  └ transport   kept-alive connections to workers, the worker exchange, bodies
//!  http1         the HTTP/1 vocabulary both stacks share (a leaf)
//!  counters      the counters the data path bumps (a leaf)
//!  runtime       serving threads, the lifetime tree (every task, one stop), systemd
//!  config        the file, read and checked once
//! ```
#![deny(missing_docs)]

pub mod admin;
pub mod broker;
pub mod config;
pub(crate) mod counters;
pub(crate) mod edge;
pub(crate) mod engineio;
pub(crate) mod http1;
pub(crate) mod observe;
pub(crate) mod proxy;
pub mod run;
pub(crate) mod runtime;
pub use runtime::forker::on_main_thread;
pub use runtime::handover;
pub use runtime::life::Life;
pub(crate) mod transport;
pub(crate) mod workers;

/// Entry points for the fuzz targets (`fuzz/`), not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::broker::resp::{parse as parse_resp, Caps};
    pub use crate::edge::auth::{parse as parse_htpasswd, verify, Hash};
    pub use crate::edge::path::normalise;
    pub use crate::http1::fuzz::request as fuzz_request;
    pub use crate::http1::fuzz::response as fuzz_response;
    pub use crate::http1::fuzz::{first_request, Framed};
}
