//! The access log: one line per request, in nginx's combined format or as JSON, to
//! stdout or a file. Engine.IO polling requests are left out unless asked for (a
//! polling client makes one every few seconds).
//!
//! Lines go through a bounded queue to a writer task, so a slow disk never blocks a
//! request; lines that do not fit are counted as dropped.

use crate::config::LogFormat as Format;
use crate::counters::Counters;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const QUEUE: usize = 16 * 1024;
/// How often an idle writer looks whether corral is stopping.
const LOOK_EVERY: Duration = Duration::from_millis(200);

/// What one line says.
pub struct Entry<'a> {
    pub peer: SocketAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: Option<u64>,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub duration: Duration,
}

pub struct AccessLog {
    format: Format,
    pub engineio: bool,
    tx: mpsc::SyncSender<String>,
    metrics: Arc<Counters>,
}

impl AccessLog {
    /// Starts the writer; `path` "-" is stdout.
    pub fn start(
        path: &str,
        format: Format,
        engineio: bool,
        metrics: Arc<Counters>,
        life: &crate::runtime::life::Life,
    ) -> Result<AccessLog, crate::observe::Error> {
        let mut out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|cause| crate::observe::Error::AccessLog {
                        path: path.to_string(),
                        cause,
                    })?,
            )
        };
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        // Ends when every sender is gone, or when `life` drains (after the client
        // connections, which write the lines) with what was queued written.
        let draining = life.clone();
        let writer = move || {
            let mut buf = std::io::BufWriter::new(&mut out);
            loop {
                let line = match rx.recv_timeout(LOOK_EVERY) {
                    Ok(line) => line,
                    Err(mpsc::RecvTimeoutError::Timeout) if !draining.is_draining() => continue,
                    Err(_) => break,
                };
                let _ = buf.write_all(line.as_bytes());
                while let Ok(more) = rx.try_recv() {
                    let _ = buf.write_all(more.as_bytes());
                }
                let _ = buf.flush();
            }
        };
        life.thread("corral-access-log".into(), writer)
            .map_err(|cause| crate::observe::Error::AccessLog {
                path: path.to_string(),
                cause,
            })?;
        Ok(AccessLog {
            format,
            engineio,
            tx,
            metrics,
        })
    }

    pub fn log(&self, e: &Entry<'_>) {
        let line = match self.format {
            Format::Combined => combined(e),
            Format::Json => json(e),
        };
        if self.tx.try_send(line).is_err() {
            self.metrics
                .access_log_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn quote(s: Option<&str>) -> String {
    match s {
        Some(s) => s.replace('\\', "\\\\").replace('"', "\\\""),
        None => "-".into(),
    }
}

/// `ip - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 2326 "ref" "ua"`
fn combined(e: &Entry<'_>) -> String {
    format!(
        "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\"\n",
        e.peer.ip(),
        clf_time(SystemTime::now()),
        e.method,
        quote(Some(e.target)),
        e.version,
        e.status,
        e.bytes.map_or("-".to_string(), |b| b.to_string()),
        quote(e.referer),
        quote(e.user_agent),
    )
}

fn json(e: &Entry<'_>) -> String {
    let v = serde_json::json!({
        "time": clf_time(SystemTime::now()),
        "remote_addr": e.peer.ip().to_string(),
        "method": e.method,
        "target": e.target,
        "protocol": e.version,
        "status": e.status,
        "bytes": e.bytes,
        "referer": e.referer,
        "user_agent": e.user_agent,
        "duration_ms": e.duration.as_secs_f64() * 1000.0,
    });
    format!("{v}\n")
}

/// `10/Oct/2000:13:55:36 +0000`, in UTC: the fields of an HTTP date
/// (`Tue, 10 Oct 2000 13:55:36 GMT`, fixed width) in the Common Log Format's order.
pub fn clf_time(t: SystemTime) -> String {
    let http = httpdate::fmt_http_date(t);
    let field = |r: std::ops::Range<usize>| http.get(r).unwrap_or("?");
    format!(
        "{}/{}/{}:{} +0000",
        field(5..7),
        field(8..11),
        field(12..16),
        field(17..25)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn clf_dates() {
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(971_186_136);
        assert_eq!(clf_time(t), "10/Oct/2000:13:55:36 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_164_800); // 2024-02-29
        assert_eq!(clf_time(leap), "29/Feb/2024:00:00:00 +0000");
    }

    #[test]
    fn combined_line() {
        let e = Entry {
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            method: "GET",
            target: "/a?\"b\"",
            version: "HTTP/1.1",
            status: 200,
            bytes: Some(12),
            referer: None,
            user_agent: Some("curl/8"),
            duration: Duration::from_millis(3),
        };
        let line = combined(&e);
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(
            line.ends_with("\"GET /a?\\\"b\\\" HTTP/1.1\" 200 12 \"-\" \"curl/8\"\n"),
            "{line}"
        );
    }
}
