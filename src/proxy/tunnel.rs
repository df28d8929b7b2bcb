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
//! stopped (1012, at a moment spread over `workers.close_spread`); nothing else. The
//! caller has already chosen the worker, and the ticket it hands over keeps the
//! session counted while the tunnel is open. It does not reach into the request path
//! (`route`).

use crate::counters::Counters;
use crate::http1::strip_hop_by_hop;
use crate::proxy::answer::{self, short};
use crate::proxy::forward::{prepare_request_headers, Forwarder, Peer, Replay, Target, Ticket};
use crate::proxy::relay::{splice_from, Early, Meter, GOING_AWAY, SERVICE_RESTART};
use crate::runtime::life::Life;
use crate::transport::body::{Guarded, ProxyBody, RequestBody};
use crate::transport::moving::{Duplex, Replant, Taken, TakenSocket};
use crate::transport::upstream::{take_worker_socket, SendError};
use crate::workers::pool::{Pool, Worker};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Handle;
use tokio_util::either::Either;

/// A client connection's place under `limits.max_connections`, shared by the
/// connection and the websocket tunnel it may become: the place is given back when
/// both have ended. It also says how to take the connection's socket out of its
/// upgrade, where the listener knows.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<dyn Send + Sync>,
    take_socket: Option<TakeSocket>,
}

/// Takes the socket out of an upgraded connection (`Err`: not one it knows).
pub type TakeSocket = fn(Upgraded) -> Result<io::Result<TakenSocket>, Upgraded>;

impl ConnectionSlot {
    /// The slot of a connection that holds `permit` (given back when dropped).
    pub fn new(permit: impl Send + Sync + 'static) -> ConnectionSlot {
        ConnectionSlot {
            _permit: Arc::new(permit),
            take_socket: None,
        }
    }

    /// Its socket can be taken out of its upgrade with `take`.
    pub fn with_socket(mut self, take: TakeSocket) -> ConnectionSlot {
        self.take_socket = Some(take);
        self
    }
}

/// The open tunnels: their tasks, in the client connections' lifetime, whose drain
/// signal closes them. One for the life of corral: a config reload changes the
/// [`Timing`] of new tunnels, and shutdown closes old and new alike.
pub struct Tunnels {
    life: Life,
    /// Tunnels opened so far, to place each one's close in the window.
    opened: AtomicU64,
    /// The serving threads: a worker's tunnels are relayed on one of them.
    lanes: OnceLock<Vec<Handle>>,
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
        let addr = target.worker.addr;
        let client_side = hyper::upgrade::on(&mut req);
        // The client connection's slot (limits.max_connections) stays taken while
        // its tunnel is open.
        let slot = req.extensions_mut().remove::<ConnectionSlot>();
        let (parts, _) = req.into_parts();
        let mut headers = parts.headers;
        prepare_request_headers(&mut headers, &parts.uri, &peer, true, forward.underscores);
        forward.mark_hop(&mut headers, &target.ticket);
        let replay = Replay::new(parts.method, &parts.uri, headers);
        // A kept-alive connection serves as well as a new one, and saves a connect.
        let exchange = forward.exchange(&target.worker, replay.request(), Some(&replay));
        let answer = match tokio::time::timeout(timing.read_timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(SendError::Connect(e))) => {
                tracing::warn!(worker, %addr, error = %e, "cannot connect to worker for websocket");
                pool.check_failed(&target.worker);
                return answer::unreachable(metrics, &target.ticket, addr);
            }
            Ok(Err(e)) => {
                return short(
                    StatusCode::BAD_GATEWAY,
                    &format!("corral: worker {addr} failed: {e}\n"),
                )
            }
            Err(_) => {
                return short(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("corral: worker {addr} did not answer the upgrade\n"),
                )
            }
        };
        let mut resp = answer.response;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused upgrade (a 400 for a bad sid, say): pass the answer on as it is.
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = Guarded::new(body, (answer.lease, target.ticket))
                .map_err(Into::into)
                .boxed_unsync();
            return Response::from_parts(parts, body);
        }
        let worker_side = hyper::upgrade::on(&mut resp);
        let idle = timing.idle;
        let open = target.worker.open_tunnel();
        let metrics = metrics.clone();
        let ticket = match target.ticket {
            Ticket::Session(t) => Ticket::Session(t.into_tunnel()),
            other => other,
        };
        let closing = self.close_signal(&target.worker, timing.spread);
        let lane = self.lane_for(worker);
        let life = self.life.clone();
        self.life.spawn(async move {
            let (client_io, worker_io) = match tokio::try_join!(client_side, worker_side) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade did not complete");
                    return;
                }
            };
            let take_client = slot.as_ref().and_then(|s| s.take_socket);
            let relay = Relay {
                idle,
                closing,
                metrics,
                _owned: (slot, ticket, open),
            };
            match take_client {
                Some(take) => {
                    relay
                        .elsewhere(&lane, &life, take, client_io, worker_io)
                        .await
                }
                None => {
                    let (a, b) = (TokioIo::new(client_io), TokioIo::new(worker_io));
                    relay.run(a, b, Early::default()).await
                }
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, crate::transport::body::empty())
    }
}

/// What a tunnel's relay owns: its timing and close signal, the counters it adds
/// its bytes to, and what ends with it (the client's connection slot, the session's
/// ticket, the worker's count of open tunnels).
struct Relay<C, O> {
    idle: Duration,
    closing: C,
    metrics: Arc<Counters>,
    _owned: O,
}

impl<C, O> Relay<C, O>
where
    C: std::future::Future<Output = u16> + Send + 'static,
    O: Send + 'static,
{
    async fn run<A, B>(self, client: A, worker: B, early: Early)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let meter = Meter {
            up: &self.metrics.bytes_in,
            down: &self.metrics.bytes_out,
        };
        splice_from(client, worker, early, self.idle, self.closing, meter).await;
    }

    /// Relays on `lane` (its worker's thread, which may be this one): both sockets
    /// are taken out of their upgrades and served there. Where a socket cannot be
    /// taken (not one the listener or the worker connection knows), the tunnel stays
    /// here, in its upgrades.
    async fn elsewhere(
        self,
        lane: &Handle,
        life: &Life,
        take_client: TakeSocket,
        client: Upgraded,
        worker: Upgraded,
    ) {
        let client = match take_client(client) {
            Err(client) => {
                let (a, b) = (TokioIo::new(client), TokioIo::new(worker));
                return self.run(a, b, Early::default()).await;
            }
            Ok(Err(e)) => return tracing::debug!(error = %e, "tunnel lost its client socket"),
            Ok(Ok(client)) => client,
        };
        let (worker_tcp, to_client) = match take_worker_socket(worker) {
            Err(worker) => {
                let early = Early {
                    to_worker: client.early,
                    ..Early::default()
                };
                return self.run_taken(client.io, TokioIo::new(worker), early).await;
            }
            Ok(Err(e)) => return tracing::debug!(error = %e, "tunnel lost its worker socket"),
            Ok(Ok(worker)) => worker,
        };
        life.spawn_on(lane, self.relay_taken(client, worker_tcp, to_client));
    }

    /// The tunnel's task on its worker's thread: both sockets put on this thread's
    /// reactor, then relayed. Written flat, with the relay taken apart at once: each
    /// level of async functions that passed it on kept a copy of it in the task,
    /// which an idle tunnel holds for its whole life.
    async fn relay_taken(
        self,
        client: TakenSocket,
        worker: std::net::TcpStream,
        to_client: bytes::Bytes,
    ) {
        let Relay {
            idle,
            closing,
            metrics,
            _owned,
        } = self;
        let early = Early {
            to_worker: client.early,
            to_client,
        };
        let Some(b) = registered(worker) else {
            return;
        };
        let meter = Meter {
            up: &metrics.bytes_in,
            down: &metrics.bytes_out,
        };
        if let Some(a) = client_stream(client.io) {
            splice_from(a, b, early, idle, closing, meter).await;
        }
        drop(_owned);
    }

    /// As `run`, with the client's taken socket put on this thread's reactor.
    async fn run_taken<B>(self, client: Taken, worker: B, early: Early)
    where
        B: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(a) = client_stream(client) {
            self.run(a, worker, early).await
        }
    }
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
