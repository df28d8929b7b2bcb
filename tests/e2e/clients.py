"""Real python-socketio clients for the end-to-end tests."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import socketio


def wait_until(predicate, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Member:
    """One Socket.IO client that records its worker and every broadcast it receives."""

    def __init__(self, idx, url, transports=None, reconnection=False, headers=None):
        self.idx = idx
        self.url = url
        self.transports = transports
        self.headers = headers or {}
        self.sio = socketio.Client(reconnection=reconnection, reconnection_delay=0.2,
                                   reconnection_delay_max=0.5)
        self.worker = None
        self.workers_seen = []
        self.received = set()
        self.error = None
        self.lock = threading.Lock()
        self.welcomed = threading.Event()
        self.disconnects = 0

        @self.sio.event
        def disconnect(*_reason):
            with self.lock:
                self.disconnects += 1

        @self.sio.on("welcome")
        def _welcome(data):
            with self.lock:
                self.worker = data["worker"]
                self.workers_seen.append(data["worker"])
            self.welcomed.set()

        @self.sio.on("message")
        def _message(data):
            with self.lock:
                self.received.add(data["from"])

    def connect(self):
        try:
            self.sio.connect(self.url, transports=self.transports, headers=self.headers,
                             wait_timeout=15)
            if not self.welcomed.wait(15):
                raise RuntimeError("no welcome")
        except Exception as e:  # recorded and asserted on by the test
            self.error = repr(e)
        return self

    @property
    def transport(self):
        try:
            return self.sio.transport()
        except Exception:
            return None

    def disconnect(self):
        try:
            self.sio.disconnect()
        except Exception:
            pass


def connect_many(url, n, transports=None, reconnection=False, headers=None):
    members = [Member(i, url, transports, reconnection, headers) for i in range(n)]
    with ThreadPoolExecutor(max_workers=min(n, 50)) as pool:
        list(pool.map(lambda m: m.connect(), members))
    return members


def disconnect_all(members):
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(lambda m: m.disconnect(), members))


def spread(members):
    counts = {}
    for m in members:
        if m.worker is not None:
            counts[m.worker] = counts.get(m.worker, 0) + 1
    return counts


class WssClient:
    """A python-socketio client over `wss://` for sync test code: an AsyncClient on an
    event loop of its own thread.

    Why not `socketio.Client`: its reader and writer threads share one
    `ssl.SSLSocket` without a lock (python-engineio 4.x, `_read_loop_websocket` and
    `_write_loop`); the reader can take the writer's EAGAIN as the end and close
    the session, about one wss connect in a hundred, with or without corral in
    between (measured: gunicorn serving TLS itself, no corral, fails the same way).
    The asyncio client reads and writes from one thread."""

    def __init__(self, reconnection=False):
        import asyncio
        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sio = socketio.AsyncClient(reconnection=reconnection, ssl_verify=False,
                                        reconnection_delay=0.2, reconnection_delay_max=0.5)
        self.disconnects = 0
        # When each disconnect and each connect came (time.monotonic()).
        self.disconnected_at = []
        self.connected_at = []

        def disconnected(*_reason):
            self.disconnects += 1
            self.disconnected_at.append(time.monotonic())

        def connected(*_args):
            self.connected_at.append(time.monotonic())

        self.sio.on("disconnect", disconnected)
        self.sio.on("connect", connected)

    def _call(self, coro, timeout=30):
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on(self, event, handler):
        """`handler` (a plain function) runs on the client's thread."""
        self.sio.on(event, handler)

    def connect(self, url, headers=None, wait_timeout=10):
        self._call(self.sio.connect(url, headers=headers or {}, wait_timeout=wait_timeout),
                   timeout=wait_timeout + 20)

    def transport(self):
        return self.sio.transport()

    def emit(self, event, data):
        self._call(self.sio.emit(event, data))

    def disconnect(self):
        try:
            self._call(self.sio.disconnect(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
