#!/usr/bin/env python3
"""The front door's answers beside nginx's and HAProxy's, on the same bytes.

    python3 bench/conformance.py > docs/conformance-table.md   (make conformance)

Starts a raw HTTP/1.1 worker that records what reaches it, then corral, nginx and
HAProxy in front of it (each in turn, on 127.0.0.1), sends every case on a fresh
connection, and prints a markdown table: the status each proxy answered (`-` for a
connection closed without an answer) and whether a complete request reached the
worker. The cases are those of tests/hardening.rs, where corral's answers are
asserted; this table is the record of how they compare.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("two Host headers", b"GET /ui HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n", False),
    ("no Host on HTTP/1.1", b"GET /ui HTTP/1.1\r\nUser-Agent: t\r\n\r\n", False),
    ("absolute-form target with userinfo",
     b"GET http://localhost@evil.example/ui HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("chunk size overflowing 64 bits",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n", False),
    ("negative chunk size",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-5\r\nhello\r\n0\r\n\r\n", False),
    ("chunk data without its CRLF",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nhelloXX0\r\n\r\n", False),
    ("missing final CRLF (then EOF)",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n", True),
    ("bare LF chunk lines",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\nhello\n0\n\n", False),
    ("upgrade request with a body (smuggling, part A)",
     b"GET /health HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 144\r\n\r\n"
     + b"A" * 144, False),
    ("Content-Length and Transfer-Encoding both",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
    ("well-formed chunked POST (control)",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", False),
    ("`CONNECT host:443`", b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n", False),
    ("empty `Host:`", b"GET /ui HTTP/1.1\r\nHost:\r\n\r\n", False),
    ("`Transfer-Encoding: gzip, chunked`",
     b"POST /ui HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", False),
    ("`GET *`", b"GET * HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("`OPTIONS *` (control)", b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    ("a 70 KB head", b"GET /ui HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: " + b"p" * 600 + b"\r\n" * 1
     + (b"X-Pad: " + b"p" * 600 + b"\r\n") * 118 + b"\r\n", False),
]


class Worker:
    """Answers 200 after reading each request whole; records complete requests."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.complete = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        return
                    head += line
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        size = int(f.readline().split(b";")[0], 16)
                        f.read(size + 2) if size else f.readline()
                        if size == 0:
                            break
                elif b"content-length:" in lower:
                    n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(f.read(n)) < n:
                        return
                self.complete.append(head.split(b"\r\n")[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (OSError, ValueError):
            return


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def send(port, data, half_close):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(3)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = s.recv(200)
        return got.split(b" ")[1].decode() if got.startswith(b"HTTP/") else "-"
    except OSError:
        return "-"
    finally:
        s.close()


def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start(name, port, backend, work):
    if name == "corral":
        cfg = os.path.join(work, "corral.toml")
        with open(cfg, "w") as fh:
            fh.write(f'listen = ["127.0.0.1:{port}"]\nupstreams = ["127.0.0.1:{backend}"]\n'
                     f'admin_socket = "{work}/admin.sock"\n')
        binary = os.environ.get("CORRAL_BIN", os.path.join(ROOT, "target", "debug", "corral"))
        return subprocess.Popen([binary, "run", "-c", cfg], stderr=subprocess.DEVNULL)
    if name == "nginx":
        cfg = os.path.join(work, "nginx.conf")
        with open(cfg, "w") as fh:
            fh.write(f"""daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{}}
http {{ access_log off; client_body_temp_path {work};
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://127.0.0.1:{backend}; proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; }} }} }}
""")
        return subprocess.Popen(["nginx", "-p", work, "-c", cfg], stderr=subprocess.DEVNULL)
    cfg = os.path.join(work, "haproxy.cfg")
    with open(cfg, "w") as fh:
        fh.write(f"""defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server w 127.0.0.1:{backend}
""")
    return subprocess.Popen(["haproxy", "-f", cfg, "-db"], stderr=subprocess.DEVNULL)


def main():
    proxies = [p for p in ("corral", "nginx", "haproxy") if p == "corral" or shutil.which(p)]
    results = {}
    for name in proxies:
        worker = Worker()
        port = free_port()
        work = tempfile.mkdtemp()
        proc = start(name, port, worker.port, work)
        try:
            wait_port(port)
            for case, data, half in CASES:
                before = len(worker.complete)
                status = send(port, data, half)
                time.sleep(0.1)
                reached = len(worker.complete) > before
                results[(name, case)] = f"{status}{' (reached worker)' if reached else ''}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(work, ignore_errors=True)
    print("| case | " + " | ".join(proxies) + " |")
    print("|---|" + "---|" * len(proxies))
    for case, _, _ in CASES:
        print(f"| {case} | " + " | ".join(results[(p, case)] for p in proxies) + " |")


if __name__ == "__main__":
    sys.exit(main())
