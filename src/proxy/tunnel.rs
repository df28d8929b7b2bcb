//! Websocket tunnels: forward an `Upgrade: websocket` request to its worker (through
//! `forward`, on a kept-alive connection when one is idle, which then belongs to the
//! tunnel), relay the worker's 101, then copy bytes both ways until either side
//! closes or the tunnel is idle too long.
//!
//! Each worker's tunnels are relayed on one serving thread (both sockets move there
//! when the upgrade is done, where the listener can take its socket out), since a
//! worker writes a broadcast to all its clients at once. With
//! `experimental.kernel_relay`, a cleartext tunnel's bytes are moved by the kernel
//! (`transport::kernel_relay`) until the tunnel needs corral again: its close code,
//! an end, or frames the kernel could not follow; it is then relayed here from where
//! the kernel stopped.
//!
//! [`Tunnels`] owns the upgraded connections and their tasks, and has each send its
//! client a close frame at shutdown (1001) or when its worker is about to be
//! stopped (1012, at a moment spread over `workers.close_spread`); nothing else. The caller has already chosen
//! the worker, and the ticket it hands over keeps the session counted while the
//! tunnel is open. It does not reach into the request path (`route`).

use crate::counters::Counters;
use crate::http1::strip_hop_by_hop;
use crate::proxy::answer::{self, short};
use crate::proxy::forward::{prepare_request_headers, Forwarder, Peer, Replay, Target, Ticket};
use crate::proxy::frames::Frames;
use crate::proxy::lane_relay;
use crate::transport::body::{Guarded, ProxyBody, RequestBody};
use crate::transport::moving::{Duplex, Replant, Taken, TakenSocket};
use crate::transport::upstream::{take_worker_socket, SendError};
use crate::workers::pool::{Pool, Worker};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A client connection's place under `limits.max_connections`, shared by the
/// connection and the websocket tunnel it may become: the place is given back when
/// both have ended. It also says how to take the connection's socket out of its
/// upgrade, where the listener knows.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
    take_socket: Option<TakeSocket>,
}

/// Takes the socket out of an upgraded connection (`Err`: not one it knows).
pub type TakeSocket = fn(Upgraded) -> Result<io::Result<TakenSocket>, Upgraded>;

impl ConnectionSlot {
    /// The slot of a connection that holds `permit`.
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit) -> ConnectionSlot {
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

/// The open tunnels: their tasks, and the signal that closes them. One for the
/// life of corral: a config reload changes the [`Timing`] of new tunnels, and
/// shutdown closes old and new alike.
#[derive(Default)]
pub struct Tunnels {
    tasks: TaskTracker,
    closing: CancellationToken,
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
    /// Cleartext tunnels are relayed by the kernel (`experimental.kernel_relay`).
    pub kernel: bool,
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
        let shutdown = self.closing.clone();
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

    /// The thread a worker's tunnels are relayed on, when not this one.
    fn lane_for(&self, worker: usize) -> Option<&Handle> {
        let lanes = self.lanes.get().filter(|l| l.len() > 1)?;
        let i = worker % lanes.len();
        (crate::runtime::lanes::current() != i + 1).then(|| &lanes[i])
    }

    /// Shutdown: each tunnel sends its client a close frame and ends. Resolves once
    /// every tunnel has ended, or after `limit`; returns how many were still open.
    pub async fn close(&self, limit: Duration) -> usize {
        self.closing.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(limit, self.tasks.wait()).await;
        self.tasks.len()
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
        let kernel = timing.kernel;
        let open = target.worker.open_tunnel();
        let metrics = metrics.clone();
        let ticket = match target.ticket {
            Ticket::Session(t) => Ticket::Session(t.into_tunnel()),
            other => other,
        };
        let closing = self.close_signal(&target.worker, timing.spread);
        // On this thread too the sockets come out of their upgrades: for the lane's
        // set or the kernel relay.
        let lane = self
            .lane_for(worker)
            .cloned()
            .unwrap_or_else(Handle::current);
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
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
                kernel,
                closing,
                metrics,
                _owned: (slot, ticket, open),
            };
            match take_client {
                Some(take) => {
                    relay
                        .elsewhere(&lane, &tasks, take, client_io, worker_io)
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
    /// Cleartext tunnels go to the kernel relay.
    kernel: bool,
    closing: C,
    metrics: Arc<Counters>,
    _owned: O,
}

/// Bytes read from either side before the relay began, to be sent on first.
#[derive(Default)]
pub struct Early {
    pub to_worker: Bytes,
    pub to_client: Bytes,
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
        let (up, down) = splice_from(client, worker, early, self.idle, self.closing).await;
        count_bytes(&self.metrics, up, down);
    }

    /// Relays on `lane` (its worker's thread, which may be this one): both sockets
    /// are taken out of their upgrades and served there. Where a socket cannot be
    /// taken (not one the listener or the worker connection knows), the tunnel stays
    /// here, in its upgrades.
    async fn elsewhere(
        self,
        lane: &Handle,
        tasks: &TaskTracker,
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
        let worker = match take_worker_socket(worker) {
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
        let (worker_tcp, worker_early) = worker;
        lane.spawn(tasks.track_future(async move {
            let lane = crate::runtime::lanes::current();
            tracing::debug!(lane, "tunnel relayed on its worker's thread");
            let early = Early {
                to_worker: client.early,
                to_client: worker_early,
            };
            match client.io {
                #[cfg(target_os = "linux")]
                Taken::Tcp(tcp) if self.kernel => {
                    if let (Some(a), Some(b)) = (registered(tcp), registered(worker_tcp)) {
                        self.run_in_kernel(a, b, early).await
                    }
                }
                Taken::Tcp(tcp) if lane_relay::usable_here() => {
                    self.run_in_set(tcp, worker_tcp, early).await
                }
                io => {
                    if let Some(b) = registered(worker_tcp) {
                        self.run_taken(io, b, early).await
                    }
                }
            }
        }));
    }

    /// As `run`, with the client's taken socket put on this thread's reactor.
    async fn run_taken<B>(self, client: Taken, worker: B, early: Early)
    where
        B: AsyncRead + AsyncWrite + Unpin,
    {
        match client {
            Taken::Tcp(tcp) => {
                if let Some(a) = registered(tcp) {
                    self.run(a, worker, early).await
                }
            }
            Taken::Over(over) => {
                if let Some(a) = replanted(over) {
                    self.run(a, worker, early).await
                }
            }
        }
    }

    /// As `run`, for two cleartext sockets on a lane: they go in the lane's set
    /// (`lane_relay`), which moves the bytes and passes ends on, until the tunnel
    /// needs a task of its own: for its close code, its idle period, an error, a side
    /// that cannot take a whole read at once, or a bulk transfer. It is then relayed
    /// here from where the set stopped.
    async fn run_in_set(
        self,
        client: std::net::TcpStream,
        worker: std::net::TcpStream,
        early: Early,
    ) {
        let mut frames = Frames::default();
        let (up, up_error) = lane_relay::write_now(&worker, &early.to_worker);
        let (down, down_error) = lane_relay::write_now(&client, &early.to_client);
        frames.feed(&early.to_client[..down]);
        let moved = [up as u64, down as u64];
        let rest = lane_relay::Back {
            client,
            worker,
            to_worker: early.to_worker[up..].to_vec(),
            to_client: early.to_client[down..].to_vec(),
            frames,
            moved,
            error: up_error.or(down_error),
            ended: false,
            why: "",
        };
        if rest.error.is_some() || !rest.to_worker.is_empty() || !rest.to_client.is_empty() {
            return carry_on(&self.metrics, self.idle, rest, self.closing).await;
        }
        let active = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (back, mut given_back) = tokio::sync::oneshot::channel();
        let place = match lane_relay::enter(rest.client, rest.worker, frames, active.clone(), back)
        {
            Ok(place) => place,
            Err((client, worker, e)) => {
                tracing::debug!(error = %e, "tunnel not put in its lane's set");
                let rest = lane_relay::Back {
                    client,
                    worker,
                    error: None,
                    ..rest
                };
                return carry_on(&self.metrics, self.idle, rest, self.closing).await;
            }
        };
        tracing::debug!("tunnel relayed in its lane's set");
        let mut in_set = InSet(Some(place));
        // Unlike a tunnel relayed by its own task, this task does not wake per
        // frame: its close signal can be polled at every wake-up.
        let closing = self.closing;
        tokio::pin!(closing);
        let step = idle_check_every(self.idle);
        let mut quiet = 0;
        let (back, code) = loop {
            tokio::select! {
                back = &mut given_back => {
                    in_set.0 = None;
                    break (back.ok(), None);
                }
                c = &mut closing => break (in_set.take(&mut given_back).await, Some(c)),
                _ = tokio::time::sleep(step) => {
                    quiet = match active.swap(false, Ordering::Relaxed) {
                        true => 0,
                        false => quiet + 1,
                    };
                    if quiet >= IDLE_CHECKS {
                        tracing::debug!(idle = ?self.idle, "tunnel idle, closing");
                        if let Some(back) = in_set.take(&mut given_back).await {
                            count_bytes(&self.metrics, moved[0] + back.moved[0], moved[1] + back.moved[1]);
                        }
                        return;
                    }
                }
            }
        };
        let Some(mut back) = back else {
            return;
        };
        back.moved = [moved[0] + back.moved[0], moved[1] + back.moved[1]];
        if back.ended {
            return count_bytes(&self.metrics, back.moved[0], back.moved[1]);
        }
        if back.error.is_none() {
            let why = match code {
                Some(_) => "to send its close frame",
                None => back.why,
            };
            tracing::debug!(why, "tunnel taken back from its lane's set");
        }
        let closing = match code {
            Some(c) => futures_util::future::Either::Left(std::future::ready(c)),
            None => futures_util::future::Either::Right(closing),
        };
        carry_on(&self.metrics, self.idle, back, closing).await
    }
}

/// Relays the rest of a tunnel with its own task, from where `rest` stands (unless
/// it ended with an error), and counts its bytes.
async fn carry_on(
    metrics: &Counters,
    idle: Duration,
    rest: lane_relay::Back,
    closing: impl std::future::Future<Output = u16>,
) {
    let moved = rest.moved;
    if let Some(e) = rest.error {
        count_bytes(metrics, moved[0], moved[1]);
        return tracing::debug!(error = %e, "tunnel ended with an error");
    }
    let (Some(a), Some(b)) = (registered(rest.client), registered(rest.worker)) else {
        return count_bytes(metrics, moved[0], moved[1]);
    };
    let early = Early {
        to_worker: rest.to_worker.into(),
        to_client: rest.to_client.into(),
    };
    let (up, down) = splice_framed(a, b, early, rest.frames, idle, closing).await;
    count_bytes(metrics, moved[0] + up, moved[1] + down);
}

/// A tunnel in its lane's set, taken out when dropped (its task ending first).
struct InSet(Option<lane_relay::Place>);

impl InSet {
    /// Takes the tunnel out of the set, or receives it if the set gave it back first.
    async fn take(
        &mut self,
        given_back: &mut tokio::sync::oneshot::Receiver<lane_relay::Back>,
    ) -> Option<lane_relay::Back> {
        match self.0.take().and_then(lane_relay::leave) {
            Some(back) => Some(back),
            None => given_back.await.ok(),
        }
    }
}

impl Drop for InSet {
    fn drop(&mut self) {
        if let Some(place) = self.0.take() {
            drop(lane_relay::leave(place));
        }
    }
}

#[cfg(target_os = "linux")]
impl<C, O> Relay<C, O>
where
    C: std::future::Future<Output = u16> + Send + 'static,
    O: Send + 'static,
{
    /// As `run`, for two cleartext sockets, with the bytes moved by the kernel
    /// (`experimental.kernel_relay`): corral wakes only for the idle clock, its close
    /// signal, or the relay's word that a socket ended or the kernel gave up on the
    /// frames; then it takes the tunnel back, where the kernel stopped, and relays
    /// the rest itself (for a close frame, after the worker's frame in progress).
    async fn run_in_kernel(
        self,
        mut client: tokio::net::TcpStream,
        mut worker: tokio::net::TcpStream,
        early: Early,
    ) {
        use crate::transport::kernel_relay::{KernelRelay, Side};
        use std::os::fd::AsRawFd;
        use tokio::io::AsyncWriteExt;
        let mut frames = Frames::default();
        frames.feed(&early.to_client);
        let mut moved = [early.to_worker.len() as u64, early.to_client.len() as u64];
        if client.write_all(&early.to_client).await.is_err()
            || worker.write_all(&early.to_worker).await.is_err()
        {
            return;
        }
        let mut attached =
            match KernelRelay::get().map(|k| k.attach(client.as_raw_fd(), worker.as_raw_fd())) {
                Some(Ok(a)) => a,
                other => {
                    if let Some(Err(e)) = other {
                        tracing::debug!(error = %e, "tunnel not given to the kernel relay");
                    }
                    return self.resume(client, worker, frames, moved, None).await;
                }
            };
        // Bytes that came before the sockets were in the map (or were passed up
        // since) are sent on here; the relay starts once a look finds none passed
        // meanwhile.
        let mut started = false;
        for _ in 0..5 {
            let passed = [attached.passed(Side::Client), attached.passed(Side::Worker)];
            let ended = match catch_up(&mut client, &mut worker, &mut frames, &mut moved).await {
                Ok(ended) => ended,
                Err(e) => return tracing::debug!(error = %e, "tunnel ended"),
            };
            let now = [attached.passed(Side::Client), attached.passed(Side::Worker)];
            if !ended && now == passed && frames.have == 0 {
                match attached.start(passed, frames.left) {
                    Ok(true) => started = true,
                    // Bytes passed up meanwhile: read them, then try again.
                    Ok(false) => continue,
                    Err(_) => break,
                }
            }
            if ended || started {
                break;
            }
        }
        if !started {
            tracing::debug!("tunnel not started in the kernel relay");
            // Still in the map, passing everything up: it stays until the end.
            return self
                .resume(client, worker, frames, moved, Some(attached))
                .await;
        }
        self.metrics.kernel_tunnels.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("tunnel relayed by the kernel");
        // Off this thread's reactor while the kernel relays: it would wake it for
        // every byte moved. The relay's own watch says when a socket ends.
        let (Ok(client), Ok(worker)) = (client.into_std(), worker.into_std()) else {
            return tracing::debug!("tunnel socket not taken off the reactor; tunnel ends");
        };
        let closing = Lazy::new(self.closing);
        tokio::pin!(closing);
        let step = idle_check_every(self.idle);
        let mut seen = attached.moved();
        let mut quiet = 0;
        let woke = loop {
            tokio::select! {
                c = &mut closing => break Wake::Close(c),
                _ = attached.woken() => break Wake::Readable,
                _ = tokio::time::sleep(step) => {
                    let now = attached.moved();
                    quiet = if now == seen { quiet + 1 } else { 0 };
                    seen = now;
                    if quiet >= IDLE_CHECKS {
                        break Wake::Idle;
                    }
                }
            }
        };
        let stopped = match attached.stop(CLOSE_WAIT).await {
            Ok(s) => s,
            Err(e) => {
                // Bytes may still be on their way: nothing can be added safely.
                return tracing::debug!(error = %e, "kernel relay did not stop in time; tunnel ends");
            }
        };
        moved[0] += stopped.up;
        moved[1] += stopped.down;
        frames.left = stopped.remaining;
        let (Some(client), Some(worker)) = (registered(client), registered(worker)) else {
            return;
        };
        if let Wake::Idle = woke {
            tracing::debug!(idle = ?self.idle, "tunnel idle, closing");
            return count_bytes(&self.metrics, moved[0], moved[1]);
        }
        self.metrics
            .kernel_taken_back
            .fetch_add(1, Ordering::Relaxed);
        let why = match woke {
            _ if attached.gave_up() => "frames the kernel could not follow",
            Wake::Close(_) => "to send its close frame",
            _ => "a socket ended",
        };
        tracing::debug!(why, "tunnel taken back from the kernel");
        let closing = match woke {
            Wake::Close(c) => futures_util::future::Either::Left(std::future::ready(c)),
            _ => futures_util::future::Either::Right(closing),
        };
        let (up, down) =
            splice_framed(client, worker, Early::default(), frames, self.idle, closing).await;
        count_bytes(&self.metrics, moved[0] + up, moved[1] + down);
        // The sockets leave the map only now: what the program passed up is read.
        drop(attached);
    }

    /// Relays the rest in user space, the worker's frames standing at `frames` and
    /// `moved` bytes sent on so far (client to worker, worker to client).
    async fn resume(
        self,
        client: tokio::net::TcpStream,
        worker: tokio::net::TcpStream,
        frames: Frames,
        moved: [u64; 2],
        _attached: Option<crate::transport::kernel_relay::Attached>,
    ) {
        let (up, down) = splice_framed(
            client,
            worker,
            Early::default(),
            frames,
            self.idle,
            self.closing,
        )
        .await;
        count_bytes(&self.metrics, moved[0] + up, moved[1] + down);
    }
}

/// Why a kernel-relayed tunnel's task woke.
#[cfg(target_os = "linux")]
enum Wake {
    /// Its close signal, with the code to send.
    Close(u16),
    /// A socket ended, or the kernel passed bytes back (frames it could not follow).
    Readable,
    /// No byte either way for the idle period.
    Idle,
}

/// Sends on what either socket has now, until both would block, adding to `moved`
/// (client to worker, worker to client). True at an end (the relay then carries on
/// as usual).
#[cfg(target_os = "linux")]
async fn catch_up(
    client: &mut tokio::net::TcpStream,
    worker: &mut tokio::net::TcpStream,
    frames: &mut Frames,
    moved: &mut [u64; 2],
) -> io::Result<bool> {
    use tokio::io::AsyncWriteExt;
    let mut buf = vec![0u8; CHUNK];
    // Straight from the sockets: tokio's try_read answers from the readiness it
    // has been told of, which may not yet include bytes that just came.
    let read_now = |socket: &tokio::net::TcpStream, buf: &mut [u8]| {
        use std::os::fd::AsRawFd;
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => Err(io::Error::last_os_error()),
        }
    };
    loop {
        let mut idle = true;
        match read_now(client, &mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                worker.write_all(&buf[..n]).await?;
                moved[0] += n as u64;
                idle = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        match read_now(worker, &mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                client.write_all(&buf[..n]).await?;
                frames.feed(&buf[..n]);
                moved[1] += n as u64;
                idle = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if idle {
            return Ok(false);
        }
    }
}

/// A tunnel's bytes, client to worker and back, added to the counters at its end.
fn count_bytes(metrics: &Counters, up: u64, down: u64) {
    metrics.bytes_in.fetch_add(up, Ordering::Relaxed);
    metrics.bytes_out.fetch_add(down, Ordering::Relaxed);
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

#[cfg(test)]
/// Copies both ways until both directions end, an error, or `idle` without a byte.
/// Returns the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    splice_from(a, b, Early::default(), idle, std::future::pending::<u16>()).await
}

/// How many times per idle period a tunnel looks whether bytes came: it closes
/// between one and one and an eighth idle periods after the last byte.
const IDLE_CHECKS: u32 = 8;

/// How often a tunnel with `idle` as its idle period looks whether bytes came.
fn idle_check_every(idle: Duration) -> Duration {
    (idle / IDLE_CHECKS).max(Duration::from_millis(1))
}

/// Longest a closing tunnel waits for the worker's frame in flight to end.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Close status 1001 "going away": corral is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// Close status 1012 "service restart": the worker is being replaced or removed.
pub const SERVICE_RESTART: u16 = 1012;

/// A websocket close frame (server to client: unmasked) with status `code`.
fn close_frame(code: u16) -> [u8; 4] {
    let [hi, lo] = code.to_be_bytes();
    [0x88, 0x02, hi, lo]
}

/// As [`splice`], where `a` is the websocket client and `b` the worker. When
/// `closing` resolves with a close code, the tunnel waits for the worker's frame in
/// flight to end (up to a second), sends the client a close frame with that code so
/// that its socket closes cleanly and it reconnects, and ends.
/// `early`'s bytes are sent on first (and counted as copied).
pub async fn splice_from<A, B>(
    a: A,
    b: B,
    early: Early,
    idle: Duration,
    closing: impl std::future::Future<Output = u16>,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    splice_framed(a, b, early, Frames::default(), idle, closing).await
}

/// As [`splice_from`], the worker's bytes so far having left its frames at `frames`.
async fn splice_framed<A, B>(
    a: A,
    b: B,
    early: Early,
    frames: Frames,
    idle: Duration,
    closing: impl std::future::Future<Output = u16>,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Set by every read that brings bytes; the idle check looks at it a few times
    // per idle period (a clock read on every read cost more than the flag).
    let active = std::sync::atomic::AtomicBool::new(false);
    let mut a = Activity::new(a, &active);
    let mut b = Activity::new(b, &active);
    a.bytes = early.to_worker.len() as u64;
    b.bytes = early.to_client.len() as u64;
    let mut say_goodbye = None;
    {
        let copy = Bidirectional {
            a: &mut a,
            b: &mut b,
            a_to_b: Pump {
                pending: early.to_worker.to_vec(),
                ..Pump::default()
            },
            b_to_a: Pump {
                pending: early.to_client.to_vec(),
                frames: Some(frames),
                ..Pump::default()
            },
        };
        tokio::pin!(copy);
        // Polled only when it wakes: beside the copy, it would be polled (a lock
        // taken) at every burst of bytes.
        let closing = Lazy::new(closing);
        tokio::pin!(closing);
        let step = idle_check_every(idle);
        let mut next_check = tokio::time::Instant::now() + step;
        let mut quiet = 0;
        let mut close_by: Option<tokio::time::Instant> = None;
        let mut code = GOING_AWAY;
        loop {
            if let Some(deadline) = close_by {
                if copy.b_to_a.between_frames() {
                    say_goodbye = Some(code);
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::debug!("tunnel closing mid-frame");
                    break;
                }
            }
            let wake = close_by.map_or(next_check, |d| d.min(next_check));
            tokio::select! {
                result = &mut copy => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "tunnel ended with an error");
                    }
                    break;
                }
                c = &mut closing, if close_by.is_none() => {
                    code = c;
                    close_by = Some(tokio::time::Instant::now() + CLOSE_WAIT);
                }
                _ = Lazy::new(tokio::time::sleep_until(wake)) => {
                    let now = tokio::time::Instant::now();
                    if now >= next_check {
                        quiet = match active.swap(false, Ordering::Relaxed) {
                            true => 0,
                            false => quiet + 1,
                        };
                        if close_by.is_none() && quiet >= IDLE_CHECKS {
                            tracing::debug!(?idle, "tunnel idle, closing");
                            break;
                        }
                        next_check = now + step;
                    }
                }
            }
        }
    }
    if let Some(code) = say_goodbye {
        use tokio::io::AsyncWriteExt;
        let bye = async {
            a.write_all(&close_frame(code)).await?;
            a.flush().await?;
            a.shutdown().await
        };
        if let Err(e) = tokio::time::timeout(CLOSE_WAIT, bye)
            .await
            .unwrap_or(Err(io::ErrorKind::TimedOut.into()))
        {
            tracing::debug!(error = %e, "close frame not delivered");
        }
    }
    (a.bytes, b.bytes)
}

pin_project_lite::pin_project! {
    /// A future polled only after it woke (and once at first): `select!` polls every
    /// branch whenever any wakes the task, and a tunnel's task wakes for every
    /// burst of bytes, while its close signal and timer wake almost never.
    struct Lazy<F> {
        #[pin]
        inner: F,
        woke: Arc<Woke>,
    }
}

/// The wake-up a [`Lazy`] future's inner future gives: marked, then passed on.
#[derive(Default)]
struct Woke {
    marked: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Woke {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.marked.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> Lazy<F> {
    fn new(inner: F) -> Lazy<F> {
        let woke = Arc::new(Woke::default());
        woke.marked.store(true, Ordering::Relaxed);
        Lazy { inner, woke }
    }
}

impl<F: std::future::Future> std::future::Future for Lazy<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.woke.task.register(cx.waker());
        if !this.woke.marked.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let waker = std::task::Waker::from(this.woke.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

/// One direction of a tunnel. Bytes are read into a buffer on the stack and written
/// on at once; only what the writer cannot take right away is kept on the heap, so an
/// idle tunnel holds no buffer at all (tokio's copy keeps 8 KiB per direction).
#[derive(Default)]
struct Pump {
    pending: Vec<u8>,
    pos: usize,
    unflushed: bool,
    eof: bool,
    done: bool,
    /// Websocket framing of what was written on (worker to client only).
    frames: Option<Frames>,
}

/// Stack buffer for one read.
const CHUNK: usize = 16 * 1024;

impl Pump {
    /// Nothing held back and the bytes written so far end with a whole frame.
    fn between_frames(&self) -> bool {
        self.pending.len() == self.pos && self.frames.as_ref().is_none_or(Frames::between)
    }

    fn wrote(&mut self, data: &[u8]) {
        if let Some(f) = self.frames.as_mut() {
            f.feed(data);
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.pos < self.pending.len() {
                let n = ready!(w.as_mut().poll_write(cx, &self.pending[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                if let Some(f) = self.frames.as_mut() {
                    f.feed(&self.pending[self.pos..self.pos + n]);
                }
                self.pos += n;
                // Taken is not sent: a TLS writer may hold the records until flushed.
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                // Give the memory back: the next burst may be long in coming.
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Uninitialised: zeroing 16 KiB on every read would cost more than the read.
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.unflushed {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            let mut off = 0;
            while off < data.len() {
                match w.as_mut().poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.wrote(&data[off..off + n]);
                        off += n;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.pending = data[off..].to_vec();
                        self.pos = 0;
                        break;
                    }
                }
            }
            self.unflushed = true;
        }
    }
}

/// Both directions; done when both have ended (each shuts down its writer at EOF).
struct Bidirectional<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Pump,
    b_to_a: Pump,
}

impl<A, B> std::future::Future for Bidirectional<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.a_to_b.done {
            if let Poll::Ready(Err(e)) =
                this.a_to_b
                    .poll(cx, Pin::new(&mut *this.a), Pin::new(&mut *this.b))
            {
                return Poll::Ready(Err(e));
            }
        }
        if !this.b_to_a.done {
            if let Poll::Ready(Err(e)) =
                this.b_to_a
                    .poll(cx, Pin::new(&mut *this.b), Pin::new(&mut *this.a))
            {
                return Poll::Ready(Err(e));
            }
        }
        if this.a_to_b.done && this.b_to_a.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes read from the inner stream and marks that some came.
    struct Activity<'f, T> {
        #[pin]
        inner: T,
        active: &'f std::sync::atomic::AtomicBool,
        bytes: u64,
    }
}

impl<'f, T> Activity<'f, T> {
    fn new(inner: T, active: &'f std::sync::atomic::AtomicBool) -> Self {
        Activity {
            inner,
            active,
            bytes: 0,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Activity<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            *this.bytes += (buf.filled().len() - before) as u64;
            this.active.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splice_copies_and_closes_on_idle() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(splice(a, b, Duration::from_millis(200)));
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.expect("write");
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"pong");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("idle tunnel closes")
            .expect("task");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn bytes_keep_a_tunnel_open_past_its_idle_period() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(300);
        let t = tokio::spawn(splice(a, b, idle));
        let mut buf = [0u8; 1];
        // A byte every 100 ms for four idle periods, one way and then the other.
        for i in 0..12 {
            if i < 6 {
                client.write_all(b"x").await.expect("write");
                server.read_exact(&mut buf).await.expect("read");
            } else {
                server.write_all(b"y").await.expect("write");
                client.read_exact(&mut buf).await.expect("read");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!t.is_finished(), "closed while bytes came, at {i}");
        }
        let quiet = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("closes once quiet")
            .expect("task");
        assert!(quiet.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn splice_carries_bulk_through_slow_writers() {
        // Tiny pipes force partial writes and the pending-buffer path.
        let (mut client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(10)));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, data);
        server.write_all(b"bye").await.expect("reply");
        drop(server);
        assert_eq!(writer.await.expect("task"), b"bye");
        let (up, down) = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("ends")
            .expect("task");
        assert_eq!((up, down), (200_000, 3));
    }

    #[tokio::test]
    async fn splice_ends_when_one_side_closes() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(60)));
        drop(client);
        let mut rest = Vec::new();
        server
            .read_to_end(&mut rest)
            .await
            .expect("eof reaches the worker");
        drop(server);
        tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .expect("tunnel ends")
            .expect("task");
    }
}
