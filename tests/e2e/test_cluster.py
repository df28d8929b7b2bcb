"""Several machines behind one address, on one box: two corral nodes on their own
loopback addresses (127.0.0.11 and 127.0.0.12), each supervising two gunicorn
workers of the Flask-SocketIO app, and redis-server on 127.0.0.13 as the message
queue between them. The clients send *every* request to a node picked at random (as
DNS round-robin or an L4 balancer without affinity would), with no cookies: the sid's
tag carries the session's node and worker, and a node sends a request for the other
node's session there once.

Checked: all clients connect, upgrade and receive every broadcast across the two
machines; no "Session ID unknown" anywhere; requests did hop between nodes. Then
kill -9 of one node: the clients of its workers (and those whose websocket went
through it) reconnect through the other node, and the rest see nothing."""
import base64
import hashlib
import json
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests
import socketio

from clients import wait_until
from conftest import APPS, VENV_BIN, Proc, corral_binary, wait_http

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is installed by .ci/run")

KEY = "cluster-key-shared-by-both-nodes"
NODES = {"a": "127.0.0.11", "b": "127.0.0.12"}
REDIS_IP = "127.0.0.13"
CLIENTS = 40


def free_port_on(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def node_ref(name):
    return hashlib.sha256(b"corral-node\0" + name.encode()).digest()[:4]


def node_of(sid):
    """The node a tagged sid names."""
    tag = sid.rsplit(".", 1)[1]
    raw = base64.urlsafe_b64decode(tag + "==")
    for name in NODES:
        if raw[:4] == node_ref(name):
            return name
    raise AssertionError(f"sid {sid} names no node")


class AnyNode(requests.Session):
    """Each request to a node picked at random; a node that refuses connections is
    skipped, as a client tries the next address of a name."""

    def __init__(self, urls):
        super().__init__()
        self.urls = urls
        self.trust_env = False

    def request(self, method, url, *args, **kwargs):
        order = random.sample(list(self.urls), len(self.urls))
        last = None
        for base in order:
            rest = url.split("/", 3)[3] if url.count("/") >= 3 else ""
            target = f"{base}/{rest}"
            try:
                return super().request(method, target, *args, **kwargs)
            except requests.ConnectionError as e:
                last = e
                # Connection refused: try the next node at once.
                continue
        raise last


class Client:
    def __init__(self, i, urls):
        self.i = i
        self.home = random.choice(list(urls.values()))  # where its websocket goes
        self.sio = socketio.Client(reconnection=True, reconnection_delay=0.2,
                                   reconnection_delay_max=1,
                                   http_session=AnyNode(list(urls.values())))
        self.received = set()
        self.disconnects = 0
        self.lock = threading.Lock()
        self.sio.on("message", self._message)
        self.sio.on("disconnect", self._gone)

    def _message(self, data):
        with self.lock:
            self.received.add(data["from"])

    def _gone(self, *a):
        self.disconnects += 1

    def connect(self):
        self.sio.connect(self.home + "/", wait_timeout=15)
        return self


def start_node(stack, tmp_path, name, ports, redis_port):
    others = {n: f"{ip}:{ports[n]}" for n, ip in NODES.items() if n != name}
    admin = free_port_on("127.0.0.1")
    cfg = tmp_path / f"node-{name}.toml"
    node_list = ", ".join(f'{n} = "{a}"' for n, a in others.items())
    cfg.write_text(
        f'listen = ["{NODES[name]}:{ports[name]}"]\n'
        f'admin_socket = "{tmp_path}/admin-{name}.sock"\n'
        f'[engineio]\ntag_sids = true\n'
        f'[cluster]\nnode = "{name}"\nkey = "{KEY}"\n'
        f'nodes = {{ {node_list} }}\n'
        f'[message_queue]\nurl = "redis://{REDIS_IP}:{redis_port}/0"\n'
        f'[workers]\ncommand = ["{VENV_BIN}/gunicorn", "-w", "1", "--threads", "100", '
        f'"-b", "127.0.0.1:{{port}}", "--chdir", "{APPS}", "chat_app:create_app()"]\n'
        f'count = 2\nready_path = "/health"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    p = Proc([corral_binary(), "run", "-c", str(cfg)], tmp_path / f"node-{name}.log",
             env={"CORRAL_LOG": "info"})
    stack.procs.append(p)
    p.admin = f"http://127.0.0.1:{admin}"
    p.url = f"http://{NODES[name]}:{ports[name]}"
    return p


def totals(node):
    return requests.get(node.admin + "/status.json", timeout=5).json()["totals"]


def start_cluster(stack, tmp_path):
    redis_port = free_port_on(REDIS_IP)
    redis = Proc(["redis-server", "--bind", REDIS_IP, "--port", str(redis_port),
                  "--save", "", "--appendonly", "no"], tmp_path / "redis.log")
    stack.procs.append(redis)
    ports = {n: free_port_on(ip) for n, ip in NODES.items()}
    nodes = {n: start_node(stack, tmp_path, n, ports, redis_port) for n in NODES}
    for n in nodes.values():
        wait_http(n.url + "/health", timeout=60, proc=n.popen, log=n.log)
    return nodes


class RoundRobinL4:
    """A TCP balancer without affinity on 127.0.0.14: each new connection goes to
    the next node, as a cloud L4 load balancer or DNS round-robin spreads them."""

    def __init__(self, targets):
        self.targets = targets
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.14", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.14:{self.sock.getsockname()[1]}"
        self.n = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            host, port = self.targets[self.n % len(self.targets)]
            self.n += 1
            try:
                upstream = socket.create_connection((host, port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def test_node_clients_through_an_l4_balancer(stack, tmp_path):
    """Node's socket.io-client, through a balancer that sends each connection to
    the next node: every request finds its session, broadcasts reach everyone."""
    node_dir = APPS / "node"
    if shutil.which("node") is None or not (node_dir / "node_modules").is_dir():
        pytest.skip("node or tests/apps/node/node_modules missing (make test-deps)")
    nodes = start_cluster(stack, tmp_path)
    lb = RoundRobinL4([(NODES[n], int(nodes[n].url.rsplit(":", 1)[1])) for n in NODES])
    try:
        out = subprocess.run(["node", str(node_dir / "clients.js"), lb.url, "20", "all"],
                             capture_output=True, text=True, timeout=90, cwd=node_dir)
    finally:
        lb.close()
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r for r in report if r["error"]] == []
    assert all(r["upgraded"] for r in report), report
    assert all(len(r["received"]) == r["expected"] == 20 for r in report), report
    t = {n: totals(nodes[n]) for n in NODES}
    assert all(t[n]["unknown_sid"] == 0 for n in NODES), t
    assert sum(t[n]["forwarded_to_nodes"] for n in NODES) > 0, t


def test_two_nodes_one_address(stack, tmp_path):
    nodes = start_cluster(stack, tmp_path)
    urls = {n: nodes[n].url for n in NODES}

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(20) as pool:
        clients = list(pool.map(lambda i: Client(i, urls).connect(), range(CLIENTS)))
    try:
        assert all("." in c.sio.eio.sid for c in clients)
        homes = {node_of(c.sio.eio.sid) for c in clients}
        assert homes == set(NODES), homes  # sessions on both machines
        assert wait_until(lambda: all(c.sio.transport() == "websocket" for c in clients), 20), \
            [c.sio.transport() for c in clients]
        for c in clients:
            c.sio.emit("broadcast", {"from": c.i, "room": "all"})
        everyone = set(range(CLIENTS))
        assert wait_until(lambda: all(c.received >= everyone for c in clients), 20), \
            [len(c.received) for c in clients]
        t = {n: totals(nodes[n]) for n in NODES}
        assert all(t[n]["unknown_sid"] == 0 for n in NODES), t
        assert sum(t[n]["forwarded_to_nodes"] for n in NODES) > 0, t
        assert sum(t[n]["received_from_nodes"] for n in NODES) > 0, t
        assert all(c.disconnects == 0 for c in clients)

        # kill -9 node a: its workers die with it (parent-death signal).
        dead = "a"
        sids = {c.i: c.sio.eio.sid for c in clients}
        nodes[dead].popen.send_signal(signal.SIGKILL)
        nodes[dead].popen.wait(timeout=10)
        affected = [c for c in clients
                    if node_of(sids[c.i]) == dead or c.home == urls[dead]]
        untouched = [c for c in clients if c not in affected]
        assert affected and untouched
        # The affected reconnect (through node b, the only one left).
        assert wait_until(lambda: all(c.disconnects >= 1 and c.sio.connected for c in affected), 60), \
            [(c.disconnects, c.sio.connected) for c in affected]
        for c in affected:
            assert node_of(c.sio.eio.sid) == "b"
        time.sleep(1)
        assert [c.disconnects for c in untouched] == [0] * len(untouched)
        # And a broadcast still reaches everyone.
        for c in clients:
            c.received.clear()
        clients[0].sio.emit("broadcast", {"from": 999, "room": "all"})
        assert wait_until(lambda: all(999 in c.received for c in clients), 20), \
            [999 in c.received for c in clients]
    finally:
        for c in clients:
            try:
                c.sio.disconnect()
            except Exception:
                pass
