//! Websocket tunnels: forward an `Upgrade: websocket` request to its worker (through
//! `forward`, on a kept-alive connection when one is idle, which then belongs to the
//! tunnel), relay the worker's 101, then relay bytes both ways (`relay`) until either
//! side closes or the tunnel is idle too long.
//!
//! Each worker's tunnels are relayed on one serving thread (both sockets move there
//! when the upgrade is done, where the listener can take its socket out), since a
//! worker writes a broadcast to all its clients at once.
//!
//! [`Tunnels`] owns the upgraded connections and their tasks, and has each send its
//! client a close frame at shutdown (1001) or when its worker is about to be
//! stopped (1012, at a moment spread over `workers.close_spread`), and at an upgrade
//! gives each cleartext tunnel's sockets and relay state to the new image (a TLS one
//! gets 1012) and resumes those it is given; nothing else. The
//! caller has already chosen the worker, and the ticket it hands over keeps the
//! session counted while the tunnel is open. It does not reach into the request path
//! (`route`).

use crate::counters::Counters;
use crate::http1::{origin_form, strip_hop_by_hop};
use crate::proxy::answer::{self, short};
use crate::proxy::forward::{prepare_request_headers, Forwarder, Peer, Target, Ticket};
use crate::proxy::relay::{
    resume, splice_from, Close, Early, Meter, Spliced, GOING_AWAY, SERVICE_RESTART,
};
use crate::runtime::handover;
use crate::runtime::life::Life;
use crate::transport::body::{Guarded, ProxyBody, RequestBody};
use crate::transport::http1::{self, Sending};
use crate::transport::moving::{Duplex, Handover, OnUpgrade, Replant, Taken};
use crate::transport::upstream::SendError;
use crate::workers::pool::{Pool, Worker};
use http::{Request, Response, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// The open tunnels: their tasks, in the client connections' lifetime, whose drain
/// signal closes them. One for the life of corral: a config reload changes the
/// [`Timing`] of new tunnels, and shutdown closes old and new alike.
pub struct Tunnels {
    life: Life,
    /// Tunnels opened so far, to place each one's close in the window.
    opened: AtomicU64,
    /// The serving threads: a worker's tunnels are relayed on one of them.
    lanes: OnceLock<Vec<Handle>>,
    carry: Arc<Carry>,
}

/// An upgrade's carry of the tunnels: at its signal each cleartext tunnel stops
/// where it stands and gives its sockets and state; a TLS one sends 1012 after
/// the frame in flight and ends.
#[derive(Default)]
struct Carry {
    signal: CancellationToken,
    /// Tunnel tasks not yet ended (relaying, or waiting for the client's socket).
    running: AtomicU64,
    ended: tokio::sync::Notify,
    given: std::sync::Mutex<Vec<Carried>>,
}

/// A tunnel as an upgrade carries it.
pub struct Carried {
    /// The client's socket.
    pub client: std::net::TcpStream,
    /// The worker's socket.
    pub worker: std::net::TcpStream,
    /// The rest: whose tunnel it is, and where the relay stood.
    pub state: handover::Tunnel,
}

/// A tunnel task, counted for the carry while it runs.
struct Running(Arc<Carry>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

/// Whose tunnel it is, for a carry: its worker and its session.
#[derive(Clone)]
struct Owner {
    worker: usize,
    sid: Option<String>,
    counted: bool,
    /// Only a worker of the pool (not another corral node) is found again.
    carried: bool,
}

/// What an upgrade goes through: the proxy's forwarder, pool and counters, and the
/// timing of the config in force.
pub(crate) struct Via<'a> {
    pub forward: &'a Forwarder,
    pub pool: &'a Pool,
    pub metrics: &'a Arc<Counters>,
    pub timing: Timing,
}

/// The times a tunnel is opened with (from the config at its upgrade).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the worker may take to answer the upgrade.
    pub read_timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle: Duration,
    /// The window over which a leaving worker's tunnels are closed.
    pub spread: Duration,
}

impl Tunnels {
    /// Resolves with the close code to send when the tunnel must end: 1001 at
    /// shutdown, 1012 some time within the spread after its worker started leaving.
    /// The moments follow the golden-ratio sequence over the tunnels' numbers, so
    /// any run of tunnels spreads evenly and their reconnects do not come at once.
    fn close_signal(
        &self,
        worker: &Worker,
        spread: Duration,
    ) -> impl std::future::Future<Output = u16> {
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        let fraction = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) as f64 / u64::MAX as f64;
        let delay = spread.mul_f64(fraction);
        let shutdown = self.life.signal();
        let leaving = worker.leaving.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => return GOING_AWAY,
                _ = leaving.cancelled() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => GOING_AWAY,
                _ = tokio::time::sleep(delay) => SERVICE_RESTART,
            }
        }
    }

    /// For an upgrade: every cleartext tunnel stops where it stands and is given
    /// back with its sockets; TLS tunnels (whose session state cannot be carried)
    /// send 1012 after the frame in flight and end. Returns once every tunnel task
    /// has done one or the other; with how many did not go on (TLS, or their
    /// worker not in the pool).
    pub async fn carry(&self) -> (Vec<Carried>, u64) {
        let carry = &self.carry;
        let before = carry.running.load(Ordering::Acquire);
        carry.signal.cancel();
        let all_ended = async {
            loop {
                let ended = carry.ended.notified();
                if carry.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                ended.await;
            }
        };
        // A TLS tunnel's frame in flight, and its close frame.
        let limit = Duration::from_secs(3);
        if tokio::time::timeout(limit, all_ended).await.is_err() {
            tracing::warn!("tunnels still open after the upgrade's wait: closed by it");
        }
        let given = std::mem::take(&mut *carry.given.lock().unwrap_or_else(|e| e.into_inner()));
        let closed = before.saturating_sub(given.len() as u64);
        (given, closed)
    }

    /// Takes on the tunnels an upgrade carried: each relayed on from where it
    /// stood, on its worker's thread, holding its session (found by sid in
    /// `router`, or counted on its worker) and `hold()`'s connection slot. A
    /// tunnel whose worker is gone is closed.
    pub(crate) fn resume(
        &self,
        carried: Vec<Carried>,
        via: Via<'_>,
        router: &Arc<crate::engineio::router::Router>,
        hold: impl Fn() -> Box<dyn Send + Sync>,
    ) -> usize {
        let workers = via.pool.workers();
        let mut resumed = 0;
        for c in carried {
            let Some(worker) = workers.iter().find(|w| w.id == c.state.worker_id) else {
                continue;
            };
            let ticket = match (&c.state.sid, c.state.counted) {
                (Some(sid), _) => match router.existing(sid) {
                    crate::engineio::router::Route::Session(t) => Ticket::Session(t.into_tunnel()),
                    _ => Ticket::Plain,
                },
                (None, true) => Ticket::New(router.count_on(worker.clone())),
                (None, false) => Ticket::Plain,
            };
            let owner = owner_of(worker, &ticket);
            let relay = Relay {
                idle: via.timing.idle,
                closing: self.close_signal(worker, via.timing.spread),
                metrics: via.metrics.clone(),
                owner,
                carry: self.carry.signal.clone(),
                _owned: (ticket, worker.open_tunnel()),
            };
            let hold = hold();
            let running = self.running();
            self.life.spawn_on(&self.lane_for(worker.id), async move {
                relay.resume(c, hold).await;
                drop(running);
            });
            resumed += 1;
        }
        resumed
    }

    /// Counts a tunnel task as running until the guard is dropped.
    fn running(&self) -> Running {
        self.carry.running.fetch_add(1, Ordering::AcqRel);
        Running(self.carry.clone())
    }

    /// Relays each worker's tunnels on one of these threads (its number modulo
    /// theirs): a worker writes a broadcast to all its clients at once, and with
    /// their tunnels on one thread that wakes one thread, not all of them. Set once.
    pub fn relay_on(&self, lanes: Vec<Handle>) {
        let _ = self.lanes.set(lanes);
    }

    /// The thread a worker's tunnels are relayed on (this one, before `relay_on`).
    fn lane_for(&self, worker: usize) -> Handle {
        match self.lanes.get().filter(|l| !l.is_empty()) {
            Some(lanes) => lanes[worker % lanes.len()].clone(),
            None => Handle::current(),
        }
    }

    /// Tunnels whose tasks are `life`'s: at its drain signal each sends its client
    /// a close frame and ends.
    pub fn new(life: Life) -> Tunnels {
        Tunnels {
            life,
            opened: AtomicU64::new(0),
            lanes: OnceLock::new(),
            carry: Arc::default(),
        }
    }

    /// Forwards an upgrade request; on 101, splices the two connections.
    pub(crate) async fn upgrade(
        &self,
        via: Via<'_>,
        mut req: Request<RequestBody>,
        peer: Peer,
        target: Target,
    ) -> Response<ProxyBody> {
        let Via {
            forward,
            pool,
            metrics,
            timing,
        } = via;
        let worker = target.worker.id;
        // Only a connection that can hand its socket over carries an upgrade
        // (HTTP/1.1's; an HTTP/2 stream has none).
        let Some(client_side) = req.extensions_mut().remove::<OnUpgrade>() else {
            return short(
                StatusCode::BAD_REQUEST,
                "corral: websocket upgrades are served over HTTP/1.1\n",
            );
        };
        let (parts, _) = req.into_parts();
        let mut headers = parts.headers;
        prepare_request_headers(&mut headers, &parts.uri, &peer, true, forward.underscores);
        forward.mark_hop(&mut headers, &target.ticket);
        let uri = origin_form(&parts.uri);
        let none = Sending::InHand(bytes::Bytes::new());
        let out = http1::encode(&parts.method, &uri, &headers, |_| false, &[], &none).upgrade();
        // A kept-alive connection serves as well as a new one, and saves a connect.
        let exchange = forward.exchange(&target.worker, &out, None, true);
        let resp = match tokio::time::timeout(timing.read_timeout, exchange).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return not_upgraded(Some(e), &target, pool, metrics),
            Err(_) => return not_upgraded(None, &target, pool, metrics),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return refused(resp, target.ticket);
        }
        let (parts, reading) = resp.into_parts();
        let Some((worker_tcp, to_client)) = reading.into_upgraded() else {
            return short(StatusCode::BAD_GATEWAY, "corral: worker socket lost\n");
        };
        let worker_tcp = match worker_tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel lost its worker socket");
                return short(StatusCode::BAD_GATEWAY, "corral: worker socket lost\n");
            }
        };
        let ticket = match target.ticket {
            Ticket::Session(t) => Ticket::Session(t.into_tunnel()),
            other => other,
        };
        let relay = Relay {
            idle: timing.idle,
            closing: self.close_signal(&target.worker, timing.spread),
            metrics: metrics.clone(),
            owner: owner_of(&target.worker, &ticket),
            carry: self.carry.signal.clone(),
            _owned: (ticket, target.worker.open_tunnel()),
        };
        // The tunnel is relayed on its worker's thread, once the client's
        // connection has written the 101 and given its socket up.
        let (running, carry) = (self.running(), self.carry.clone());
        self.life.spawn_on(&self.lane_for(worker), async move {
            let Ok(client) = client_side.connection().await else {
                return tracing::debug!("websocket upgrade did not complete");
            };
            if let Some(given) = relay.relay_taken(client, worker_tcp, to_client).await {
                carry
                    .given
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(given);
            }
            drop(running);
        });
        Response::from_parts(parts, crate::transport::body::empty())
    }
}

/// The answer to an upgrade its worker did not answer (`err`; None: not within
/// `timeouts.read`): 502 or 504, or, when it refused the connection, what
/// `answer::unreachable` says.
fn not_upgraded(
    err: Option<SendError>,
    target: &Target,
    pool: &Pool,
    metrics: &Arc<Counters>,
) -> Response<ProxyBody> {
    let (worker, addr) = (target.worker.id, target.worker.addr);
    match err {
        Some(SendError::Connect(e)) => {
            tracing::warn!(worker, %addr, error = %e, "cannot connect to worker for websocket");
            pool.check_failed(&target.worker);
            answer::unreachable(metrics, &target.ticket, addr)
        }
        Some(e) => short(
            StatusCode::BAD_GATEWAY,
            &format!("corral: worker {addr} failed: {e}\n"),
        ),
        None => short(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("corral: worker {addr} did not answer the upgrade\n"),
        ),
    }
}

/// A refused upgrade (a 400 for a bad sid, say), passed on as it is.
fn refused(resp: crate::transport::upstream::Answer, ticket: Ticket) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Guarded::new(body, ticket).boxed_unsync();
    Response::from_parts(parts, body)
}

/// Whose tunnel it is, as a carry writes it down.
fn owner_of(worker: &Worker, ticket: &Ticket) -> Owner {
    let (sid, counted) = match ticket {
        Ticket::Session(t) => (Some(t.sid().to_string()), false),
        Ticket::New(_) => (None, true),
        Ticket::Plain | Ticket::Hop => (None, false),
    };
    Owner {
        worker: worker.id,
        sid,
        counted,
        carried: worker.managed || !matches!(ticket, Ticket::Hop),
    }
}

/// What a tunnel's relay owns: its timing and close signal, the counters it adds
/// its bytes to, and what ends with it (the session's ticket, the worker's count
/// of open tunnels, and the client's connection slot, which comes with its socket).
struct Relay<C, O> {
    idle: Duration,
    closing: C,
    metrics: Arc<Counters>,
    owner: Owner,
    /// An upgrade's signal to carry the tunnel.
    carry: CancellationToken,
    _owned: O,
}

impl<C, O> Relay<C, O>
where
    C: std::future::Future<Output = u16> + Send + 'static,
    O: Send + 'static,
{
    /// The tunnel's task on its worker's thread: both sockets put on this thread's
    /// reactor, then relayed. Written flat, with the relay taken apart at once: each
    /// level of async functions that passed it on kept a copy of it in the task,
    /// which an idle tunnel holds for its whole life.
    async fn relay_taken(
        self,
        client: Handover,
        worker: std::net::TcpStream,
        to_client: bytes::Bytes,
    ) -> Option<Carried> {
        let Relay {
            idle,
            closing,
            metrics,
            owner,
            carry,
            _owned,
        } = self;
        let Handover { socket, hold } = client;
        let early = Early {
            to_worker: socket.early,
            to_client,
        };
        let b = registered(worker)?;
        let meter = Meter {
            up: &metrics.bytes_in,
            down: &metrics.bytes_out,
        };
        let a = client_stream(socket.io)?;
        let closing = carry_or_close(closing, carry, owner.carried && plain(&a));
        let spliced = splice_from(a, b, early, idle, closing, meter).await;
        let given = given(spliced, owner);
        drop((_owned, hold));
        given
    }

    /// A carried tunnel's task in the new image: both sockets put on this thread's
    /// reactor, and the relay resumed where it stood.
    async fn resume(self, carried: Carried, hold: Box<dyn Send + Sync>) -> Option<Carried> {
        let Relay {
            idle,
            closing,
            metrics,
            owner,
            carry,
            _owned,
        } = self;
        let (a, b) = (registered(carried.client)?, registered(carried.worker)?);
        let meter = Meter {
            up: &metrics.bytes_in,
            down: &metrics.bytes_out,
        };
        let closing = carry_or_close(closing, carry, owner.carried);
        let a = Either::<_, Box<dyn Duplex>>::Left(a);
        let spliced = resume(a, b, carried.state.relay, idle, closing, meter).await;
        let given = given(spliced, owner);
        drop((_owned, hold));
        given
    }
}

/// Whether a client stream is cleartext (an upgrade can carry it).
fn plain(a: &Either<tokio::net::TcpStream, Box<dyn Duplex>>) -> bool {
    matches!(a, Either::Left(_))
}

/// A tunnel's close signal with the upgrade's carry in it: carried where it can
/// be, else 1012 (the client reconnects to the new image).
async fn carry_or_close(
    closing: impl std::future::Future<Output = u16>,
    carry: CancellationToken,
    can_carry: bool,
) -> Close {
    tokio::select! {
        code = closing => Close::Code(code),
        _ = carry.cancelled() => match can_carry {
            true => Close::Carry,
            false => Close::Code(SERVICE_RESTART),
        },
    }
}

/// A paused relay as the carry takes it: both sockets out of the runtime.
fn given(
    spliced: Spliced<Either<tokio::net::TcpStream, Box<dyn Duplex>>, tokio::net::TcpStream>,
    owner: Owner,
) -> Option<Carried> {
    let (client, worker, relay) = match spliced {
        Spliced::Paused(Either::Left(client), worker, relay) => (client, worker, relay),
        Spliced::Paused(..) => return None,
        Spliced::Ended(up, down) => {
            tracing::debug!(up, down, "tunnel ended");
            return None;
        }
    };
    let (client, worker) = (client.into_std().ok()?, worker.into_std().ok()?);
    let state = handover::Tunnel {
        client: -1,
        worker: -1,
        worker_id: owner.worker,
        sid: owner.sid,
        counted: owner.counted,
        relay,
    };
    Some(Carried {
        client,
        worker,
        state,
    })
}

/// A taken client socket (plain, or under its TLS session) on this thread's reactor,
/// as one type: one relay serves both, where two would each have their place in
/// the tunnel's task.
fn client_stream(client: Taken) -> Option<Either<tokio::net::TcpStream, Box<dyn Duplex>>> {
    match client {
        Taken::Tcp(tcp) => registered(tcp).map(Either::Left),
        Taken::Over(over) => replanted(over).map(Either::Right),
    }
}

/// A taken stream (TLS) with its socket on this thread's reactor.
fn replanted(over: Box<dyn Replant>) -> Option<Box<dyn Duplex>> {
    over.replant()
        .inspect_err(|e| tracing::debug!(error = %e, "tunnel stream not registered"))
        .ok()
}

/// A taken socket on this thread's reactor.
fn registered(tcp: std::net::TcpStream) -> Option<tokio::net::TcpStream> {
    tokio::net::TcpStream::from_std(tcp)
        .inspect_err(|e| tracing::debug!(error = %e, "tunnel socket not registered"))
        .ok()
}
