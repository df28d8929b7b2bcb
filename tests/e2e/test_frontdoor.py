"""corral at the edge: TLS (real certificates, curl and openssl s_client), basic auth
from files written by the real `htpasswd`, limits against slow and greedy clients,
forwarded headers, and path tricks against an auth-protected corral."""
import base64
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest
import requests
import socketio
import websocket

from clients import WssClient, wait_until
from conftest import Proc, corral_binary, free_port, wait_http

needs = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("curl") and shutil.which("htpasswd")),
    reason="openssl, curl and htpasswd (apache2-utils) are installed by .ci/run")
pytestmark = needs


def sh(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)


def make_ca(tmp):
    ca_key, ca = tmp / "ca.key", tmp / "ca.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
       "-out", str(ca), "-days", "2", "-subj", "/CN=corral test CA")
    return ca, ca_key


def make_cert(tmp, ca, ca_key, kind="rsa-pkcs8", name="server"):
    """A server certificate for 127.0.0.1/localhost signed by the test CA, with its key
    in the asked format: rsa-pkcs1, rsa-pkcs8, ec-sec1 or ec-pkcs8."""
    key, csr, crt = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem"
    if kind.startswith("rsa"):
        args = ["openssl", "genrsa", "-out", str(key), "2048"]
        if kind == "rsa-pkcs1":
            args.insert(2, "-traditional")
        sh(*args)
    else:
        sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
        if kind == "ec-pkcs8":
            sh("openssl", "pkcs8", "-topk8", "-nocrypt", "-in", str(key), "-out", str(key) + ".p8")
            os.replace(str(key) + ".p8", key)
    sh("openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext = tmp / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    out = sh("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))
    assert out.returncode == 0, out.stderr
    return crt, key


def start(stack, config, wait_url=None, ok=True):
    port = free_port()
    cfg = stack.tmp / f"corral-{port}.toml"
    cfg.write_text(config)
    p = Proc([corral_binary(), "run", "-c", str(cfg)], stack.tmp / f"corral-{port}.log")
    stack.procs.append(p)
    if wait_url:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.popen.poll() is not None:
                raise RuntimeError(p.output())
            try:
                requests.get(wait_url, verify=False, timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.1)
    return p


def tls_config(listen_port, worker_port, crt, key, extra=""):
    return (f'upstreams = ["127.0.0.1:{worker_port}"]\n{extra}\n'
            f'[[listener]]\naddress = "127.0.0.1:{listen_port}"\n'
            f'tls = {{ cert = "{crt}", key = "{key}" }}\n')


def fingerprint_of(port):
    out = subprocess.run(f"echo | openssl s_client -connect 127.0.0.1:{port} 2>/dev/null | "
                         "openssl x509 -noout -fingerprint -sha256", shell=True,
                         capture_output=True, text=True, timeout=20)
    return out.stdout.strip().split("=", 1)[-1]


@pytest.mark.parametrize("kind", ["rsa-pkcs1", "rsa-pkcs8", "ec-sec1", "ec-pkcs8"])
def test_tls_key_formats_with_curl(stack, kind):
    w = stack.gunicorn()
    ca, ca_key = make_ca(stack.tmp)
    crt, key = make_cert(stack.tmp, ca, ca_key, kind)
    port = free_port()
    start(stack, tls_config(port, w.port, crt, key), f"https://127.0.0.1:{port}/health")
    out = sh("curl", "-sS", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
             f"https://localhost:{port}/health")
    assert out.stdout == "200 2", (out.stdout, out.stderr)  # h2 negotiated by ALPN
    out = sh("curl", "-sS", "--http1.1", "--cacert", str(ca), f"https://127.0.0.1:{port}/echo")
    headers = __import__("json").loads(out.stdout)["headers"]
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{port}"


def test_tls_versions_with_openssl(stack):
    w = stack.gunicorn()
    ca, ca_key = make_ca(stack.tmp)
    crt, key = make_cert(stack.tmp, ca, ca_key)
    port = free_port()
    start(stack, tls_config(port, w.port, crt, key), f"https://127.0.0.1:{port}/health")

    def s_client(*flags):
        return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *flags],
                              input="", capture_output=True, text=True, timeout=20)

    t13 = s_client("-tls1_3")
    assert "Protocol  : TLSv1.3" in t13.stdout or "TLSv1.3" in t13.stdout, t13.stdout[-800:]
    t12 = s_client("-tls1_2")
    assert re.search(r"Protocol\s*: TLSv1.2", t12.stdout), t12.stdout[-800:]
    t11 = s_client("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert t11.returncode != 0
    # The client offered TLS 1.1 for real; the server refused: no cipher agreed.
    assert "Cipher is (NONE)" in t11.stdout, t11.stdout[-800:]
    assert "alert protocol version" in t11.stderr or "no protocols available" in t11.stderr \
        or "handshake failure" in t11.stderr, t11.stderr[-500:]


def test_bad_certificate_paths_are_named(stack):
    w = stack.gunicorn()
    ca, ca_key = make_ca(stack.tmp)
    crt, key = make_cert(stack.tmp, ca, ca_key)
    for cfg_crt, cfg_key, needle in [
        (stack.tmp / "missing.pem", key, "missing.pem"),
        (crt, stack.tmp / "nokey.pem", "nokey.pem"),
        (key, key, "server.key"),       # a key where the certificate should be
        (crt, ca_key, "does not match"),  # another key
    ]:
        p = start(stack, tls_config(free_port(), w.port, cfg_crt, cfg_key))
        assert p.popen.wait(10) != 0
        assert needle in p.output(), p.output()


def test_self_signed_fingerprint_and_reload_keeps_connections(stack):
    w = stack.gunicorn()
    port = free_port()
    p = start(stack, f'upstreams = ["127.0.0.1:{w.port}"]\n[[listener]]\naddress = "127.0.0.1:{port}"\n'
                     'tls = "self-signed"\n', f"https://127.0.0.1:{port}/health")
    m = re.search(r"sha256=([0-9A-F:]{95})", p.output())
    assert m, p.output()
    assert fingerprint_of(port) == m.group(1)
    pem = re.search(r"pem=(\S+)", p.output()).group(1)
    out = sh("curl", "-sS", "--cacert", pem, f"https://localhost:{port}/health")
    assert out.stdout == "ok", out.stderr

    # Files-based certificate replaced on disk, then SIGHUP.
    ca, ca_key = make_ca(stack.tmp)
    crt, key = make_cert(stack.tmp, ca, ca_key, name="one")
    port2 = free_port()
    p2 = start(stack, tls_config(port2, w.port, crt, key), f"https://127.0.0.1:{port2}/health")
    before = fingerprint_of(port2)
    ctx = ssl.create_default_context(cafile=str(ca))
    held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port2)), server_hostname="localhost")
    crt2, key2 = make_cert(stack.tmp, ca, ca_key, kind="ec-sec1", name="two")
    shutil.copy(crt2, crt)
    shutil.copy(key2, key)
    p2.popen.send_signal(signal.SIGHUP)
    assert wait_until(lambda: fingerprint_of(port2) not in ("", before), 10)
    # The connection opened before the reload still works.
    held.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 200")
    held.close()
    assert p2.popen.poll() is None


def test_http_listener_redirects_to_https(stack):
    w = stack.gunicorn()
    https, http = free_port(), free_port()
    start(stack, f'upstreams = ["127.0.0.1:{w.port}"]\n'
                 f'[[listener]]\naddress = "127.0.0.1:{https}"\ntls = "self-signed"\n'
                 f'[[listener]]\naddress = "127.0.0.1:{http}"\nredirect_https = true\n',
          f"https://127.0.0.1:{https}/health")
    r = requests.get(f"http://127.0.0.1:{http}/page?x=1", allow_redirects=False)
    assert r.status_code == 301
    assert r.headers["Location"] == f"https://127.0.0.1:{https}/page?x=1"


def htpasswd_file(tmp, fmt, user="alice", password="correct horse"):
    path = tmp / f"htpasswd-{fmt}"
    flag = {"bcrypt": ["-B", "-C", "10"], "md5": ["-m"], "sha": ["-s"]}[fmt]
    out = sh("htpasswd", "-c", "-b", *flag, str(path), user, password)
    assert out.returncode == 0, out.stderr
    return path


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("fmt", ["bcrypt", "md5", "sha"])
def test_htpasswd_formats(stack, fmt):
    w = stack.gunicorn()
    path = htpasswd_file(stack.tmp, fmt)
    prefix = {"bcrypt": "alice:$2y$", "md5": "alice:$apr1$", "sha": "alice:{SHA}"}[fmt]
    assert path.read_text().startswith(prefix)
    corral = stack.corral([w.port], extra=f'[auth]\nhtpasswd = "{path}"\nrealm = "Application Login"\n'
                                          'exempt = ["/health"]\n')
    r = requests.get(corral.url + "/whoami")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Basic realm="Application Login"')
    assert requests.get(corral.url + "/whoami", headers={"Authorization": basic("alice", "correct horse")}).status_code == 200
    assert requests.get(corral.url + "/whoami", headers={"Authorization": basic("alice", "wrong")}).status_code == 401
    assert requests.get(corral.url + "/whoami", headers={"Authorization": basic("bob", "correct horse")}).status_code == 401
    assert requests.get(corral.url + "/whoami", headers={"Authorization": "Basic !!!"}).status_code == 401


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_bcrypt_cache_makes_polling_cheap(stack):
    w = stack.gunicorn()
    path = htpasswd_file(stack.tmp, "bcrypt")
    corral = stack.corral([w.port], extra=f'[auth]\nhtpasswd = "{path}"\n')
    s = requests.Session()
    # The price of one verification: wrong passwords are never cached.
    t0 = cpu_seconds(corral.pid)
    for i in range(5):
        assert s.get(corral.url + "/health", headers={"Authorization": basic("alice", f"bad{i}")}).status_code == 401
    per_verify = (cpu_seconds(corral.pid) - t0) / 5
    assert per_verify > 0.01, per_verify  # bcrypt cost 10 is tens of milliseconds
    good = {"Authorization": basic("alice", "correct horse")}
    t0 = cpu_seconds(corral.pid)
    for _ in range(200):
        assert s.get(corral.url + "/health", headers=good).status_code == 200
    spent = cpu_seconds(corral.pid) - t0
    assert spent < 20 * per_verify, f"200 requests cost {spent:.2f}s CPU, one bcrypt {per_verify:.3f}s"
    # A changed file drops the cache: the old password stops working.
    htpasswd_file(stack.tmp, "bcrypt", password="new password")
    assert wait_until(lambda: s.get(corral.url + "/health", headers=good).status_code == 401, 10)
    assert s.get(corral.url + "/health", headers={"Authorization": basic("alice", "new password")}).status_code == 200


def test_socketio_over_wss_with_basic_auth(stack):
    workers = [stack.gunicorn() for _ in range(2)]
    path = htpasswd_file(stack.tmp, "md5")
    port = free_port()
    cfg = (f'upstreams = ["127.0.0.1:{workers[0].port}", "127.0.0.1:{workers[1].port}"]\n'
           f'[auth]\nhtpasswd = "{path}"\n'
           f'[[listener]]\naddress = "127.0.0.1:{port}"\ntls = "self-signed"\n')
    start(stack, cfg, f"https://127.0.0.1:{port}/health")
    url = f"https://127.0.0.1:{port}"
    good = {"Authorization": basic("alice", "correct horse")}
    members = []
    try:
        for i in range(6):
            # The asyncio client: the sync one races on its own TLS socket (WssClient).
            sio = WssClient()
            got = []
            sio.on("message", lambda d, got=got: got.append(d["from"]))
            sio.connect(url, headers=good, wait_timeout=10)
            members.append((sio, got))
        assert wait_until(lambda: all(s.transport() == "websocket" for s, _ in members), 15)
        for i, (s, _) in enumerate(members):
            s.emit("broadcast", {"from": i, "room": "all"})
        assert wait_until(lambda: sum(len(g) for _, g in members) >= 6, 10)
    finally:
        for s, _ in members:
            s.disconnect()
    # Without credentials: refused on polling and on the websocket upgrade alike.
    r = requests.get(url + "/socket.io/?EIO=4&transport=polling", verify=False)
    assert r.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(f"wss://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket",
                                    sslopt={"cert_reqs": ssl.CERT_NONE}, timeout=10)
    assert e.value.status_code == 401
    session = requests.Session()
    session.trust_env = False
    session.verify = False
    bad = socketio.Client(ssl_verify=False, reconnection=False, http_session=session)
    with pytest.raises(socketio.exceptions.ConnectionError):
        bad.connect(url, wait_timeout=5)


PATH_TRICKS = [
    "/whoami", "//whoami", "/health/../whoami", "/health/..%2fwhoami", "/health%2F..%2Fwhoami",
    "/health/%2e%2e/whoami", "/%2e%2e/whoami", "/health\\..\\whoami", "/health%5c..%5cwhoami",
    "/./whoami", "/HEALTH/../whoami", "/Health", "/healthz", "/health;/../whoami",
    "/health/./../socket.io/?EIO=4&transport=polling", "//socket.io/?EIO=4&transport=polling",
    "/socket.io/../whoami", "/health%00/../whoami", "/health/%252e%252e/whoami",
]


def test_path_tricks_cannot_skip_auth(stack):
    w = stack.gunicorn()
    path = htpasswd_file(stack.tmp, "sha")
    corral = stack.corral([w.port], extra=f'[auth]\nhtpasswd = "{path}"\nexempt = ["/health"]\n')
    results = {}
    for trick in PATH_TRICKS:
        with socket.create_connection(("127.0.0.1", corral.port), timeout=5) as s:
            s.sendall(f"GET {trick} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64).decode(errors="replace")
        results[trick] = head.split(" ")[1] if head.startswith("HTTP/") else head
    # 400/401: refused by corral. 404: exempt and forwarded as is, and the worker
    # (which decodes once, as corral does) found nothing there: nothing protected
    # was reached either way.
    refused = {t: code for t, code in results.items() if code in ("400", "401", "404")}
    assert refused == results, {t: c for t, c in results.items() if c not in ("400", "401", "404")}
    assert sum(1 for c in results.values() if c == "401") >= len(results) - 3
    assert requests.get(corral.url + "/health").status_code == 200
    assert requests.get(corral.url + "/health/").status_code in (200, 404)


def test_slowloris_cut_off_while_others_served(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='[timeouts]\nheader_read = "2s"\n')
    slow = socket.create_connection(("127.0.0.1", corral.port))
    request = b"GET /whoami HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    t0 = time.monotonic()
    closed_at = None
    served = 0
    for byte in request:
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            closed_at = time.monotonic() - t0
            break
        assert requests.get(corral.url + "/whoami", timeout=5).status_code == 200
        served += 1
        slow.settimeout(0.2)
        try:
            if slow.recv(1024) == b"":
                closed_at = time.monotonic() - t0
                break
        except socket.timeout:
            pass
        except OSError:
            closed_at = time.monotonic() - t0
            break
        if time.monotonic() - t0 > 10:
            break
    assert closed_at is not None and 1.5 < closed_at < 5, closed_at
    assert served >= 5


def test_oversized_headers_431_and_body_413(stack):
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='[limits]\nmax_header = "16K"\nmax_body = "10K"\n')
    r = requests.get(corral.url + "/whoami", headers={"X-Big": "a" * 40000})
    assert r.status_code == 431
    assert requests.post(corral.url + "/upload", data=b"x" * 20000).status_code == 413
    assert requests.get(corral.url + "/whoami").status_code == 200


def test_ten_thousand_idle_connections_do_not_block_new_clients(stack):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 12000:
        pytest.skip(f"file descriptor limit {hard} too low for 10,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    w = stack.gunicorn()
    corral = stack.corral([w.port], extra='[timeouts]\nheader_read = "60s"\n')
    idle = []
    try:
        for _ in range(10000):
            s = socket.socket()
            s.setblocking(True)
            s.connect(("127.0.0.1", corral.port))
            idle.append(s)
        t0 = time.monotonic()
        for _ in range(20):
            assert requests.get(corral.url + "/whoami", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 10
        # They are really held open by corral.
        idle[0].settimeout(0.2)
        with pytest.raises(socket.timeout):
            idle[0].recv(1)
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
