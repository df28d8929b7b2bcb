//! What corral tells about itself: the views ([`metrics`]: Prometheus text, status
//! JSON, history) read the counters (`crate::counters`, a leaf the data path writes
//! to), the pool, the router and the broker, and change nothing; the edge's status
//! listener serves them. [`access`] writes the access log. Commands that change
//! things (`corral reload|scale`) are the admin socket's (`crate::admin`), not
//! this part's.

pub mod access;
pub mod metrics;

use std::net::SocketAddr;

/// Why an observing part could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The access log file cannot be opened for appending.
    #[error("access log {path}: {cause}")]
    AccessLog {
        /// The configured path.
        path: String,
        /// What the system said.
        cause: std::io::Error,
    },
    /// The admin listener's address is taken or not ours.
    #[error("admin listener cannot listen on {addr}: {cause}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// What the system said.
        cause: std::io::Error,
    },
}
