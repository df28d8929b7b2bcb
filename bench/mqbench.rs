//! Message queue benchmark client: PUBLISH throughput and fan-out, against any
//! Redis-protocol server, so corral's broker and redis-server are measured the same
//! way in one run.
//!
//!     mqbench --port 6379 --subscribers 100 --messages 20000 --size 256
//!
//! Prints one JSON line: publishes/s (all replies received) and deliveries/s (until
//! every subscriber has every message).

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    port: u16,
    subscribers: usize,
    messages: usize,
    size: usize,
    pipeline: usize,
}

fn args() -> Args {
    let mut a = Args {
        port: 6379,
        subscribers: 0,
        messages: 100_000,
        size: 64,
        pipeline: 64,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i + 1 < argv.len() {
        let v: usize = argv[i + 1].parse().unwrap_or_else(|_| {
            eprintln!("{}: expected a number", argv[i]);
            std::process::exit(2)
        });
        match argv[i].as_str() {
            "--port" => a.port = v as u16,
            "--subscribers" => a.subscribers = v,
            "--messages" => a.messages = v,
            "--size" => a.size = v,
            "--pipeline" => a.pipeline = v.max(1),
            other => {
                eprintln!("unknown option {other}");
                std::process::exit(2)
            }
        }
        i += 2;
    }
    a
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads until `expected` bytes have arrived (messages have a fixed framed size).
async fn drain(mut s: TcpStream, expected: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < expected {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("subscriber closed"));
        }
        got += n;
    }
    Ok(())
}

/// Counts complete replies (lines starting with ':') for pipelined PUBLISHes.
async fn read_replies(s: &mut TcpStream, mut want: usize, buf: &mut [u8]) -> std::io::Result<()> {
    while want > 0 {
        let n = s.read(buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("publisher closed"));
        }
        want = want.saturating_sub(buf[..n].iter().filter(|b| **b == b'\n').count());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let a = args();
    let channel = b"bench-channel";
    let payload = vec![b'm'; a.size];
    let frame = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{}\r\n${}\r\n",
        channel.len(),
        std::str::from_utf8(channel).unwrap_or("bench-channel"),
        a.size
    )
    .len()
        + a.size
        + 2;
    let confirm = format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\nbench-channel\r\n:1\r\n",
        channel.len()
    )
    .len();

    let mut readers = Vec::new();
    for _ in 0..a.subscribers {
        let mut s = TcpStream::connect(("127.0.0.1", a.port)).await?;
        s.set_nodelay(true)?;
        s.write_all(&command(&[b"SUBSCRIBE", channel])).await?;
        let mut c = vec![0u8; confirm];
        s.read_exact(&mut c).await?;
        readers.push(s);
    }
    let expected = frame * a.messages;
    let started = Instant::now();
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|s| tokio::spawn(drain(s, expected)))
        .collect();

    let mut p = TcpStream::connect(("127.0.0.1", a.port)).await?;
    p.set_nodelay(true)?;
    let one = command(&[b"PUBLISH", channel, &payload]);
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < a.messages {
        let batch = a.pipeline.min(a.messages - sent);
        let mut out = Vec::with_capacity(one.len() * batch);
        for _ in 0..batch {
            out.extend_from_slice(&one);
        }
        p.write_all(&out).await?;
        read_replies(&mut p, batch, &mut rbuf).await?;
        sent += batch;
    }
    let published = started.elapsed();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .map_err(|_| std::io::Error::other("subscribers timed out"))??
            .map_err(|e| std::io::Error::other(format!("subscriber: {e}")))?;
    }
    let delivered = started.elapsed();
    println!(
        "{{\"subscribers\":{},\"messages\":{},\"size\":{},\"publish_per_s\":{:.0},\"deliveries_per_s\":{:.0},\"seconds\":{:.3}}}",
        a.subscribers,
        a.messages,
        a.size,
        a.messages as f64 / published.as_secs_f64(),
        (a.messages * a.subscribers) as f64 / delivered.as_secs_f64(),
        delivered.as_secs_f64()
    );
    Ok(())
}
