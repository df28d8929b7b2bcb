//! The admin socket: a Unix socket on which a running corral takes one-line commands
//! (`reload`, `reload --keep-workers`, `scale N`, `status`, `upgrade [PATH]`) from
//! `corral reload|scale|status|upgrade`, and `addresses` (where it is bound, whether
//! it is ready and which image runs: for scripts and tests that start it on port
//! 0), and the client side of those commands.
//!
//! It owns the socket file and the tiny line protocol; the work itself is the
//! supervisor's, and a config reload and an upgrade the App's (through [`Reload`]
//! and [`Upgrade`]). Only the local user can reach it (file mode 0600).

use crate::runtime::life::Life;
use crate::workers::supervisor::Supervisor;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Why the admin socket could not start, or a command got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another corral answers on the admin socket.
    #[error("admin socket {} is in use by another corral", .0.display())]
    SocketInUse(PathBuf),
    /// The admin socket cannot be made.
    #[error("cannot create admin socket {}: {cause}", path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// No corral listens on the admin socket.
    #[error("cannot reach corral at {}: {cause} (is it running? see `admin_socket`)", path.display())]
    Unreachable {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// The running corral did not answer in time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The admin conversation broke off.
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a running corral is bound, as `addresses` tells it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Addresses {
    /// The client listeners, in the config's order (a reload may change them).
    #[serde(serialize_with = "current")]
    pub listeners: Arc<arc_swap::ArcSwap<Vec<std::net::SocketAddr>>>,
    /// The status listener (`[admin] listen`; a reload may change it).
    #[serde(serialize_with = "current")]
    pub status: Arc<arc_swap::ArcSwap<Option<std::net::SocketAddr>>>,
    /// The embedded message queue.
    pub broker: Option<std::net::SocketAddr>,
    /// "corral ready" was said: at least one worker is ready (at once without
    /// supervised workers).
    #[serde(serialize_with = "flag")]
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// An upgrade has stopped the accept loops (connections wait in the backlogs)
    /// and is finishing what is in flight before the exec.
    #[serde(serialize_with = "flag")]
    pub upgrading: Arc<std::sync::atomic::AtomicBool>,
    /// This process image: its version, and when it started (an upgrade changes
    /// both; the pid stays).
    pub image: Image,
}

/// The running image, as `addresses` tells it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Image {
    /// `corral --version`.
    pub version: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// The process id (the same across upgrades).
    pub pid: u32,
    /// The binary it runs.
    pub exe: PathBuf,
}

fn current<T: serde::Serialize, S: serde::Serializer>(
    value: &Arc<arc_swap::ArcSwap<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&**value.load(), s)
}

fn flag<S: serde::Serializer>(
    ready: &Arc<std::sync::atomic::AtomicBool>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_bool(ready.load(std::sync::atomic::Ordering::Relaxed))
}

/// Reads the config file again and applies it (the App does; this part only asks).
pub trait Reload: Send + Sync {
    /// Applies the file as it is now; with `keep_workers`, the workers are kept
    /// (scaled to a new count) unless their command, environment or directory
    /// changed; without, they are replaced one at a time. The answer says what
    /// changed, or why nothing did.
    fn reload(
        &self,
        keep_workers: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>;
}

/// What an accepted upgrade starts once its answer is sent: the hand-over, which
/// ends in the exec.
pub type HandOver = Box<dyn FnOnce() + Send>;

/// An upgrade's answer: what to say and the hand-over to start, or why not.
pub type Upgrading<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(String, HandOver), String>> + Send + 'a>,
>;

/// Replaces the running corral by another binary in the same process (the App
/// does; this part only asks).
pub trait Upgrade: Send + Sync {
    /// Probes `binary` (None: the file corral was started from). Accepted: what
    /// to say, and the hand-over to start once it is said; refused: why, and
    /// nothing has changed.
    fn upgrade(&self, binary: Option<PathBuf>) -> Upgrading<'_>;
}

/// What the admin socket's commands act on.
#[derive(Clone)]
pub struct Targets {
    /// The workers corral supervises.
    pub supervisor: Option<Arc<Supervisor>>,
    /// The config reload; None when corral was not started from a file.
    pub reload: Option<Arc<dyn Reload>>,
    /// The in-place upgrade.
    pub upgrade: Option<Arc<dyn Upgrade>>,
}

/// Longest command line accepted (an upgrade's path may be a long one).
const MAX_COMMAND: u64 = 4352;

/// The default socket path for a corral listening on `port`.
pub fn default_path(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("corral-{port}.sock"))
}

/// Where a corral started from config file `file` (its canonical path) links its
/// admin socket, so that a command given the same file finds it whatever the
/// command line added (the prefix mode's binds): `$TMPDIR/corral-file-<hash>.sock`.
pub fn file_link(file: &Path) -> PathBuf {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let digest = sha2::Sha256::digest(file.as_os_str().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join(format!("corral-file-{hex}.sock"))
}

/// The admin socket of the corral a command with `-c FILE` means (`cfg` read from
/// that file): the file's `admin_socket`, else the link a corral started from the
/// file made, else the default for the file's first listener.
pub fn path_for(cfg: &crate::config::Config) -> PathBuf {
    if let Some(sock) = &cfg.admin_socket {
        return sock.clone();
    }
    let linked = cfg.file.as_deref().map(file_link).filter(|l| l.exists());
    linked.unwrap_or_else(|| default_path(cfg.first_port()))
}

/// Binds the socket at `path` (replacing a stale file no one answers on) and
/// serves commands until `owner` stops, which ends the accept loop and every
/// command's task and waits for them.
/// `carried`: the socket an upgrade carried over, taken when it is still at
/// `path` (commands sent during the exec wait in its backlog). Returns another
/// descriptor of the listening socket, for the next upgrade to carry.
pub async fn serve(
    path: &Path,
    targets: Targets,
    addresses: Addresses,
    owner: &Life,
    carried: Option<std::os::unix::net::UnixListener>,
) -> Result<Option<std::os::fd::OwnedFd>, Error> {
    let at_path = |l: &std::os::unix::net::UnixListener| {
        l.local_addr().is_ok_and(|a| a.as_pathname() == Some(path))
    };
    let carried = carried.filter(at_path).and_then(|l| {
        l.set_nonblocking(true).ok()?;
        UnixListener::from_std(l).ok()
    });
    let listener = match carried {
        Some(listener) => listener,
        None => bind(path).await?,
    };
    let copy = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .ok();
    let tasks = owner.clone();
    owner.spawn_until_drained(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors and the like: pause instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (targets, addresses) = (targets.clone(), addresses.clone());
            tasks.spawn_until_drained(async move {
                let _ = answer(stream, &targets, &addresses).await;
            });
        }
    });
    Ok(copy)
}

/// Binds the admin socket at `path`, replacing a stale file no one answers on.
async fn bind(path: &Path) -> Result<UnixListener, Error> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|cause| Error::Socket {
        path: path.to_path_buf(),
        cause,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}

async fn answer(
    stream: UnixStream,
    targets: &Targets,
    addresses: &Addresses,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_COMMAND))
        .read_line(&mut line)
        .await?;
    let mut then = None;
    let reply = match line.trim() {
        "addresses" => {
            serde_json::to_string(addresses).unwrap_or_else(|e| format!("error: {e}")) + "\n"
        }
        cmd if cmd == "upgrade" || cmd.starts_with("upgrade ") => {
            let binary = cmd["upgrade".len()..].trim();
            let binary = (!binary.is_empty()).then(|| PathBuf::from(binary));
            match targets.upgrade.as_ref() {
                None => "error: this corral cannot upgrade itself\n".into(),
                Some(u) => match u.upgrade(binary).await {
                    Ok((said, hand_over)) => {
                        then = Some(hand_over);
                        format!("ok: {said}\n")
                    }
                    Err(why) => format!("error: {why}\n"),
                },
            }
        }
        cmd => run_command(cmd, targets).await,
    };
    let sent = write.write_all(reply.as_bytes()).await;
    let _ = write.shutdown().await;
    // Only once the answer is in the caller's socket: the exec closes this one.
    if let Some(hand_over) = then {
        hand_over();
    }
    sent
}

async fn run_command(cmd: &str, targets: &Targets) -> String {
    let mut words = cmd.split_whitespace();
    let (first, second, third) = (words.next(), words.next(), words.next());
    if first == Some("reload") && third.is_none() {
        let keep_workers = match second {
            None => false,
            Some("--keep-workers") => true,
            Some(other) => {
                return format!("error: unknown reload option `{other}` (--keep-workers)\n")
            }
        };
        return reload(targets, keep_workers).await;
    }
    let Some(sup) = targets.supervisor.as_deref() else {
        return "error: this corral supervises no workers ([workers] is not configured)\n".into();
    };
    match (first, second, third) {
        (Some("scale"), Some(n), None) => match n.parse::<usize>() {
            Ok(n) => match sup.scale(n).await {
                Ok(()) => format!("ok: {n} workers\n"),
                Err(e) => format!("error: {e}\n"),
            },
            Err(_) => format!("error: `{n}` is not a number\n"),
        },
        (Some("status"), None, _) => {
            let status = sup.status().await;
            serde_json::to_string(&status).unwrap_or_else(|e| format!("error: {e}")) + "\n"
        }
        _ => format!(
            "error: unknown command `{cmd}` (reload [--keep-workers], scale N, status, addresses, upgrade [PATH])\n"
        ),
    }
}

/// `reload`: the config file read again and applied, or, for a corral not started
/// from a file, the workers replaced.
async fn reload(targets: &Targets, keep_workers: bool) -> String {
    let answer = match (&targets.reload, &targets.supervisor) {
        (Some(r), _) => r.reload(keep_workers).await,
        (None, Some(_)) if keep_workers => {
            Err("corral was not started from a config file: nothing to read again".into())
        }
        (None, Some(sup)) => sup
            .rolling_restart()
            .await
            .map(|()| "every worker replaced".into())
            .map_err(|e| e.to_string()),
        (None, None) => Err("corral was not started from a config file and runs no workers".into()),
    };
    match answer {
        Ok(text) => format!("ok: {text}\n"),
        Err(text) => format!("error: {text}\n"),
    }
}

/// Sends one command to a running corral and returns its answer.
pub async fn send(path: &Path, command: &str, timeout: Duration) -> Result<String, Error> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|cause| Error::Unreachable {
            path: path.to_path_buf(),
            cause,
        })?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(timeout, stream.read_to_string(&mut reply))
        .await
        .map_err(|_| Error::NoAnswer(timeout))??;
    Ok(reply)
}
