"""The embedded message queue against a real redis-server: the same command sequences
give the same bytes back, in RESP2 and RESP3, errors and subscribed mode included;
redis-py and redis-cli work against it; a slow subscriber is cut off at its limit."""
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
import redis

from conftest import Proc, corral_binary, free_port, rss_kb

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server missing (.ci/run installs it)")
PASSWORD = "s3cret pass"


def wait_port(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(proc.output())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open: {proc.output()}")


def start_redis(stack, password=None):
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no"]
    if password:
        args += ["--requirepass", password]
    p = Proc(args, stack.tmp / f"redis-{port}.log")
    stack.procs.append(p)
    wait_port(port, p)
    return port


def start_mq(stack, password=None, extra=()):
    port = free_port()
    args = [corral_binary(), "mq", "--listen", f"127.0.0.1:{port}", *extra]
    if password:
        args += ["--password", password]
    p = Proc(args, stack.tmp / f"mq-{port}.log")
    stack.procs.append(p)
    p.port = port
    wait_port(port, p)
    return port, p


class Session:
    """Named raw connections to one server; `step` sends bytes on one and returns
    what every connection received since."""

    def __init__(self, port):
        self.port = port
        self.conns = {}

    def conn(self, name):
        if name not in self.conns:
            s = socket.create_connection(("127.0.0.1", self.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[name] = s
        return self.conns[name]

    def send(self, name, data):
        self.conn(name).sendall(data)

    def collect(self, idle=0.06):
        got = {}
        for name, s in self.conns.items():
            s.settimeout(idle)
            buf = b""
            while True:
                try:
                    d = s.recv(65536)
                except socket.timeout:
                    break
                except ConnectionResetError:
                    buf += b"<RESET>"
                    break
                if not d:
                    buf += b"<EOF>"
                    break
                buf += d
            got[name] = buf
        return got

    def close(self):
        for s in self.conns.values():
            s.close()


def normalise(data):
    # Client ids are per-server counters; the rest must match byte for byte.
    return re.sub(rb"(\$2\r\nid\r\n:)\d+", rb"\1<id>", data)


def run_script(steps, port_a, port_b):
    a, b = Session(port_a), Session(port_b)
    diffs, transcript = [], []
    try:
        for name, data in steps:
            a.send(name, data)
            b.send(name, data)
            ga, gb = a.collect(), b.collect()
            for conn in sorted(set(ga) | set(gb)):
                ra, rb_ = normalise(ga.get(conn, b"")), normalise(gb.get(conn, b""))
                transcript.append((name, data[:60], conn, ra))
                if ra != rb_:
                    diffs.append((name, data[:80], conn, ra, rb_))
    finally:
        a.close()
        b.close()
    return diffs, transcript


def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


BASIC = [
    ("a", b"PING\r\n"), ("a", b"PING hello\r\n"), ("a", cmd("PING", "a", "b")),
    ("a", b"ECHO\r\n"), ("a", cmd("ECHO", "x y")), ("a", b"FOO a b\r\n"), ("a", cmd("foo")),
    ("a", cmd("fOo", "x" * 200, "y")), ("a", b"publish x\r\n"), ("a", b"SELECT 16\r\n"),
    ("a", b"SELECT x\r\n"), ("a", b"SELECT 3\r\n"), ("a", b"SELECT -1\r\n"),
    ("a", b"AUTH x\r\n"), ("a", b"AUTH default x\r\n"), ("a", b"AUTH someone x\r\n"), ("a", b"AUTH a b c\r\n"),
    ("a", b"CLIENT\r\n"), ("a", b"CLIENT SETNAME\r\n"), ("a", b"client foo\r\n"),
    ("a", b"CLIENT SETNAME a b\r\n"), ("a", cmd("CLIENT", "SETNAME", "bad name")), ("a", b"CLIENT GETNAME\r\n"),
    ("a", b"CLIENT SETNAME worker-1\r\n"), ("a", b"CLIENT GETNAME\r\n"), ("a", cmd("CLIENT", "SETNAME", "")),
    ("a", b"CLIENT GETNAME\r\n"), ("a", b"HELLO 4\r\n"), ("a", b"HELLO x\r\n"), ("a", b"HELLO 3 FOO\r\n"),
    ("a", b"HELLO 2 SETNAME n1\r\n"), ("a", b"CLIENT GETNAME\r\n"),
    ("a", b"PUBSUB\r\n"), ("a", b"PUBSUB FOO\r\n"), ("a", b"PUBSUB NUMPAT\r\n"), ("a", b"PUBSUB NUMPAT x\r\n"),
    ("a", b"PUBSUB NUMSUB\r\n"), ("a", b"PUBSUB NUMSUB a b\r\n"), ("a", b"PUBSUB CHANNELS\r\n"),
    ("a", b"PUBSUB SHARDCHANNELS\r\n"), ("a", b"PUBSUB SHARDNUMSUB s\r\n"),
    ("a", b"UNSUBSCRIBE\r\n"), ("a", b"PUNSUBSCRIBE\r\n"), ("a", b"SUNSUBSCRIBE\r\n"), ("a", b"SUBSCRIBE\r\n"),
    ("a", b"PUBLISH nobody hello\r\n"), ("a", b"SPUBLISH nobody hello\r\n"),
    # Pipelined, inline quoting, empty lines and bare \n.
    ("a", b"*-1\r\n*0\r\nPING\r\n\r\n   \r\nPING\nECHO \"a\\x41\\n b\" 'c\\'d'\r\n" + cmd("ECHO", "x") * 3),
    # A bulk's two trailing bytes are skipped unchecked.
    ("a", b"*2\r\n$4\r\nECHO\r\n$3\r\nabcXY"),
    ("a", b"QUIT\r\n"),
]

PUBSUB_RESP2 = [
    ("s", b"SUBSCRIBE news\r\n"), ("s", b"SUBSCRIBE news sport\r\n"), ("s", b"PSUBSCRIBE n* h?llo\r\n"),
    ("p", b"PUBSUB NUMSUB news sport other\r\n"), ("p", b"PUBSUB NUMPAT\r\n"), ("p", b"PUBSUB CHANNELS spo*\r\n"),
    ("p", b"PUBLISH news first\r\n"), ("p", b"PUBLISH hello x\r\n"), ("p", cmd("PUBLISH", "sport", b"\x00\xff binary\r\n")),
    ("s", b"PING\r\n"), ("s", b"PING x\r\n"), ("s", b"publish a b\r\n"), ("s", b"ECHO x\r\n"),
    ("s", b"HELLO\r\n"), ("s", b"CLIENT ID\r\n"), ("s", b"PUBSUB CHANNELS\r\n"), ("s", b"FOO\r\n"),
    ("s", b"PING a b\r\n"), ("s", b"UNSUBSCRIBE sport\r\n"), ("s", b"UNSUBSCRIBE nothere\r\n"),
    ("s", b"PUNSUBSCRIBE h?llo\r\n"), ("p", b"PUBLISH news second\r\n"), ("s", b"SSUBSCRIBE sh1\r\n"),
    ("p", b"SPUBLISH sh1 shard-msg\r\n"), ("p", b"PUBSUB SHARDNUMSUB sh1\r\n"), ("p", b"PUBSUB SHARDCHANNELS\r\n"),
    ("s", b"SUNSUBSCRIBE sh1\r\n"), ("s", b"PUNSUBSCRIBE n*\r\n"), ("s", b"UNSUBSCRIBE news\r\n"),
    ("s", b"PING\r\n"), ("p", b"PUBSUB NUMSUB news\r\n"), ("p", b"PUBSUB NUMPAT\r\n"),
    ("s", b"SUBSCRIBE again\r\n"), ("s", b"RESET\r\n"), ("p", b"PUBLISH again x\r\n"), ("s", b"PING\r\n"),
    ("s", b"SUBSCRIBE last\r\n"), ("s", b"QUIT\r\n"), ("p", b"PUBLISH last x\r\n"),
]

PUBSUB_RESP3 = [
    ("s", b"HELLO 3\r\n"), ("s", b"SUBSCRIBE a b\r\n"), ("s", b"PING\r\n"), ("s", b"PUBSUB NUMSUB a\r\n"),
    ("s", b"PUBLISH a x\r\n"), ("p", b"PUBLISH b y\r\n"), ("s", b"UNSUBSCRIBE a\r\n"), ("s", b"CLIENT GETNAME\r\n"),
    ("s", b"PSUBSCRIBE h?llo\r\n"), ("p", b"PUBLISH hello z\r\n"), ("s", b"PUBSUB NUMPAT\r\n"),
    ("s", b"UNSUBSCRIBE\r\n"), ("s", b"PUNSUBSCRIBE\r\n"), ("s", b"UNSUBSCRIBE\r\n"),
    ("s", b"SSUBSCRIBE s1\r\n"), ("p", b"SPUBLISH s1 m\r\n"), ("s", b"SUNSUBSCRIBE\r\n"),
    ("s", b"ECHO hi\r\n"), ("s", b"HELLO\r\n"), ("s", b"SUBSCRIBE c\r\n"), ("s", b"HELLO 2\r\n"),
    ("p", b"PUBLISH c after-downgrade\r\n"), ("s", b"PUBSUB CHANNELS\r\n"), ("s", b"RESET\r\n"),
    ("s", b"HELLO 3 SETNAME me\r\n"), ("s", b"CLIENT GETNAME\r\n"), ("s", b"SELECT 1\r\n"),
]

PROTOCOL_ERRORS = [[("e", data)] for data in [
    b"*x\r\n", b"*2\r\nfoo\r\n", b"*1\r\n$x\r\n", b"*1\r\n$-5\r\n", b'PING "a\r\n', b"ECHO 'it''s'\r\n",
    b"*1\r\n$" + b"9" * 70000, b"A" * 70000, b"*" + b"9" * 70000, b"*3000000000\r\n",
]]

AUTH_SCRIPT = [
    ("a", b"PING\r\n"), ("a", b"FOO\r\n"), ("a", b"PING a b\r\n"), ("a", b"ECHO x\r\n"), ("a", b"HELLO\r\n"),
    ("a", b"HELLO 3\r\n"), ("a", b"CLIENT ID\r\n"), ("a", b"SUBSCRIBE a\r\n"), ("a", b"PUBLISH a b\r\n"),
    ("a", b"AUTH\r\n"), ("a", b"AUTH bad\r\n"), ("a", cmd("AUTH", "default", "bad")), ("a", cmd("AUTH", PASSWORD)),
    ("a", b"PING\r\n"), ("a", b"RESET\r\n"), ("a", b"PING\r\n"), ("a", cmd("HELLO", "3", "AUTH", "default", "nope")),
    ("a", cmd("HELLO", "3", "AUTH", "default", PASSWORD, "SETNAME", "me")), ("a", b"CLIENT GETNAME\r\n"),
    ("a", b"RESET\r\n"), ("b", b"*11\r\n"), ("c", b"*1\r\n$16385\r\n"), ("d", b"QUIT\r\n"),
]


@pytest.mark.parametrize("name,script", [
    ("basic", BASIC), ("pubsub-resp2", PUBSUB_RESP2), ("pubsub-resp3", PUBSUB_RESP3),
] + [(f"protocol-error-{i}", s) for i, s in enumerate(PROTOCOL_ERRORS)])
def test_same_bytes_as_redis(stack, name, script):
    redis_port = start_redis(stack)
    mq_port, _ = start_mq(stack)
    diffs, transcript = run_script(script, redis_port, mq_port)
    assert diffs == [], "\n".join(f"{d[0]} {d[1]!r} -> [{d[2]}]\n  redis: {d[3]!r}\n  corral: {d[4]!r}" for d in diffs)
    assert any(t[3] for t in transcript), "the script got no replies at all"


def test_same_bytes_as_redis_with_password(stack):
    redis_port = start_redis(stack, PASSWORD)
    mq_port, _ = start_mq(stack, PASSWORD)
    diffs, _ = run_script(AUTH_SCRIPT, redis_port, mq_port)
    assert diffs == [], "\n".join(f"{d[0]} {d[1]!r} -> [{d[2]}]\n  redis: {d[3]!r}\n  corral: {d[4]!r}" for d in diffs)


def test_redis_py_pubsub(stack):
    port, _ = start_mq(stack)
    for protocol in (2, 3):
        r = redis.Redis(port=port, protocol=protocol)
        assert r.ping() is True
        p = r.pubsub()
        p.subscribe("flask-socketio")
        p.psubscribe("room:*")
        assert p.get_message(timeout=2)["type"] == "subscribe"
        assert p.get_message(timeout=2)["type"] == "psubscribe"
        assert r.publish("flask-socketio", b"\x80pickled") == 1
        assert r.publish("room:1", "hi") == 1
        m = p.get_message(timeout=2)
        assert m["type"] == "message" and m["channel"] == b"flask-socketio" and m["data"] == b"\x80pickled"
        m = p.get_message(timeout=2)
        assert m["type"] == "pmessage" and m["pattern"] == b"room:*" and m["data"] == b"hi"
        assert r.pubsub_numsub("flask-socketio") == [(b"flask-socketio", 1)]
        p.close()
        r.close()


def test_redis_cli(stack):
    port, _ = start_mq(stack)
    out = subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == "PONG", out
    sub = subprocess.Popen(["redis-cli", "-p", str(port), "SUBSCRIBE", "chan"], stdout=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == "subscribe"
        sub.stdout.readline()
        sub.stdout.readline()
        pub = subprocess.run(["redis-cli", "-p", str(port), "PUBLISH", "chan", "hello"],
                             capture_output=True, text=True, timeout=10)
        assert pub.stdout.strip() == "1"
        assert [sub.stdout.readline().strip() for _ in range(3)] == ["message", "chan", "hello"]
    finally:
        sub.kill()
        sub.wait()
    out = subprocess.run(["redis-cli", "-3", "-p", str(port), "HELLO", "3"], capture_output=True, text=True, timeout=10)
    assert "standalone" in out.stdout


def test_slow_subscriber_disconnected_others_keep_receiving(stack):
    """A subscriber that stops reading is cut off at the hard output limit; the
    broker's memory stays bounded; a reading subscriber gets every message."""
    port, mq = start_mq(stack, extra=["--output-limit", "4M"])
    slow = socket.create_connection(("127.0.0.1", port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(cmd("SUBSCRIBE", "flood"))
    # Subscribed once the broker says so.
    slow.settimeout(5)
    said = b""
    while b"flood" not in said:
        said += slow.recv(4096)
    slow.settimeout(None)
    fast = redis.Redis(port=port).pubsub()
    fast.subscribe("flood")
    assert fast.get_message(timeout=2)["type"] == "subscribe"
    received = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            m = fast.get_message(timeout=0.5)
            if m and m["type"] == "message":
                received.append(len(m["data"]))

    t = threading.Thread(target=reader)
    t.start()
    pub = redis.Redis(port=port)
    payload = b"x" * 16384
    base = rss_kb(mq.pid, "VmRSS")
    sent = 0
    counts = []
    deadline = time.monotonic() + 30
    while sent < 3000 and time.monotonic() < deadline:  # ~48 MB in all, bounded
        counts.append(pub.publish("flood", payload))
        sent += 1
    assert wait_until_true(lambda: len(received) == sent, 20), (len(received), sent)
    done.set()
    t.join()
    # The slow one was dropped on the way: later publishes reach only the fast one.
    assert counts[0] == 2 and counts[-1] == 1, (counts[0], counts[-1])
    assert "over its output limit" in mq.output()
    assert rss_kb(mq.pid, "VmHWM") - base < 60_000
    slow.close()


def wait_until_true(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_client_vanishing_mid_command(stack):
    port, mq = start_mq(stack)
    for data in [b"*3\r\n$7\r\nPUBLISH\r\n$1\r\na", b"*2\r\n$9\r\nSUBSCRIBE\r\n", b"PUBL"]:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(data)
        s.close()
    r = redis.Redis(port=port)
    assert r.ping() and r.publish("a", "b") == 0
    assert mq.popen.poll() is None
