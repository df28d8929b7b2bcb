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
