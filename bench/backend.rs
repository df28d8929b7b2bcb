//! The native backend behind every proxy in the benchmarks, fast enough that the
//! proxy is the bottleneck: `GET /...` answers a small body with keep-alive, and
//! `/ws` upgrades to a websocket that echoes every message, and `/feed?every_us=N`
//! to one that sends a binary frame every N µs (a Socket.IO worker's broadcasts, as
//! the relay benchmark wants them): 50 to 500 bytes, each starting with the time it
//! was sent (nanoseconds since the Unix epoch, big-endian) so that the client can
//! tell how long it took to arrive.
//!
//!     backend 127.0.0.1:7000

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

async fn answer(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let key = req.headers().get("sec-websocket-key").cloned();
    let path = req.uri().path();
    let feed = path.starts_with("/feed");
    if let (Some(key), true) = (key, path.starts_with("/ws") || feed) {
        let every = feed_period(req.uri().query().unwrap_or(""));
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = upgrade.await {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                if feed {
                    send_feed(ws, every).await
                } else {
                    echo(ws).await
                }
            }
        });
        let resp = Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
        return Ok(resp);
    }
    Ok(Response::new(Full::new(Bytes::from_static(
        b"hello from the backend\n",
    ))))
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn echo(mut ws: Socket) {
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
    }
}

/// `every_us=N` from the query; 20 ms when absent.
fn feed_period(query: &str) -> Duration {
    let us = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("every_us="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000u64);
    Duration::from_micros(us.max(10))
}

/// Frames of 50 to 500 bytes, one every `every`, until the client goes; what the
/// client sends is read and dropped (its close ends the feed).
async fn send_feed(ws: Socket, every: Duration) {
    let (mut tx, mut rx) = ws.split();
    // Each feed starts at its own point of the period (golden-ratio sequence), so the
    // frames come evenly spread rather than in bursts of timers firing together.
    static FEEDS: AtomicU64 = AtomicU64::new(0);
    let n = FEEDS.fetch_add(1, Ordering::Relaxed);
    let phase = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) as f64 / u64::MAX as f64;
    let first = tokio::time::Instant::now() + every.mul_f64(phase);
    let mut tick = tokio::time::interval_at(first, every);
    let mut n: usize = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let len = 50 + (n * 37) % 451;
                n += 1;
                let mut frame = vec![b'x'; len];
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                frame[..8].copy_from_slice(&(now.as_nanos() as u64).to_be_bytes());
                if tx.send(Message::binary(frame)).await.is_err() {
                    return;
                }
            }
            msg = rx.next() => match msg {
                Some(Ok(m)) if !m.is_close() => {}
                _ => return,
            }
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("backend on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
