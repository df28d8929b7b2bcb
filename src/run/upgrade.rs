//! The in-place upgrade (`corral upgrade`, docs/upgrade.md). The new binary is first
//! run as a probe (`NEW upgrade-probe ARGS…`, with the running corral's own
//! arguments): it must answer in this build's hand-over format, having read and
//! checked the config as a start would; anything else is refused and nothing has
//! changed. Then the running corral stops accepting (connections wait in the
//! listeners' backlogs), finishes what is in flight, writes the hand-over and execs
//! the new binary in the same process, which takes the listeners and the workers
//! back. An exec that fails falls back to this corral's own binary.
//!
//! It owns the order of the hand-over and its fall-back. Each part gives and takes
//! back what it carries (`Serving::carry`, `Supervisor::carry`); the format is
//! `runtime::handover`'s. It must not let go of anything before the probe answered.

use super::reload::Live;
use crate::admin;
use crate::edge::h1::{Given, Waiting, Writing};
use crate::edge::listen;
use crate::observe::metrics::Queue;
use crate::runtime::forker;
use crate::runtime::handover::{self, Carried, Handover};
use crate::runtime::life::Life;
use crate::transport::moving::PendingAnswer;
use crate::workers::supervisor::{Adopted, Hold};
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// `corral --version`: the version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CORRAL_COMMIT"),
    ")"
);

/// How long a probe may take: it reads the config and checks the machine as a
/// start does (a gunicorn's `--help` among it).
const PROBE_LIMIT: Duration = Duration::from_secs(30);

/// Most of a probe's output read: its answer is one short line.
const PROBE_OUTPUT: u64 = 4096;

/// Where this image came from: the binary an upgrade runs by default, and the
/// arguments the new image gets.
#[derive(Clone)]
pub struct Origin {
    exe: PathBuf,
    argv: Vec<OsString>,
}

impl Origin {
    /// This process's: read at the start, before the file may be replaced.
    pub fn here() -> Origin {
        Origin {
            exe: std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
            argv: std::env::args_os().collect(),
        }
    }

    /// The binary this image runs.
    pub fn exe(&self) -> &Path {
        &self.exe
    }
}

/// The upgrade as the admin socket asks for it.
#[derive(Clone)]
pub(super) struct Upgrader {
    pub(super) origin: Origin,
    pub(super) live: Arc<Live>,
    /// The client connections: drained alone before the exec.
    pub(super) serving: Life,
    /// Where the hand-over runs.
    pub(super) root: Life,
    /// The sid tags' key, where it was made at random: carried, so that the sids
    /// issued go on being read.
    pub(super) tag_key: Option<Vec<u8>>,
    /// An upgrade has been accepted and not given up: a second is refused.
    pub(super) begun: Arc<std::sync::atomic::AtomicBool>,
    /// The admin socket, once it listens.
    pub(super) admin: Arc<std::sync::OnceLock<std::os::fd::OwnedFd>>,
}

impl admin::Upgrade for Upgrader {
    fn upgrade(&self, binary: Option<PathBuf>) -> admin::Upgrading<'_> {
        Box::pin(async move {
            use std::sync::atomic::Ordering;
            let binary = binary.unwrap_or_else(|| self.origin.exe.clone());
            if self.begun.load(Ordering::Acquire) {
                return Err("an upgrade is already under way".into());
            }
            let to = probe(&binary, &self.origin.argv).await?;
            if self.begun.swap(true, Ordering::AcqRel) {
                return Err("an upgrade is already under way".into());
            }
            let said = format!(
                "upgrading pid {} from {VERSION} to {to} ({})",
                std::process::id(),
                binary.display()
            );
            let me = self.clone();
            let go: admin::HandOver = Box::new(move || {
                let root = me.root.clone();
                root.spawn(me.hand_over(binary, to));
            });
            Ok((said, go))
        })
    }
}

/// Runs `binary` as a probe with the running corral's arguments: the version it
/// answers with, or why it cannot take over.
pub async fn probe(binary: &Path, argv: &[OsString]) -> Result<String, String> {
    let name = binary.display();
    let mut child = tokio::process::Command::new(binary)
        .arg("upgrade-probe")
        .args(argv.iter().skip(1))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let answered = async {
        let mut said = Vec::new();
        if let Some(out) = out {
            out.take(PROBE_OUTPUT).read_to_end(&mut said).await?;
        }
        if said.len() as u64 >= PROBE_OUTPUT {
            return Ok((said, Vec::new(), None));
        }
        let mut complaint = Vec::new();
        if let Some(err) = err {
            err.take(PROBE_OUTPUT).read_to_end(&mut complaint).await?;
        }
        child.wait().await.map(|s| (said, complaint, Some(s)))
    };
    let (said, complaint, status) = match tokio::time::timeout(PROBE_LIMIT, answered).await {
        Err(_) => {
            return Err(format!(
                "{name} did not answer the probe within {PROBE_LIMIT:?}"
            ))
        }
        Ok(Err(e)) => return Err(format!("{name}: {e}")),
        Ok(Ok(answer)) => answer,
    };
    let said = String::from_utf8_lossy(&said);
    let first = said.lines().next().unwrap_or("");
    match status {
        None => Err(format!(
            "{name} cannot take over: it said more than a probe's answer"
        )),
        Some(s) if !s.success() => {
            let complaint = String::from_utf8_lossy(&complaint);
            let why = complaint.trim().lines().last().unwrap_or(first);
            let why = if why.is_empty() {
                "it said nothing"
            } else {
                why
            };
            Err(format!("{name} refused the upgrade ({s}): {why}"))
        }
        Some(_) => handover::read_probe_answer(first)
            .map_err(|why| format!("{name} cannot take over: {why}")),
    }
}

impl Upgrader {
    /// After the probe: stop accepting, finish what is in flight, carry the rest
    /// over. Until the listeners are carried nothing has changed, and a failure
    /// leaves corral running as it was.
    async fn hand_over(self, binary: PathBuf, to: String) {
        tracing::info!(from = VERSION, %to, binary = %binary.display(), "upgrading in place");
        crate::runtime::notify::reloading("upgrading");
        let mut carried = Carried::default();
        // Held until the exec: no change to the workers starts meanwhile.
        let (workers, mut written) = match self.let_go(&mut carried).await {
            Ok(taken) => taken,
            Err(e) => {
                self.begun
                    .store(false, std::sync::atomic::Ordering::Release);
                return not_upgraded(&e);
            }
        };
        // From here on, there is no going back: only forward to an exec.
        let upgrading = &self.live.addresses.upgrading;
        upgrading.store(true, std::sync::atomic::Ordering::Relaxed);
        self.carry_connections(&mut carried, &mut written).await;
        // The broker last: the requests finished above may have published.
        self.carry_broker(&mut carried, &mut written).await;
        // Last, as they are now (a crash meanwhile is not restarted by this image).
        if let Some(sup) = &self.live.supervisor {
            match sup.carry(&mut carried).await {
                Ok((slots, next)) => (written.workers, written.next_index) = (slots, next),
                Err(e) => return stop_after(&format!("the workers cannot be carried: {e}")),
            }
        }
        // After the drain: what it ended is not carried.
        written.sessions = self.live.router.carry();
        written.tag_key = self.tag_key.clone();
        let upgrades = self.live.sources.upgrades.lock();
        written.upgrades = upgrades.unwrap_or_else(|e| e.into_inner()).clone();
        let entry = match carried.prepare(&written) {
            Ok(e) => e,
            Err(e) => return stop_after(&format!("the hand-over cannot be written: {e}")),
        };
        exec(&binary, &self.origin.argv, &entry).await;
        // The exec failed (said in the log): this corral's own binary, which
        // speaks the same hand-over, takes over instead.
        exec(Path::new("/proc/self/exe"), &self.origin.argv, &entry).await;
        stop_after("neither binary could be run");
        drop(workers);
    }

    /// The part of the hand-over that changes nothing until it is all done: changes
    /// to the workers held, then every listening socket taken, accepting stopped
    /// last. A failure leaves corral as it was.
    async fn let_go(&self, carried: &mut Carried) -> std::io::Result<(Option<Hold>, Handover)> {
        let workers = match &self.live.supervisor {
            Some(sup) => Some(sup.hold().await),
            None => None,
        };
        let mut sockets = std::collections::BTreeMap::new();
        if let Queue::Embedded(broker, _) = &self.live.sources.queue {
            if let Some(socket) = broker.listening_socket() {
                sockets.insert(BROKER.to_string(), carried.dup(socket)?);
            }
        }
        let status = {
            let status = self.live.status.lock().unwrap_or_else(|e| e.into_inner());
            status.as_ref().map(|s| s.carry(carried))
        };
        if let Some(fd) = status.transpose()?.flatten() {
            sockets.insert(STATUS.to_string(), fd);
        }
        // It goes on answering until the exec (`corral upgrade` asks it when the
        // new image is ready); what comes during the exec waits in its backlog.
        if let Some(admin) = self.admin.get() {
            sockets.insert(ADMIN.to_string(), carried.dup(admin)?);
        }
        let listeners = self.live.serving.carry(carried)?;
        let mut written = Handover::new(VERSION, listeners, Vec::new(), 0);
        written.sockets = sockets;
        Ok((workers, written))
    }

    /// The client connections: cleartext tunnels stopped where they stand (TLS ones
    /// closed with 1012), then the drain, which carries connections between
    /// requests and long-polls in flight and lets the other requests finish.
    async fn carry_connections(&self, carried: &mut Carried, written: &mut Handover) {
        let proxy = self.live.front.load().proxy().clone();
        let (given, not_carried) = proxy.carry_tunnels().await;
        count(&mut written.closed, "tunnels (TLS: 1012 sent)", not_carried);
        for t in given {
            let mut state = t.state;
            match (carried.dup(&t.client), carried.dup(&t.worker)) {
                (Ok(client), Ok(worker)) => (state.client, state.worker) = (client, worker),
                _ => {
                    tracing::warn!("a websocket tunnel is not carried: no descriptor left");
                    continue;
                }
            }
            written.tunnels.push(state);
        }
        self.live.serving.begin_carry();
        proxy.carry_polls();
        self.serving.drain();
        let drain = self.live.front.load().cfg().timeouts.shutdown_drain;
        if tokio::time::timeout(drain, self.serving.ended())
            .await
            .is_err()
        {
            let open = self.serving.running();
            tracing::warn!(
                ?drain,
                open,
                "requests still open after the drain period: the upgrade closes them"
            );
            let why = "requests (still open after the drain period)";
            count(&mut written.closed, why, open as u64);
        }
        let answered = proxy.polls_answered();
        let why = "long-polls (TLS or HTTP/2: answered 503)";
        count(&mut written.closed, why, answered);
        for given in self.live.serving.carried() {
            match written_down(given, carried) {
                Ok(c) => written.connections.push(c),
                Err(e) => tracing::warn!(error = %e, "a client connection is not carried"),
            }
        }
    }

    /// The embedded broker's clients.
    async fn carry_broker(&self, carried: &mut Carried, written: &mut Handover) {
        let Queue::Embedded(broker, _) = &self.live.sources.queue else {
            return;
        };
        let (given, lost) = broker.carry().await;
        count(
            &mut written.closed,
            "message queue clients (output stalled)",
            lost,
        );
        for c in given {
            let mut state = c.state;
            match carried.dup(&c.socket) {
                Ok(fd) => state.socket = fd,
                Err(e) => {
                    tracing::warn!(error = %e, "a message queue client is not carried");
                    continue;
                }
            }
            written.broker_clients.push(state);
        }
    }
}

/// A carried client connection as the hand-over writes it: its socket, and the
/// worker connection of the answer it waits for.
fn written_down(given: Given, carried: &mut Carried) -> std::io::Result<handover::Connection> {
    let socket = carried.dup(&given.socket)?;
    let waiting = match given.waiting {
        Some(w) => {
            let (io, early) = w.answer.conn.into_parts();
            let io = io.into_std()?;
            Some(handover::Waiting {
                socket: carried.dup(&io)?,
                early: early.to_vec(),
                worker: w.answer.worker,
                sid: w.answer.sid,
                http10: w.how.http10,
                close: w.how.close,
            })
        }
        None => None,
    };
    Ok(handover::Connection {
        socket,
        early: given.early.to_vec(),
        waiting,
    })
}

/// A carried client connection taken back.
fn taken_back(c: handover::Connection, handover: &mut Handover) -> std::io::Result<Given> {
    let socket = std::net::TcpStream::from(handover.claim(c.socket)?);
    let waiting = match c.waiting {
        Some(w) => {
            let io = std::net::TcpStream::from(handover.claim(w.socket)?);
            io.set_nonblocking(true)?;
            let io = tokio::net::TcpStream::from_std(io)?;
            Some(Waiting {
                answer: PendingAnswer {
                    conn: crate::transport::http1::Conn::resumed(io, &w.early),
                    worker: w.worker,
                    sid: w.sid,
                },
                how: Writing {
                    http10: w.http10,
                    close: w.close,
                },
            })
        }
        None => None,
    };
    Ok(Given {
        socket,
        early: bytes::Bytes::from(c.early),
        waiting,
    })
}

/// Adds `n` of `kind` to `counts`, when there are any.
fn count(counts: &mut std::collections::BTreeMap<String, u64>, kind: &str, n: u64) {
    if n > 0 {
        *counts.entry(kind.to_string()).or_default() += n;
    }
}

/// A failure before anything was let go: corral goes on as it was.
fn not_upgraded(e: &std::io::Error) {
    tracing::error!(error = %e, "upgrade not made: nothing was carried; corral goes on");
    crate::runtime::notify::notify("READY=1\nSTATUS=upgrade not made");
}

/// A failure after the listeners were let go: corral stops as at SIGTERM.
fn stop_after(why: &str) {
    tracing::error!("upgrade failed after the hand-over began ({why}): stopping");
    // SAFETY: a signal to this process, handled by its own stop.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
}

/// Execs `binary` with `argv` and this environment plus `entry` (the hand-over's
/// place). Returns only if it failed, said in the log.
async fn exec(binary: &Path, argv: &[OsString], entry: &str) {
    let c = |s: &[u8]| CString::new(s).ok();
    let program = c(binary.as_os_str().as_bytes());
    let args: Option<Vec<CString>> = argv.iter().map(|a| c(a.as_bytes())).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            c(&kv)
        })
        .collect();
    env.extend(c(entry.as_bytes()));
    let (Some(program), Some(args)) = (program, args) else {
        tracing::error!(
            "cannot exec {}: a NUL byte in it or its arguments",
            binary.display()
        );
        return;
    };
    let e = forker::exec(program, args, env).await;
    tracing::error!(error = %e, binary = %binary.display(), "cannot exec");
}

/// What the new image takes back from a hand-over, part by part.
#[derive(Default)]
pub(crate) struct Taken {
    /// The version that carried them.
    pub from: Option<String>,
    /// The client listeners.
    pub listeners: Vec<listen::Inherited>,
    /// The workers' processes.
    pub workers: Vec<Adopted>,
    /// The next worker slot's index.
    pub next_index: usize,
    /// The embedded broker's listening socket.
    pub broker: Option<std::net::TcpListener>,
    /// The status listener's socket.
    pub status: Option<std::net::TcpListener>,
    /// The admin socket.
    pub admin: Option<std::os::unix::net::UnixListener>,
    /// The Engine.IO session table.
    pub sessions: Vec<handover::Session>,
    /// The sid tags' key, where the image before made it at random.
    pub tag_key: Option<Vec<u8>>,
    /// The embedded broker's client connections.
    pub broker_clients: Vec<crate::broker::CarriedClient>,
    /// The cleartext websocket tunnels.
    pub tunnels: Vec<crate::proxy::tunnel::Carried>,
    /// The cleartext HTTP/1.1 connections, with the bytes read and not used and
    /// the answer each waits for.
    pub connections: Vec<Given>,
    /// What the image before did not carry.
    pub closed: std::collections::BTreeMap<String, u64>,
    /// The upgrades before this one.
    pub upgrades: Vec<handover::Record>,
}

impl Taken {
    /// This upgrade's record, with what each part took on; added to the ones
    /// before it. None when this image was not started by an upgrade.
    pub(super) fn record(
        &mut self,
        carried: &[(&str, usize)],
        binary: &Path,
    ) -> Option<Vec<handover::Record>> {
        let from = self.from.clone()?;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut record = handover::Record {
            at,
            from,
            to: VERSION.into(),
            binary: binary.display().to_string(),
            closed: std::mem::take(&mut self.closed),
            ..Default::default()
        };
        for (kind, n) in carried {
            count(&mut record.carried, kind, *n as u64);
        }
        let mut all = std::mem::take(&mut self.upgrades);
        all.push(record);
        // The status page shows the last few.
        let excess = all.len().saturating_sub(UPGRADES_KEPT);
        all.drain(..excess);
        Some(all)
    }
}

/// Upgrades kept for the status page.
const UPGRADES_KEPT: usize = 20;

/// The embedded broker's socket in the hand-over.
const BROKER: &str = "broker";
/// The status listener's socket in the hand-over.
const STATUS: &str = "status";
/// The admin socket in the hand-over.
const ADMIN: &str = "admin";

/// Whether a carried listening socket is the one `configured` asks for: the same
/// address, or any port on its address for port 0.
pub(super) fn fits(socket: &std::net::TcpListener, configured: std::net::SocketAddr) -> bool {
    socket
        .local_addr()
        .is_ok_and(|a| a == configured || (configured.port() == 0 && a.ip() == configured.ip()))
}

/// Claims every descriptor of `handover` for the part that takes it; what no part
/// takes is closed.
pub(crate) fn take(mut handover: Handover) -> Taken {
    let mut taken = Taken {
        from: Some(handover.from.clone()),
        closed: std::mem::take(&mut handover.closed),
        upgrades: std::mem::take(&mut handover.upgrades),
        next_index: handover.next_index,
        sessions: std::mem::take(&mut handover.sessions),
        tag_key: handover.tag_key.take(),
        ..Taken::default()
    };
    for l in std::mem::take(&mut handover.listeners) {
        let sockets: Vec<std::net::TcpListener> = l
            .sockets
            .iter()
            .filter_map(|fd| match handover.claim(*fd) {
                Ok(fd) => Some(std::net::TcpListener::from(fd)),
                Err(e) => {
                    tracing::error!(listener = %l.bound, error = %e, "a carried socket is lost");
                    None
                }
            })
            .filter(|s| s.set_nonblocking(true).is_ok())
            .collect();
        if !sockets.is_empty() {
            taken.listeners.push(listen::Inherited {
                address: l.address,
                bound: l.bound,
                sockets,
            });
        }
    }
    let mut socket = |name: &str| {
        let fd = handover.sockets.get(name).copied()?;
        handover.claim(fd).ok().map(std::net::TcpListener::from)
    };
    taken.broker = socket(BROKER);
    taken.status = socket(STATUS);
    if let Some(fd) = handover.sockets.get(ADMIN).copied() {
        taken.admin = handover
            .claim(fd)
            .ok()
            .map(std::os::unix::net::UnixListener::from);
    }
    for mut state in std::mem::take(&mut handover.broker_clients) {
        if let Ok(fd) = handover.claim(state.socket) {
            state.socket = -1;
            let socket = std::net::TcpStream::from(fd);
            taken
                .broker_clients
                .push(crate::broker::CarriedClient { socket, state });
        }
    }
    for c in std::mem::take(&mut handover.connections) {
        match taken_back(c, &mut handover) {
            Ok(given) => taken.connections.push(given),
            Err(e) => tracing::warn!(error = %e, "a carried client connection is lost"),
        }
    }
    for mut state in std::mem::take(&mut handover.tunnels) {
        let (Ok(client), Ok(worker)) = (handover.claim(state.client), handover.claim(state.worker))
        else {
            continue;
        };
        (state.client, state.worker) = (-1, -1);
        taken.tunnels.push(crate::proxy::tunnel::Carried {
            client: client.into(),
            worker: worker.into(),
            state,
        });
    }
    for w in std::mem::take(&mut handover.workers) {
        let output = w
            .output
            .iter()
            .filter_map(|fd| handover.claim(*fd).ok())
            .collect();
        taken.workers.push(Adopted {
            id: w.id,
            index: w.index,
            port: w.port,
            pid: w.pid,
            restarts: w.restarts,
            output,
        });
    }
    handover.close_unclaimed();
    taken
}
