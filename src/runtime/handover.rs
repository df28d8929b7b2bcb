//! The hand-over of an in-place upgrade (docs/upgrade.md): what the running corral
//! writes down for the image it execs into, in one versioned format, and how the
//! new image reads it back. Descriptors cross the `execve` by number: the writer
//! clears their close-on-exec flag, the reader claims each number once and sets it
//! again, so nothing carried leaks into the workers the new image forks.
//!
//! It owns the format, its memfd and environment variable, and the descriptors'
//! inheritance. What each part carries is that part's to give and to take back; a
//! leaf, it knows none of them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The hand-over format this build writes and reads. A change to [`Handover`] that
/// an image of the previous format could not read raises it.
pub const FORMAT: u32 = 1;

/// What a probe (`corral upgrade-probe …`) prints first: this word, the format
/// and the version.
const PROBE_WORD: &str = "corral-handover";

/// The environment variable that gives the new image the hand-over's descriptor.
const ENV: &str = "CORRAL_HANDOVER";

/// Everything the running corral carries into the new image.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Handover {
    /// [`FORMAT`] of the image that wrote it.
    pub format: u32,
    /// The version of the image that wrote it (`corral --version`).
    pub from: String,
    /// The client listeners.
    pub listeners: Vec<Listener>,
    /// The supervised workers, in slot order.
    pub workers: Vec<Worker>,
    /// The next worker slot's index (`CORRAL_WORKER_ID`).
    pub next_index: usize,
    /// The Engine.IO session table.
    pub sessions: Vec<Session>,
    /// The sid tags' signing key, where it was made at random (none configured).
    pub tag_key: Option<Vec<u8>>,
    /// The embedded broker's client connections.
    pub broker_clients: Vec<BrokerClient>,
    /// The cleartext websocket tunnels.
    pub tunnels: Vec<Tunnel>,
    /// The cleartext HTTP/1.1 client connections, between two requests.
    pub connections: Vec<Connection>,
    /// What this upgrade did not carry, by kind, as the image that wrote it saw it.
    pub closed: std::collections::BTreeMap<String, u64>,
    /// The upgrades before this one, oldest first (for the status page).
    pub upgrades: Vec<Record>,
    /// Other listening sockets, by what they serve (`broker`).
    pub sockets: std::collections::BTreeMap<String, RawFd>,
    /// The numbers it names, as read.
    #[serde(skip)]
    named: BTreeSet<RawFd>,
    /// Numbers already claimed by the reader.
    #[serde(skip)]
    claimed: BTreeSet<RawFd>,
}

/// A client listener: every socket of it (one a serving thread).
#[derive(Debug, Serialize, Deserialize)]
pub struct Listener {
    /// As configured: the new image's config finds it by this.
    pub address: SocketAddr,
    /// As bound (a configured port 0 made a real one).
    pub bound: SocketAddr,
    /// Its listening sockets.
    pub sockets: Vec<RawFd>,
}

/// A client connection of the embedded broker.
#[derive(Debug, Serialize, Deserialize)]
pub struct BrokerClient {
    /// Its socket.
    pub socket: RawFd,
    /// Bytes read and not yet run: a command read in part.
    pub unread: Vec<u8>,
    /// Output queued and not yet written.
    pub unsent: Vec<u8>,
    /// It speaks RESP3.
    pub resp3: bool,
    /// It has authenticated (or needs not).
    pub authenticated: bool,
    /// CLIENT REPLY: 0 on, 1 off, 2 skip the next.
    pub reply: u8,
    /// CLIENT SETNAME.
    pub name: Option<Vec<u8>>,
    /// Its channel subscriptions.
    pub channels: Vec<Vec<u8>>,
    /// Its pattern subscriptions.
    pub patterns: Vec<Vec<u8>>,
    /// Its shard channel subscriptions.
    pub shard: Vec<Vec<u8>>,
}

/// Where a websocket relay stood when an upgrade carried it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Relay {
    /// Read from the client, not yet written to the worker.
    pub to_worker: Vec<u8>,
    /// The client's side has ended (EOF read).
    pub up_eof: bool,
    /// The worker's side was shut down after it.
    pub up_done: bool,
    /// Read from the worker, not yet written to the client.
    pub to_client: Vec<u8>,
    /// The worker's side has ended.
    pub down_eof: bool,
    /// The client's side was shut down after it.
    pub down_done: bool,
    /// Where the worker-to-client bytes written so far stand in the frame stream.
    pub frame: Frame,
    /// Bytes from the client so far.
    pub bytes_up: u64,
    /// Bytes from the worker so far.
    pub bytes_down: u64,
    /// Idle checks passed without a byte.
    pub quiet: u32,
}

/// A position in a websocket frame stream: a frame head read in part, or the
/// payload bytes of the current frame still to come.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Frame {
    /// The head's bytes read so far.
    pub head: Vec<u8>,
    /// How many.
    pub have: usize,
    /// How long the head is (once its second byte is known).
    pub need: usize,
    /// Payload bytes of the current frame still to come.
    pub left: u64,
}

/// What one upgrade did, for the status page and the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// The version that carried.
    pub from: String,
    /// The version that took over.
    pub to: String,
    /// The binary that took over.
    pub binary: String,
    /// What was carried over, by kind (listeners, workers, sessions, tunnels,
    /// connections, broker clients).
    pub carried: std::collections::BTreeMap<String, u64>,
    /// What was closed instead, by kind and why (TLS tunnels sent 1012, requests
    /// still running after the drain period, broker clients whose output stalled).
    pub closed: std::collections::BTreeMap<String, u64>,
}

/// A client connection between two requests (or in the middle of a head).
#[derive(Debug, Serialize, Deserialize)]
pub struct Connection {
    /// Its socket.
    pub socket: RawFd,
    /// Bytes read from it and not yet used: the next request's, begun.
    pub early: Vec<u8>,
    /// The answer its request still waits for (a long-poll's), if any.
    pub waiting: Option<Waiting>,
}

/// A request in flight an upgrade carried: sent whole, its answer to be read from
/// its worker connection.
#[derive(Debug, Serialize, Deserialize)]
pub struct Waiting {
    /// The worker connection's socket.
    pub socket: RawFd,
    /// What was read of the answer so far.
    pub early: Vec<u8>,
    /// The worker's id in the pool.
    pub worker: usize,
    /// The session's sid.
    pub sid: Option<String>,
    /// The request was HTTP/1.0.
    pub http10: bool,
    /// The request asked for its connection to close after the answer.
    pub close: bool,
}

/// A websocket tunnel.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tunnel {
    /// The client's socket.
    pub client: RawFd,
    /// The worker's socket.
    pub worker: RawFd,
    /// The worker's id in the pool.
    pub worker_id: usize,
    /// Its Engine.IO session's sid, if it belongs to a remembered one.
    pub sid: Option<String>,
    /// It counts as a session of its worker without being remembered (a
    /// websocket-only session).
    pub counted: bool,
    /// Where its relay stood.
    pub relay: Relay,
}

/// An Engine.IO session.
#[derive(Debug, Serialize, Deserialize)]
pub struct Session {
    /// Its sid.
    pub sid: String,
    /// Its worker's id in the pool.
    pub worker: usize,
    /// How long it may stay idle.
    pub idle_ms: u64,
    /// How long ago a request of it was last answered.
    pub seen_ms_ago: u64,
    /// Its websocket closed (or is closed by the upgrade): it is kept only briefly
    /// unless it polls.
    pub tunnel_closed: bool,
}

/// A supervised worker slot.
#[derive(Debug, Serialize, Deserialize)]
pub struct Worker {
    /// Its id in the pool (the tag its sessions' sids carry).
    pub id: usize,
    /// The slot's index (`CORRAL_WORKER_ID`, `{id}`).
    pub index: usize,
    /// Its port.
    pub port: u16,
    /// Its process (None: between a crash and its restart).
    pub pid: Option<u32>,
    /// How often it was restarted.
    pub restarts: u64,
    /// The read ends of its stdout and stderr pipes.
    pub output: Vec<RawFd>,
}

/// The line a probe prints.
pub fn probe_answer(version: &str) -> String {
    format!("{PROBE_WORD} {FORMAT} {version}")
}

/// Reads a probe's first line: the version of a binary speaking this format, or
/// why it is not one.
pub fn read_probe_answer(line: &str) -> Result<String, String> {
    let mut words = line.trim_end().splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some(PROBE_WORD), Some(n), version) if n == FORMAT.to_string() => {
            Ok(version.unwrap_or("").to_string())
        }
        (Some(PROBE_WORD), Some(n), _) => Err(format!(
            "it speaks hand-over format {n}, this corral speaks {FORMAT}"
        )),
        _ => Err("it did not answer as a corral that can take over".into()),
    }
}

/// What the writer keeps open until the exec: the descriptors it carries.
#[derive(Default)]
pub struct Carried {
    fds: Vec<OwnedFd>,
}

impl Carried {
    /// Carries a duplicate of `fd` (the part keeps its own) and returns its number.
    pub fn dup(&mut self, fd: &impl std::os::fd::AsFd) -> std::io::Result<RawFd> {
        let copy = fd.as_fd().try_clone_to_owned()?;
        let raw = copy.as_raw_fd();
        self.fds.push(copy);
        Ok(raw)
    }

    /// As `dup`, for each of `fds`.
    pub fn dup_all<F: std::os::fd::AsFd>(&mut self, fds: &[F]) -> std::io::Result<Vec<RawFd>> {
        fds.iter().map(|fd| self.dup(fd)).collect()
    }

    /// Writes `handover` where the new image finds it and makes every carried
    /// descriptor inheritable; returns the environment entry that names it. Until
    /// the exec, dropping `self` undoes it (the duplicates are closed).
    pub fn prepare(&mut self, handover: &Handover) -> std::io::Result<String> {
        let text = serde_json::to_vec(handover).map_err(std::io::Error::other)?;
        let memfd = memfd(&text)?;
        let entry = format!("{ENV}={}", memfd.as_raw_fd());
        self.fds.push(memfd);
        for fd in &self.fds {
            set_cloexec(fd.as_raw_fd(), false)?;
        }
        Ok(entry)
    }
}

/// A memfd holding `bytes`, inherited across exec, read from its start.
fn memfd(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::{Seek, Write};
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new
    // descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"corral-handover".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just made, owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file.into())
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor number change only its flag; a
    // number that is not open fails with EBADF.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = match on {
            true => flags | libc::FD_CLOEXEC,
            false => flags & !libc::FD_CLOEXEC,
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The hand-over this image was given, if it was exec'd by an upgrade; the
/// environment variable is removed (the workers must not see it). Called at the
/// start, before any thread. Every descriptor it names is made close-on-exec
/// again at once.
pub fn take_from_env() -> Option<Result<Handover, String>> {
    let value = std::env::var(ENV).ok()?;
    std::env::remove_var(ENV);
    Some(read(&value))
}

fn read(value: &str) -> Result<Handover, String> {
    use std::io::Read;
    let fd: RawFd = value
        .parse()
        .map_err(|_| format!("{ENV}={value} is not a descriptor number"))?;
    set_cloexec(fd, true).map_err(|e| format!("{ENV}={value}: {e}"))?;
    // SAFETY: the number was checked open above and was made for this image by the
    // one that exec'd it; nothing else owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("the hand-over cannot be read: {e}"))?;
    let mut handover: Handover =
        serde_json::from_str(&text).map_err(|e| format!("the hand-over cannot be read: {e}"))?;
    if handover.format != FORMAT {
        return Err(format!(
            "the hand-over is in format {}, this corral reads {FORMAT}",
            handover.format
        ));
    }
    handover.named = handover.numbers().into_iter().collect();
    for fd in &handover.named {
        let _ = set_cloexec(*fd, true);
    }
    Ok(handover)
}

impl Handover {
    /// A hand-over written by version `from`.
    pub fn new(
        from: &str,
        listeners: Vec<Listener>,
        workers: Vec<Worker>,
        next_index: usize,
    ) -> Self {
        Handover {
            format: FORMAT,
            from: from.into(),
            listeners,
            workers,
            next_index,
            ..Handover::default()
        }
    }

    /// Every descriptor number it names.
    fn numbers(&self) -> Vec<RawFd> {
        let listeners = self.listeners.iter().flat_map(|l| l.sockets.iter());
        let workers = self.workers.iter().flat_map(|w| w.output.iter());
        let others = self.sockets.values();
        let clients = self.broker_clients.iter().map(|c| &c.socket);
        let tunnels = self.tunnels.iter().flat_map(|t| [&t.client, &t.worker]);
        let connections = self
            .connections
            .iter()
            .flat_map(|c| std::iter::once(&c.socket).chain(c.waiting.as_ref().map(|w| &w.socket)));
        let all = listeners.chain(workers).chain(others).chain(clients);
        let all = all.chain(tunnels).chain(connections);
        all.copied().collect()
    }

    /// Takes ownership of carried descriptor `fd`: once, and only a number the
    /// hand-over names that is open.
    pub fn claim(&mut self, fd: RawFd) -> std::io::Result<OwnedFd> {
        let bad = |why: &str| std::io::Error::other(format!("descriptor {fd}: {why}"));
        if !self.named.contains(&fd) {
            return Err(bad("not in the hand-over"));
        }
        if !self.claimed.insert(fd) {
            return Err(bad("claimed twice"));
        }
        set_cloexec(fd, true)?;
        // SAFETY: open (checked above), named by the hand-over the image that
        // exec'd this one wrote for it, and claimed once.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Closes what no part claimed (a listener the new config dropped).
    pub fn close_unclaimed(&mut self) {
        let named: Vec<RawFd> = self.named.iter().copied().collect();
        for fd in named {
            if !self.claimed.contains(&fd) {
                drop(self.claim(fd));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_answer_is_read_by_format() {
        let said = probe_answer("0.9 (commit abc)");
        assert_eq!(read_probe_answer(&said), Ok("0.9 (commit abc)".into()));
        let other = format!("{PROBE_WORD} {} x", FORMAT + 1);
        assert!(read_probe_answer(&other)
            .unwrap_err()
            .contains("hand-over format"));
        assert!(read_probe_answer("upgrade-probe -c x").is_err());
        assert!(read_probe_answer("").is_err());
    }

    /// Written as the old image writes it and read as the new one reads it: the
    /// memfd and each descriptor are the same open files, each claimed once.
    #[test]
    fn a_handover_is_read_back_with_its_descriptors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let bound = listener.local_addr().expect("addr");
        let mut carried = Carried::default();
        let socket = carried.dup(&listener).expect("dup");
        let listeners = vec![Listener {
            address: "127.0.0.1:0".parse().expect("addr"),
            bound,
            sockets: vec![socket],
        }];
        let written = Handover::new("test", listeners, Vec::new(), 0);
        let entry = carried.prepare(&written).expect("prepared");
        let value = entry.split_once('=').expect("entry").1;
        let mut back = read(value).expect("read back");
        assert_eq!(back.listeners[0].bound, bound);
        let fd = back.claim(socket).expect("claimed");
        assert!(back.claim(socket).is_err(), "claimed twice");
        assert!(back.claim(9999).is_err(), "not named");
        std::mem::forget(carried);
        let again = std::net::TcpListener::from(fd);
        assert_eq!(again.local_addr().expect("addr"), bound);
    }
}
