//! `wsbench feed`: the relay benchmark's client (see the top of wsbench.rs).

use futures_util::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Socket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// The client TLS settings trusting only `WSBENCH_CA`'s certificate.
fn tls() -> Option<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    let file = std::env::var("WSBENCH_CA").ok()?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(&file).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn open(url: &str, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Socket, String> {
    let (secure, rest) = match (url.strip_prefix("wss://"), url.strip_prefix("ws://")) {
        (Some(rest), _) => (true, rest),
        (_, Some(rest)) => (false, rest),
        _ => return Err(format!("not a ws:// or wss:// URL: {url}")),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let io: Box<dyn Io> = if secure {
        let connector = tls.ok_or("wss:// needs WSBENCH_CA")?;
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        Box::new(
            connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?,
        )
    } else {
        Box::new(stream)
    };
    let (ws, _) = tokio_tungstenite::client_async(url, io)
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    Ok(ws)
}

/// User and system clock ticks of `pid` and of its children.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = |p: &str| -> Option<(u64, u64, u32)> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            f.get(11)?.parse().ok()?,
            f.get(12)?.parse().ok()?,
            f.get(1)?.parse().ok()?,
        ))
    };
    let (mut user, mut sys) = stat(&pid.to_string()).map_or((0, 0), |s| (s.0, s.1));
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some((u, s, ppid)) = stat(&name) {
            if ppid == pid {
                user += u;
                sys += s;
            }
        }
    }
    (user, sys)
}

/// Nanoseconds the scheduler counted for the kernel's own workers (`kworker`,
/// `ksoftirqd`), from each thread's `schedstat`: where a proxy that hands its
/// forwarding to the kernel has it done.
fn kernel_worker_ns() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !(comm.starts_with("kworker") || comm.starts_with("ksoftirqd")) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Resident KiB of `pid` and of its children.
fn rss_kib(pid: u32) -> u64 {
    let rss = |p: &str| -> Option<(u64, u32)> {
        let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        let field = |k: &str| s.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
        let kib = field("VmRSS:")?
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .ok()?;
        Some((kib, field("PPid:")?.parse().ok()?))
    };
    let mut total = rss(&pid.to_string()).map_or(0, |s| s.0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some((kib, ppid)) = rss(&name) {
            if ppid == pid {
                total += kib;
            }
        }
    }
    total
}

pub async fn run(url: &str, conns: usize, seconds: u64, rate: f64) {
    let tls = tls();
    let every_us = (conns as f64 * 1e6 / rate.max(1.0)).round() as u64;
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = Arc::new(format!("{url}{sep}every_us={every_us}"));
    let mut sockets = Vec::with_capacity(conns);
    let mut opening = futures_util::stream::iter(0..conns)
        .map(|_| {
            let (url, tls) = (url.clone(), tls.clone());
            async move { open(&url, tls.as_ref()).await }
        })
        .buffer_unordered(32);
    let mut failed = 0;
    while let Some(ws) = opening.next().await {
        match ws {
            Ok(ws) => sockets.push(ws),
            Err(e) => {
                if failed == 0 {
                    eprintln!("wsbench: {e}");
                }
                failed += 1;
            }
        }
    }
    // Settle: every feed running, the first frames' queues drained.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid: Option<u32> = std::env::var("PROXY_PID").ok().and_then(|p| p.parse().ok());
    let ticks0 = pid.map(cpu_ticks);
    // Work a proxy hands to the kernel runs in its workers, charged to no proxy.
    let kernel0 = kernel_worker_ns();
    let from = now_ns();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut late = Vec::new();
                let mut errors = 0;
                loop {
                    match tokio::time::timeout_at(deadline, ws.next()).await {
                        Err(_) => break,
                        Ok(Some(Ok(Message::Binary(b)))) if b.len() >= 8 => {
                            let mut sent = [0u8; 8];
                            sent.copy_from_slice(&b[..8]);
                            let sent = u64::from_be_bytes(sent);
                            if sent >= from {
                                late.push(now_ns().saturating_sub(sent));
                            }
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (late, errors, ws)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut open = Vec::new();
    for r in readers {
        if let Ok((late, e, ws)) = r.await {
            all.extend(late);
            errors += e;
            open.push(ws);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = match (pid, ticks0) {
        (Some(p), Some(t0)) => {
            let (u1, s1) = cpu_ticks(p);
            let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            let user = u1.saturating_sub(t0.0) as f64 / tck;
            let sys = s1.saturating_sub(t0.1) as f64 / tck;
            let per_frame = |s: f64| s * 1e6 / (all.len().max(1) as f64);
            format!(
                ",\"cpu_s\":{:.3},\"cpu_us_per_frame\":{:.3},\"user_us_per_frame\":{:.3},\"sys_us_per_frame\":{:.3},\"rss_kib\":{}",
                user + sys,
                per_frame(user + sys),
                per_frame(user),
                per_frame(sys),
                rss_kib(p)
            )
        }
        _ => String::new(),
    };
    let kernel = format!(
        ",\"kernel_us_per_frame\":{:.3}",
        kernel_worker_ns().saturating_sub(kernel0) as f64 / 1e3 / (all.len().max(1) as f64)
    );
    for mut ws in open {
        let _ = ws.close(None).await;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
        }
    };
    println!(
        "{{\"conns\":{},\"failed\":{failed},\"errors\":{errors},\"frames\":{},\"frames_per_s\":{:.0},\"p50_us\":{:.0},\"p99_us\":{:.0}{cpu}{kernel}}}",
        conns - failed,
        all.len(),
        all.len() as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
}
