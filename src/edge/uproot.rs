//! Taking a client connection's socket out of its websocket upgrade, so that the
//! tunnel can be relayed on another serving thread: the socket comes off this
//! thread's reactor with the bytes already read from it, and, over TLS, the session
//! as it stands, to be put back on the other thread's reactor there.
//!
//! It knows the types the listener serves connections as, and nothing of what the
//! tunnel does with them.

use crate::transport::moving::{Duplex, Replant, Taken};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A connection served over TLS: its socket can be taken from under the session.
pub type Tls = TlsStream<Movable>;

/// A client connection's socket, which can be taken away (from under its TLS
/// session, if any) and put back, and whose writes have a deadline: one that cannot
/// go out for `send` fails, and the connection with it (`timeouts.send`, nginx's
/// `send_timeout`). A socket put back for a tunnel has none: a tunnel has its idle
/// period.
pub struct Movable {
    tcp: Option<TcpStream>,
    send: Option<std::time::Duration>,
    /// Armed when a write could not go out, cleared when one does.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Movable {
    pub fn new(tcp: TcpStream, send: std::time::Duration) -> Movable {
        Movable {
            tcp: Some(tcp),
            send: Some(send),
            stalled: None,
        }
    }

    pub fn get_ref(&self) -> Option<&TcpStream> {
        self.tcp.as_ref()
    }

    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self.tcp.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// `polled` (a write's outcome) held to the send deadline.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(send) = self.send else {
            return polled;
        };
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(send)));
        match std::future::Future::poll(stalled.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for timeouts.send",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Movable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Movable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.tcp()?.poll_write(cx, buf);
        this.deadline(cx, polled)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.tcp()?.poll_write_vectored(cx, bufs);
        this.deadline(cx, polled)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = this.tcp()?.poll_flush(cx);
        this.deadline(cx, polled)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_shutdown(cx)
    }
}

impl NoDelay for Movable {
    fn no_delay(&self) {
        if let Some(tcp) = self.get_ref() {
            let _ = tcp.set_nodelay(true);
        }
    }
}

impl NoDelay for Tls {
    fn no_delay(&self) {
        if let Some(tcp) = self.get_ref().0.get_ref() {
            let _ = tcp.set_nodelay(true);
        }
    }
}

/// A client connection's socket, whose Nagle's algorithm can be turned off.
pub trait NoDelay {
    /// Sets TCP_NODELAY.
    fn no_delay(&self);
}

impl NoDelay for tokio::net::TcpStream {
    fn no_delay(&self) {
        let _ = self.set_nodelay(true);
    }
}

/// A connection stream whose socket can come off this thread's reactor.
pub trait Uproot: AsyncRead + AsyncWrite + Unpin + Sized + Send + 'static {
    fn uproot(self) -> io::Result<Taken>;
}

impl Uproot for Movable {
    fn uproot(mut self) -> io::Result<Taken> {
        let tcp = self.tcp.take().ok_or(io::ErrorKind::NotConnected)?;
        tcp.into_std().map(Taken::Tcp)
    }
}

impl Uproot for Tls {
    fn uproot(mut self) -> io::Result<Taken> {
        let tcp = self
            .get_mut()
            .0
            .tcp
            .take()
            .ok_or(io::ErrorKind::NotConnected)?;
        let tcp = tcp.into_std()?;
        Ok(Taken::Over(Box::new(Uprooted { tls: self, tcp })))
    }
}

/// A TLS session whose socket is off every reactor.
struct Uprooted {
    tls: Tls,
    tcp: std::net::TcpStream,
}

impl Replant for Uprooted {
    fn replant(self: Box<Self>) -> io::Result<Box<dyn Duplex>> {
        let Uprooted { mut tls, tcp } = *self;
        let movable = &mut tls.get_mut().0;
        movable.tcp = Some(TcpStream::from_std(tcp)?);
        movable.send = None;
        movable.stalled = None;
        Ok(Box::new(tls))
    }
}
