//! The configuration: one TOML file (or the equivalent command-line flags) read into
//! plain typed structs, validated once at start.
//!
//! This module owns parsing, defaults and validation. Every error names the file, the
//! key and what is wrong; unknown keys are errors. It must not start anything: the
//! other modules receive a finished, validated [`Config`].

pub mod prefix;

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration, as the running proxy sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file it was read from (canonical), if any: a running corral is found by
    /// it (`admin::file_link`). Not a key.
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// Plain-HTTP addresses to accept clients on (default 127.0.0.1:8000 when no
    /// `[[listener]]` is given either).
    #[serde(default, deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Listeners with options: TLS, or a redirect to https.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listener: Vec<Listener>,
    /// Basic authentication for every path but the exempt ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Peers (addresses or CIDR ranges) whose X-Forwarded-* headers are kept and
    /// appended to; from anyone else they are replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// Worker addresses (`IP:port`) that corral forwards to.
    #[serde(default, deserialize_with = "addr_list")]
    pub upstreams: Vec<SocketAddr>,
    #[serde(default)]
    /// Engine.IO routing: path, stickiness, session table bounds, tagged sids.
    pub engineio: EngineIo,
    #[serde(default)]
    /// How new sessions are spread over workers.
    pub balance: Balance,
    #[serde(default)]
    /// Active health checks of the workers.
    pub health: Health,
    #[serde(default)]
    /// Size and count limits.
    pub limits: Limits,
    #[serde(default)]
    /// Timeouts, on the client side and towards workers.
    pub timeouts: Timeouts,
    /// Worker processes corral starts and supervises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Workers>,
    /// The message queue handed to the workers: the embedded broker or a Redis URL.
    #[serde(default)]
    pub message_queue: MessageQueue,
    /// The admin listener: /metrics, /status, /status.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    /// The access log.
    pub access_log: AccessLogConfig,
    /// Unix socket for `corral reload`, `corral scale` and `corral status`. Default:
    /// `corral-<first listen port>.sock` in the temporary directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    /// Threads serving client connections, each with whole connections of its own:
    /// a number, or `"auto"` (the default) for one per CPU.
    #[serde(default)]
    pub threads: Count,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain-HTTP listeners, as
    /// nginx's `listen ... http2` does. Off by default: browsers and curl speak h2
    /// only over TLS (where ALPN picks it), and a plain listener that serves
    /// HTTP/1.1 alone skips the protocol detection on every connection.
    #[serde(default)]
    pub h2c: bool,
    /// Pass on request header names with an underscore (`X_Forwarded_For`). Off by
    /// default, as nginx's `underscores_in_headers`: a CGI or WSGI server maps `-`
    /// and `_` to one key, so such a name could pose as one corral sets.
    #[serde(default)]
    pub underscores_in_headers: bool,
    /// `[cluster]`: this node's name and the key its sid tags are signed with (and,
    /// with several nodes, the others).
    #[serde(default)]
    pub cluster: Cluster,
}

/// `[cluster]`: what tagged sids need (`engineio.tag_sids`): this node's name and the
/// key every node shares; the other nodes, when there are several.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// This node's name, the same on every start (it is part of each tag).
    pub node: String,
    /// The key tags are signed with, shared by every node. Without `key` or
    /// `key_file`, a random key per start: tags then do not survive a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A file holding the key (its bytes, trailing whitespace removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The other nodes: name = "host:port of its listener" (plain HTTP; the host may
    /// be a DNS name, looked up again every few seconds, as a Kubernetes headless
    /// service gives). A request whose tag names one of them is sent there once,
    /// marked as a hop.
    pub nodes: BTreeMap<String, String>,
    /// Keys accepted besides `key` (tags and hop marks made under them), never
    /// signed with: a rotation gives every node the new key here first, then
    /// makes it `key` everywhere.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accept_keys: Vec<String>,
    /// How long a reload that changes the key keeps accepting the key it replaced.
    #[serde(with = "duration")]
    pub previous_key_for: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            node: "corral".into(),
            key: None,
            key_file: None,
            nodes: BTreeMap::new(),
            accept_keys: Vec::new(),
            previous_key_for: Duration::from_secs(3600),
        }
    }
}

impl Cluster {
    /// The signing key: from `key`, `key_file`, or random (and said so).
    pub fn signing_key(&self) -> Result<Vec<u8>, BadValue> {
        if let Some(k) = &self.key {
            return Ok(k.as_bytes().to_vec());
        }
        if let Some(f) = &self.key_file {
            let bytes = std::fs::read(f).map_err(|e| {
                BadValue::new(format!(
                    "cluster.key_file {}: cannot read: {e}",
                    f.display()
                ))
            })?;
            let end = bytes
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |i| i + 1);
            if end < 16 {
                return Err(BadValue::new(format!(
                    "cluster.key_file {}: a key of at least 16 bytes is needed",
                    f.display()
                )));
            }
            return Ok(bytes[..end].to_vec());
        }
        let mut key = vec![0u8; 32];
        // SAFETY: getrandom fills the buffer it is given, up to its length.
        let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
        if n != key.len() as isize {
            return Err(BadValue::new(
                "cannot make a random tag key (getrandom failed)".into(),
            ));
        }
        Ok(key)
    }
}

/// The command line of a worker: a string run by `/bin/sh -c` (quotes as in a shell)
/// or an argument list run as is. `{port}` and `{id}` are replaced in either.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum WorkerCommand {
    /// One string, run by `/bin/sh -c`.
    Shell(String),
    /// A program and its arguments, run as is.
    Args(Vec<String>),
}

impl WorkerCommand {
    /// Its words, a shell string split on blanks: enough to look for options,
    /// not a shell's parse.
    pub fn words(&self) -> Vec<&str> {
        match self {
            WorkerCommand::Shell(s) => s.split_whitespace().collect(),
            WorkerCommand::Args(a) => a.iter().map(String::as_str).collect(),
        }
    }
}

/// How many workers: a number, or `"auto"` for one per CPU.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Count {
    /// This many.
    Fixed(usize),
    #[default]
    /// One per CPU.
    Auto,
}

impl Count {
    /// The number of workers this means on this machine.
    pub fn resolve(self) -> usize {
        match self {
            Count::Fixed(n) => n,
            Count::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Count::Fixed(n) => s.serialize_u64(*n as u64),
            Count::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(Count::Fixed(n as usize)),
            NumOrStr::Str(s) if s == "auto" => Ok(Count::Auto),
            NumOrStr::Str(s) => Err(serde::de::Error::custom(format!(
                "`{s}` is not a count: use a number or \"auto\""
            ))),
        }
    }
}

/// Supervised workers: `[workers]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workers {
    /// The command that starts one worker; `{port}` is replaced by its port.
    pub command: WorkerCommand,
    #[serde(default = "default_count")]
    /// How many workers to run.
    pub count: Count,
    /// First port; workers take the lowest free ports from here. Unset: corral picks
    /// free loopback ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The directory workers start in.
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    /// Extra environment for the workers.
    pub env: BTreeMap<String, String>,
    /// Readiness: empty means any HTTP answer to `GET /`; a path must answer 2xx/3xx.
    #[serde(default)]
    pub ready_path: String,
    #[serde(default = "default_start_timeout", with = "duration")]
    /// How long a worker may take to answer HTTP after it starts.
    pub start_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a worker is stopped.
    #[serde(default = "default_stop_grace", with = "duration")]
    pub stop_grace: Duration,
    /// How long a replaced worker keeps serving its sessions in a rolling restart.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    /// Longest wait between restarts of a worker that keeps crashing.
    #[serde(default = "default_backoff_max", with = "duration")]
    pub backoff_max: Duration,
    /// A worker being replaced or removed, once it has no plain request in flight,
    /// has its websockets closed (1012, service restart) at moments spread over this
    /// window, so that their clients do not all reconnect at once.
    #[serde(default = "default_close_spread", with = "duration")]
    pub close_spread: Duration,
}

/// `workers.close_spread` when not set.
pub const DEFAULT_CLOSE_SPREAD: Duration = Duration::from_secs(2);

fn default_close_spread() -> Duration {
    DEFAULT_CLOSE_SPREAD
}

/// `[message_queue]`: the embedded Redis-protocol broker, or an external Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageQueue {
    /// Run the embedded broker. Default: yes when corral supervises workers and no
    /// `url` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded: Option<bool>,
    /// Where the embedded broker listens (port 0: a free port).
    #[serde(with = "addr")]
    pub listen: SocketAddr,
    /// An external Redis instead (`redis://host:port/db`), for deployments across
    /// machines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Required by the embedded broker when it listens beyond loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Largest bulk string (a published message) accepted.
    #[serde(with = "size")]
    pub max_bulk: u64,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Most bytes in one command, its arguments together (Redis's
    /// client-query-buffer-limit).
    #[serde(with = "size")]
    pub max_command: u64,
    /// Most clients connected at once; one more is told so and closed (Redis's
    /// maxclients).
    pub max_clients: usize,
    /// A subscriber whose unsent backlog passes this is disconnected at once.
    #[serde(with = "size")]
    pub output_limit_hard: u64,
    /// ... or stays above this for `output_limit_soft_for`.
    #[serde(with = "size")]
    pub output_limit_soft: u64,
    #[serde(with = "duration")]
    /// How long a subscriber may stay over the soft output limit.
    pub output_limit_soft_for: Duration,
    /// How long a supervised worker may serve Engine.IO sessions without a
    /// subscription on the embedded queue before corral calls it deaf (status page,
    /// /status.json, one warning in the log).
    #[serde(with = "duration")]
    pub unsubscribed_grace: Duration,
}

impl Default for MessageQueue {
    fn default() -> Self {
        MessageQueue {
            embedded: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            url: None,
            password: None,
            max_bulk: 64 << 20,
            max_args: 1024 * 1024,
            max_command: 128 << 20,
            max_clients: 10_000,
            output_limit_hard: 32 << 20,
            output_limit_soft: 8 << 20,
            output_limit_soft_for: Duration::from_secs(60),
            unsubscribed_grace: Duration::from_secs(20),
        }
    }
}

impl Config {
    /// Every listener: `listen` entries (plain) and `[[listener]]` ones; 127.0.0.1:8000
    /// when neither is given.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut all: Vec<Listener> = self
            .listen
            .iter()
            .map(|a| Listener {
                address: *a,
                tls: None,
                redirect_https: false,
            })
            .collect();
        all.extend(self.listener.iter().cloned());
        if all.is_empty() {
            all.push(Listener {
                address: SocketAddr::from(([127, 0, 0, 1], 8000)),
                tls: None,
                redirect_https: false,
            });
        }
        all
    }

    /// The port of the first listener (it names the admin socket).
    pub fn first_port(&self) -> u16 {
        self.listeners()[0].address.port()
    }

    /// The networks whose forwarded headers are believed (`trusted_proxies`).
    pub fn trusted(&self) -> Vec<Cidr> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| Cidr::parse(p).ok())
            .collect()
    }

    /// Whether the embedded broker runs.
    pub fn embedded_broker(&self) -> bool {
        let mq = &self.message_queue;
        mq.embedded
            .unwrap_or(mq.url.is_none() && self.workers.is_some())
    }
}

fn default_count() -> Count {
    Count::Fixed(1)
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(10)
}

impl Workers {
    /// Workers from a command line (`corral run -w 4 -- gunicorn ... {port} ...`).
    pub fn from_args(args: Vec<String>, count: Count) -> Workers {
        Workers {
            command: WorkerCommand::Args(args),
            count,
            base_port: None,
            cwd: None,
            env: BTreeMap::new(),
            ready_path: String::new(),
            start_timeout: default_start_timeout(),
            stop_grace: default_stop_grace(),
            drain_timeout: default_drain(),
            backoff_max: default_backoff_max(),
            close_spread: DEFAULT_CLOSE_SPREAD,
        }
    }
}

/// One `[[listener]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// The address to listen on.
    #[serde(with = "addr")]
    pub address: SocketAddr,
    /// `"self-signed"`, or `{ cert = "chain.pem", key = "key.pem" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSetting>,
    /// Answer every request with a redirect to the https listener.
    #[serde(default)]
    pub redirect_https: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
/// A listener's certificate: `"self-signed"` or PEM files.
pub enum TlsSetting {
    /// `"self-signed"`.
    Mode(String),
    /// PEM files.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
}

impl<'de> Deserialize<'de> for TlsSetting {
    /// Says which forms are accepted; serde's untagged error says only that none
    /// matched.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Files {
            cert: PathBuf,
            key: PathBuf,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mode(String),
            Files(Files),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Mode(m)) => Ok(TlsSetting::Mode(m)),
            Ok(Raw::Files(f)) => Ok(TlsSetting::Files {
                cert: f.cert,
                key: f.key,
            }),
            Err(_) => Err(serde::de::Error::custom(
                "must be \"self-signed\" or { cert = \"chain.pem\", key = \"key.pem\" } \
                 (a PEM certificate chain and its private key)",
            )),
        }
    }
}

/// `[auth]`: HTTP basic authentication from an htpasswd file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The htpasswd file (bcrypt, apr1 MD5, SHA-1 entries).
    pub htpasswd: PathBuf,
    #[serde(default = "default_realm")]
    /// The realm named in the 401 challenge.
    pub realm: String,
    /// Path prefixes (segment-wise) that need no credentials, e.g. a health check.
    #[serde(default)]
    pub exempt: Vec<String>,
}

fn default_realm() -> String {
    "corral".into()
}

/// `[admin]`: metrics and the status page on a port of their own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen", with = "addr")]
    /// The address of the admin listener (status page, metrics, probes).
    pub listen: SocketAddr,
    /// Optional basic auth for the admin pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<PathBuf>,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000))
}

/// `[access_log]`: one line per request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Whether requests are logged.
    pub enabled: bool,
    /// Line format.
    pub format: LogFormat,
    /// `-` for stdout, or a file appended to.
    pub path: String,
    /// Log Engine.IO requests too (a polling client makes one every few seconds).
    pub engineio: bool,
}

/// How access log lines are written: nginx's combined format, or one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    /// nginx's `combined` format.
    Combined,
    /// One JSON object per line.
    Json,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            format: LogFormat::Combined,
            path: "-".into(),
            engineio: false,
        }
    }
}

/// A trusted proxy range (`ipnet`'s), where an IPv4 range also holds the
/// IPv4-mapped IPv6 form of its addresses (a dual-stack listener's view).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    /// Parses `a.b.c.d/n`, `a:b::/n` or a bare address.
    pub fn parse(s: &str) -> Result<Cidr, BadValue> {
        let text = s.trim();
        if let Ok(ip) = text.parse::<std::net::IpAddr>() {
            return Ok(Cidr(ip.into()));
        }
        text.parse::<ipnet::IpNet>().map(Cidr).map_err(|_| {
            BadValue::new(format!(
                "`{s}` is not an address or CIDR range (a.b.c.d/n or a:b::/n)"
            ))
        })
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) if matches!(self.0, ipnet::IpNet::V4(_)) => {
                match v6.to_ipv4_mapped() {
                    Some(v4) => std::net::IpAddr::V4(v4),
                    None => return false,
                }
            }
            other => other,
        };
        self.0.contains(&ip)
    }
}

/// How the Engine.IO path is recognised and how sessions are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineIo {
    /// Path prefix of the Engine.IO endpoint (Socket.IO's default is `/socket.io/`).
    pub path: String,
    /// Route every request of a session to the worker that created it. Turning this off
    /// reproduces what `gunicorn -w N` does (sessions thrash); it exists to show that.
    pub sticky: bool,
    /// Upper bound on remembered sessions; handshakes beyond it get 503.
    pub max_sessions: usize,
    /// Forget a session with no request for this long. When unset, the bound is derived
    /// from the worker's handshake: pingInterval + pingTimeout + 15 s.
    #[serde(with = "opt_duration")]
    pub session_idle: Option<Duration>,
    /// Carry each session's worker in its sid (`sid.TAG`, signed with
    /// `cluster.key`), so that a restarted corral, or another node, routes it
    /// without having seen the handshake. Off: the session table alone routes.
    pub tag_sids: bool,
}

impl Default for EngineIo {
    fn default() -> Self {
        EngineIo {
            path: "/socket.io/".into(),
            sticky: true,
            max_sessions: 1_000_000,
            session_idle: None,
            tag_sids: false,
        }
    }
}

/// Which worker gets a new Engine.IO session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Fewest live Engine.IO sessions, ties broken round-robin.
    #[default]
    LeastConnections,
    /// Each worker in turn.
    RoundRobin,
    /// Hash of the client address, as nginx's `ip_hash` (for comparison).
    IpHash,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::LeastConnections => "least-connections",
            Policy::RoundRobin => "round-robin",
            Policy::IpHash => "ip-hash",
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// How new sessions are spread over workers.
pub struct Balance {
    /// The balancing policy.
    pub policy: Policy,
}

/// Active health checks that bring a worker marked down back into service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    #[serde(with = "duration")]
    /// How often each worker is checked.
    pub interval: Duration,
    #[serde(with = "duration")]
    /// How long a check may take before it counts as failed.
    pub timeout: Duration,
    /// Path to GET; a 2xx/3xx answer is healthy. Empty: a TCP connect is the check.
    pub path: String,
    /// Passed checks in a row that bring a worker marked down back (HAProxy's rise).
    pub rise: u32,
    /// Failed checks in a row (health checks or refused connects) that mark a
    /// worker down (HAProxy's fall). A supervised worker whose process exits is
    /// down at once.
    pub fall: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            path: String::new(),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// Size and count limits: bodies, headers, connections.
pub struct Limits {
    /// Largest request body accepted (413 beyond it), counted while streaming.
    #[serde(with = "size")]
    pub max_body: u64,
    /// Largest request head (request line + headers) accepted.
    #[serde(with = "size")]
    pub max_header: u64,
    /// Most client connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 1 << 20,
            max_header: 64 << 10,
            max_connections: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// Timeouts, on the client side and towards workers.
pub struct Timeouts {
    /// Connecting to a worker (502 when it fails).
    #[serde(with = "duration")]
    pub connect: Duration,
    /// Waiting for a worker's response head on plain HTTP (504 beyond it).
    #[serde(with = "duration")]
    pub read: Duration,
    /// The same on the Engine.IO path; a long-poll GET may legitimately wait
    /// pingInterval + pingTimeout, so this must exceed it.
    #[serde(with = "duration")]
    pub engineio_read: Duration,
    /// A websocket tunnel with no bytes either way for this long is closed.
    #[serde(with = "duration")]
    pub websocket_idle: Duration,
    /// Reading a client's request head (cuts off slowloris clients).
    #[serde(with = "duration")]
    pub header_read: Duration,
    /// Idle worker connections kept for reuse this long. Keep it below the workers'
    /// own keep-alive timeout (gunicorn's is 2 s), or a request may be sent on a
    /// connection the worker is closing at that moment.
    #[serde(with = "duration")]
    pub upstream_idle: Duration,
    /// At shutdown, how long requests in flight may take to finish.
    #[serde(with = "duration")]
    pub shutdown_drain: Duration,
    /// A write to a client that cannot go out for this long (the client reads
    /// nothing) closes its connection (nginx's `send_timeout`).
    #[serde(with = "duration")]
    pub send: Duration,
    /// A request body that sends nothing for this long fails (nginx's
    /// `client_body_timeout`; the request gets 408).
    #[serde(with = "duration")]
    pub body_read: Duration,
    /// A kept-alive client connection with no request begun for this long is closed
    /// (nginx's `keepalive_timeout`); once a request's first byte has come, its head
    /// has `header_read`.
    #[serde(with = "duration")]
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            read: Duration::from_secs(60),
            engineio_read: Duration::from_secs(90),
            websocket_idle: Duration::from_secs(300),
            header_read: Duration::from_secs(10),
            upstream_idle: Duration::from_millis(1500),
            shutdown_drain: Duration::from_secs(5),
            send: Duration::from_secs(60),
            body_read: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
        }
    }
}

/// A configuration error that says where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{file}: cannot read: {cause}")]
    Read {
        /// The file.
        file: String,
        /// What the system said.
        cause: std::io::Error,
    },
    /// A key has a wrong or missing value.
    #[error("{file}: key `{key}`: {message}")]
    Key {
        /// The file.
        file: String,
        /// The key, as dotted path.
        key: String,
        /// What is wrong with its value.
        message: String,
    },
    /// The file is not valid TOML.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// What the parser said, with the line.
        message: String,
    },
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::load_part(path)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Reads a TOML file that is one part of the config (the rest comes from a
    /// command line, `corral gunicorn …`): every key checked, the whole not yet
    /// (the caller validates it once complete).
    pub fn load_part(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            file: file.clone(),
            cause,
        })?;
        let mut config = Config::parse_keys(&text, &file)?;
        // Paths in the file are relative to the file, not to where corral runs.
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for l in &mut config.listener {
            if let Some(TlsSetting::Files { cert, key }) = l.tls.as_mut() {
                rebase(cert);
                rebase(key);
            }
        }
        if let Some(a) = config.auth.as_mut() {
            rebase(&mut a.htpasswd);
        }
        if let Some(h) = config.admin.as_mut().and_then(|a| a.htpasswd.as_mut()) {
            rebase(h);
        }
        if config.access_log.path != "-" {
            let mut p = PathBuf::from(&config.access_log.path);
            rebase(&mut p);
            config.access_log.path = p.display().to_string();
        }
        if let Some(w) = config.workers.as_mut() {
            if let Some(cwd) = w.cwd.as_mut() {
                if cwd.is_relative() {
                    *cwd = base.join(&*cwd);
                }
            }
        }
        if let Some(sock) = config.admin_socket.as_mut() {
            if sock.is_relative() {
                *sock = base.join(&*sock);
            }
        }
        if let Some(k) = config.cluster.key_file.as_mut() {
            rebase(k);
        }
        config.file = std::fs::canonicalize(path).ok();
        Ok(config)
    }

    /// Whether this is only a part of a config: no workers to reach and none to
    /// start, as a file for the prefix mode (`corral -c FILE gunicorn …`) is.
    pub fn is_part(&self) -> bool {
        self.upstreams.is_empty() && self.workers.is_none()
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config = Config::parse_keys(text, file)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Parses TOML text, each key by its type, without the rules across keys.
    fn parse_keys(text: &str, file: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            file: file.into(),
            message: one_line(&e.to_string()),
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = did_you_mean(one_line(&e.inner().to_string()));
            if key == "." {
                ConfigError::Syntax {
                    file: file.into(),
                    message,
                }
            } else {
                ConfigError::Key {
                    file: file.into(),
                    key,
                    message,
                }
            }
        })?;
        Ok(config)
    }

    /// Checks what types alone cannot, of a whole config.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        self.validate_part(file)?;
        if self.is_part() {
            return Err(ConfigError::Key {
                file: file.into(),
                key: "upstreams".into(),
                message: "give worker addresses (upstreams = [\"127.0.0.1:5000\"]) or a [workers] command for corral to start".into(),
            });
        }
        Ok(())
    }

    /// As `validate`, of a part of a config: every rule but the one that asks for
    /// workers (the prefix mode's command line gives them).
    pub fn validate_part(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Key {
            file: file.into(),
            key: key.into(),
            message: message.into(),
        };
        if self.cluster.key.is_some() && self.cluster.key_file.is_some() {
            return Err(bad("cluster.key_file", "give key or key_file, not both"));
        }
        if self.cluster.key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err(bad("cluster.key", "a key of at least 16 bytes is needed"));
        }
        if self.cluster.accept_keys.iter().any(|k| k.len() < 16) {
            return Err(bad(
                "cluster.accept_keys",
                "each key needs at least 16 bytes",
            ));
        }
        if self.cluster.node.is_empty() {
            return Err(bad("cluster.node", "must not be empty"));
        }
        if !self.cluster.nodes.is_empty() {
            if self.cluster.nodes.contains_key(&self.cluster.node) {
                return Err(bad(
                    "cluster.nodes",
                    "lists this node itself (cluster.node); list only the others",
                ));
            }
            if self.cluster.key.is_none() && self.cluster.key_file.is_none() {
                return Err(bad(
                    "cluster.key",
                    "several nodes need a key they share (key or key_file)",
                ));
            }
            for (name, addr) in &self.cluster.nodes {
                let port = addr.rsplit_once(':').and_then(|(h, p)| {
                    (!h.is_empty()).then_some(())?;
                    p.parse::<u16>().ok()
                });
                if port.is_none() {
                    return Err(bad(
                        &format!("cluster.nodes.{name}"),
                        "must be \"host:port\" (the node's listener)",
                    ));
                }
            }
            if !self.engineio.tag_sids {
                return Err(bad(
                    "engineio.tag_sids",
                    "several nodes route by tagged sids: set it to true",
                ));
            }
        }
        for (i, l) in self.listener.iter().enumerate() {
            if let Some(TlsSetting::Mode(m)) = &l.tls {
                if m != "self-signed" {
                    return Err(bad(
                        &format!("listener[{i}].tls"),
                        "must be \"self-signed\" or { cert = \"...\", key = \"...\" }",
                    ));
                }
            }
            if l.redirect_https && l.tls.is_some() {
                return Err(bad(
                    &format!("listener[{i}].redirect_https"),
                    "a TLS listener cannot redirect to itself",
                ));
            }
        }
        if self.listener.iter().any(|l| l.redirect_https)
            && !self.listener.iter().any(|l| l.tls.is_some())
        {
            return Err(bad(
                "listener.redirect_https",
                "needs a TLS listener to redirect to",
            ));
        }
        if let Some(a) = &self.auth {
            if let Some(e) = a.exempt.iter().find(|e| !e.starts_with('/')) {
                return Err(bad("auth.exempt", &format!("`{e}` must start with '/'")));
            }
            if a.realm.contains('"') {
                return Err(bad("auth.realm", "must not contain '\"'"));
            }
        }
        for p in &self.trusted_proxies {
            Cidr::parse(p).map_err(|e| bad("trusted_proxies", &e.to_string()))?;
        }
        if self.threads == Count::Fixed(0) || self.threads.resolve() > 1024 {
            return Err(bad("threads", "must be 1 to 1024 (or \"auto\")"));
        }
        if let Some(w) = &self.workers {
            let empty = match &w.command {
                WorkerCommand::Shell(s) => s.trim().is_empty(),
                WorkerCommand::Args(a) => a.is_empty() || a[0].is_empty(),
            };
            if empty {
                return Err(bad("workers.command", "is empty"));
            }
            if w.count == Count::Fixed(0) {
                return Err(bad("workers.count", "must be at least 1 (or \"auto\")"));
            }
            if w.count.resolve() > 1024 {
                return Err(bad("workers.count", "more than 1024 workers"));
            }
            if !w.ready_path.is_empty() && !w.ready_path.starts_with('/') {
                return Err(bad(
                    "workers.ready_path",
                    "must start with '/' (or be empty)",
                ));
            }
            if w.start_timeout.is_zero() {
                return Err(bad("workers.start_timeout", "must be more than 0"));
            }
            if w.base_port == Some(0) {
                return Err(bad("workers.base_port", "must be a port number above 0"));
            }
        }
        let path = &self.engineio.path;
        if !path.starts_with('/') || !path.ends_with('/') || path.len() < 2 {
            return Err(bad(
                "engineio.path",
                "must start and end with '/', e.g. \"/socket.io/\"",
            ));
        }
        if self.engineio.max_sessions == 0 {
            return Err(bad("engineio.max_sessions", "must be at least 1"));
        }
        if !self.health.path.is_empty() && !self.health.path.starts_with('/') {
            return Err(bad("health.path", "must start with '/' (or be empty)"));
        }
        for (key, value) in [
            ("health.interval", self.health.interval),
            ("health.timeout", self.health.timeout),
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.read", self.timeouts.read),
            ("timeouts.engineio_read", self.timeouts.engineio_read),
            ("timeouts.websocket_idle", self.timeouts.websocket_idle),
            ("timeouts.header_read", self.timeouts.header_read),
        ] {
            if value.is_zero() {
                return Err(bad(key, "must be more than 0"));
            }
        }
        let mq = &self.message_queue;
        if mq.embedded == Some(true) && mq.url.is_some() {
            return Err(bad(
                "message_queue.url",
                "an external url and embedded = true exclude each other",
            ));
        }
        if let Some(url) = &mq.url {
            if !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|s| url.starts_with(s))
            {
                return Err(bad(
                    "message_queue.url",
                    "must start with redis://, rediss:// or unix://",
                ));
            }
        }
        if self.embedded_broker()
            && !mq.listen.ip().is_loopback()
            && mq.password.as_deref().unwrap_or("").is_empty()
        {
            return Err(bad(
                "message_queue.password",
                "is required when the embedded broker listens beyond loopback",
            ));
        }
        if mq.max_bulk == 0 || mq.max_bulk > (512 << 20) {
            return Err(bad(
                "message_queue.max_bulk",
                "must be between 1 byte and 512M",
            ));
        }
        if mq.output_limit_soft > mq.output_limit_hard {
            return Err(bad(
                "message_queue.output_limit_soft",
                "must not exceed output_limit_hard",
            ));
        }
        if self.limits.max_header < 1024 {
            return Err(bad("limits.max_header", "must be at least 1K"));
        }
        if self.limits.max_connections == 0 {
            return Err(bad("limits.max_connections", "must be at least 1"));
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `corral check`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    items
        .iter()
        .map(|s| parse_addr(s).map_err(serde::de::Error::custom))
        .collect()
}

fn addr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_addr(s).map_err(serde::de::Error::custom))
        .collect()
}

/// An `IP:port` address; the error says what is wrong with it (a port out of
/// range, a host name, a missing port).
pub fn parse_addr(s: &str) -> Result<SocketAddr, BadValue> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = |why: String| Err(BadValue::new(format!("`{s}`: {why}")));
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("no port: write it as IP:port, e.g. 127.0.0.1:8000".into());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match port.parse::<u64>() {
        Ok(p) if p > 65535 => return bad(format!("port {p} is out of range (0 to 65535)")),
        Ok(_) => {}
        Err(_) => return bad(format!("`{port}` is not a port number")),
    }
    if host.parse::<std::net::IpAddr>().is_err() {
        return bad(format!(
            "`{host}` is not an IP address; host names are not accepted here: \
             write 127.0.0.1:{port} (this machine only), 0.0.0.0:{port} (every IPv4 \
             address) or [::]:{port}"
        ));
    }
    bad("not an address like 127.0.0.1:8000".into())
}

/// A single `IP:port` address in the file, as a string.
mod addr {
    use super::*;
    pub fn serialize<S: serde::Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        parse_addr(&text).map_err(serde::de::Error::custom)
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" with the nearest known
/// name offered, when one is near.
fn did_you_mean(message: String) -> String {
    let Some((_, rest)) = message.split_once("unknown field `") else {
        return message;
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message;
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|known| (strsim::levenshtein(unknown, known), known))
        .filter(|(d, known)| *d <= (known.len() / 3).max(2))
        .min();
    match nearest {
        Some((_, known)) => format!("{message}; did you mean `{known}`?"),
        None => message,
    }
}

/// A value that cannot be used, and why (the message names the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(String);

impl BadValue {
    /// A value refused for the reason `why`.
    pub fn new(why: String) -> BadValue {
        BadValue(why)
    }
}

/// Parses `"10s"`, `"500ms"`, `"2m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, BadValue> {
    let s = s.trim();
    // A bare number is seconds (as in nginx); anything with a unit is humantime's
    // ("500ms", "2m", "1h 30m").
    let parsed = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=1e9).contains(&secs) => {
            Ok(Duration::from_secs_f64(secs))
        }
        Ok(_) => Err(BadValue::new(format!("`{s}` is out of range"))),
        Err(_) => humantime::parse_duration(s).map_err(|e| {
            BadValue::new(format!(
                "`{s}` is not a duration like \"10s\", \"500ms\", \"2m\" ({e})"
            ))
        }),
    }?;
    if parsed.as_secs_f64() > 1e9 {
        return Err(BadValue::new(format!("`{s}` is out of range")));
    }
    Ok(parsed)
}

/// Parses `"200M"`, `"64K"`, `"1G"` (powers of 1024, as nginx) or a bare byte count.
/// Sizes are nginx's: K, M and G are powers of 1024 (`client_max_body_size 200M`).
/// Not the `bytesize` crate, which reads `64K` as 64,000 and would shrink every
/// limit copied from an nginx configuration.
pub fn parse_size(s: &str) -> Result<u64, BadValue> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 = num.parse().map_err(|_| {
        BadValue::new(format!(
            "`{s}` is not a size like \"200M\", \"64K\" or 1048576"
        ))
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        // "200MB" reads as 200,000,000 bytes to some and 200 MiB to others; nginx
        // refuses it, and so does corral, saying what to write.
        two @ ("kb" | "mb" | "gb" | "kib" | "mib" | "gib") => {
            let letter = two[..1].to_ascii_uppercase();
            return Err(BadValue::new(format!(
                "`{s}`: write {num}{letter} (as nginx: K, M and G are 1024, 1024² and 1024³ bytes)"
            )));
        }
        other => {
            return Err(BadValue::new(format!(
            "unknown size unit `{other}` in `{s}` (use K, M or G, powers of 1024, or a byte count)"
        )))
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| BadValue::new(format!("`{s}` is too large")))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

mod duration {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(Duration::from_secs(n)),
            NumOrStr::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
        }
    }
}

mod opt_duration {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_str("auto"),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(Some(Duration::from_secs(n))),
            NumOrStr::Str(s) if s == "auto" => Ok(None),
            NumOrStr::Str(s) => parse_duration(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

mod size {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(n),
            NumOrStr::Str(s) => parse_size(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            listen = ["127.0.0.1:9000", "[::1]:9000"]
            upstreams = ["127.0.0.1:5000", "127.0.0.1:5001"]
            [engineio]
            path = "/ws/"
            session_idle = "90s"
            [balance]
            policy = "ip-hash"
            [limits]
            max_body = "200M"
            [timeouts]
            read = "500ms"
            "#,
            "t.toml",
        )
        .expect("valid");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.balance.policy, Policy::IpHash);
        assert_eq!(c.limits.max_body, 200 << 20);
        assert_eq!(c.timeouts.read, Duration::from_millis(500));
        assert_eq!(c.engineio.session_idle, Some(Duration::from_secs(90)));
        // The printed effective config parses back to the same thing.
        let again = Config::parse(&c.to_toml(), "printed").expect("round trip");
        assert_eq!(again.limits.max_body, c.limits.max_body);
        assert_eq!(again.engineio.session_idle, c.engineio.session_idle);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse(
            "upstreams = [\"127.0.0.1:1\"]\n[limits]\nmax_bodyy = 3\n",
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.toml"), "{e}");
        assert!(e.contains("max_bodyy"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = Config::parse(
            "upstreams = [\"127.0.0.1:1\"]\n[timeouts]\nread = \"10 parsecs\"\n",
            "y.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("y.toml") && e.contains("timeouts.read"), "{e}");
        let e = Config::parse("upstreams = [\"nowhere\"]\n", "z.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstreams"), "{e}");
        let e = Config::parse(
            "upstreams = [\"127.0.0.1:1\"]\n[balance]\npolicy = \"random\"\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("balance.policy"), "{e}");
    }

    #[test]
    fn workers_section() {
        let c = Config::parse(
            "[workers]\ncommand = \"gunicorn -b 127.0.0.1:{port} app:app\"\ncount = \"auto\"\nenv = { A = \"1\" }\n",
            "w.toml",
        )
        .expect("workers alone are enough");
        let w = c.workers.as_ref().expect("workers");
        assert_eq!(w.count, Count::Auto);
        assert!(w.count.resolve() >= 1);
        assert_eq!(w.env.get("A").map(String::as_str), Some("1"));
        let again = Config::parse(&c.to_toml(), "printed").expect("round trip");
        assert_eq!(again.workers.map(|w| w.command), Some(w.command.clone()));
        for (text, key) in [
            ("[workers]\ncommand = \"x\"\ncount = 0\n", "workers.count"),
            ("[workers]\ncommand = []\n", "workers.command"),
            (
                "[workers]\ncommand = \"x\"\ncount = \"many\"\n",
                "workers.count",
            ),
            ("[workers]\ncommand = \"x\"\nrestart = true\n", "restart"),
        ] {
            let e = Config::parse(text, "w.toml").unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn missing_upstreams_is_an_error() {
        let e = Config::parse("", "e.toml").unwrap_err().to_string();
        assert!(e.contains("upstreams"), "{e}");
    }

    #[test]
    fn trusted_ranges_hold_their_addresses() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let net = Cidr::parse("10.0.0.0/8").expect("range");
        assert!(net.contains(ip("10.200.1.2")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!net.contains(ip("11.0.0.1")));
        let one = Cidr::parse(" 127.0.0.1 ").expect("address");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6 = Cidr::parse("fd00::/8").expect("range");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("all")
            .contains(ip("8.8.8.8")));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "host",
            "10.0.0/8",
            "10.0.0.0/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_say_what_is_wrong() {
        assert!(parse_addr("127.0.0.1:8000").is_ok());
        assert!(parse_addr("[::1]:8000").is_ok());
        let e = parse_addr("127.0.0.1:99999")
            .expect_err("range")
            .to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = parse_addr("localhost:9443").expect_err("name").to_string();
        assert!(
            e.contains("host names are not accepted") && e.contains("127.0.0.1:9443"),
            "{e}"
        );
        let e = parse_addr("8000").expect_err("port").to_string();
        assert!(e.contains("no port"), "{e}");
    }

    #[test]
    fn unknown_keys_get_the_nearest_known_one() {
        let e = Config::parse(
            "upstreams = [\"127.0.0.1:1\"]\n[limits]\nmax_bdoy = 1\n",
            "t.toml",
        )
        .expect_err("unknown")
        .to_string();
        assert!(e.contains("did you mean `max_body`?"), "{e}");
        let e = Config::parse("upstreams = [\"127.0.0.1:1\"]\nzzzzzz = 1\n", "t.toml")
            .expect_err("unknown")
            .to_string();
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn a_tls_typo_says_which_forms_are_accepted() {
        for tls in ["{ crt = \"a\", key = \"b\" }", "{ cert = \"a\" }", "7"] {
            let text = format!(
                "upstreams = [\"127.0.0.1:1\"]\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = {tls}\n"
            );
            let e = Config::parse(&text, "t.toml")
                .expect_err("typo")
                .to_string();
            assert!(e.contains("\"self-signed\" or { cert"), "{tls}: {e}");
            assert!(!e.contains("untagged"), "{e}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("99999999999h").is_err());
        assert!(parse_duration("-5").is_err());
        assert_eq!(parse_size("200M"), Ok(200 << 20), "nginx's M");
        let mb = parse_size("200MB").expect_err("ambiguous, as nginx finds it");
        assert!(mb.to_string().contains("write 200M"), "{mb}");
        assert!(parse_size("5b").is_err());
    }

    #[test]
    fn threads_must_be_a_count() {
        let parse = |v: &str| {
            Config::parse(
                &format!("upstreams = [\"127.0.0.1:1\"]\nthreads = {v}\n"),
                "t.toml",
            )
        };
        assert_eq!(parse("3").map(|c| c.threads.resolve()).ok(), Some(3));
        assert!(parse("\"auto\"").is_ok_and(|c| c.threads.resolve() >= 1));
        for bad in ["0", "\"many\""] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains("threads"), "{e}");
        }
    }

    #[test]
    fn documented_reference_parses() {
        // The reference block in docs/configuration.md is copied by users: every key
        // in it must be where the parser expects it.
        let readme = include_str!("../../docs/configuration.md");
        let start = readme
            .find("```toml")
            .map(|j| j + 7)
            .expect("reference block");
        let end = start + readme[start..].find("```").expect("end of block");
        let parsed: Result<Config, _> = toml::from_str(&readme[start..end]);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }
}
