"""A deploy: corral runs under a supervisor script (as systemd or a container
runtime would restart it) and gets SIGTERM while 50 Socket.IO clients are connected
over websocket and HTTP requests are in flight. Every request in flight is answered,
every client gets a websocket close frame (1001, going away: a clean close, after
which socket.io clients reconnect), and the clients connect again to the corral the
script started anew."""
import os
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import websocket

from conftest import Proc, corral_binary, free_port, wait_http

CLIENTS = 50


def children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class EioClient:
    """A Socket.IO client over a raw websocket, so that how it was closed is seen:
    the close frame's status, or none (the connection just dropped)."""

    def __init__(self, url):
        self.ws = websocket.create_connection(
            url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
        assert self.ws.recv().startswith("0{")  # Engine.IO open
        self.ws.send("40")  # Socket.IO connect
        while not (msg := self.ws.recv()).startswith("40"):
            pass
        self.closed_with = None
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        """Answers pings until the connection ends; records the close status."""
        self.ws.settimeout(60)
        try:
            while True:
                opcode, frame = self.ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    data = frame.data or b""
                    self.closed_with = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                    return
                if opcode == websocket.ABNF.OPCODE_TEXT and frame.data == b"2":
                    self.ws.send("3")
        except Exception as e:  # a connection dropped without a close frame
            self.closed_with = f"dropped: {e!r}"


def test_sigterm_during_a_deploy_loses_nothing(stack, tmp_path):
    workers = [stack.gunicorn() for _ in range(2)]
    port = free_port()
    cfg = tmp_path / "corral.toml"
    ups = ", ".join(f'"127.0.0.1:{w.port}"' for w in workers)
    cfg.write_text(f'listen = ["127.0.0.1:{port}"]\nupstreams = [{ups}]\n'
                   f'[timeouts]\nshutdown_drain = "10s"\n')
    # The supervisor script: start corral again whenever it exits (at most 3 times).
    script = f'for i in 1 2 3; do "{corral_binary()}" run -c "{cfg}"; sleep 0.2; done'
    sup = Proc(["bash", "-c", script], tmp_path / "supervisor.log",
               env={"CORRAL_LOG": "info"})
    stack.procs.append(sup)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=sup.popen, log=sup.log)
    first = children(sup.pid)
    assert len(first) == 1, first

    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = list(pool.map(lambda _: EioClient(url), range(CLIENTS)))

    # Requests that take 2 s, sent just before the SIGTERM.
    def slow(_):
        return requests.get(url + "/sleep?s=2", timeout=30).status_code

    with ThreadPoolExecutor(10) as pool:
        in_flight = [pool.submit(slow, i) for i in range(10)]
        time.sleep(0.5)
        os.kill(first[0], signal.SIGTERM)
        statuses = [f.result() for f in in_flight]
    assert statuses == [200] * 10, statuses

    for c in clients:
        c.thread.join(timeout=15)
    closes = [c.closed_with for c in clients]
    assert closes == [1001] * CLIENTS, closes

    # The script started corral again: the clients come back.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = children(sup.pid)
        if now and now != first:
            break
        time.sleep(0.1)
    wait_http(url + "/health", proc=sup.popen, log=sup.log)
    with ThreadPoolExecutor(CLIENTS) as pool:
        again = list(pool.map(lambda _: EioClient(url), range(CLIENTS)))
    assert len(again) == CLIENTS
    for c in again:
        c.ws.close()
