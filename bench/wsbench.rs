//! Websocket load client for the proxy benchmarks.
//!
//!     wsbench echo ws://127.0.0.1:8000/ws CONNS SECONDS   -> messages/s, RTT p50/p99
//!     wsbench idle ws://127.0.0.1:8000/ws CONNS SECONDS [SOURCES]
//!
//! `echo`: every connection sends a 32-byte message, waits for its echo, repeats.
//! `idle`: opens CONNS websockets (from 127.0.0.1..SOURCES as source addresses, to get
//! past one address's port range), prints `connected N` and holds them SECONDS.
//! `feed`: opens CONNS websockets to URL (ws:// or wss://; `WSBENCH_CA` names the
//! certificate to trust) asking the backend's `/feed` for RATE frames per second in
//! all, then counts the frames that arrive in SECONDS and how long each took (the
//! backend stamps each with its send time). With `PROXY_PID` set, the CPU time of
//! that process and its children (nginx's workers) over the same window, and their
//! resident memory at its end, are part of the results.
//!
//!     wsbench feed ws://127.0.0.1:8000/feed CONNS SECONDS RATE
//!
//! One JSON line of results on stdout.

use futures_util::{SinkExt, StreamExt};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

async fn open(
    url: &str,
    source: Ipv4Addr,
) -> Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let rest = url.strip_prefix("ws://")?;
    let authority = rest.split('/').next()?;
    let target: SocketAddr = authority.parse().ok()?;
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((source, 0))).ok()?;
    let stream = socket.connect(target).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.ok()?;
    Some(ws)
}

#[path = "wsbench/feed.rs"]
mod feed;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() < 5 {
        eprintln!("usage: wsbench echo|idle URL CONNS SECONDS [SOURCES]");
        std::process::exit(2);
    }
    let (mode, url) = (argv[1].clone(), argv[2].clone());
    if mode == "feed" {
        let rate: f64 = argv.get(5).and_then(|s| s.parse().ok()).unwrap_or(10_000.0);
        let conns: usize = argv[3].parse().unwrap_or(200);
        let seconds: u64 = argv[4].parse().unwrap_or(8);
        return feed::run(&url, conns, seconds, rate).await;
    }
    let conns: usize = argv[3].parse().unwrap_or(10);
    let seconds: u64 = argv[4].parse().unwrap_or(10);
    let sources: u8 = argv.get(5).and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let source = move |i: usize| Ipv4Addr::new(127, 0, 0, 1 + (i % sources as usize) as u8);

    if mode == "idle" {
        // Opened 64 at a time: one at a time would measure the round trips, not the
        // proxy; all at once would measure the listen backlog.
        let started = Instant::now();
        let url = std::sync::Arc::new(url);
        let mut held = Vec::with_capacity(conns);
        let mut failed = 0;
        let mut opening = futures_util::stream::iter(0..conns)
            .map(|i| {
                let url = url.clone();
                async move { open(&url, source(i)).await }
            })
            .buffer_unordered(64);
        while let Some(ws) = opening.next().await {
            match ws {
                Some(ws) => held.push(ws),
                None => failed += 1,
            }
        }
        let open_s = started.elapsed().as_secs_f64();
        println!("connected {} {open_s:.1}", held.len());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        println!(
            "{{\"connected\":{},\"failed\":{failed},\"open_s\":{open_s:.1}}}",
            held.len()
        );
        return;
    }

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let url = std::sync::Arc::new(url);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut rtts = Vec::new();
                let Some(mut ws) = open(&url, source(i)).await else {
                    return (rtts, 1);
                };
                let payload = vec![b'x'; 32];
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if ws.send(Message::binary(payload.clone())).await.is_err() {
                        return (rtts, 1);
                    }
                    match ws.next().await {
                        Some(Ok(_)) => rtts.push(t.elapsed()),
                        _ => return (rtts, 1),
                    }
                }
                let _ = ws.close(None).await;
                (rtts, 0)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((r, e)) = t.await {
            all.extend(r);
            errors += e;
        }
    }
    let secs = started
        .elapsed()
        .as_secs_f64()
        .min(seconds as f64)
        .max(0.001);
    all.sort();
    println!(
        "{{\"conns\":{conns},\"messages_per_s\":{:.0},\"p50_us\":{:.0},\"p99_us\":{:.0},\"errors\":{errors}}}",
        all.len() as f64 / secs,
        percentile(&all, 0.5),
        percentile(&all, 0.99)
    );
}
