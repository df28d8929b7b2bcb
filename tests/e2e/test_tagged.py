"""Tagged sids (`engineio.tag_sids`): each session's worker travels in its sid, so a
corral that never saw the handshake — here a restarted one — still routes every
request of the session to its worker. Polling-only clients keep their sessions
across a restart of corral in front of the same static upstreams; without tags the
new corral does not know them ("Session ID unknown") and every client is
disconnected, which the control case checks, so this test fails if tags break."""
import signal
import threading
import time

import socketio

from clients import wait_until
from conftest import Proc, corral_binary, free_port, wait_http

CLIENTS = 10
KEY = "a-shared-key-of-32-characters-xx"


class Polling:
    """A polling-only python-socketio client that counts its disconnects."""

    def __init__(self, i, url):
        self.i = i
        self.sio = socketio.Client(reconnection=False)
        self.disconnects = 0
        self.received = set()
        self.lock = threading.Lock()
        self.sio.on("disconnect", self._gone)
        self.sio.on("message", self._message)
        self.sio.connect(url, transports=["polling"], wait_timeout=15)
        self.sid = self.sio.eio.sid

    def _gone(self, *args):
        self.disconnects += 1

    def _message(self, data):
        with self.lock:
            self.received.add(data["from"])


def start(stack, tmp_path, port, upstreams, tags):
    cfg = tmp_path / f"corral-{tags}-{time.monotonic_ns()}.toml"
    ups = ", ".join(f'"127.0.0.1:{u}"' for u in upstreams)
    text = (f'listen = ["127.0.0.1:{port}"]\nupstreams = [{ups}]\n'
            f'admin_socket = "{tmp_path}/admin-{time.monotonic_ns()}.sock"\n'
            f'[timeouts]\nshutdown_drain = "40s"\n')
    if tags:
        text += f'[engineio]\ntag_sids = true\n[cluster]\nnode = "a"\nkey = "{KEY}"\n'
    cfg.write_text(text)
    p = Proc([corral_binary(), "run", "-c", str(cfg)], tmp_path / f"{cfg.stem}.log",
             env={"CORRAL_LOG": "info"})
    stack.procs.append(p)
    return p


def restart_under_clients(stack, tmp_path, tags):
    """Clients on the first corral, a second corral on the same port once the first
    stops accepting; returns the clients."""
    workers = [stack.gunicorn() for _ in range(2)]
    ports = [w.port for w in workers]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start(stack, tmp_path, port, ports, tags)
    wait_http(url + "/health", proc=first.popen, log=first.log)
    clients = [Polling(i, url) for i in range(CLIENTS)]
    if tags:
        assert all("." in c.sid for c in clients), [c.sid for c in clients]
    # Every client's long-poll is in flight (a request still in the listen backlog
    # when the first corral closes its socket is reset, as with any proxy that stops
    # accepting; its client reconnects).
    time.sleep(1)
    # The first corral stops accepting at once and drains its long-polls; the
    # second takes the port as soon as it is free.
    first.popen.send_signal(signal.SIGTERM)
    second = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        second = start(stack, tmp_path, port, ports, tags)
        time.sleep(0.5)
        if second.popen.poll() is None:
            break
    wait_http(url + "/health", proc=second.popen, log=second.log)
    # Each client's broadcast goes through the second corral; the answers end the
    # long-polls still held by the first, and the next ones reach the second.
    for c in clients:
        try:
            c.sio.emit("broadcast", {"from": c.i, "room": "all"})
        except Exception:
            pass
    return clients, second


def test_polling_sessions_survive_a_restart_with_tags(stack, tmp_path):
    clients, second = restart_under_clients(stack, tmp_path, tags=True)
    # A POST that met the first corral's closing keep-alive connection is lost by
    # the client (python-engineio does not send it again): such a client sends its
    # broadcast again. What must hold is that no session is lost.
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not all(c.i in c.received for c in clients):
        time.sleep(2)
        for c in clients:
            if c.i not in c.received and c.disconnects == 0:
                c.sio.emit("broadcast", {"from": c.i, "room": "all"})
    assert all(c.i in c.received for c in clients), \
        [(c.i, sorted(c.received), c.disconnects) for c in clients if c.i not in c.received]
    assert [c.disconnects for c in clients] == [0] * CLIENTS
    # The same sids, never refused: the second corral took each on from its tag.
    assert [c.sio.eio.sid for c in clients] == [c.sid for c in clients]
    for c in clients:
        c.sio.disconnect()


def test_without_tags_a_restart_loses_them(stack, tmp_path):
    clients, _ = restart_under_clients(stack, tmp_path, tags=False)
    assert wait_until(lambda: all(c.disconnects > 0 for c in clients), 40), \
        [c.disconnects for c in clients]
