"""The container image run for real (`make test-container`): podman (or docker) runs
localhost/corral:latest with host networking, as `make demo` runs the chat example:
TLS on 8443 with basic auth demo/demo, the redirect on 8000, the status listener on
9000, corral as PID 1 and not root. Checked: 401 without and 200 with credentials,
/readyz, four python-socketio clients over wss with basic auth upgrading to
websocket on several workers and hearing each other's messages (through the
embedded queue: the image's requirements carry `redis`), the image's HEALTHCHECK,
no zombie inside, and a stop with a request in flight: the request is answered and
the container exits 0 within the grace period."""
import base64
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest
import requests
import socketio

IMAGE = os.environ.get("CORRAL_IMAGE", "localhost/corral:latest")
AUTH = ("demo", "demo")
BASE = "https://127.0.0.1:8443"
GRACE = 20

# Self-signed certificate: requests must not take these over verify=False.
for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
    os.environ.pop(name, None)


def runtime():
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return ["docker"], []
    if not shutil.which("podman"):
        pytest.fail("neither a docker engine nor podman: run `make test-container`, which installs podman")
    return (["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"],
            ["--ulimit", "nofile=10000:10000", "--ulimit", "nproc=4096:4096"])


def wait_until(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def status(url, **kw):
    try:
        return requests.get(url, verify=False, timeout=5, allow_redirects=False, **kw).status_code
    except requests.RequestException:
        return None


@pytest.fixture
def container():
    cmd, limits = runtime()
    name = f"corral-test-{uuid.uuid4().hex[:8]}"
    subprocess.run([*cmd, "run", "-d", "--name", name, "--network", "host", *limits, IMAGE],
                   check=True, capture_output=True)
    try:
        assert wait_until(lambda: status("http://127.0.0.1:9000/readyz") == 200, 90), logs(cmd, name)
        yield cmd, name
    finally:
        subprocess.run([*cmd, "rm", "-f", "-t", "0", name], capture_output=True)


def logs(cmd, name):
    out = subprocess.run([*cmd, "logs", name], capture_output=True, text=True)
    return (out.stdout + out.stderr)[-4000:]


def inside(cmd, name, script):
    return subprocess.run([*cmd, "exec", name, "sh", "-c", script],
                          capture_output=True, text=True, timeout=30)


class Member:
    def __init__(self, idx):
        self.idx = idx
        http = requests.Session()
        http.auth = AUTH
        http.verify = False
        self.sio = socketio.Client(http_session=http, ssl_verify=False, reconnection=False)
        self.worker = None
        self.heard = set()
        self.welcomed = threading.Event()
        self.sio.on("welcome", self._welcome)
        self.sio.on("chat", lambda data: self.heard.add(data["text"]))

    def _welcome(self, data):
        self.worker = data["worker"]
        self.welcomed.set()

    def connect(self):
        token = base64.b64encode(b"demo:demo").decode()
        self.sio.connect(BASE, headers={"Authorization": f"Basic {token}"}, wait_timeout=15)
        assert self.welcomed.wait(15)


def test_the_image_serves_the_chat_example(container):
    cmd, name = container
    assert status(BASE + "/") == 401
    assert status(BASE + "/", auth=AUTH) == 200
    assert status("http://127.0.0.1:8000/") in (301, 308)
    assert status("http://127.0.0.1:9000/readyz") == 200
    # corral is PID 1 and not root.
    who = inside(cmd, name, "id -u; tr '\\0' ' ' < /proc/1/cmdline")
    uid, pid1 = who.stdout.split("\n", 1)
    assert uid.strip() != "0" and pid1.startswith("corral run"), who
    members = [Member(i) for i in range(4)]
    try:
        for m in members:
            m.connect()
        assert wait_until(lambda: all(m.sio.transport() == "websocket" for m in members), 20)
        assert len({m.worker for m in members}) >= 2, [m.worker for m in members]
        for m in members:
            m.sio.emit("chat", f"hello from {m.idx}")
        everyone = {f"hello from {m.idx}" for m in members}
        assert wait_until(lambda: all(everyone <= m.heard for m in members), 20), \
            [(m.idx, m.worker, sorted(m.heard)) for m in members]
    finally:
        for m in members:
            m.sio.disconnect()
    if cmd[0] == "podman":
        # The image's HEALTHCHECK (kept by `build --format docker`), run once.
        assert subprocess.run([*cmd, "healthcheck", "run", name], capture_output=True).returncode == 0


def test_stop_answers_the_request_in_flight_and_exits_cleanly(container):
    cmd, name = container
    # No zombie inside: corral (PID 1) reaps what the workers leave.
    states = inside(cmd, name, "for f in /proc/[0-9]*/stat; do cut -d')' -f2 < $f | cut -d' ' -f2; done")
    assert states.returncode == 0 and "Z" not in states.stdout.split(), states
    sid = requests.get(BASE + "/socket.io/?EIO=4&transport=polling", auth=AUTH, verify=False,
                       timeout=10).text.split('"sid":"')[1].split('"')[0]
    body = b'40'
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = ctx.wrap_socket(socket.create_connection(("127.0.0.1", 8443), timeout=20))
    token = base64.b64encode(b"demo:demo").decode()
    head = (f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n"
            f"Authorization: Basic {token}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    raw.sendall(head + body[:1])
    time.sleep(0.5)
    started = time.monotonic()
    stopping = subprocess.Popen([*cmd, "stop", "-t", str(GRACE), name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    raw.sendall(body[1:])
    answer = raw.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 200"), answer
    assert stopping.wait(GRACE + 10) == 0
    took = time.monotonic() - started
    code = subprocess.run([*cmd, "inspect", name, "--format", "{{.State.ExitCode}}"],
                          capture_output=True, text=True).stdout.strip()
    assert code == "0", (code, logs(cmd, name))
    assert took < GRACE, took
    assert "SIGKILL" not in logs(cmd, name)
