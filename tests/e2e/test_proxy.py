"""The front proxy with real gunicorn workers: headers, limits, errors, failover,
streaming, unknown sessions and websocket tunnels."""
import json
import socket
import threading
import time

import requests
import websocket

from clients import connect_many, disconnect_all, spread, wait_until
from conftest import free_port, rss_kb

UNKNOWN_SID = b'{"code":1,"message":"Session ID unknown"}'


def test_forwarded_headers_and_hop_by_hop(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='trusted_proxies = ["127.0.0.0/8"]\n')
    r = requests.get(corral.url + "/echo?x=1", headers={
        "Host": "app.example:8443",
        "X-Forwarded-For": "203.0.113.7",
        "Connection": "keep-alive, X-Private",
        "X-Private": "must not pass",
        "Keep-Alive": "timeout=5",
    })
    assert r.status_code == 200
    h = r.json()["headers"]
    assert h["Host"] == "app.example:8443"
    assert h["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == "app.example:8443"
    assert "X-Private" not in h and "Keep-Alive" not in h
    assert r.json()["path"] == "/echo?x=1"


def test_origin_checked_by_engineio_matches_forwarded_host(stack):
    """python-engineio compares Origin with X-Forwarded-Proto://X-Forwarded-Host:
    a browser-like client with a same-origin Origin header must be accepted."""
    w = stack.gunicorn()
    corral = stack.corral([w.port])
    ok = requests.get(corral.url + "/socket.io/?EIO=4&transport=polling",
                      headers={"Origin": corral.url})
    assert ok.status_code == 200 and ok.text.startswith("0{"), ok.text
    bad = requests.get(corral.url + "/socket.io/?EIO=4&transport=polling",
                       headers={"Origin": "http://evil.example"})
    assert bad.status_code == 400


def test_unknown_sid_answered_like_engineio(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port])
    for method in ("GET", "POST"):
        r = requests.request(method, corral.url + "/socket.io/?EIO=4&transport=polling&sid=nosuchsid",
                             data=b"40" if method == "POST" else None)
        assert r.status_code == 400
        assert r.content == UNKNOWN_SID
        assert r.headers["Content-Type"] == "application/json"
    # The websocket upgrade with an unknown sid too.
    r = requests.get(corral.url + "/socket.io/?EIO=4&transport=websocket&sid=nosuchsid",
                     headers={"Connection": "Upgrade", "Upgrade": "websocket",
                              "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code == 400 and r.content == UNKNOWN_SID


def test_handshake_learned_then_sticky_by_hand(stack):
    """The raw protocol: handshake through corral, then many requests with the sid
    all land on the same worker (the worker would answer 400 otherwise)."""
    workers = [stack.gunicorn() for _ in range(3)]
    corral = stack.corral([w.port for w in workers])
    s = requests.Session()
    r = s.get(corral.url + "/socket.io/?EIO=4&transport=polling", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.text.startswith("0{")
    sid = json.loads(r.text[1:])["sid"]
    r = s.post(corral.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}", data=b"40")
    assert r.status_code == 200, r.text
    r = s.get(corral.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}")
    assert r.status_code == 200 and "\x1e40{" in "\x1e" + r.text, r.text
    for _ in range(5):
        # Plain requests in between spread over all workers...
        requests.get(corral.url + "/whoami")
        # ...while the session's requests stay put (a ping reply is accepted).
        r = s.post(corral.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}", data=b"3")
        assert r.status_code == 200, r.text
    assert "Invalid session" not in stack.worker_logs()


def test_plain_http_spreads_over_workers(stack):
    workers = [stack.gunicorn() for _ in range(3)]
    corral = stack.corral([w.port for w in workers])
    seen = set()
    lock = threading.Lock()

    def hit():
        for _ in range(10):
            r = requests.get(corral.url + "/sleep?s=0.05")
            assert r.status_code == 200
        with lock:
            seen.update(requests.get(corral.url + "/whoami").json()["worker"] for _ in range(3))

    threads = [threading.Thread(target=hit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen) == 3, seen


def test_body_limits(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='[limits]\nmax_body = "1M"\n')
    small = b"a" * 1000
    r = requests.post(corral.url + "/upload", data=small)
    assert r.status_code == 200 and r.json()["received"] == 1000
    # Declared too large: refused before anything is sent.
    r = requests.post(corral.url + "/upload", data=b"a" * (1 << 20 + 1))
    assert r.status_code == 413
    # Chunked, with no length: counted while streaming.

    def chunks(n):
        for _ in range(n):
            yield b"b" * 65536

    r = requests.post(corral.url + "/upload", data=chunks(8))  # 512 KiB: fits
    assert r.status_code == 200 and r.json()["received"] == 8 * 65536
    r = requests.post(corral.url + "/upload", data=chunks(40))  # 2.5 MiB: too big
    assert r.status_code == 413
    # corral is still fine afterwards.
    assert requests.get(corral.url + "/health").status_code == 200


def test_large_upload_streams_without_buffering(stack):
    """A 200 MB upload must not cost corral 200 MB of memory."""
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='[limits]\nmax_body = "300M"\n')
    before = rss_kb(corral.pid, "VmRSS")
    block = b"z" * (1 << 20)

    def body():
        for _ in range(200):
            yield block

    r = requests.post(corral.url + "/upload", data=body(), timeout=120)
    assert r.status_code == 200
    assert r.json()["received"] == 200 << 20
    peak = rss_kb(corral.pid, "VmHWM")
    assert peak - before < 40_000, f"corral grew from {before} kB to a peak of {peak} kB"
    # Downloads stream too.
    r = requests.get(corral.url + "/big?n=104857600", stream=True)
    total = sum(len(c) for c in r.iter_content(1 << 20))
    assert total == 100 << 20
    assert rss_kb(corral.pid, "VmHWM") - before < 40_000


def test_unreachable_worker_is_502_and_slow_worker_504(stack):
    dead = free_port()
    corral = stack.corral([dead], wait=False)
    r = wait_until(lambda: _get_status(corral.url + "/x") == 502, 10)
    assert r
    body = requests.get(corral.url + "/x").text
    assert "cannot connect" in body and str(dead) in body

    w = stack.gunicorn()
    slow = stack.corral([w.port], extra='[timeouts]\nread = "1s"\n')
    t0 = time.monotonic()
    r = requests.get(slow.url + "/sleep?s=5")
    assert r.status_code == 504
    assert "did not answer" in r.text
    assert time.monotonic() - t0 < 4


def _get_status(url):
    try:
        return requests.get(url, timeout=3).status_code
    except requests.RequestException:
        return None


def test_dead_worker_skipped_and_comes_back(stack):
    """Passive health marks a refusing worker down; idempotent requests are retried on
    another; the active check brings the worker back when it answers again."""
    a = stack.gunicorn()
    b_port = free_port()
    corral = stack.corral([a.port, b_port], extra='[health]\ninterval = "500ms"\n', wait=False)
    from conftest import wait_http
    wait_http(corral.url + "/health", proc=corral.popen, log=corral.log)
    statuses = [requests.get(corral.url + "/whoami").status_code for _ in range(20)]
    assert statuses == [200] * 20
    b = stack.gunicorn(port=b_port)
    assert wait_until(
        lambda: requests.get(corral.url + "/whoami").json()["worker"] == f"w{b_port}", 10, step=0.05)


def test_worker_death_sends_clients_elsewhere(stack):
    workers = [stack.gunicorn() for _ in range(2)]
    corral = stack.corral([w.port for w in workers], extra='[health]\ninterval = "500ms"\n')
    members = connect_many(corral.url, 10, reconnection=True)
    try:
        assert not [m.error for m in members if m.error]
        victim = workers[0]
        victim_name = f"w{victim.port}"
        on_victim = [m for m in members if m.worker == victim_name]
        assert on_victim
        victim.stop(grace=0.1)
        assert wait_until(lambda: all(m.worker != victim_name and m.sio.connected for m in members), 20), \
            [(m.idx, m.worker, m.sio.connected) for m in members]
        assert spread(members) == {f"w{workers[1].port}": 10}
    finally:
        disconnect_all(members)


def test_websocket_tunnel_relays_and_idle_closes(stack):
    w = stack.gunicorn(env={"PING_INTERVAL": "60"})
    corral = stack.corral([w.port], extra='[timeouts]\nwebsocket_idle = "2s"\n')
    ws = websocket.create_connection(
        corral.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
    try:
        opened = ws.recv()
        assert opened.startswith("0{")
        ws.send("40")
        first = [ws.recv(), ws.recv()]
        assert any(p.startswith("40") for p in first), first
        ws.send('42["whoami"]')
        ws.send('421["whoami"]')
        reply = ws.recv()
        assert reply.startswith("431") and f"w{w.port}" in reply, reply
        t0 = time.monotonic()
        # Silence both ways (pings are 60 s apart): corral closes after ~2 s.
        closed = False
        try:
            while time.monotonic() - t0 < 10:
                if ws.recv() in ("", None):
                    closed = True
                    break
        except (websocket.WebSocketConnectionClosedException, ConnectionError, socket.timeout, OSError):
            closed = True
        assert closed
        assert 1.5 < time.monotonic() - t0 < 6
    finally:
        ws.close()


def test_session_forgotten_after_disconnect(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port])
    [m] = connect_many(corral.url, 1)
    assert m.error is None
    assert wait_until(lambda: m.transport == "websocket", 10)
    sid = m.sio.eio.sid
    m.disconnect()
    # After the tunnel closes corral forgets the sid (its own answer, not the worker's).
    assert wait_until(lambda: requests.get(
        corral.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}").content == UNKNOWN_SID, 12, step=0.5)


def test_malformed_requests_get_errors_not_crashes(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='[limits]\nmax_header = "8K"\n')
    cases = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"GET /socket.io/?sid=%ff%fe HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n",
    ]
    for raw in cases:
        with socket.create_connection(("127.0.0.1", corral.port), timeout=5) as s:
            s.sendall(raw)
            try:
                head = s.recv(64)
            except ConnectionResetError:
                head = b""
            assert head == b"" or head.startswith(b"HTTP/1.1 4"), (raw[:40], head)
    assert requests.get(corral.url + "/health").status_code == 200
    assert corral.popen.poll() is None
    assert "panicked" not in corral.output()


class ClosingWorker:
    """An HTTP/1.1 worker that answers the first request on each connection with
    keep-alive, and closes the connection unanswered when a second request comes on
    it: what a worker does when it closes a kept-alive connection (its keep-alive
    timeout, a restart) just as the proxy sends on it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.seen = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        buf = b""
        answered = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                with self.lock:
                    self.seen.append(lines[0])
                if answered:
                    return  # closed with the request read and unanswered
                body = b"fresh connection\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                answered += 1

    def close(self):
        self.sock.close()


def test_request_on_a_closing_kept_alive_connection(stack):
    """A bodiless GET that meets a kept-alive connection closing under it is sent
    again on a new connection (as nginx does); a POST is not (it may have been acted
    on) and gets 502."""
    worker = ClosingWorker()
    try:
        corral = stack.corral([worker.port], extra='[health]\ninterval = "60s"\n')
        s = requests.Session()
        s.trust_env = False
        for path in ("/a", "/b", "/c"):
            r = s.get(corral.url + path)
            assert r.status_code == 200 and r.text == "fresh connection\n", (path, r.status_code, r.text)
        # Each request found the connection the one before it left, closing: it went
        # out there first, then on a new connection.
        for path in ("/b", "/c"):
            assert worker.seen.count(f"GET {path} HTTP/1.1") == 2, worker.seen
        r = s.post(corral.url + "/d", data=b"x" * 10)
        assert r.status_code == 502, r.text
        assert [line for line in worker.seen if line.startswith("POST")] == ["POST /d HTTP/1.1"]
    finally:
        worker.close()


def test_port_held_with_reuseport_is_refused(stack):
    """corral listens with one SO_REUSEPORT socket per serving thread; a port that
    another process holds the same way must still be refused, not shared with it."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    port = holder.getsockname()[1]
    try:
        w = stack.gunicorn()
        corral = stack.corral([w.port], listen_port=port, wait=False)
        assert corral.popen.wait(timeout=20) != 0
        log = corral.output()
        assert f"cannot listen on 127.0.0.1:{port}" in log, log
    finally:
        holder.close()
    # Free again, the same port serves.
    corral = stack.corral([w.port], listen_port=port)
    assert requests.get(corral.url + "/whoami").status_code == 200
