//! One lane's cleartext websocket tunnels, relayed by one task. The sockets of the
//! tunnels in a lane's set sit in an epoll set of the lane's own (mio), which the
//! lane's tokio reactor watches as one descriptor: a burst of a worker's frames to
//! many clients wakes one task once, and each frame then costs its read and its
//! write, without a task, a waker or readiness bookkeeping per tunnel.
//!
//! It owns a tunnel's sockets while the tunnel is in the set, and moves whole reads:
//! each read is written on at once, or the tunnel goes back to its own task
//! (`proxy::tunnel`) with what is left. An end is passed on (the other side's write
//! half shut down); once both sides have ended, or at an error, the tunnel goes back
//! to its task to be closed. It does not decide when a tunnel closes (its idle
//! period, its close code): the tunnel's task takes it out of the set for that. The set belongs to the thread of a
//! single-threaded runtime (a lane); nothing else may use it.

use crate::proxy::frames::Frames;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

/// A tunnel given back to its task.
pub(crate) struct Back {
    pub client: TcpStream,
    pub worker: TcpStream,
    /// Read and not yet written on (only one of the two is ever set).
    pub to_worker: Vec<u8>,
    pub to_client: Vec<u8>,
    /// Where the worker's frames stand, after the bytes written on.
    pub frames: Frames,
    /// Bytes written on while in the set: client to worker, worker to client.
    pub moved: [u64; 2],
    /// What ended the tunnel, if an error did.
    pub error: Option<io::Error>,
    /// Both sides ended (each end passed on): nothing is left to relay.
    pub ended: bool,
    /// Why the set gave it back.
    pub why: &'static str,
}

/// A tunnel's place in its lane's set, to take it out again.
#[derive(Clone, Copy)]
pub(crate) struct Place {
    index: usize,
    id: u64,
}

struct Tunnel {
    id: u64,
    client: TcpStream,
    worker: TcpStream,
    frames: Frames,
    moved: [u64; 2],
    /// The directions whose reader has ended: client to worker, worker to client.
    ended: [bool; 2],
    active: Arc<AtomicBool>,
    back: oneshot::Sender<Back>,
}

impl Tunnel {
    /// The reader of `direction` has ended: the other side is told (its write half
    /// shut down, as the tunnel's task does), and once both have, the tunnel is done.
    fn end(&mut self, direction: usize) -> Step {
        self.ended[direction] = true;
        let to = match direction {
            0 => &self.worker,
            _ => &self.client,
        };
        if let Err(e) = to.shutdown(std::net::Shutdown::Write) {
            return Step::GiveBack(Vec::new(), Some(e), AN_ERROR);
        }
        match self.ended {
            [true, true] => Step::GiveBack(Vec::new(), None, ENDED),
            _ => Step::Drained,
        }
    }
}

struct Set {
    poll: Poll,
    /// A tunnel's sockets are registered as tokens `2 × index` (client) and
    /// `2 × index + 1` (worker).
    tunnels: Vec<Option<Tunnel>>,
    free: Vec<usize>,
    next_id: u64,
    /// One read's buffer, for every tunnel of the lane.
    buf: Box<[u8]>,
}

thread_local! {
    static SET: RefCell<Option<Set>> = const { RefCell::new(None) };
}

/// The largest read (as the tokio path's).
const CHUNK: usize = 16 * 1024;
/// Events taken per look; a look that fills them looks again.
const EVENTS: usize = 256;
/// Full reads in a row after which a tunnel goes back to its task: a bulk transfer
/// is relayed there, where tokio's budget shares the thread, and not here, where it
/// would hold up every other tunnel of the lane.
const FULL_READS: usize = 16;

/// Why a tunnel is given back.
const ENDED: &str = "both sides ended";
const AN_ERROR: &str = "an error";
const CANNOT_TAKE: &str = "a side that could not take a whole read";
const BULK: &str = "a bulk transfer";

/// Whether this thread may keep a set: it runs a single-threaded runtime, so a
/// tunnel's task is always polled here, where its tunnel's set is.
pub(crate) fn usable_here() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// Puts a tunnel (nonblocking sockets) in this lane's set, starting the set's task
/// on first use. `active` is set by every read that brings bytes; `back` gets the
/// tunnel when the set gives it back. On an error the sockets are given back at once.
pub(crate) fn enter(
    client: TcpStream,
    worker: TcpStream,
    frames: Frames,
    active: Arc<AtomicBool>,
    back: oneshot::Sender<Back>,
) -> Result<Place, (TcpStream, TcpStream, io::Error)> {
    SET.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match Set::start() {
                Ok(set) => *slot = Some(set),
                Err(e) => return Err((client, worker, e)),
            }
        }
        match slot.as_mut() {
            Some(set) => set.insert(client, worker, frames, active, back),
            None => Err((client, worker, io::ErrorKind::Other.into())),
        }
    })
}

/// Takes the tunnel at `place` out of this lane's set; `None` if the set has given
/// it back already (or is gone).
pub(crate) fn leave(place: Place) -> Option<Back> {
    SET.try_with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        let set = slot.as_mut()?;
        if set.tunnels.get(place.index)?.as_ref()?.id != place.id {
            return None;
        }
        let t = set.remove(place.index, false)?;
        Some(Back {
            client: t.client,
            worker: t.worker,
            to_worker: Vec::new(),
            to_client: Vec::new(),
            frames: t.frames,
            moved: t.moved,
            error: None,
            ended: false,
            why: "taken out",
        })
    })
    .ok()
    .flatten()
}

/// Writes what `to` takes of `data` now: the count, and the error that stopped it
/// short (a full socket is no error).
pub(crate) fn write_now(mut to: &TcpStream, data: &[u8]) -> (usize, Option<io::Error>) {
    let mut off = 0;
    while off < data.len() {
        match to.write(&data[off..]) {
            Ok(0) => return (off, Some(io::ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (off, Some(e)),
        }
    }
    (off, None)
}

/// What one read of a tunnel's socket came to.
enum Step {
    /// All written on; maybe more to read.
    Sent(usize),
    /// Nothing more now.
    Drained,
    /// The tunnel goes back to its task, with the bytes not written on.
    GiveBack(Vec<u8>, Option<io::Error>, &'static str),
}

impl Set {
    fn start() -> io::Result<Set> {
        let poll = Poll::new()?;
        // The lane's reactor watches a copy of the descriptor, which its task owns:
        // it stays open for as long as it is registered, whatever becomes of the set.
        // SAFETY: `poll` is open for the duration of the borrow.
        let copy = unsafe { BorrowedFd::borrow_raw(poll.as_raw_fd()) }.try_clone_to_owned()?;
        // SAFETY: `copy` is owned by the `AsyncFd`, so open while registered.
        let watched = unsafe {
            AsyncFd::register_with_interest(copy, tokio::io::Interest::READABLE)
                .map_err(io::Error::from)?
        };
        tokio::spawn(serve(watched));
        Ok(Set {
            poll,
            tunnels: Vec::new(),
            free: Vec::new(),
            next_id: 0,
            buf: vec![0; CHUNK].into_boxed_slice(),
        })
    }

    fn insert(
        &mut self,
        client: TcpStream,
        worker: TcpStream,
        frames: Frames,
        active: Arc<AtomicBool>,
        back: oneshot::Sender<Back>,
    ) -> Result<Place, (TcpStream, TcpStream, io::Error)> {
        let index = self.free.last().copied().unwrap_or(self.tunnels.len());
        let registry = self.poll.registry();
        let fd = |s: &TcpStream| s.as_raw_fd();
        if let Err(e) = registry.register(
            &mut SourceFd(&fd(&client)),
            Token(index << 1),
            Interest::READABLE,
        ) {
            return Err((client, worker, e));
        }
        if let Err(e) = registry.register(
            &mut SourceFd(&fd(&worker)),
            Token(index << 1 | 1),
            Interest::READABLE,
        ) {
            let _ = registry.deregister(&mut SourceFd(&fd(&client)));
            return Err((client, worker, e));
        }
        if index == self.tunnels.len() {
            self.tunnels.push(None);
        } else {
            self.free.pop();
        }
        self.next_id += 1;
        let id = self.next_id;
        self.tunnels[index] = Some(Tunnel {
            id,
            client,
            worker,
            frames,
            moved: [0; 2],
            ended: [false; 2],
            active,
            back,
        });
        Ok(Place { index, id })
    }

    /// Takes the tunnel at `index` out of the set, and its sockets off the epoll
    /// set unless they are about to be closed (which takes them off; an event they
    /// still bring meanwhile finds their slot empty, or another tunnel's sockets,
    /// which it then reads to no harm).
    fn remove(&mut self, index: usize, closing: bool) -> Option<Tunnel> {
        let t = self.tunnels.get_mut(index)?.take()?;
        self.free.push(index);
        if closing {
            return Some(t);
        }
        let registry = self.poll.registry();
        for fd in [t.client.as_raw_fd(), t.worker.as_raw_fd()] {
            if let Err(e) = registry.deregister(&mut SourceFd(&fd)) {
                tracing::debug!(error = %e, "tunnel socket not taken off its lane's set");
            }
        }
        Some(t)
    }

    /// Relays what the sockets that woke have; true if there may be more events.
    fn turn(&mut self, events: &mut Events) -> bool {
        if let Err(e) = self.poll.poll(events, Some(Duration::ZERO)) {
            return e.kind() == io::ErrorKind::Interrupted;
        }
        let mut seen = 0;
        for event in events.iter() {
            seen += 1;
            let token = event.token().0;
            let ending = event.is_read_closed() || event.is_error();
            self.pump(token >> 1, token & 1 == 1, ending);
        }
        seen == EVENTS
    }

    /// Reads one socket of the tunnel at `index` until it has no more, writing each
    /// read on to the other. A read shorter than the buffer took all there was,
    /// unless the socket is `ending`: its end (or error) may wait behind the bytes,
    /// and brings no new event.
    fn pump(&mut self, index: usize, from_worker: bool, ending: bool) {
        for _ in 0..FULL_READS {
            match self.step(index, from_worker) {
                Step::Sent(n) if n == self.buf.len() || ending => continue,
                Step::Sent(_) | Step::Drained => return,
                Step::GiveBack(rest, error, why) => {
                    return self.give_back(index, from_worker, rest, error, why)
                }
            }
        }
        self.give_back(index, from_worker, Vec::new(), None, BULK);
    }

    fn step(&mut self, index: usize, from_worker: bool) -> Step {
        let Some(Some(t)) = self.tunnels.get_mut(index) else {
            return Step::Drained;
        };
        let direction = from_worker as usize;
        if t.ended[direction] {
            return Step::Drained;
        }
        let (mut from, to) = match from_worker {
            true => (&t.worker, &t.client),
            false => (&t.client, &t.worker),
        };
        let n = loop {
            match from.read(&mut self.buf) {
                Ok(0) => return t.end(direction),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Step::GiveBack(Vec::new(), Some(e), AN_ERROR),
            }
        };
        t.active.store(true, Ordering::Relaxed);
        let data = &self.buf[..n];
        let (sent, error) = write_now(to, data);
        if from_worker {
            t.frames.feed(&data[..sent]);
        }
        t.moved[direction] += sent as u64;
        if sent < n || error.is_some() {
            return Step::GiveBack(data[sent..].to_vec(), error, CANNOT_TAKE);
        }
        Step::Sent(n)
    }

    fn give_back(
        &mut self,
        index: usize,
        from_worker: bool,
        rest: Vec<u8>,
        error: Option<io::Error>,
        why: &'static str,
    ) {
        let closing = error.is_some() || why == ENDED;
        let Some(t) = self.remove(index, closing) else {
            return;
        };
        let (to_worker, to_client) = match from_worker {
            true => (Vec::new(), rest),
            false => (rest, Vec::new()),
        };
        // Its task gone (the lane stopping), the sockets close here.
        let _ = t.back.send(Back {
            client: t.client,
            worker: t.worker,
            to_worker,
            to_client,
            frames: t.frames,
            moved: t.moved,
            ended: t.ended == [true; 2],
            error,
            why,
        });
    }

    /// Gives every tunnel back (the set cannot go on).
    fn give_all_back(&mut self) {
        for index in 0..self.tunnels.len() {
            let error = io::Error::other("the lane's relay set failed");
            self.give_back(index, false, Vec::new(), Some(error), AN_ERROR);
        }
    }
}

/// The set's task: woken by the lane's reactor when the set's epoll descriptor has
/// events, it relays them all, then waits again.
async fn serve(watched: AsyncFd<OwnedFd>) {
    let mut events = Events::with_capacity(EVENTS);
    let error = loop {
        let mut ready = match watched.readable().await {
            Ok(ready) => ready,
            Err(e) => break e,
        };
        let more = SET.with(|cell| match cell.borrow_mut().as_mut() {
            Some(set) => set.turn(&mut events),
            None => false,
        });
        if !more {
            ready.clear_ready();
        }
    };
    tracing::warn!(error = %error, "a lane's relay set stopped; its tunnels go back to their tasks");
    if let Some(mut set) = SET.with(|cell| cell.borrow_mut().take()) {
        set.give_all_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Two connected sockets: corral's end (nonblocking) and its peer's.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        (ours, peer)
    }

    fn set_buffer(socket: &TcpStream, option: libc::c_int, size: libc::c_int) {
        let done = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(done, 0, "setsockopt");
    }

    /// `n` bytes from `socket`, waiting for them (up to a few seconds).
    fn read_n(mut socket: &TcpStream, n: usize) -> Vec<u8> {
        socket.set_nonblocking(false).expect("blocking");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = vec![0; n];
        socket.read_exact(&mut got).expect("the bytes expected");
        got
    }

    fn enter_pair(
        client: TcpStream,
        worker: TcpStream,
    ) -> (Place, Arc<AtomicBool>, oneshot::Receiver<Back>) {
        let active = Arc::new(AtomicBool::new(false));
        let (tx, rx) = oneshot::channel();
        let place = enter(client, worker, Frames::default(), active.clone(), tx)
            .map_err(|(_, _, e)| e)
            .expect("enter");
        (place, active, rx)
    }

    async fn given_back(rx: oneshot::Receiver<Back>) -> Back {
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("given back in time")
            .expect("given back")
    }

    /// The client's socket takes part of a read: the tunnel comes back with the
    /// rest, and what the client got, what came back and what is still in the
    /// worker's socket are the worker's bytes, in order, each once.
    #[tokio::test]
    async fn a_read_the_client_cannot_take_comes_back_with_the_tunnel() {
        let (client, client_peer) = pair();
        let (worker, mut worker_peer) = pair();
        set_buffer(&client, libc::SO_SNDBUF, 4096);
        set_buffer(&client_peer, libc::SO_RCVBUF, 4096);
        let (_, active, rx) = enter_pair(client, worker);
        let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        worker_peer.write_all(&sent).expect("worker writes");
        let back = given_back(rx).await;
        assert_eq!(back.why, CANNOT_TAKE);
        assert!(back.error.is_none());
        assert!(!back.to_client.is_empty() && back.to_worker.is_empty());
        assert!(active.load(Ordering::Relaxed));
        assert_eq!(back.moved[0], 0);
        let got = back.moved[1] as usize;
        let left = sent.len() - got - back.to_client.len();
        let mut all = read_n(&client_peer, got);
        all.extend_from_slice(&back.to_client);
        all.extend(read_n(&back.worker, left));
        assert!(all == sent, "the worker's bytes, in order, each once");
    }

    /// Read after full read (bytes were waiting): the tunnel goes back to its task
    /// once the set has relayed its share, and nothing is lost.
    #[tokio::test]
    async fn a_bulk_transfer_goes_back_to_its_task() {
        let (client, client_peer) = pair();
        let (worker, worker_peer) = pair();
        for (socket, option) in [
            (&client, libc::SO_SNDBUF),
            (&client_peer, libc::SO_RCVBUF),
            (&worker, libc::SO_RCVBUF),
        ] {
            set_buffer(socket, option, 1 << 20);
        }
        let sent: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
        let writer = {
            let (mut peer, sent) = (worker_peer.try_clone().expect("clone"), sent.clone());
            std::thread::spawn(move || peer.write_all(&sent).expect("worker writes"))
        };
        // All of it waiting in corral's socket before the set first looks.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while queued(&worker) < sent.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} queued",
                queued(&worker)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.join().expect("writer");
        let (_, _, rx) = enter_pair(client, worker);
        let back = given_back(rx).await;
        assert_eq!(
            (back.why, back.moved),
            (BULK, [0, (FULL_READS * CHUNK) as u64])
        );
        assert!(back.error.is_none() && back.to_client.is_empty());
        let got = back.moved[1] as usize;
        let mut all = read_n(&client_peer, got);
        all.extend(read_n(&back.worker, sent.len() - got));
        assert!(all == sent, "the worker's bytes, in order, each once");
    }

    /// Bytes waiting in `socket`'s receive queue.
    fn queued(socket: &TcpStream) -> usize {
        let mut n: libc::c_int = 0;
        let done = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(done, 0, "FIONREAD");
        n as usize
    }

    /// Bytes go both ways; each side's end is passed on to the other, and once both
    /// have ended the tunnel goes back to its task, done.
    #[tokio::test]
    async fn ends_are_passed_on_and_both_give_the_tunnel_back() {
        let (client, mut client_peer) = pair();
        let (worker, mut worker_peer) = pair();
        let (_, _, rx) = enter_pair(client, worker);
        // The peers block: on a thread of their own, while the set runs here.
        let peers = std::thread::spawn(move || {
            client_peer.write_all(b"up").expect("client writes");
            client_peer
                .shutdown(std::net::Shutdown::Write)
                .expect("client shuts down");
            let mut up = Vec::new();
            worker_peer
                .read_to_end(&mut up)
                .expect("worker reads to the end");
            worker_peer.write_all(b"down!").expect("worker writes");
            worker_peer
                .shutdown(std::net::Shutdown::Write)
                .expect("worker shuts down");
            let mut down = Vec::new();
            client_peer
                .read_to_end(&mut down)
                .expect("client reads to the end");
            (up, down, client_peer, worker_peer)
        });
        let back = given_back(rx).await;
        let (up, down, _client_peer, _worker_peer) = peers.join().expect("peers");
        assert_eq!((&up[..], &down[..]), (&b"up"[..], &b"down!"[..]));
        assert_eq!((back.why, back.ended, back.moved), (ENDED, true, [2, 5]));
        assert!(back.error.is_none() && back.to_client.is_empty());
    }

    /// A place taken out once is empty: taking it again finds nothing, even when a
    /// new tunnel has the same slot.
    #[tokio::test]
    async fn a_place_is_taken_out_once() {
        let (first, _first_peer) = pair();
        let (first_worker, _first_worker_peer) = pair();
        let (place, _, _rx) = enter_pair(first, first_worker);
        assert!(leave(place).is_some_and(|b| b.why == "taken out"));
        let (second, _second_peer) = pair();
        let (second_worker, _second_worker_peer) = pair();
        let (again, _, _rx2) = enter_pair(second, second_worker);
        assert_eq!(again.index, place.index);
        assert!(leave(place).is_none());
        assert!(leave(again).is_some());
    }
}
