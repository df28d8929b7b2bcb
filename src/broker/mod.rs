//! The embedded message queue: a pub/sub broker that speaks the Redis protocol
//! (RESP2 and RESP3), so `message_queue='redis://...'` in Flask-SocketIO (or a Node
//! redis adapter) works with nothing else installed.
//!
//! At an upgrade every connection stops reading, then each gives its socket, its
//! subscriptions, a command read in part and its unsent output ([`Broker::carry`]);
//! the new image resumes each where it stood ([`Broker::resume`]).
//!
//! This module owns the broker's sockets and per-connection state and runs commands;
//! [`registry`] is the pub/sub core, [`resp`] the wire format, [`glob`] Redis's
//! pattern rules. It is not a Redis: commands other than the pub/sub set get Redis's
//! own unknown-command error. It must not touch the proxy's state.

pub(crate) mod glob;
pub(crate) mod registry;
pub(crate) mod resp;

use crate::runtime::handover;
use crate::runtime::life::Life;
use bytes::{Bytes, BytesMut};
pub use registry::OutputLimit;
use registry::{ClientHandle, Registry, Space};
use resp::{Caps, Out};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The Redis version whose replies the broker reproduces (and reports, as other
/// Redis-protocol servers do, so clients enable the features it has).
pub const REDIS_VERSION: &str = "7.0.15";
const DATABASES: i64 = 16;

#[derive(Debug, Clone, Copy)]
/// What the broker has done, for metrics and the status page.
pub struct BrokerStats {
    /// Clients connected now.
    pub connected: u64,
    /// Channel, pattern and shard subscriptions now.
    pub subscriptions: u64,
    /// PUBLISH and SPUBLISH commands.
    pub published: u64,
    /// Messages queued to subscribers.
    pub delivered: u64,
    /// Messages not delivered: the subscriber was over its output limit.
    pub dropped: u64,
    /// Subscribers disconnected at their output limit.
    pub over_limit: u64,
}

/// How the broker is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `requirepass`: clients must AUTH with it (None: no AUTH).
    pub password: Option<String>,
    /// Largest bulk string accepted.
    pub max_bulk: u64,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Largest command, all arguments together.
    pub max_command: u64,
    /// Most clients at once (`maxclients`).
    pub max_clients: usize,
    /// Output limits of a subscriber (`client-output-buffer-limit pubsub`).
    pub output: OutputLimit,
}

/// A running broker: its registry and counters.
pub struct Broker {
    settings: Settings,
    registry: Registry,
    next_id: AtomicU64,
    started: Instant,
    port: u16,
    /// Each connected client's address, by id: which process holds a connection is
    /// found from it (`clients`).
    peers: std::sync::Mutex<std::collections::HashMap<u64, std::net::SocketAddr>>,
    /// Its listening socket, as an upgrade carries it (the accept loop owns
    /// another of the same socket).
    socket: std::sync::OnceLock<std::net::TcpListener>,
    carry: Carry,
}

/// An upgrade's carry of the client connections, in two steps: first every
/// connection stops reading (so no command runs and no message is published from
/// then on), then each one's writer stops between two writes and the connection
/// gives its socket and state.
#[derive(Default)]
struct Carry {
    stop_reading: CancellationToken,
    give: CancellationToken,
    /// Connections still reading commands.
    reading: AtomicU64,
    /// Connections that stopped reading for the carry and have not given yet.
    giving: AtomicU64,
    changed: tokio::sync::Notify,
    given: std::sync::Mutex<Vec<CarriedClient>>,
}

/// Longest a carried connection's writer may take to finish the write it is in.
const CARRY_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// A client connection as an upgrade carries it: its socket, and where it stood.
pub struct CarriedClient {
    /// Its socket.
    pub socket: std::net::TcpStream,
    /// Its state, the socket's number left out.
    pub state: handover::BrokerClient,
}

/// Ends of a connection's read loop.
#[derive(PartialEq, Eq)]
enum Ended {
    Closed,
    Carried,
}

impl Broker {
    /// A broker with these settings, for a listener on `port`.
    pub fn new(settings: Settings, port: u16) -> Arc<Broker> {
        Arc::new(Broker {
            settings,
            registry: Registry::default(),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            port,
            peers: Default::default(),
            socket: std::sync::OnceLock::new(),
            carry: Carry::default(),
        })
    }

    /// For an upgrade: stops accepting and reading commands, then takes every
    /// client connection out with its subscriptions, its unread bytes (a command
    /// read in part) and what it was still to be sent. A connection whose writer is
    /// stuck (a subscriber that does not read) is not carried: how many were not
    /// comes with them.
    pub async fn carry(&self) -> (Vec<CarriedClient>, u64) {
        let carry = &self.carry;
        let before = self.registry.stats.connected.load(Ordering::Relaxed);
        carry.stop_reading.cancel();
        let wait = |count: &'static str| async move {
            let counter = match count {
                "reading" => &carry.reading,
                _ => &carry.giving,
            };
            loop {
                let changed = carry.changed.notified();
                if counter.load(Ordering::Acquire) == 0 {
                    return;
                }
                changed.await;
            }
        };
        let limit = CARRY_WRITE * 2;
        let _ = tokio::time::timeout(limit, wait("reading")).await;
        carry.give.cancel();
        let _ = tokio::time::timeout(limit, wait("giving")).await;
        let given = std::mem::take(&mut *carry.given.lock().unwrap_or_else(|e| e.into_inner()));
        let lost = before.saturating_sub(given.len() as u64);
        (given, lost)
    }

    /// Takes on client connections an upgrade carried, each served from where it
    /// stood (its subscriptions registered again, its unsent output sent first).
    pub fn resume(self: &Arc<Self>, clients: Vec<CarriedClient>, owner: &Life) {
        for c in clients {
            let Ok(stream) = c
                .socket
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(c.socket))
            else {
                continue;
            };
            let (b, stop) = (self.clone(), owner.signal());
            owner.spawn(async move {
                b.connection(stream, stop, Some(c.state)).await;
            });
        }
    }

    /// Its listening socket, for an upgrade to carry.
    pub fn listening_socket(&self) -> Option<&std::net::TcpListener> {
        self.socket.get()
    }

    /// The pub/sub core.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every connected client's address, and whether it holds a subscription.
    pub fn clients(&self) -> Vec<(std::net::SocketAddr, bool)> {
        let subscribed = self.registry.subscribed_clients();
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .iter()
            .map(|(id, addr)| (*addr, subscribed.contains(id)))
            .collect()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Counters for metrics and the status page.
    pub fn stats(&self) -> BrokerStats {
        let s = &self.registry.stats;
        BrokerStats {
            connected: s.connected.load(Ordering::Relaxed),
            subscriptions: self.registry.subscriptions(),
            published: s.published.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            over_limit: s.over_limit.load(Ordering::Relaxed),
        }
    }

    /// Accepts clients until `owner` stops, at most `max_clients` at once: one
    /// more gets Redis's error and is closed (as mini-redis, a semaphore bounds them).
    /// The accept loop and every client's task are `owner`'s: its stop ends them and
    /// waits until they have.
    pub fn spawn(self: &Arc<Self>, listener: TcpListener, owner: &Life) {
        let broker = self.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(self.settings.max_clients));
        let tasks = owner.clone();
        let carrying = self.carry.stop_reading.clone();
        owner.spawn_until_drained(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    // An upgrade carries the socket: its backlog waits for the new image.
                    _ = carrying.cancelled() => return,
                };
                match accepted {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            let _ = stream
                                .write_all(b"-ERR max number of clients reached\r\n")
                                .await;
                            continue;
                        };
                        let (b, stop) = (broker.clone(), tasks.signal());
                        // Ends itself at the stop, dropping its subscriptions.
                        tasks.spawn(async move {
                            b.connection(stream, stop, None).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "message queue accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }

    /// Serves one client connection; `resume`: where a connection an upgrade
    /// carried stood.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        stop: CancellationToken,
        resume: Option<handover::BrokerClient>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stats = &self.registry.stats;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let handle = ClientHandle::new(id, self.settings.output);
        if let Ok(peer) = stream.peer_addr() {
            self.peers_of().insert(id, peer);
        }
        let (mut reader, writer) = stream.into_split();
        let mut client = Client {
            handle: handle.clone(),
            reply: Reply::On,
            resp3: false,
            authenticated: self.settings.password.is_none(),
            name: None,
            channels: HashSet::new(),
            patterns: HashSet::new(),
            shard: HashSet::new(),
        };
        let mut buf = BytesMut::with_capacity(16 * 1024);
        if let Some(state) = resume {
            self.resume_client(&mut client, state, &mut buf);
        }
        let writing = tokio::spawn(write_loop(writer, handle.clone()));
        self.carry.reading.fetch_add(1, Ordering::AcqRel);
        let ended = self
            .read_commands(&mut client, &mut reader, &mut buf, &stop)
            .await;
        if ended == Ended::Carried {
            self.carry.giving.fetch_add(1, Ordering::AcqRel);
        }
        self.carry.reading.fetch_sub(1, Ordering::AcqRel);
        self.carry.changed.notify_waiters();
        if ended == Ended::Carried {
            self.give(client, reader, buf, writing, &stop).await;
            self.carry.giving.fetch_sub(1, Ordering::AcqRel);
            self.carry.changed.notify_waiters();
            self.peers_of().remove(&id);
            stats.connected.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.forget(&mut client);
        self.peers_of().remove(&id);
        handle.close();
        let _ = writing.await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads and runs commands until the connection ends or an upgrade carries it
    /// (then between two reads: every whole command read has run, and `buf` holds
    /// at most a command read in part).
    async fn read_commands(
        &self,
        client: &mut Client,
        reader: &mut tokio::net::tcp::OwnedReadHalf,
        buf: &mut BytesMut,
        stop: &CancellationToken,
    ) -> Ended {
        let handle = client.handle.clone();
        let mut parser = resp::Parser::default();
        // What a carried connection had read but not run goes first.
        let mut n = buf.len();
        loop {
            if n == 0 {
                n = tokio::select! {
                    r = reader.read_buf(buf) => r.unwrap_or(0),
                    _ = handle.kill.notified() => 0,
                    _ = stop.cancelled() => 0,
                    _ = self.carry.stop_reading.cancelled() => return Ended::Carried,
                };
                if n == 0 {
                    return Ended::Closed;
                }
            }
            n = 0;
            loop {
                let caps = Caps {
                    max_bulk: self.settings.max_bulk as i64,
                    max_args: self.settings.max_args as i64,
                    max_command: self.settings.max_command,
                    unauthenticated: !client.authenticated,
                };
                match parser.next(buf, caps) {
                    Ok(Some(args)) if args.is_empty() => continue,
                    Ok(Some(args)) => {
                        if self.execute(client, args) == Next::Close {
                            return Ended::Closed;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let mut out = BytesMut::new();
                        client
                            .out()
                            .error(&mut out, &format!("ERR Protocol error: {}", e.0));
                        handle.reply(&out);
                        return Ended::Closed;
                    }
                }
            }
        }
    }

    /// A carried connection's last step: once every connection has stopped
    /// reading, its writer stops between two writes, and the socket and state go
    /// to the carry.
    async fn give(
        &self,
        client: Client,
        reader: tokio::net::tcp::OwnedReadHalf,
        unread: BytesMut,
        writing: tokio::task::JoinHandle<Option<(OwnedWriteHalf, BytesMut)>>,
        stop: &CancellationToken,
    ) {
        tokio::select! {
            _ = self.carry.give.cancelled() => {}
            _ = stop.cancelled() => return,
        }
        client.handle.carry();
        let Ok(Ok(Some((writer, unsent)))) = tokio::time::timeout(CARRY_WRITE, writing).await
        else {
            return tracing::warn!(
                client = client.handle.id,
                "message queue client not carried: its output was not taken in time"
            );
        };
        let Ok(socket) = reader.reunite(writer).map(TcpStream::into_std) else {
            return;
        };
        let Ok(socket) = socket else { return };
        for space in [Space::Channel, Space::Pattern, Space::Shard] {
            let names = match space {
                Space::Channel => &client.channels,
                Space::Pattern => &client.patterns,
                Space::Shard => &client.shard,
            };
            for name in names {
                self.registry.unsubscribe(space, name, client.handle.id);
            }
        }
        let state = client.carried(unread.to_vec(), unsent.to_vec());
        let mut given = self.carry.given.lock().unwrap_or_else(|e| e.into_inner());
        given.push(CarriedClient { socket, state });
    }

    /// Puts a carried connection's state back: its settings, its subscriptions,
    /// its unread bytes into `buf` and its unsent output into its queue.
    fn resume_client(
        &self,
        client: &mut Client,
        state: handover::BrokerClient,
        buf: &mut BytesMut,
    ) {
        client.reply = match state.reply {
            1 => Reply::Off,
            2 => Reply::Skip,
            _ => Reply::On,
        };
        client.set_protocol(state.resp3);
        client.authenticated = state.authenticated;
        client.name = state.name.map(Bytes::from);
        for (space, names) in [
            (Space::Channel, state.channels),
            (Space::Pattern, state.patterns),
            (Space::Shard, state.shard),
        ] {
            for name in names.into_iter().map(Bytes::from) {
                self.registry.subscribe(space, name.clone(), &client.handle);
                match space {
                    Space::Channel => client.channels.insert(name),
                    Space::Pattern => client.patterns.insert(name),
                    Space::Shard => client.shard.insert(name),
                };
            }
        }
        buf.extend_from_slice(&state.unread);
        if !state.unsent.is_empty() {
            client.handle.reply(&state.unsent);
        }
    }

    fn peers_of(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, std::net::SocketAddr>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every subscription of a client that is leaving.
    fn forget(&self, c: &mut Client) {
        for ch in c.channels.drain() {
            self.registry.unsubscribe(Space::Channel, &ch, c.handle.id);
        }
        for p in c.patterns.drain() {
            self.registry.unsubscribe(Space::Pattern, &p, c.handle.id);
        }
        for s in c.shard.drain() {
            self.registry.unsubscribe(Space::Shard, &s, c.handle.id);
        }
    }

    fn execute(&self, c: &mut Client, args: Vec<Bytes>) -> Next {
        let mut out = BytesMut::new();
        let mode = c.reply;
        if mode == Reply::Skip {
            c.reply = Reply::On;
        }
        let next = self.dispatch(c, &args, &mut out);
        // CLIENT REPLY OFF/SKIP silence command replies; RESP3 subscription pushes
        // still go out, as Redis sends them (pubsub.tcl relies on it).
        let silenced = match mode {
            Reply::On => false,
            Reply::Off => c.reply == Reply::Off,
            Reply::Skip => true,
        } && !(c.resp3 && is_subscription(&args[0]));
        if !out.is_empty() && !silenced {
            c.handle.reply(&out);
        }
        next
    }

    fn dispatch(&self, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
        let o = c.out();
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        let Some(cmd) = COMMANDS.iter().find(|cmd| cmd.name == name) else {
            o.error(out, &unknown_command(args));
            return Next::Go;
        };
        // Container commands: the subcommand has its own arity and name.
        let Some((full, arity)) = subcommand(cmd, args) else {
            o.error(out, &unknown_subcommand(cmd, &args[1]));
            return Next::Go;
        };
        // Redis checks the arity before authentication.
        let argc = args.len() as i32;
        if (arity > 0 && argc != arity) || argc < -arity {
            o.error(
                out,
                &format!("ERR wrong number of arguments for '{full}' command"),
            );
            return Next::Go;
        }
        if !c.authenticated && !cmd.no_auth {
            o.error(out, "NOAUTH Authentication required.");
            return Next::Go;
        }
        if !c.resp3 && c.subscriptions() + c.shard.len() > 0 && !cmd.in_subscribed_mode {
            o.error(out, &format!("ERR Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"));
            return Next::Go;
        }
        (cmd.run)(self, c, args, out)
    }

    fn info(&self, section: Option<&str>) -> String {
        let all = section.is_none_or(|s| matches!(s, "all" | "everything" | "default"));
        let want = |s: &str| all || section == Some(s);
        let stats = &self.registry.stats;
        let mut text = String::new();
        if want("server") {
            text.push_str(&format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\ncorral_version:{}\r\nos:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::process::id(),
                self.port,
                self.started.elapsed().as_secs()
            ));
        }
        if want("clients") {
            text.push_str(&format!(
                "# Clients\r\nconnected_clients:{}\r\n\r\n",
                stats.connected.load(Ordering::Relaxed)
            ));
        }
        if want("stats") {
            text.push_str(&format!(
                "# Stats\r\ntotal_connections_received:{}\r\npubsub_channels:{}\r\npubsub_patterns:{}\r\npubsub_shardchannels:{}\r\ncorral_messages_published:{}\r\ncorral_messages_delivered:{}\r\n\r\n",
                stats.connections.load(Ordering::Relaxed),
                self.registry.names(Space::Channel, None).len(),
                self.registry.numpat(),
                self.registry.names(Space::Shard, None).len(),
                stats.published.load(Ordering::Relaxed),
                stats.delivered.load(Ordering::Relaxed),
            ));
        }
        if text.ends_with("\r\n\r\n") {
            text.truncate(text.len() - 2);
        }
        text
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Go,
    Close,
}

/// CLIENT REPLY: whether command replies are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    On,
    Off,
    /// Not for the next command, then on again.
    Skip,
}

fn is_subscription(name: &[u8]) -> bool {
    [
        "subscribe",
        "unsubscribe",
        "psubscribe",
        "punsubscribe",
        "ssubscribe",
        "sunsubscribe",
    ]
    .iter()
    .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
}

/// One connection's state, owned by its reader.
struct Client {
    handle: Arc<ClientHandle>,
    reply: Reply,
    resp3: bool,
    authenticated: bool,
    name: Option<Bytes>,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard: HashSet<Bytes>,
}

impl Client {
    /// Its state as an upgrade carries it.
    fn carried(&self, unread: Vec<u8>, unsent: Vec<u8>) -> handover::BrokerClient {
        let names = |set: &HashSet<Bytes>| set.iter().map(|n| n.to_vec()).collect();
        handover::BrokerClient {
            socket: -1,
            unread,
            unsent,
            resp3: self.resp3,
            authenticated: self.authenticated,
            reply: match self.reply {
                Reply::On => 0,
                Reply::Off => 1,
                Reply::Skip => 2,
            },
            name: self.name.as_ref().map(|n| n.to_vec()),
            channels: names(&self.channels),
            patterns: names(&self.patterns),
            shard: names(&self.shard),
        }
    }

    fn out(&self) -> Out {
        Out { resp3: self.resp3 }
    }
    /// What Redis counts in (un)subscribe replies: channels plus patterns.
    fn subscriptions(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }
    fn set_protocol(&mut self, resp3: bool) {
        if self.resp3 != resp3 {
            self.resp3 = resp3;
            self.handle.set_resp3(resp3);
        }
    }
}

type Run = fn(&Broker, &mut Client, &[Bytes], &mut BytesMut) -> Next;

struct Command {
    name: &'static str,
    arity: i32,
    no_auth: bool,
    in_subscribed_mode: bool,
    run: Run,
    /// (name, arity) of subcommands, for container commands.
    subcommands: &'static [(&'static str, i32)],
}

const fn cmd(name: &'static str, arity: i32, run: Run) -> Command {
    Command {
        name,
        arity,
        no_auth: false,
        in_subscribed_mode: false,
        run,
        subcommands: &[],
    }
}

const COMMANDS: &[Command] = &[
    Command {
        in_subscribed_mode: true,
        ..cmd("ping", -1, ping)
    },
    cmd("echo", 2, echo),
    Command {
        no_auth: true,
        ..cmd("hello", -1, hello)
    },
    Command {
        no_auth: true,
        ..cmd("auth", -2, auth)
    },
    Command {
        subcommands: &[
            ("id", 2),
            ("setname", 3),
            ("getname", 2),
            ("setinfo", 4),
            ("reply", 3),
        ],
        ..cmd("client", -2, client)
    },
    cmd("select", 2, select),
    Command {
        no_auth: true,
        in_subscribed_mode: true,
        ..cmd("quit", -1, quit)
    },
    Command {
        no_auth: true,
        in_subscribed_mode: true,
        ..cmd("reset", 1, reset)
    },
    Command {
        in_subscribed_mode: true,
        ..cmd("subscribe", -2, subscribe)
    },
    Command {
        in_subscribed_mode: true,
        ..cmd("unsubscribe", -1, unsubscribe)
    },
    Command {
        in_subscribed_mode: true,
        ..cmd("psubscribe", -2, psubscribe)
    },
    Command {
        in_subscribed_mode: true,
        ..cmd("punsubscribe", -1, punsubscribe)
    },
    Command {
        in_subscribed_mode: true,
        ..cmd("ssubscribe", -2, ssubscribe)
    },
    Command {
        in_subscribed_mode: true,
        ..cmd("sunsubscribe", -1, sunsubscribe)
    },
    cmd("publish", 3, publish),
    cmd("spublish", 3, spublish),
    Command {
        subcommands: &[
            ("channels", -2),
            ("numsub", -2),
            ("numpat", 2),
            ("shardchannels", -2),
            ("shardnumsub", -2),
        ],
        ..cmd("pubsub", -2, pubsub)
    },
    Command {
        subcommands: &[("count", 2), ("docs", -2), ("info", -2), ("list", -2)],
        ..cmd("command", -1, command)
    },
    cmd("info", -1, info),
    // There is no keyspace to flush; Redis's own test harness sends these first.
    cmd("flushall", -1, flush),
    cmd("flushdb", -1, flush),
];

/// The full name and arity to check: `client|setname` for a container's subcommand;
/// None for a subcommand the container does not have.
fn subcommand(cmd: &Command, args: &[Bytes]) -> Option<(String, i32)> {
    if cmd.subcommands.is_empty() || args.len() < 2 {
        return Some((cmd.name.to_string(), cmd.arity));
    }
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
    let (n, arity) = cmd.subcommands.iter().find(|(n, _)| *n == sub)?;
    Some((format!("{}|{n}", cmd.name), *arity))
}

/// Redis's text for a subcommand a container does not have.
fn unknown_subcommand(cmd: &Command, sub: &[u8]) -> String {
    format!(
        "ERR unknown subcommand '{}'. Try {} HELP.",
        truncate(&String::from_utf8_lossy(sub), 128),
        cmd.name.to_ascii_uppercase()
    )
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Redis's text: the name (up to 128 bytes) and the first arguments (128 in all).
fn unknown_command(args: &[Bytes]) -> String {
    let mut listed = String::new();
    for a in &args[1..] {
        if listed.len() >= 128 {
            break;
        }
        let room = 128 - listed.len();
        listed.push_str(&format!(
            "'{}' ",
            truncate(&String::from_utf8_lossy(a), room)
        ));
    }
    format!(
        "ERR unknown command '{}', with args beginning with: {listed}",
        truncate(&String::from_utf8_lossy(&args[0]), 128)
    )
}

fn ping(_: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    if args.len() > 2 {
        o.error(out, "ERR wrong number of arguments for 'ping' command");
    } else if !c.resp3 && c.subscriptions() + c.shard.len() > 0 {
        o.array(out, 2);
        o.bulk(out, b"pong");
        o.bulk(out, args.get(1).map_or(&b""[..], |a| &a[..]));
    } else if let Some(msg) = args.get(1) {
        o.bulk(out, msg);
    } else {
        o.simple(out, "PONG");
    }
    Next::Go
}

fn echo(_: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    c.out().bulk(out, &args[1]);
    Next::Go
}

fn valid_name(name: &[u8]) -> bool {
    name.iter().all(|b| (b'!'..=b'~').contains(b))
}

fn password_ok(b: &Broker, user: Option<&[u8]>, pass: &[u8]) -> bool {
    if user.is_some_and(|u| u != b"default") {
        return false;
    }
    match &b.settings.password {
        // The default user has no password: any password is accepted for it.
        None => true,
        Some(p) => constant_time_eq(p.as_bytes(), pass),
    }
}

/// Equal in time that does not depend on where the bytes differ. (subtle answers at
/// once for a different length, which tells only the length.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

fn auth(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    match args.len() {
        2 if b.settings.password.is_none() => o.error(out, "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"),
        2 | 3 => {
            let user = (args.len() == 3).then(|| &args[1][..]);
            if password_ok(b, user, &args[args.len() - 1]) {
                c.authenticated = true;
                o.simple(out, "OK");
            } else {
                o.error(out, WRONGPASS);
            }
        }
        _ => o.error(out, "ERR syntax error"),
    }
    Next::Go
}

fn hello(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    let mut proto = if c.resp3 { 3 } else { 2 };
    if let Some(v) = args.get(1) {
        match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            None => {
                o.error(
                    out,
                    "ERR Protocol version is not an integer or out of range",
                );
                return Next::Go;
            }
            Some(2) => proto = 2,
            Some(3) => proto = 3,
            Some(_) => {
                o.error(out, "NOPROTO unsupported protocol version");
                return Next::Go;
            }
        }
    }
    let mut auth: Option<(&Bytes, &Bytes)> = None;
    let mut setname: Option<&Bytes> = None;
    let mut j = 2;
    while j < args.len() {
        let opt = String::from_utf8_lossy(&args[j]).to_ascii_lowercase();
        let left = args.len() - j - 1;
        if opt == "auth" && left >= 2 {
            auth = Some((&args[j + 1], &args[j + 2]));
            j += 3;
        } else if opt == "setname" && left >= 1 {
            setname = Some(&args[j + 1]);
            j += 2;
        } else {
            o.error(
                out,
                &format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[j])
                ),
            );
            return Next::Go;
        }
    }
    if let Some((user, pass)) = auth {
        if !password_ok(b, Some(user), pass) {
            o.error(out, WRONGPASS);
            return Next::Go;
        }
        c.authenticated = true;
    }
    if !c.authenticated {
        o.error(out, "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
        return Next::Go;
    }
    if let Some(name) = setname {
        if !valid_name(name) {
            o.error(
                out,
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
            return Next::Go;
        }
        c.name = (!name.is_empty()).then(|| name.clone());
    }
    c.set_protocol(proto == 3);
    let o = c.out();
    o.map(out, 7);
    o.bulk(out, b"server");
    o.bulk(out, b"redis");
    o.bulk(out, b"version");
    o.bulk(out, REDIS_VERSION.as_bytes());
    o.bulk(out, b"proto");
    o.int(out, proto);
    o.bulk(out, b"id");
    o.int(out, c.handle.id as i64);
    o.bulk(out, b"mode");
    o.bulk(out, b"standalone");
    o.bulk(out, b"role");
    o.bulk(out, b"master");
    o.bulk(out, b"modules");
    o.array(out, 0);
    Next::Go
}

fn client(_: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    match String::from_utf8_lossy(&args[1])
        .to_ascii_lowercase()
        .as_str()
    {
        "id" => o.int(out, c.handle.id as i64),
        "getname" => match &c.name {
            Some(n) => o.bulk(out, n),
            None => o.null(out),
        },
        "setname" => {
            if valid_name(&args[2]) {
                c.name = (!args[2].is_empty()).then(|| args[2].clone());
                o.simple(out, "OK");
            } else {
                o.error(
                    out,
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
        }
        "reply" => match String::from_utf8_lossy(&args[2])
            .to_ascii_lowercase()
            .as_str()
        {
            "on" => {
                c.reply = Reply::On;
                o.simple(out, "OK");
            }
            "off" => c.reply = Reply::Off,
            "skip" => {
                if c.reply == Reply::On {
                    c.reply = Reply::Skip;
                }
            }
            _ => o.error(out, "ERR syntax error"),
        },
        // setinfo (Redis 7.2): accepted and remembered nowhere, as it only labels.
        _ => {
            let attr = String::from_utf8_lossy(&args[2]).to_ascii_lowercase();
            if attr != "lib-name" && attr != "lib-ver" {
                o.error(
                    out,
                    &format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&args[2])
                    ),
                );
            } else if !valid_name(&args[3]) {
                o.error(out, "ERR lib-name and lib-ver cannot contain spaces, newlines or special characters.");
            } else {
                o.simple(out, "OK");
            }
        }
    }
    Next::Go
}

fn select(_: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    match std::str::from_utf8(&args[1])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        None => o.error(out, "ERR value is not an integer or out of range"),
        Some(n) if !(0..DATABASES).contains(&n) => o.error(out, "ERR DB index is out of range"),
        // Pub/sub does not depend on the database.
        Some(_) => o.simple(out, "OK"),
    }
    Next::Go
}

fn quit(_: &Broker, c: &mut Client, _: &[Bytes], out: &mut BytesMut) -> Next {
    c.out().simple(out, "OK");
    Next::Close
}

fn reset(b: &Broker, c: &mut Client, _: &[Bytes], out: &mut BytesMut) -> Next {
    b.forget(c);
    c.name = None;
    c.authenticated = b.settings.password.is_none();
    c.set_protocol(false);
    c.out().simple(out, "RESET");
    Next::Go
}

/// Replies `[kind, name, count]` as a push (an array in RESP2).
fn confirm(o: Out, out: &mut BytesMut, kind: &str, name: Option<&[u8]>, count: usize) {
    o.push(out, 3);
    o.bulk(out, kind.as_bytes());
    match name {
        Some(n) => o.bulk(out, n),
        None => o.null(out),
    }
    o.int(out, count as i64);
}

fn subscribe_in(b: &Broker, c: &mut Client, space: Space, names: &[Bytes], out: &mut BytesMut) {
    let kind = match space {
        Space::Channel => "subscribe",
        Space::Pattern => "psubscribe",
        Space::Shard => "ssubscribe",
    };
    for name in names {
        let set = match space {
            Space::Channel => &mut c.channels,
            Space::Pattern => &mut c.patterns,
            Space::Shard => &mut c.shard,
        };
        if set.insert(name.clone()) {
            b.registry.subscribe(space, name.clone(), &c.handle);
        }
        let count = if space == Space::Shard {
            c.shard.len()
        } else {
            c.subscriptions()
        };
        confirm(c.out(), out, kind, Some(name), count);
    }
}

fn unsubscribe_in(b: &Broker, c: &mut Client, space: Space, names: &[Bytes], out: &mut BytesMut) {
    let kind = match space {
        Space::Channel => "unsubscribe",
        Space::Pattern => "punsubscribe",
        Space::Shard => "sunsubscribe",
    };
    let set = match space {
        Space::Channel => &c.channels,
        Space::Pattern => &c.patterns,
        Space::Shard => &c.shard,
    };
    let names: Vec<Bytes> = if names.is_empty() {
        set.iter().cloned().collect()
    } else {
        names.to_vec()
    };
    if names.is_empty() {
        let count = if space == Space::Shard {
            c.shard.len()
        } else {
            c.subscriptions()
        };
        confirm(c.out(), out, kind, None, count);
        return;
    }
    for name in names {
        let set = match space {
            Space::Channel => &mut c.channels,
            Space::Pattern => &mut c.patterns,
            Space::Shard => &mut c.shard,
        };
        if set.remove(&name) {
            b.registry.unsubscribe(space, &name, c.handle.id);
        }
        let count = if space == Space::Shard {
            c.shard.len()
        } else {
            c.subscriptions()
        };
        confirm(c.out(), out, kind, Some(&name), count);
    }
}

fn subscribe(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    subscribe_in(b, c, Space::Channel, &args[1..], out);
    Next::Go
}
fn psubscribe(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    subscribe_in(b, c, Space::Pattern, &args[1..], out);
    Next::Go
}
fn ssubscribe(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    subscribe_in(b, c, Space::Shard, &args[1..], out);
    Next::Go
}
fn unsubscribe(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    unsubscribe_in(b, c, Space::Channel, &args[1..], out);
    Next::Go
}
fn punsubscribe(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    unsubscribe_in(b, c, Space::Pattern, &args[1..], out);
    Next::Go
}
fn sunsubscribe(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    unsubscribe_in(b, c, Space::Shard, &args[1..], out);
    Next::Go
}

fn publish(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    // Delivered (to this client too, if subscribed) before the reply is queued.
    let n = b.registry.publish(&args[1], &args[2]);
    c.out().int(out, n);
    Next::Go
}

fn spublish(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let n = b.registry.spublish(&args[1], &args[2]);
    c.out().int(out, n);
    Next::Go
}

fn pubsub(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
    let space = if sub.starts_with("shard") {
        Space::Shard
    } else {
        Space::Channel
    };
    match sub.as_str() {
        "channels" | "shardchannels" if args.len() > 3 => o.error(
            out,
            &format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try PUBSUB HELP.",
                truncate(&String::from_utf8_lossy(&args[1]), 128)
            ),
        ),
        "channels" | "shardchannels" => {
            let names = b.registry.names(space, args.get(2).map(|p| &p[..]));
            o.array(out, names.len());
            for n in names {
                o.bulk(out, &n);
            }
        }
        "numsub" | "shardnumsub" => {
            o.array(out, (args.len() - 2) * 2);
            for ch in &args[2..] {
                o.bulk(out, ch);
                o.int(out, b.registry.numsub(space, ch) as i64);
            }
        }
        _ => o.int(out, b.registry.numpat() as i64),
    }
    Next::Go
}

fn flush(_: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    match args.get(1).map(|a| a.to_ascii_lowercase()) {
        None => o.simple(out, "OK"),
        Some(a) if args.len() == 2 && (a == b"sync" || a == b"async") => o.simple(out, "OK"),
        Some(_) => o.error(out, "ERR syntax error"),
    }
    Next::Go
}

fn command(_: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let o = c.out();
    let sub = args
        .get(1)
        .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
    match sub.as_deref() {
        Some("count") => o.int(out, COMMANDS.len() as i64),
        // No documentation to give; clients (redis-cli) fall back to their own.
        Some("docs") => o.map(out, 0),
        Some("list") => {
            o.array(out, COMMANDS.len());
            for cmd in COMMANDS {
                o.bulk(out, cmd.name.as_bytes());
            }
        }
        Some(_) => {
            o.array(out, args.len() - 2);
            for name in &args[2..] {
                let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                match COMMANDS.iter().find(|c| c.name == name) {
                    Some(cmd) => command_info(o, out, cmd),
                    None => o.null(out),
                }
            }
        }
        None => {
            o.array(out, COMMANDS.len());
            for cmd in COMMANDS {
                command_info(o, out, cmd);
            }
        }
    }
    Next::Go
}

fn command_info(o: Out, out: &mut BytesMut, cmd: &Command) {
    o.array(out, 10);
    o.bulk(out, cmd.name.as_bytes());
    o.int(out, cmd.arity as i64);
    let mut flags = vec!["pubsub", "fast"];
    if cmd.no_auth {
        flags.push("no_auth");
    }
    o.array(out, flags.len());
    for f in flags {
        o.simple(out, f);
    }
    o.int(out, 0);
    o.int(out, 0);
    o.int(out, 0);
    for _ in 0..4 {
        o.array(out, 0);
    }
}

fn info(b: &Broker, c: &mut Client, args: &[Bytes], out: &mut BytesMut) -> Next {
    let section = args
        .get(1)
        .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
    c.out().verbatim(out, b.info(section.as_deref()).as_bytes());
    Next::Go
}

/// Writes a client's replies and messages, in order: whatever is buffered when it
/// wakes goes out in one write. Carried by an upgrade, it stops at its next wait
/// and gives back its half of the socket and what was queued.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    handle: Arc<ClientHandle>,
) -> Option<(OwnedWriteHalf, BytesMut)> {
    let mut batch = BytesMut::with_capacity(16 * 1024);
    loop {
        let closing = handle.take(&mut batch).await;
        if handle.is_killed() {
            return None;
        }
        if handle.is_carried() {
            return Some((writer, batch));
        }
        if !batch.is_empty() {
            if writer.write_all(&batch).await.is_err() {
                return None;
            }
            handle.written(batch.len());
            batch.clear();
            if batch.capacity() > 1024 * 1024 {
                // A large burst passed: do not keep its buffer for the connection's life.
                batch = BytesMut::with_capacity(16 * 1024);
            }
        }
        if closing {
            let _ = writer.shutdown().await;
            return None;
        }
    }
}

impl Settings {
    /// The settings `[message_queue]` asks for.
    pub fn from_config(mq: &crate::config::MessageQueue) -> Settings {
        Settings {
            password: mq.password.clone().filter(|p| !p.is_empty()),
            max_bulk: mq.max_bulk,
            max_args: mq.max_args,
            max_command: mq.max_command,
            max_clients: mq.max_clients,
            output: OutputLimit {
                hard: mq.output_limit_hard as usize,
                soft: mq.output_limit_soft as usize,
                soft_for: mq.output_limit_soft_for,
            },
        }
    }
}

/// The URL workers use to reach a broker listening on `addr`.
pub fn url_for(addr: SocketAddr, password: Option<&str>) -> String {
    let host = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    let host = SocketAddr::new(host, addr.port());
    match password {
        Some(p) if !p.is_empty() => {
            let enc: String = p
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("redis://:{enc}@{host}/0")
        }
        _ => format!("redis://{host}/0"),
    }
}

/// The broker's address is taken or not ours.
#[derive(Debug, thiserror::Error)]
#[error("message queue cannot listen on {addr}: {cause}")]
pub struct ListenError {
    /// The configured address.
    pub addr: SocketAddr,
    /// What the system said.
    pub cause: std::io::Error,
}

/// Binds and starts a broker, its tasks `owner`'s; returns it and the address it
/// listens on (port 0: the one the system chose).
pub async fn start(
    addr: SocketAddr,
    settings: Settings,
    owner: &Life,
) -> Result<(Arc<Broker>, SocketAddr), ListenError> {
    let listen_error = |cause| ListenError { addr, cause };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let listener = listener.into_std().map_err(listen_error)?;
    start_on(listener, settings, owner).map_err(listen_error)
}

/// As `start`, on a socket already listening (one an upgrade carried over: the
/// clients waiting in its backlog are served).
pub fn start_on(
    listener: std::net::TcpListener,
    settings: Settings,
    owner: &Life,
) -> std::io::Result<(Arc<Broker>, SocketAddr)> {
    let local = listener.local_addr()?;
    let broker = Broker::new(settings, local.port());
    if let Ok(copy) = listener.try_clone() {
        let _ = broker.socket.set(copy);
    }
    listener.set_nonblocking(true)?;
    broker.spawn(TcpListener::from_std(listener)?, owner);
    Ok((broker, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_command_text() {
        let args = vec![Bytes::from("FOO"), Bytes::from("a"), Bytes::from("b")];
        assert_eq!(
            unknown_command(&args),
            "ERR unknown command 'FOO', with args beginning with: 'a' 'b' "
        );
        let long = vec![
            Bytes::from("x"),
            Bytes::from("y".repeat(300)),
            Bytes::from("z"),
        ];
        let text = unknown_command(&long);
        assert!(text.ends_with(&format!("'{}' ", "y".repeat(128))), "{text}");
    }

    #[test]
    fn message_framing() {
        let mut b = BytesMut::new();
        registry::frame_message(&mut b, false, registry::Kind::Message, None, b"ch", 3);
        assert_eq!(&b[..], b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\n");
        b.clear();
        registry::frame_message(
            &mut b,
            true,
            registry::Kind::PMessage,
            Some(b"c*"),
            b"ch",
            0,
        );
        assert_eq!(
            &b[..],
            b">4\r\n$8\r\npmessage\r\n$2\r\nc*\r\n$2\r\nch\r\n$0\r\n"
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        // The hand-written compare truncated the length difference to a byte.
        let mut padded = b"abc".to_vec();
        padded.extend(std::iter::repeat_n(0u8, 256));
        assert!(!constant_time_eq(b"abc", &padded));
    }
}
