//! Shared parts of the socket-level tests: corral started as its own process from a
//! config written for the test, on port 0, its bound addresses and readiness asked
//! of its admin socket (`addresses`); and a raw HTTP/1.1 worker served in-process
//! that records exactly the bytes it received and can echo, answer early, delay or
//! close.
//!
//! Everything listens on 127.0.0.1 only, and every wait is bounded.
#![allow(dead_code)]

pub mod relay;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A directory of the test's own files, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// corral running as a child process; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Corral {
    pub child: Child,
    /// The first listener's bound address.
    pub addr: SocketAddr,
    /// Every listener's, in the config's order (`listen` first, then `[[listener]]`).
    pub listeners: Vec<SocketAddr>,
    /// The status listener's, with `[admin]`.
    pub status: Option<SocketAddr>,
    pub dir: TempDir,
    pub log: PathBuf,
}

impl Corral {
    /// Starts corral with `config` (TOML without `listen`, which is added: port 0)
    /// and waits until it says it is ready.
    pub fn start(config: &str) -> Corral {
        Corral::start_with(config, |_| {})
    }

    /// As `start`, letting the caller adjust the command (environment, wrapper).
    pub fn start_with(config: &str, adjust: impl FnOnce(&mut Command)) -> Corral {
        Corral::start_until(config, "corral ready", adjust)
    }

    /// As `start`, but returns once the admin socket tells the addresses, before
    /// any worker is ready.
    pub fn start_unready(config: &str) -> Corral {
        Corral::start_until(config, "", |_| {})
    }

    /// The supervised workers as the admin socket's `status` tells them (id, pid,
    /// port, state, restarts, ...).
    pub fn workers(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.admin("status")).unwrap_or_default()
    }

    /// Waits (up to `limit`) until `pred` holds of the supervised workers; returns
    /// them as they were then.
    pub fn wait_workers(
        &self,
        limit: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let workers = self.workers();
            if pred(&workers) {
                return workers;
            }
            assert!(
                Instant::now() < deadline,
                "workers never as expected: {workers:?}: {}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// As `start`, but waits until `marker` appears in the log instead of for
    /// readiness (the addresses are known either way).
    pub fn start_until(config: &str, marker: &str, adjust: impl FnOnce(&mut Command)) -> Corral {
        let dir = TempDir::new("corral");
        let text = format!(
            "listen = [\"127.0.0.1:0\"]\nadmin_socket = \"{}\"\n{config}",
            dir.0.join("admin.sock").display()
        );
        let path = dir.file("corral.toml", &text);
        let log = dir.0.join("corral.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
        cmd.args(["run", "-c"])
            .arg(&path)
            .env("CORRAL_LOG", "corral=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        adjust(&mut cmd);
        let child = cmd.spawn().expect("start corral");
        let mut c = Corral {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            listeners: Vec::new(),
            status: None,
            dir,
            log,
        };
        c.wait_ready(marker);
        c
    }

    /// Waits until the admin socket tells the addresses and, for "corral ready",
    /// that corral is ready; for any other marker, until the log shows it.
    fn wait_ready(&mut self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("corral exited ({status}): {}", self.log_text());
            }
            if let Some(told) = self.addresses() {
                let ready = match marker {
                    "corral ready" => told["ready"] == true,
                    marker => self.log_text().contains(marker),
                };
                let addrs = |v: &serde_json::Value| v.as_str().and_then(|a| a.parse().ok());
                self.listeners = told["listeners"]
                    .as_array()
                    .map(|l| l.iter().filter_map(addrs).collect())
                    .unwrap_or_default();
                self.status = addrs(&told["status"]);
                if let (true, Some(first)) = (ready, self.listeners.first()) {
                    self.addr = *first;
                    return;
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("corral did not start: {}", self.log_text());
    }

    /// Writes the config file again (`config` as given to `start`; the listener
    /// and admin socket lines are kept), for a reload to read.
    pub fn rewrite(&self, config: &str) {
        let path = self.dir.0.join("corral.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let head: Vec<&str> = text.lines().take(2).collect();
        std::fs::write(&path, format!("{}\n{config}", head.join("\n"))).expect("rewrite");
    }

    /// Writes the config file again with other listeners: `listen` (a TOML
    /// line) in place of the first line, the admin socket's line kept.
    pub fn rewrite_listen(&self, listen: &str, config: &str) {
        let path = self.dir.0.join("corral.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let admin = text.lines().nth(1).expect("admin socket line");
        std::fs::write(&path, format!("{listen}\n{admin}\n{config}")).expect("rewrite");
    }

    /// The listeners and status listener the admin socket tells now.
    pub fn bound_now(&self) -> (Vec<SocketAddr>, Option<SocketAddr>) {
        let told = self.addresses().expect("addresses");
        let addrs = |v: &serde_json::Value| v.as_str().and_then(|a| a.parse().ok());
        let listeners = told["listeners"]
            .as_array()
            .map(|l| l.iter().filter_map(addrs).collect())
            .unwrap_or_default();
        (listeners, addrs(&told["status"]))
    }

    /// The admin socket's answer to `command` (up to a minute).
    pub fn admin(&self, command: &str) -> String {
        let socket = self.dir.0.join("admin.sock");
        admin_command(&socket, command, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no answer to `{command}`: {}", self.log_text()))
    }

    /// What the admin socket's `addresses` says, once it answers.
    fn addresses(&self) -> Option<serde_json::Value> {
        addresses(&self.dir.0.join("admin.sock"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: a plain signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits up to `limit` for corral to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The status listener's `/metrics` text (the config needs `[admin] listen`).
    pub fn metrics(&self) -> String {
        let status = self.status.expect("a status listener ([admin] listen)");
        let ask = b"GET /metrics HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n";
        exchange(status, ask).map(|r| r.text()).unwrap_or_default()
    }

    /// One sample of `/metrics` whose line starts with `name` (and a space or `{`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                ' ' => rest,
                '{' => &rest[rest.find('}')? + 1..],
                _ => return None,
            };
            value.trim().parse().ok()
        })
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect to corral");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    }
}

/// What a corral's admin socket at `admin` says to `addresses` (where it is bound,
/// whether it is ready); None until it answers.
pub fn addresses(admin: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&admin_command(admin, "addresses", Duration::from_secs(5))?).ok()
}

/// Sends one command to the admin socket at `admin`; its answer, within `wait`.
pub fn admin_command(admin: &Path, command: &str, wait: Duration) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(admin).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.write_all(format!("{command}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    Some(reply)
}

impl Drop for Corral {
    fn drop(&mut self) {
        self.terminate();
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request as the raw worker read it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which connection (in accept order, from 0) carried it.
    pub conn: usize,
    /// The head, as received.
    pub head: String,
    /// The body, decoded from its framing.
    pub body: Vec<u8>,
    /// The request ended before its framing said it would.
    pub aborted: bool,
}

impl Seen {
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.head, name)
    }
}

fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// How the raw worker answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads each request whole, then answers 200 with the body it received.
    Echo,
    /// Answers 200 right after the head, then reads the body (as its framing says)
    /// before the next request, as a well-behaved server does.
    AnswerEarly,
    /// Reads the request, waits this long, answers.
    Delay(Duration),
    /// Answers the first request of each connection, then closes the connection
    /// without answering the second.
    CloseSecond,
    /// As `Echo`, but the first this-many requests for `/health` wait 2 s first (a
    /// slow but live worker, as seen by a health check with a short timeout).
    SlowHealth(usize),
    /// Upgrades `Upgrade: websocket` requests (101) and echoes each message back as
    /// a server frame; other requests as `Echo`.
    WebSocket,
    /// As `WebSocket`, with a text frame "hello" in the same write as the 101.
    WebSocketHello,
    /// Answers requests for `/canned…` with these bytes as they are (closing the
    /// connection after them when the flag says so); other requests as `Echo`.
    Canned(&'static [u8], bool),
}

/// An HTTP/1.1 worker on a raw socket that records every request it reads.
pub struct RawWorker {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    conns: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl RawWorker {
    pub fn start(mode: Mode) -> RawWorker {
        RawWorker::start_on("127.0.0.1:0".parse().expect("addr"), mode)
    }

    /// As `start`, on a given address.
    pub fn start_on(addr: SocketAddr, mode: Mode) -> RawWorker {
        let listener = TcpListener::bind(addr).expect("bind worker");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (s, c, o) = (seen.clone(), conns.clone(), open.clone());
        let health = Arc::new(AtomicUsize::new(0));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let id = c.fetch_add(1, Ordering::SeqCst);
                let (s, h, o) = (s.clone(), health.clone(), o.clone());
                o.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    serve(stream, id, mode, s, h);
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RawWorker {
            addr,
            seen,
            conns,
            open,
        }
    }

    /// Every request read so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Requests for `target`.
    pub fn seen_for(&self, target: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.target() == target)
            .collect()
    }

    /// Connections accepted (health checks included).
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Connections open now (until the peer closes them).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no connection to the worker is open, up to `limit`; whether none is.
    pub fn wait_all_closed(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.open_connections() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits until `pred` holds over what was seen (up to 5 s).
    pub fn wait_for(&self, pred: impl Fn(&[Seen]) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if pred(&self.seen()) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn serve(
    stream: TcpStream,
    conn: usize,
    mode: Mode,
    seen: Arc<Mutex<Vec<Seen>>>,
    health: Arc<AtomicUsize>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut r = BufReader::new(stream);
    let mut n = 0;
    loop {
        let Some(head) = read_head(&mut r) else {
            return;
        };
        n += 1;
        if mode == Mode::CloseSecond && n == 2 {
            // Closed unanswered, its body unread: recorded as aborted.
            record(&seen, conn, head, Vec::new(), true);
            return;
        }
        if mode == Mode::AnswerEarly && answer(&mut out, b"early").is_err() {
            return;
        }
        let hello = mode == Mode::WebSocketHello;
        if (mode == Mode::WebSocket || hello) && header_of(&head, "upgrade").is_some() {
            record(&seen, conn, head.clone(), Vec::new(), false);
            websocket_echo(r, out, &head, hello);
            return;
        }
        let (body, complete) = read_body(&mut r, &head);
        record(&seen, conn, head.clone(), body.clone(), !complete);
        if !complete {
            return;
        }
        if let Mode::Delay(d) = mode {
            thread::sleep(d);
        }
        if let Mode::SlowHealth(n) = mode {
            if head.starts_with("GET /health ") && health.fetch_add(1, Ordering::SeqCst) < n {
                thread::sleep(Duration::from_secs(2));
            }
        }
        if let Mode::Canned(bytes, close) = mode {
            if head
                .split(' ')
                .nth(1)
                .is_some_and(|t| t.starts_with("/canned"))
            {
                if out.write_all(bytes).is_err() || close {
                    return;
                }
                continue;
            }
        }
        if mode != Mode::AnswerEarly && answer(&mut out, &body).is_err() {
            return;
        }
    }
}

/// The 101 for `head` (and with `hello`, a text frame "hello" in the same write),
/// then every client frame back unmasked until the client closes (a close frame is
/// answered with a close frame).
fn websocket_echo(mut r: BufReader<TcpStream>, mut out: TcpStream, head: &str, hello: bool) {
    use base64::Engine as _;
    use sha1::Digest as _;
    let key = header_of(head, "sec-websocket-key").unwrap_or("");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    let mut reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    if hello {
        reply.extend_from_slice(b"\x81\x05hello");
    }
    if out.write_all(&reply).is_err() {
        return;
    }
    loop {
        let mut h = [0u8; 2];
        if r.read_exact(&mut h).is_err() {
            return;
        }
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut e = [0u8; 2];
            if r.read_exact(&mut e).is_err() {
                return;
            }
            len = u16::from_be_bytes(e) as u64;
        } else if len == 127 {
            let mut e = [0u8; 8];
            if r.read_exact(&mut e).is_err() {
                return;
            }
            len = u64::from_be_bytes(e);
        }
        let mut mask = [0u8; 4];
        if h[1] & 0x80 != 0 && r.read_exact(&mut mask).is_err() {
            return;
        }
        let mut payload = vec![0u8; len.min(1 << 20) as usize];
        if r.read_exact(&mut payload).is_err() {
            return;
        }
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        // "flood": frames of every header form, each in its own write, until the
        // client is gone; "burst": a hundred small frames in one write.
        if payload == b"flood" {
            return websocket_flood(out);
        }
        if payload == b"reset" {
            // Closed with a reset (SO_LINGER 0), as a crashed worker's socket.
            use std::os::fd::AsRawFd;
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            unsafe {
                libc::setsockopt(
                    out.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            return;
        }
        if payload == b"burst" {
            let burst: Vec<u8> = (0..100u8).flat_map(|i| [0x82, 1, i]).collect();
            if out.write_all(&burst).is_err() {
                return;
            }
            continue;
        }
        let mut frame = vec![h[0]];
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(&payload);
        if out.write_all(&frame).is_err() || h[0] & 0x0f == 0x8 {
            return;
        }
    }
}

/// The sizes `websocket_flood` cycles through (every header form); frame `n` is
/// `FLOOD_SIZES[n % len]` bytes of `n as u8`.
pub const FLOOD_SIZES: [usize; 5] = [70_000, 3, 200, 130_000, 126];

fn websocket_flood(mut out: TcpStream) {
    // Bounded: about 20 GB, far more than a test reads.
    for n in 0..100_000usize {
        let len = FLOOD_SIZES[n % FLOOD_SIZES.len()];
        let mut frame = vec![0x82];
        match len {
            0..=125 => frame.push(len as u8),
            126..=65535 => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.resize(frame.len() + len, n as u8);
        if out.write_all(&frame).is_err() {
            return;
        }
    }
}

fn record(seen: &Mutex<Vec<Seen>>, conn: usize, head: String, body: Vec<u8>, aborted: bool) {
    seen.lock().expect("seen").push(Seen {
        conn,
        head,
        body,
        aborted,
    });
}

fn answer(out: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body)
}

/// The request head up to and including the blank line, or None at EOF.
fn read_head(r: &mut impl BufRead) -> Option<String> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            if head.len() == line.len() {
                // Stray blank line between requests.
                head.clear();
                continue;
            }
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        if head.len() > 1 << 20 {
            return None;
        }
    }
}

/// Reads the body as the head frames it; returns it and whether it was complete.
fn read_body(r: &mut impl BufRead, head: &str) -> (Vec<u8>, bool) {
    let chunked = header_of(head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked(r);
    }
    let len: usize = header_of(head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = Vec::with_capacity(len.min(1 << 20));
    let got = r
        .take(len as u64)
        .read_to_end(&mut body)
        .unwrap_or(body.len());
    (body, got == len)
}

fn read_chunked(r: &mut impl BufRead) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return (body, false);
        }
        let size = line.trim().split(';').next().unwrap_or("");
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return (body, false);
        };
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t).unwrap_or(0) == 0 {
                    return (body, false);
                }
                if t == "\r\n" {
                    return (body, true);
                }
            }
        }
        let mut chunk = vec![0u8; size];
        if r.read_exact(&mut chunk).is_err() {
            return (body, false);
        }
        body.extend_from_slice(&chunk);
        let mut crlf = [0u8; 2];
        if r.read_exact(&mut crlf).is_err() || &crlf != b"\r\n" {
            return (body, false);
        }
    }
}

/// A response read off a raw client socket.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.head, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (Content-Length, chunked, or to EOF) from `r`.
pub fn read_reply(r: &mut impl BufRead) -> Option<Reply> {
    let head = read_head(r)?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = header_of(&head, "transfer-encoding").is_some();
    let body = if chunked {
        read_chunked(r).0
    } else if let Some(len) = header_of(&head, "content-length").and_then(|v| v.parse().ok()) {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).ok()?;
        body
    } else if status == 101 || status == 204 || status == 304 {
        Vec::new()
    } else {
        let mut body = Vec::new();
        let _ = r.read_to_end(&mut body);
        body
    };
    Some(Reply { status, head, body })
}

/// Sends `bytes` on a new connection to `addr` and reads one response.
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Reply> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(bytes).ok()?;
    read_reply(&mut BufReader::new(s))
}

/// An htpasswd file with one `{SHA}` user.
pub fn htpasswd(dir: &TempDir, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    use sha1::Digest as _;
    let digest = sha1::Sha1::digest(password.as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
    dir.file("htpasswd", &format!("{user}:{{SHA}}{b64}\n"))
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A TLS client that trusts only the certificates in `pem`.
pub fn tls_trusting(pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
