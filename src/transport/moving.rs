//! What a websocket tunnel's client socket is while it moves between serving
//! threads: taken off one thread's reactor by the edge, which knows how it was
//! served, and put back on another's by the tunnel, which does not. Types only.

use bytes::Bytes;

/// A client connection's socket taken out of its upgrade, to be served on another thread:
/// the socket, off this thread's reactor, and the bytes already read from it.
pub struct TakenSocket {
    pub io: Taken,
    pub early: Bytes,
}

/// What is taken: a TCP socket, or a stream over one (TLS) that is put back on a
/// reactor where it is served.
pub enum Taken {
    Tcp(std::net::TcpStream),
    Over(Box<dyn Replant>),
}

/// A stream whose socket was taken off its thread's reactor.
pub trait Replant: Send {
    /// The stream again, its socket on the current thread's reactor.
    fn replant(self: Box<Self>) -> std::io::Result<Box<dyn Duplex>>;
}

/// A byte stream both ways.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}
