//! Websocket tunnels: forward an `Upgrade: websocket` request to its worker over a
//! connection of its own, relay the worker's 101, then copy bytes both ways until
//! either side closes or the tunnel is idle too long.
//!
//! It owns the upgraded connections and nothing else; the caller has already chosen
//! the worker, and the ticket it hands over keeps the session counted while the
//! tunnel is open.

use crate::body::{Guarded, ProxyBody};
use crate::proxy::{
    prepare_request_headers, short, strip_hop_by_hop, unknown_sid, Peer, Proxy, Target, Ticket,
};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Forwards an upgrade request; on 101, splices the two connections.
pub(crate) async fn upgrade(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: Peer,
    target: Target,
) -> Response<ProxyBody> {
    let worker = target.worker.id;
    let addr = target.worker.addr;
    let client_side = hyper::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let mut headers = parts.headers;
    prepare_request_headers(&mut headers, &parts.uri, peer, true);
    let mut up = Request::new(http_body_util::Empty::<bytes::Bytes>::new());
    *up.method_mut() = parts.method;
    *up.uri_mut() = parts.uri.path_and_query().map_or_else(
        || http::Uri::from_static("/"),
        |pq| http::Uri::try_from(pq.as_str()).unwrap_or_else(|_| http::Uri::from_static("/")),
    );
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = headers;

    let cfg = &proxy.cfg;
    let stream = match tokio::time::timeout(cfg.timeouts.connect, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(worker, %addr, error = %e, "cannot connect to worker for websocket");
            proxy.pool.mark_down(&target.worker);
            return unreachable(&proxy, &target.ticket, addr);
        }
        Err(_) => {
            proxy.pool.mark_down(&target.worker);
            return unreachable(&proxy, &target.ticket, addr);
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            return short(
                StatusCode::BAD_GATEWAY,
                &format!("corral: worker {addr} failed: {e}\n"),
            )
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "websocket upstream connection ended");
        }
    });
    let mut resp = match tokio::time::timeout(cfg.timeouts.read, sender.send_request(up)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            return short(
                StatusCode::BAD_GATEWAY,
                &format!("corral: worker {addr} failed: {e}\n"),
            )
        }
        Err(_) => {
            return short(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("corral: worker {addr} did not answer the upgrade\n"),
            )
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused upgrade (a 400 for a bad sid, say): pass the answer on as it is.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Guarded::new(body, target.ticket)
            .map_err(Into::into)
            .boxed_unsync();
        return Response::from_parts(parts, body);
    }
    let worker_side = hyper::upgrade::on(&mut resp);
    let idle = cfg.timeouts.websocket_idle;
    let open = target.worker.open_tunnel();
    let metrics = proxy.metrics.clone();
    let ticket = match target.ticket {
        Ticket::Session(t) => Ticket::Session(t.into_tunnel()),
        other => other,
    };
    tokio::spawn(async move {
        let (client_io, worker_io) = match tokio::try_join!(client_side, worker_side) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade did not complete");
                return;
            }
        };
        let (up, down) = splice(TokioIo::new(client_io), TokioIo::new(worker_io), idle).await;
        metrics.bytes_in.fetch_add(up, Ordering::Relaxed);
        metrics.bytes_out.fetch_add(down, Ordering::Relaxed);
        // The session (or its count) ends with the tunnel.
        drop(ticket);
        drop(open);
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, crate::body::empty())
}

fn unreachable(proxy: &Proxy, ticket: &Ticket, addr: std::net::SocketAddr) -> Response<ProxyBody> {
    if matches!(ticket, Ticket::Session(_)) {
        proxy.metrics.unknown_sid.fetch_add(1, Ordering::Relaxed);
        unknown_sid()
    } else {
        short(
            StatusCode::BAD_GATEWAY,
            &format!("corral: cannot connect to worker {addr}\n"),
        )
    }
}

/// Copies both ways until both directions end, an error, or `idle` without a byte.
/// Returns the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Activity::new(a, start, last.clone());
    let mut b = Activity::new(b, start, last.clone());
    {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
            tokio::select! {
                result = &mut copy => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "tunnel ended with an error");
                    }
                    break;
                }
                _ = tokio::time::sleep_until((quiet_since + idle).into()) => {
                    let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
                    if quiet_since.elapsed() >= idle {
                        tracing::debug!(?idle, "tunnel idle, closing");
                        break;
                    }
                }
            }
        }
    }
    (a.bytes, b.bytes)
}

pin_project_lite::pin_project! {
    /// Records when bytes were last read from the inner stream.
    struct Activity<T> {
        #[pin]
        inner: T,
        start: Instant,
        last: Arc<AtomicU64>,
        bytes: u64,
    }
}

impl<T> Activity<T> {
    fn new(inner: T, start: Instant, last: Arc<AtomicU64>) -> Self {
        Activity {
            inner,
            start,
            last,
            bytes: 0,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Activity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            *this.bytes += (buf.filled().len() - before) as u64;
            let ms = this.start.elapsed().as_millis() as u64;
            this.last.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Activity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splice_copies_and_closes_on_idle() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(splice(a, b, Duration::from_millis(200)));
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.expect("write");
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"pong");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("idle tunnel closes")
            .expect("task");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn splice_ends_when_one_side_closes() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(60)));
        drop(client);
        let mut rest = Vec::new();
        server
            .read_to_end(&mut rest)
            .await
            .expect("eof reaches the worker");
        drop(server);
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("tunnel ends")
            .expect("task");
    }
}
