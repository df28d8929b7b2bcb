//! Active health checks: at `health.interval`, each worker that is up, or down with
//! its process alive, is asked `GET health.path` (or, without a path, connected
//! to); the pool counts the result against the worker's `rise`/`fall` thresholds.
//! The supervisor's readiness probe asks the same question.
//!
//! It owns the probe and nothing else: state changes are the pool's.

use crate::config::Health;
use crate::runtime::life::Life;
use crate::transport::http1;
use crate::workers::pool::{Pool, State};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Checks workers at `health.interval`: marks down those up that fail, and up those
/// down (but alive) that answer. Runs until `bg` stops.
pub fn spawn_health_checks(pool: Arc<Pool>, health: Checks, bg: &Life) {
    bg.spawn_until_drained(async move {
        loop {
            // Read each round: a config reload may change it.
            let health = health.load_full();
            tokio::time::sleep(health.interval).await;
            let mut checks = tokio::task::JoinSet::new();
            for w in pool.workers() {
                let candidate = match w.state() {
                    State::Up => true,
                    State::Down => w.is_alive(),
                    _ => false,
                };
                if candidate {
                    let (path, timeout) = (health.path.clone(), health.timeout);
                    checks.spawn(async move {
                        let healthy = check(w.addr, &path, timeout).await;
                        (w, healthy)
                    });
                }
            }
            while let Some(Ok((w, healthy))) = checks.join_next().await {
                match healthy {
                    true => pool.check_passed(&w),
                    false => {
                        pool.check_failed(&w);
                    }
                }
            }
        }
    });
}

/// The `[health]` table in force, shared with a config reload.
pub type Checks = Arc<arc_swap::ArcSwap<Health>>;

/// One health check: a TCP connect, or, with a path, a GET answered 2xx or 3xx.
pub async fn check(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    if path.is_empty() {
        return tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .is_ok_and(|r| r.is_ok());
    }
    matches!(http_status(addr, path, timeout).await, Some(200..=399))
}

/// The status of `GET path` on a worker, or None when it does not answer HTTP
/// within `timeout`.
pub async fn http_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let mut headers = http::HeaderMap::new();
        let host = http::HeaderValue::from_str(&addr.to_string()).ok()?;
        headers.insert(http::header::HOST, host);
        let agent = http::HeaderValue::from_static("corral-health");
        headers.insert(http::header::USER_AGENT, agent);
        let close = http::HeaderValue::from_static("close");
        headers.insert(http::header::CONNECTION, close);
        let uri: http::Uri = path.parse().ok()?;
        let none = http1::Sending::InHand(bytes::Bytes::new());
        let req = http1::encode(&http::Method::GET, &uri, &headers, |_| false, &[], &none);
        let conn = http1::Conn::new(stream);
        let resp = http1::exchange(conn, &req, None, Discard).await.ok()?;
        Some(resp.status().as_u16())
    })
    .await
    .ok()
    .flatten()
}

/// A probe's connection is not kept: it asked to close.
struct Discard;

impl http1::Keep for Discard {
    fn keep(self, _: http1::Conn) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn answering(reply: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_probe_reads_the_status_and_refuses_what_is_not_http() {
        let t = Duration::from_secs(2);
        let ok = answering(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(http_status(ok, "/health", t).await, Some(204));
        assert!(check(ok, "/health", t).await);
        let bad = answering(b"HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert!(!check(bad, "/health", t).await);
        let junk = answering(b"SSH-2.0-OpenSSH\r\n").await;
        assert_eq!(http_status(junk, "/health", t).await, None);
    }
}
