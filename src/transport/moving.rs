//! What a websocket tunnel's client socket is while it moves between serving
//! threads: taken off one thread's reactor by the edge, which knows how it was
//! served, and put back on another's by the tunnel, which does not; and what a
//! long-poll in flight is when an upgrade carries it (its worker connection, from
//! the request path to the client connection's session). Types only.

use bytes::Bytes;

/// A [`PendingAnswer`] as a response extension (which must be `Clone`): taken
/// out once, by the client connection's session.
#[derive(Clone)]
pub struct Pending(std::sync::Arc<std::sync::Mutex<Option<PendingAnswer>>>);

impl Pending {
    pub fn new(answer: PendingAnswer) -> Pending {
        Pending(std::sync::Arc::new(std::sync::Mutex::new(Some(answer))))
    }

    pub fn take(&self) -> Option<PendingAnswer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A request's answer still to come when an upgrade carried it: its worker
/// connection (the request went out whole; what was read of the answer is in it),
/// whose worker, and whose session. The request path puts it in the response it
/// gives the client connection's session, which carries both together.
pub struct PendingAnswer {
    /// The worker connection.
    pub conn: crate::transport::http1::Conn,
    /// The worker's id in the pool.
    pub worker: usize,
    /// The session's sid (a long-poll's).
    pub sid: Option<String>,
}

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

/// A client connection given up to its tunnel once the 101 went out: its socket,
/// and what the connection held that the tunnel holds now (its connection slot).
pub struct Handover {
    pub socket: TakenSocket,
    pub hold: Box<dyn Send + Sync>,
}

/// Put in an upgrade request by the connection that read it: resolves with the
/// connection once the 101 has been written to it (dropped unresolved when it was
/// not, or when the client went away). Taken out of the request once.
#[derive(Clone)]
pub struct OnUpgrade(std::sync::Arc<std::sync::Mutex<Option<Receiver>>>);

type Receiver = tokio::sync::oneshot::Receiver<Handover>;

impl OnUpgrade {
    /// The connection, once it has given its socket up (Err: it will not).
    pub async fn connection(self) -> Result<Handover, tokio::sync::oneshot::error::RecvError> {
        let rx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match rx {
            Some(rx) => rx.await,
            None => {
                let (_, rx) = tokio::sync::oneshot::channel();
                rx.await
            }
        }
    }
}

/// The connection's side of an [`OnUpgrade`].
pub struct Upgrading(pub tokio::sync::oneshot::Sender<Handover>);

/// A pair: the connection keeps the first and puts the second in the request.
pub fn upgrade_pair() -> (Upgrading, OnUpgrade) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    (Upgrading(tx), OnUpgrade(rx))
}
