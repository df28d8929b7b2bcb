//! The kernel relay (Linux, `experimental.kernel_relay`): an established cleartext
//! tunnel's bytes moved from one socket to the other by the kernel, with no read,
//! write or wake-up of corral per frame. It owns a SOCKHASH, a hand-written `sk_skb`
//! verdict program attached to it, and one slot per relayed socket (an mmapped array
//! both sides read and write); it attaches a pair of sockets, starts the relay, and
//! stops it again so that user space can carry on where the kernel left off.
//!
//! It must not lose, reorder or cut a byte. The program redirects a socket's bytes
//! only while its slot says so and user space has read every byte the program passed
//! it before; otherwise it passes them up (the socket turns readable). On the
//! worker-to-client side it follows the websocket frames, so that where the relay
//! stops is known to the byte and a close frame of corral's own can go between two
//! frames; a stretch it cannot follow (a header cut between two segments, very many
//! frames in one) makes it pass the bytes up from there on. What the tunnel does
//! with all this (when to start, when to stop, the idle clock, close frames) is
//! `proxy::tunnel`'s; this knows nothing of HTTP.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Relayed sockets at once (two per tunnel); past it tunnels stay in user space.
const SLOTS: u32 = 32 * 1024;
/// Frames the program follows within one segment before it gives the rest to
/// user space (its loop must be bounded for the verifier).
const FRAMES_PER_SEGMENT: i32 = 32;

/// The ring's size: records of 16 bytes, read at once.
const RING_BYTES: u32 = 16 * 1024;
/// The ring's event in the watch set (slots are below `SLOTS`).
const RING_EVENT: u64 = u64::MAX;

/// A `BPF_MAP_TYPE_RINGBUF` read from user space: each record a slot number.
struct Ring {
    map: OwnedFd,
    /// The consumer's position (read-write page).
    consumer: *const AtomicU64,
    /// The producer's position page, then the data mapped twice over.
    producer: *const AtomicU64,
    data: *const u8,
    mask: u64,
}

impl Ring {
    fn new(bytes: u32) -> io::Result<Ring> {
        let map = sys::map_create(sys::MAP_RINGBUF, 0, 0, bytes, 0)?;
        let page = sys::PAGE;
        let consumer = sys::map_at(&map, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = sys::map_at(&map, page + 2 * bytes as usize, libc::PROT_READ, page)?;
        Ok(Ring {
            map,
            consumer: consumer as *const AtomicU64,
            producer: producer as *const AtomicU64,
            data: unsafe { producer.add(page) },
            mask: bytes as u64 - 1,
        })
    }

    /// Calls `each` with every record's slot number, and frees their room.
    fn take(&self, mut each: impl FnMut(u32)) {
        const BUSY: u32 = 1 << 31;
        const DISCARD: u32 = 1 << 30;
        let (consumer, producer) = unsafe { (&*self.consumer, &*self.producer) };
        let mut at = consumer.load(Ordering::Acquire);
        let end = producer.load(Ordering::Acquire);
        while at < end {
            let head = unsafe {
                &*(self.data.add((at & self.mask) as usize) as *const std::sync::atomic::AtomicU32)
            };
            let len = head.load(Ordering::Acquire);
            if len & BUSY != 0 {
                break;
            }
            if len & DISCARD == 0 && len & !(BUSY | DISCARD) >= 4 {
                let slot = unsafe {
                    (self.data.add(((at + 8) & self.mask) as usize) as *const u32).read_unaligned()
                };
                each(slot);
            }
            at += ((len & !(BUSY | DISCARD)) as u64 + 8).div_ceil(8) * 8;
            consumer.store(at, Ordering::Release);
        }
    }
}

/// One relayed socket's shared state: the first four words are written by user
/// space, the rest by the program (one run at a time per socket).
#[repr(C)]
#[derive(Default)]
struct Slot {
    /// 1: redirect (when caught up); 0: pass everything up.
    relay: AtomicU64,
    /// Bytes of those passed up that user space has read and sent on.
    consumed: AtomicU64,
    /// 1: follow the websocket frames of this direction.
    track: AtomicU64,
    /// Bytes left of the frame in progress after the last byte sent on.
    remaining: AtomicU64,
    passed: AtomicU64,
    redirected: AtomicU64,
    /// Set when the frames could not be followed: everything is passed up since.
    failed: AtomicU64,
    entered: AtomicU64,
    left: AtomicU64,
}

const fn field(n: i16) -> i16 {
    n * 8
}
const RELAY: i16 = field(0);
const CONSUMED: i16 = field(1);
const TRACK: i16 = field(2);
const REMAINING: i16 = field(3);
const PASSED: i16 = field(4);
const REDIRECTED: i16 = field(5);
const FAILED: i16 = field(6);
const ENTERED: i16 = field(7);
const LEFT: i16 = field(8);

/// The kernel objects, made once per process.
pub struct KernelRelay {
    sockhash: OwnedFd,
    index: OwnedFd,
    _slots_map: OwnedFd,
    _program: OwnedFd,
    slots: *const Slot,
    free: Mutex<Vec<u32>>,
    /// Where the program tells which tunnels it gave up on.
    gave_up: Ring,
    /// An epoll set of every relayed socket, for its end only (`EPOLLRDHUP`): the
    /// kernel wakes a socket's readers as it moves bytes past it, and those
    /// wake-ups must not reach corral. Holds the ring too.
    watch: OwnedFd,
    /// Each relayed tunnel's wake-up, by its worker side's slot.
    wakes: Mutex<std::collections::HashMap<u32, std::sync::Arc<tokio::sync::Notify>>>,
    dispatching: std::sync::Once,
}

// The slots are atomics in shared memory that lives as long as the process.
unsafe impl Send for KernelRelay {}
unsafe impl Sync for KernelRelay {}

impl KernelRelay {
    /// The relay, made at first use; None (said once in the log) where this kernel
    /// or this process's privileges do not allow it.
    pub fn get() -> Option<&'static KernelRelay> {
        static RELAY: OnceLock<Option<KernelRelay>> = OnceLock::new();
        RELAY
            .get_or_init(|| match KernelRelay::new() {
                Ok(r) => {
                    tracing::info!("kernel relay ready: cleartext websocket tunnels are relayed by the kernel");
                    Some(r)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kernel relay unavailable (it needs Linux 5.12+ and CAP_BPF with CAP_NET_ADMIN); tunnels are relayed in user space");
                    None
                }
            })
            .as_ref()
    }

    fn new() -> io::Result<KernelRelay> {
        let sockhash = sys::map_create(sys::MAP_SOCKHASH, 16, 4, SLOTS, 0)?;
        let index = sys::map_create(sys::MAP_HASH, 16, 4, SLOTS, sys::F_NO_PREALLOC)?;
        let size = std::mem::size_of::<Slot>() as u32;
        let slots_map = sys::map_create(sys::MAP_ARRAY, 4, size, SLOTS, sys::F_MMAPABLE)?;
        let slots = sys::map_shared(&slots_map, size as usize * SLOTS as usize)? as *const Slot;
        let gave_up = Ring::new(RING_BYTES)?;
        let code = program(&index, &slots_map, &sockhash, &gave_up.map);
        let program = sys::load_verdict(&code)?;
        sys::attach_verdict(&sockhash, &program)?;
        let watch = sys::epoll()?;
        sys::epoll_add(
            &watch,
            gave_up.map.as_raw_fd(),
            libc::EPOLLIN as u32,
            RING_EVENT,
        )?;
        Ok(KernelRelay {
            sockhash,
            index,
            _slots_map: slots_map,
            _program: program,
            slots,
            free: Mutex::new((0..SLOTS).rev().collect()),
            gave_up,
            watch,
            wakes: Mutex::default(),
            dispatching: std::sync::Once::new(),
        })
    }

    /// Wakes the tunnels whose socket ended or whose frames the program gave up
    /// on; runs on the runtime of the first tunnel, as long as it does.
    fn dispatch(&'static self) {
        self.dispatching.call_once(|| {
            // The epoll set is the relay's, which lives as long as the process.
            let watch = unsafe { tokio::io::unix::AsyncFd::register(self.watch.as_raw_fd()) };
            let Ok(watch) = watch else {
                return tracing::warn!("kernel relay: cannot watch its sockets");
            };
            tokio::spawn(async move {
                let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
                loop {
                    let Ok(mut ready) = watch.readable().await else {
                        return;
                    };
                    let n = sys::epoll_now(&self.watch, &mut events);
                    if n == 0 {
                        ready.clear_ready();
                        continue;
                    }
                    for e in &events[..n] {
                        match e.u64 {
                            RING_EVENT => self.gave_up.take(|slot| self.wake(slot)),
                            slot => self.wake(slot as u32),
                        }
                    }
                }
            });
        });
    }

    fn wake(&self, slot: u32) {
        if let Some(w) = self.wakes.lock().ok().and_then(|w| w.get(&slot).cloned()) {
            w.notify_one();
        }
    }

    fn slot(&self, n: u32) -> &Slot {
        // In bounds: n comes from the free list of 0..SLOTS.
        unsafe { &*self.slots.add(n as usize) }
    }

    fn take_slot(&self) -> Option<u32> {
        self.free.lock().ok()?.pop()
    }

    fn give_back(&self, n: u32) {
        if let Ok(mut free) = self.free.lock() {
            free.push(n);
        }
    }

    /// Puts a tunnel's two sockets (IPv4, connected) in the map, the relay not yet
    /// started: the program passes everything up until [`Attached::start`]. Bytes
    /// from the worker are followed as websocket frames.
    pub fn attach(&'static self, client: RawFd, worker: RawFd) -> io::Result<Attached> {
        let keys = [sys::key_of(client)?, sys::key_of(worker)?];
        let mut attached = Attached {
            relay: self,
            fds: [client, worker],
            slots: [u32::MAX; 2],
            keys,
            base: [0; 2],
            wake: None,
            watched: false,
        };
        for (side, key) in keys.iter().enumerate() {
            let n = self
                .take_slot()
                .ok_or_else(|| io::Error::other("every kernel relay slot is taken"))?;
            attached.slots[side] = n;
            let s = self.slot(n);
            for w in [
                &s.relay,
                &s.consumed,
                &s.remaining,
                &s.passed,
                &s.redirected,
            ]
            .into_iter()
            .chain([&s.failed, &s.entered, &s.left])
            {
                w.store(0, Ordering::Relaxed);
            }
            s.track.store(side as u64, Ordering::Relaxed);
            sys::map_update(&self.index, key, &n.to_ne_bytes())?;
        }
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        if let Ok(mut w) = self.wakes.lock() {
            w.insert(attached.slots[1], wake.clone());
        }
        attached.wake = Some(wake);
        self.dispatch();
        // Each socket is stored under the other's key: bytes that arrive on one are
        // sent out of the socket its own key names.
        sys::map_update(&self.sockhash, &keys[0], &(worker as u32).to_ne_bytes())?;
        sys::map_update(&self.sockhash, &keys[1], &(client as u32).to_ne_bytes())?;
        Ok(attached)
    }
}

/// Which side of a tunnel: the client's socket, or the worker's.
#[derive(Clone, Copy)]
pub enum Side {
    Client = 0,
    Worker = 1,
}

/// A tunnel's sockets in the kernel relay's map; taken out of the index (and their
/// slots given back) when dropped. The sockets leave the map when they are closed.
pub struct Attached {
    relay: &'static KernelRelay,
    fds: [RawFd; 2],
    slots: [u32; 2],
    keys: [[u8; 16]; 2],
    /// Bytes queued on each socket when the relay started.
    base: [u64; 2],
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The sockets are in the relay's epoll set.
    watched: bool,
}

/// Where the relay stood when it stopped.
pub struct Stopped {
    /// Bytes the kernel moved from the client to the worker, and back.
    pub up: u64,
    pub down: u64,
    /// Bytes left of the worker's frame in progress (the next byte from the worker
    /// is a header when 0).
    pub remaining: u64,
}

impl Attached {
    fn slot(&self, side: Side) -> &Slot {
        self.relay.slot(self.slots[side as usize])
    }

    /// Bytes the program has passed up on `side` so far.
    pub fn passed(&self, side: Side) -> u64 {
        self.slot(side).passed.load(Ordering::Acquire)
    }

    /// Starts relaying: user space has read and sent on everything passed up so far
    /// (`consumed` per side), and the worker's frame in progress has `remaining`
    /// bytes left. Bytes passed up since stay with user space (the program sees the
    /// counts differ and keeps passing, having moved nothing): then this says
    /// false, the relay is off again, and the caller reads those bytes and may try
    /// again (nothing would wake it for them).
    pub fn start(&mut self, consumed: [u64; 2], remaining: u64) -> io::Result<bool> {
        for (i, fd) in self.fds.iter().enumerate() {
            self.base[i] = sys::queued_total(*fd)?.ok_or(io::ErrorKind::NotConnected)?;
        }
        let ends = (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
        // Before the adds: one that fails leaves the other to be taken out.
        self.watched = true;
        for fd in self.fds {
            sys::epoll_add(&self.relay.watch, fd, ends, self.slots[1] as u64)?;
        }
        self.slot(Side::Worker)
            .remaining
            .store(remaining, Ordering::Release);
        for side in [Side::Client, Side::Worker] {
            let s = self.slot(side);
            s.consumed.store(consumed[side as usize], Ordering::Release);
            s.relay.store(1, Ordering::SeqCst);
        }
        for side in [Side::Client, Side::Worker] {
            let s = self.slot(side);
            // A run that saw the relay still off may be counting what it passed.
            let until = Instant::now() + Duration::from_millis(100);
            while !self.settled(side) {
                if Instant::now() > until {
                    self.hold();
                    return Ok(false);
                }
                std::thread::yield_now();
            }
            if s.passed.load(Ordering::SeqCst) != consumed[side as usize] {
                self.hold();
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// No run of the program on `side` is in progress (each counts itself in and
    /// out of its slot).
    fn settled(&self, side: Side) -> bool {
        let s = self.slot(side);
        let left = s.left.load(Ordering::SeqCst);
        s.entered.load(Ordering::SeqCst) == left
    }

    /// The relay off (everything is passed up from now on) and the sockets out of
    /// the watch set.
    fn hold(&mut self) {
        // Slots not yet taken (an attach that failed half-way) are u32::MAX.
        for n in self.slots.into_iter().filter(|n| *n != u32::MAX) {
            self.relay.slot(n).relay.store(0, Ordering::SeqCst);
        }
        if std::mem::take(&mut self.watched) {
            for fd in self.fds {
                let _ = sys::epoll_del(&self.relay.watch, fd);
            }
        }
    }

    /// Resolves when a socket has ended or the program gave up on the frames (the
    /// socket then has bytes to read). The sockets must be off corral's own
    /// reactor meanwhile, or it would be woken for every byte the kernel moves.
    pub async fn woken(&self) {
        match &self.wake {
            Some(w) => w.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Bytes moved by the kernel either way so far (for the idle clock).
    pub fn moved(&self) -> u64 {
        self.slot(Side::Client).redirected.load(Ordering::Relaxed)
            + self.slot(Side::Worker).redirected.load(Ordering::Relaxed)
    }

    /// Stops relaying and waits (up to `limit`) until every byte the kernel took is
    /// queued on the socket it was going to; from then on the program passes
    /// everything up and user space carries on. An error means bytes may still be
    /// on their way: the tunnel cannot go on.
    pub async fn stop(&mut self, limit: Duration) -> io::Result<Stopped> {
        let until = Instant::now() + limit;
        self.hold();
        // A run of the program that saw the relay on may still be counting.
        for side in [Side::Client, Side::Worker] {
            while !self.settled(side) {
                if Instant::now() > until {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                tokio::task::yield_now().await;
            }
        }
        let up = self.slot(Side::Client).redirected.load(Ordering::Acquire);
        let down = self.slot(Side::Worker).redirected.load(Ordering::Acquire);
        let remaining = self.slot(Side::Worker).remaining.load(Ordering::Acquire);
        // What was redirected reaches the other socket's queue from a kernel worker.
        loop {
            let to_client = sys::queued_total(self.fds[Side::Client as usize])?;
            let to_worker = sys::queued_total(self.fds[Side::Worker as usize])?;
            // A reset socket takes nothing more: there is nothing to wait for.
            let client_done = to_client.is_none_or(|n| n >= self.base[0] + down);
            let worker_done = to_worker.is_none_or(|n| n >= self.base[1] + up);
            if client_done && worker_done {
                break;
            }
            if Instant::now() > until {
                return Err(io::ErrorKind::TimedOut.into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(Stopped {
            up,
            down,
            remaining,
        })
    }

    /// The program could not follow the worker's frames and passes everything up.
    pub fn gave_up(&self) -> bool {
        self.slot(Side::Worker).failed.load(Ordering::Acquire) != 0
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(mut w) = self.relay.wakes.lock() {
            w.remove(&self.slots[1]);
        }
        self.hold();
        for i in 0..2 {
            if self.slots[i] == u32::MAX {
                continue;
            }
            let _ = sys::map_delete(&self.relay.index, &self.keys[i]);
            let _ = sys::map_delete(&self.relay.sockhash, &self.keys[i]);
            self.relay.give_back(self.slots[i]);
        }
    }
}

/// The verdict program. On each segment that arrives on a relayed socket: find its
/// slot (by the socket's four-tuple); pass the bytes up unless the relay is on, the
/// frames were followed so far, and user space has read all it was passed; on the
/// worker's side follow the frames through the segment; count, and send the bytes
/// out of the other socket.
fn program(index: &OwnedFd, slots: &OwnedFd, sockhash: &OwnedFd, ring: &OwnedFd) -> Vec<u64> {
    use asm::*;
    let mut p = Asm::default();
    // __sk_buff offsets.
    const LEN: i16 = 0;
    const REMOTE_IP4: i16 = 92;
    const LOCAL_IP4: i16 = 96;
    const REMOTE_PORT: i16 = 132;
    const LOCAL_PORT: i16 = 136;
    const SK_PASS: i32 = 1;
    // Stack: the key at -16, the slot number at -20, the loop count at -32, a
    // frame header at -50 (so its 2- and 8-byte lengths are aligned at -48).
    p.mov(R6, R1);
    for (off, at) in [
        (REMOTE_IP4, -16),
        (LOCAL_IP4, -12),
        (REMOTE_PORT, -8),
        (LOCAL_PORT, -4),
    ] {
        p.ldxw(R2, R6, off);
        p.stxw(R10, at, R2);
    }
    p.ld_map(R1, index.as_raw_fd());
    p.mov(R2, R10);
    p.addi(R2, -16);
    p.call(HELPER_MAP_LOOKUP);
    p.jeqi(R0, 0, "unknown");
    p.ldxw(R2, R0, 0);
    p.stxw(R10, -20, R2);
    p.ld_map(R1, slots.as_raw_fd());
    p.mov(R2, R10);
    p.addi(R2, -20);
    p.call(HELPER_MAP_LOOKUP);
    p.jeqi(R0, 0, "unknown");
    p.mov(R7, R0);
    p.ldxw(R8, R6, LEN);
    p.count(R7, ENTERED);
    p.ldxdw(R1, R7, RELAY);
    p.jeqi(R1, 0, "pass");
    p.ldxdw(R1, R7, FAILED);
    p.jnei(R1, 0, "pass");
    p.ldxdw(R1, R7, PASSED);
    p.ldxdw(R2, R7, CONSUMED);
    p.jne(R1, R2, "pass");
    p.ldxdw(R1, R7, TRACK);
    p.jeqi(R1, 0, "redirect");
    // R9: where the next frame header starts, from this segment's first byte.
    p.ldxdw(R9, R7, REMAINING);
    p.jlt(R9, R8, "frames");
    p.sub(R9, R8);
    p.stxdw(R7, REMAINING, R9);
    p.ja("redirect");
    p.label("frames");
    p.stdw(R10, -32, 0);
    p.label("loop");
    p.ldxdw(R1, R10, -32);
    p.jgei(R1, FRAMES_PER_SEGMENT, "fail");
    p.addi(R1, 1);
    p.stxdw(R10, -32, R1);
    for (need, form) in [(2, "short"), (4, "ext16"), (10, "ext64")] {
        p.label(form);
        p.mov(R1, R9);
        p.addi(R1, need);
        p.jgt(R1, R8, "fail");
        p.mov(R1, R6);
        p.mov(R2, R9);
        p.mov(R3, R10);
        p.addi(R3, -50);
        p.movi(R4, need);
        p.call(HELPER_SKB_LOAD_BYTES);
        p.jnei(R0, 0, "fail");
        match form {
            "short" => {
                p.ldxb(R2, R10, -49);
                p.andi(R2, 0x7f);
                p.jeqi(R2, 126, "ext16");
                p.jeqi(R2, 127, "ext64");
                p.movi(R5, 2);
            }
            "ext16" => {
                p.ldxh(R2, R10, -48);
                p.be(R2, 16);
                p.movi(R5, 4);
            }
            _ => {
                p.ldxdw(R2, R10, -48);
                p.be(R2, 64);
                // Past 2 GiB the count could wrap: user space takes such a frame.
                p.jgti(R2, i32::MAX, "fail");
                p.movi(R5, 10);
            }
        }
        p.ja("have");
    }
    p.label("have");
    // The mask key's four bytes when the mask bit is set.
    p.ldxb(R1, R10, -49);
    p.rshi(R1, 7);
    p.lshi(R1, 2);
    p.add(R5, R1);
    p.add(R9, R5);
    p.add(R9, R2);
    p.jlt(R9, R8, "loop");
    p.sub(R9, R8);
    p.stxdw(R7, REMAINING, R9);
    p.label("redirect");
    p.ldxdw(R1, R7, REDIRECTED);
    p.add(R1, R8);
    p.stxdw(R7, REDIRECTED, R1);
    p.count(R7, LEFT);
    p.mov(R1, R6);
    p.ld_map(R2, sockhash.as_raw_fd());
    p.mov(R3, R10);
    p.addi(R3, -16);
    p.movi(R4, 0);
    p.call(HELPER_SK_REDIRECT_HASH);
    p.exit();
    p.label("fail");
    p.movi(R1, 1);
    p.stxdw(R7, FAILED, R1);
    // Tell user space which slot (its number is still at -20).
    p.ld_map(R1, ring.as_raw_fd());
    p.mov(R2, R10);
    p.addi(R2, -20);
    p.movi(R3, 4);
    p.movi(R4, 0);
    p.call(HELPER_RINGBUF_OUTPUT);
    p.label("pass");
    p.ldxdw(R1, R7, PASSED);
    p.add(R1, R8);
    p.stxdw(R7, PASSED, R1);
    p.count(R7, LEFT);
    p.label("unknown");
    p.movi(R0, SK_PASS);
    p.exit();
    p.finish()
}

/// Just enough of an eBPF assembler for the program above: instructions as 64-bit
/// words, jumps to named labels resolved at the end.
mod asm {
    use std::collections::HashMap;

    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    pub const R6: u8 = 6;
    pub const R7: u8 = 7;
    pub const R8: u8 = 8;
    pub const R9: u8 = 9;
    pub const R10: u8 = 10;
    pub const HELPER_MAP_LOOKUP: i32 = 1;
    pub const HELPER_SKB_LOAD_BYTES: i32 = 26;
    pub const HELPER_SK_REDIRECT_HASH: i32 = 72;
    pub const HELPER_RINGBUF_OUTPUT: i32 = 130;

    #[derive(Default)]
    pub struct Asm {
        code: Vec<u64>,
        labels: HashMap<&'static str, usize>,
        jumps: Vec<(usize, &'static str)>,
    }

    fn word(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        op as u64
            | ((dst as u64 | ((src as u64) << 4)) << 8)
            | ((off as u16 as u64) << 16)
            | ((imm as u32 as u64) << 32)
    }

    impl Asm {
        fn put(&mut self, op: u8, dst: u8, src: u8, off: i16, imm: i32) {
            self.code.push(word(op, dst, src, off, imm));
        }
        fn jump(&mut self, op: u8, dst: u8, src: u8, imm: i32, to: &'static str) {
            self.jumps.push((self.code.len(), to));
            self.put(op, dst, src, 0, imm);
        }
        pub fn label(&mut self, name: &'static str) {
            self.labels.insert(name, self.code.len());
        }
        pub fn mov(&mut self, d: u8, s: u8) {
            self.put(0xbf, d, s, 0, 0)
        }
        pub fn movi(&mut self, d: u8, imm: i32) {
            self.put(0xb7, d, 0, 0, imm)
        }
        pub fn add(&mut self, d: u8, s: u8) {
            self.put(0x0f, d, s, 0, 0)
        }
        pub fn addi(&mut self, d: u8, imm: i32) {
            self.put(0x07, d, 0, 0, imm)
        }
        pub fn sub(&mut self, d: u8, s: u8) {
            self.put(0x1f, d, s, 0, 0)
        }
        pub fn andi(&mut self, d: u8, imm: i32) {
            self.put(0x57, d, 0, 0, imm)
        }
        pub fn lshi(&mut self, d: u8, imm: i32) {
            self.put(0x67, d, 0, 0, imm)
        }
        pub fn rshi(&mut self, d: u8, imm: i32) {
            self.put(0x77, d, 0, 0, imm)
        }
        /// To big-endian (a byte swap here): 16, 32 or 64 bits.
        pub fn be(&mut self, d: u8, bits: i32) {
            self.put(0xdc, d, 0, 0, bits)
        }
        pub fn ldxb(&mut self, d: u8, s: u8, off: i16) {
            self.put(0x71, d, s, off, 0)
        }
        pub fn ldxh(&mut self, d: u8, s: u8, off: i16) {
            self.put(0x69, d, s, off, 0)
        }
        pub fn ldxw(&mut self, d: u8, s: u8, off: i16) {
            self.put(0x61, d, s, off, 0)
        }
        pub fn ldxdw(&mut self, d: u8, s: u8, off: i16) {
            self.put(0x79, d, s, off, 0)
        }
        pub fn stxw(&mut self, d: u8, off: i16, s: u8) {
            self.put(0x63, d, s, off, 0)
        }
        pub fn stxdw(&mut self, d: u8, off: i16, s: u8) {
            self.put(0x7b, d, s, off, 0)
        }
        pub fn stdw(&mut self, d: u8, off: i16, imm: i32) {
            self.put(0x7a, d, 0, off, imm)
        }
        /// `*(u64 *)(d + off) += 1`, through R1.
        pub fn count(&mut self, d: u8, off: i16) {
            self.ldxdw(R1, d, off);
            self.addi(R1, 1);
            self.stxdw(d, off, R1);
        }
        /// A map's address from its descriptor (a two-word instruction).
        pub fn ld_map(&mut self, d: u8, fd: i32) {
            self.put(0x18, d, 1, 0, fd);
            self.put(0, 0, 0, 0, 0);
        }
        pub fn call(&mut self, helper: i32) {
            self.put(0x85, 0, 0, 0, helper)
        }
        pub fn exit(&mut self) {
            self.put(0x95, 0, 0, 0, 0)
        }
        pub fn ja(&mut self, to: &'static str) {
            self.jump(0x05, 0, 0, 0, to)
        }
        pub fn jeqi(&mut self, d: u8, imm: i32, to: &'static str) {
            self.jump(0x15, d, 0, imm, to)
        }
        pub fn jnei(&mut self, d: u8, imm: i32, to: &'static str) {
            self.jump(0x55, d, 0, imm, to)
        }
        pub fn jgei(&mut self, d: u8, imm: i32, to: &'static str) {
            self.jump(0x35, d, 0, imm, to)
        }
        pub fn jgti(&mut self, d: u8, imm: i32, to: &'static str) {
            self.jump(0x25, d, 0, imm, to)
        }
        pub fn jne(&mut self, d: u8, s: u8, to: &'static str) {
            self.jump(0x5d, d, s, 0, to)
        }
        pub fn jgt(&mut self, d: u8, s: u8, to: &'static str) {
            self.jump(0x2d, d, s, 0, to)
        }
        pub fn jlt(&mut self, d: u8, s: u8, to: &'static str) {
            self.jump(0xad, d, s, 0, to)
        }
        /// The code, every jump pointed at its label.
        pub fn finish(mut self) -> Vec<u64> {
            for (at, to) in std::mem::take(&mut self.jumps) {
                let target = self.labels[to] as i64;
                let off = (target - at as i64 - 1) as i16;
                self.code[at] = (self.code[at] & !(0xffff << 16)) | ((off as u16 as u64) << 16);
            }
            self.code
        }
    }
}

/// The system calls: bpf(2), the socket's key, and what its send queue has taken.
mod sys {
    use super::*;

    pub const MAP_HASH: u32 = 1;
    pub const MAP_ARRAY: u32 = 2;
    pub const MAP_SOCKHASH: u32 = 18;
    pub const MAP_RINGBUF: u32 = 27;
    pub const PAGE: usize = 4096;
    pub const F_NO_PREALLOC: u32 = 1;
    pub const F_MMAPABLE: u32 = 1 << 10;
    const CMD_MAP_CREATE: i64 = 0;
    const CMD_MAP_UPDATE: i64 = 2;
    const CMD_MAP_DELETE: i64 = 3;
    const CMD_PROG_LOAD: i64 = 5;
    const CMD_PROG_ATTACH: i64 = 8;
    const PROG_SK_SKB: u32 = 14;
    const SK_SKB_VERDICT: u32 = 5;

    /// `bpf(cmd, attr)`, the attribute block zero-padded as the kernel wants it.
    fn bpf(cmd: i64, attr: &[u8]) -> io::Result<i64> {
        let mut block = [0u8; 128];
        block[..attr.len()].copy_from_slice(attr);
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, block.as_mut_ptr(), block.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r)
    }

    fn words(parts: &[u64]) -> Vec<u8> {
        parts.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn pair(lo: u32, hi: u32) -> u64 {
        lo as u64 | ((hi as u64) << 32)
    }

    fn owned(fd: i64) -> OwnedFd {
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    }

    pub fn map_create(
        kind: u32,
        key: u32,
        value: u32,
        entries: u32,
        flags: u32,
    ) -> io::Result<OwnedFd> {
        let attr = words(&[pair(kind, key), pair(value, entries), pair(flags, 0)]);
        bpf(CMD_MAP_CREATE, &attr).map(owned)
    }

    pub fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
        let attr = words(&[
            pair(map.as_raw_fd() as u32, 0),
            key.as_ptr() as u64,
            value.as_ptr() as u64,
            0,
        ]);
        bpf(CMD_MAP_UPDATE, &attr).map(drop)
    }

    pub fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
        let attr = words(&[pair(map.as_raw_fd() as u32, 0), key.as_ptr() as u64]);
        bpf(CMD_MAP_DELETE, &attr).map(drop)
    }

    /// The array's values mapped into this process, shared with the program.
    pub fn map_shared(map: &OwnedFd, len: usize) -> io::Result<*mut u8> {
        map_at(
            map,
            len.div_ceil(PAGE) * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            0,
        )
    }

    /// `len` bytes of a map's memory from `offset`, shared, for the process's life.
    pub fn map_at(map: &OwnedFd, len: usize, prot: i32, offset: usize) -> io::Result<*mut u8> {
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(p as *mut u8)
    }

    pub fn epoll() -> io::Result<OwnedFd> {
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn epoll_add(set: &OwnedFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut e = libc::epoll_event { events, u64: data };
        if unsafe { libc::epoll_ctl(set.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut e) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn epoll_del(set: &OwnedFd, fd: RawFd) -> io::Result<()> {
        let mut e = libc::epoll_event { events: 0, u64: 0 };
        if unsafe { libc::epoll_ctl(set.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut e) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The events ready now (without waiting).
    pub fn epoll_now(set: &OwnedFd, events: &mut [libc::epoll_event]) -> usize {
        let n = unsafe {
            libc::epoll_wait(set.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 0)
        };
        n.max(0) as usize
    }

    pub fn load_verdict(code: &[u64]) -> io::Result<OwnedFd> {
        let license = b"MIT\0";
        let mut log = vec![0u8; 16 << 20];
        let mut name = [0u8; 16];
        name[..12].copy_from_slice(b"corral_relay");
        let load = |log_level: u32, log: &mut [u8]| {
            let mut attr = words(&[
                pair(PROG_SK_SKB, code.len() as u32),
                code.as_ptr() as u64,
                license.as_ptr() as u64,
                pair(log_level, log.len() as u32),
                log.as_mut_ptr() as u64,
                pair(0, 0),
            ]);
            attr.extend_from_slice(&name);
            attr.extend_from_slice(&0u32.to_ne_bytes());
            attr.extend_from_slice(&SK_SKB_VERDICT.to_ne_bytes());
            bpf(CMD_PROG_LOAD, &attr).map(owned)
        };
        load(0, &mut log).or_else(|first| {
            // Again with the verifier's log, for the error to say why.
            load(1, &mut log).map_err(|e| {
                let text = String::from_utf8_lossy(&log);
                let text = text.trim_end_matches('\0');
                let tail: String = text.lines().rev().take(4).collect::<Vec<_>>().join(" / ");
                io::Error::new(
                    e.kind(),
                    format!("verdict program refused: {first}: {tail}"),
                )
            })
        })
    }

    pub fn attach_verdict(map: &OwnedFd, program: &OwnedFd) -> io::Result<()> {
        let attr = words(&[
            pair(map.as_raw_fd() as u32, program.as_raw_fd() as u32),
            pair(SK_SKB_VERDICT, 0),
        ]);
        bpf(CMD_PROG_ATTACH, &attr).map(drop)
    }

    /// The key the program builds from a segment that arrives on `fd`: remote and
    /// local IPv4 address (network order), the remote port (network order, in the
    /// upper half of a 32-bit word), the local port (host order).
    pub fn key_of(fd: RawFd) -> io::Result<[u8; 16]> {
        let sock = unsafe { std::mem::ManuallyDrop::new(std::net::TcpStream::from_raw_fd(fd)) };
        let (local, remote) = match (sock.local_addr()?, sock.peer_addr()?) {
            (std::net::SocketAddr::V4(l), std::net::SocketAddr::V4(r)) => (l, r),
            _ => return Err(io::Error::other("the kernel relay takes IPv4 sockets only")),
        };
        let mut key = [0u8; 16];
        key[0..4].copy_from_slice(&remote.ip().octets());
        key[4..8].copy_from_slice(&local.ip().octets());
        key[10..12].copy_from_slice(&remote.port().to_be_bytes());
        key[12..16].copy_from_slice(&(local.port() as u32).to_ne_bytes());
        Ok(key)
    }

    /// Every byte ever queued for sending on `fd`: acknowledged plus still queued
    /// (`tcpi_bytes_acked`, then `SIOCOUTQ`: read in this order the sum is never
    /// above the truth). None once the connection is closed (reset).
    pub fn queued_total(fd: RawFd) -> io::Result<Option<u64>> {
        const TCP_CLOSE: u8 = 7;
        const BYTES_ACKED: usize = 120;
        let mut info = [0u8; 256];
        let mut len = info.len() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if (len as usize) < BYTES_ACKED + 8 {
            return Err(io::Error::other("TCP_INFO without tcpi_bytes_acked"));
        }
        if info[0] == TCP_CLOSE {
            return Ok(None);
        }
        let mut acked = [0u8; 8];
        acked.copy_from_slice(&info[BYTES_ACKED..BYTES_ACKED + 8]);
        let mut outq: libc::c_int = 0;
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(u64::from_ne_bytes(acked) + outq.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn relay() -> &'static KernelRelay {
        match KernelRelay::get() {
            Some(r) => r,
            None => panic!(
                "no kernel relay here (the tests need root): {:?}",
                KernelRelay::new().err()
            ),
        }
    }

    /// client - near | far - server: near and far are the tunnel's two sockets.
    fn tunnel() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let front = TcpListener::bind("127.0.0.1:0").expect("bind");
        let back = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(front.local_addr().expect("addr")).expect("connect");
        let (near, _) = front.accept().expect("accept");
        let far = TcpStream::connect(back.local_addr().expect("addr")).expect("connect");
        let (server, _) = back.accept().expect("accept");
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
        }
        (client, near, far, server)
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0x82];
        match len {
            0..=125 => f.push(len as u8),
            126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend(std::iter::repeat_n(fill, len));
        f
    }

    fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).expect("read");
        got
    }

    #[tokio::test]
    async fn the_kernel_relays_both_ways_and_stops_between_frames_or_says_where() {
        let relay = relay();
        let (mut client, near, far, mut server) = tunnel();
        let mut attached = relay
            .attach(near.as_raw_fd(), far.as_raw_fd())
            .expect("attach");
        assert!(attached.start([0, 0], 0).expect("start"));
        client.write_all(b"to the worker").expect("write");
        assert_eq!(read_exactly(&mut server, 13), b"to the worker");
        // Every header form, several frames per write, one frame across writes.
        let mut stream = Vec::new();
        for (i, len) in [5usize, 125, 126, 300, 65535, 65536, 200_000, 7]
            .iter()
            .enumerate()
        {
            stream.extend(frame(*len, i as u8));
        }
        let cut = frame(1000, 9);
        server.write_all(&stream).expect("write");
        server.write_all(&cut[..600]).expect("write");
        let got = read_exactly(&mut client, stream.len() + 600);
        assert!(
            got == [&stream[..], &cut[..600]].concat(),
            "frames changed on the way"
        );
        let stopped = attached.stop(Duration::from_secs(2)).await.expect("stop");
        assert_eq!(stopped.up, 13);
        assert_eq!(stopped.down, (stream.len() + 600) as u64);
        assert_eq!(
            stopped.remaining,
            cut.len() as u64 - 600,
            "the cut frame's rest"
        );
        assert!(!attached.gave_up());
        // Stopped: the bytes come up to this process, in order.
        server.write_all(&cut[600..]).expect("write");
        let mut far = far;
        far.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(read_exactly(&mut far, cut.len() - 600), &cut[600..]);
    }

    #[tokio::test]
    async fn frames_it_cannot_follow_are_passed_up_from_where_it_lost_them() {
        let relay = relay();
        let (mut client, near, far, mut server) = tunnel();
        let mut attached = relay
            .attach(near.as_raw_fd(), far.as_raw_fd())
            .expect("attach");
        assert!(attached.start([0, 0], 0).expect("start"));
        let first = frame(10, 1);
        server.write_all(&first).expect("write");
        assert_eq!(read_exactly(&mut client, first.len()), first);
        // More frames in one segment than the program follows.
        let many: Vec<u8> = (0..100).flat_map(|i| frame(3, i as u8)).collect();
        server.write_all(&many).expect("write");
        let mut far = far;
        far.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(read_exactly(&mut far, many.len()), many, "passed up whole");
        assert!(attached.gave_up());
        let stopped = attached.stop(Duration::from_secs(2)).await.expect("stop");
        assert_eq!(stopped.down, first.len() as u64);
        assert_eq!(stopped.remaining, 0);
    }

    #[tokio::test]
    async fn a_start_that_finds_bytes_passed_up_holds_until_they_are_read() {
        let relay = relay();
        let (mut client, near, far, mut server) = tunnel();
        let mut attached = relay
            .attach(near.as_raw_fd(), far.as_raw_fd())
            .expect("attach");
        server.write_all(b"early").expect("write");
        let mut far_r = far.try_clone().expect("clone");
        far_r
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(5);
        while attached.passed(Side::Worker) < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Started as if nothing had been passed up: refused, the relay held.
        assert!(!attached.start([0, 0], 0).expect("start"));
        server.write_all(b"later").expect("write");
        // "later" must not overtake "early": it too comes up here.
        assert_eq!(read_exactly(&mut far_r, 10), b"earlylater");
        client.set_nonblocking(true).expect("nonblocking");
        let mut none = [0u8; 16];
        assert!(
            client.read(&mut none).is_err(),
            "nothing reached the client"
        );
        // Everything read: the relay starts, and the next bytes go through.
        assert!(attached.start([0, 10], 0).expect("start"));
        server.write_all(b"\x81\x03now").expect("write");
        client.set_nonblocking(false).expect("blocking");
        assert_eq!(read_exactly(&mut client, 5), b"\x81\x03now");
    }
}
