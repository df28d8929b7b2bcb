//! What corral tells about itself. [`counters`] is a leaf the data path writes to;
//! the views on top ([`metrics`]: Prometheus text, status JSON, history) read
//! counters, pool, router and broker and change nothing; the edge's admin listener
//! serves them. [`access`] writes the access log, [`admin`] serves the admin socket
//! (`corral reload|scale|status`).

pub mod access;
pub mod admin;
pub mod counters;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why an observing part could not start, or an admin command got no answer.
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
    /// Another corral answers on the admin socket.
    #[error("admin socket {} is in use by another corral", .0.display())]
    SocketInUse(PathBuf),
    /// The admin socket cannot be made.
    #[error("cannot create admin socket {}: {cause}", path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// No corral listens on the admin socket.
    #[error("cannot reach corral at {}: {cause} (is it running? see `admin_socket`)", path.display())]
    Unreachable {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// The running corral did not answer in time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The admin conversation broke off.
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
}
