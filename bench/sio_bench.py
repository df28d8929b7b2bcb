#!/usr/bin/env python3
"""Socket.IO through a proxy: corral (least-connections, sid routing) against the
seed's nginx (ip_hash), in front of the same two Flask-SocketIO gunicorn workers.

Measures sessions per second (handshake + upgrade to websocket, CLIENTS clients,
50 at a time), broadcast deliveries per second (every client broadcasts to the room
of its worker), where the sessions landed, and the proxy's CPU time as a share of
the workers' CPU time over the run.

    .venv/bin/python bench/sio_bench.py [rounds]     (make bench-socketio)
"""
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import socketio

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "apps"
VENV = Path(sys.executable).parent
CLIENTS = int(os.environ.get("CLIENTS", "100"))
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
# For a quick look at one proxy: PROXIES=corral; CORRAL=path/to/another/build.
PROXIES = os.environ.get("PROXIES", "corral,nginx").split(",")
CORRAL = os.environ.get("CORRAL", str(ROOT / "target" / "profiling" / "corral"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, **kw)


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_http(url, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return requests.get(url, timeout=2)
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def group_cpu(pgid):
    """CPU seconds of every process in a process group."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_clients(url):
    members = []
    lock = threading.Lock()

    def one(i):
        sio = socketio.Client(reconnection=False)
        state = {"worker": None, "got": 0, "i": i}
        sio.on("welcome", lambda d: state.__setitem__("worker", d["worker"]))
        sio.on("message", lambda d: state.__setitem__("got", state["got"] + 1))
        sio.connect(url, wait_timeout=20)
        deadline = time.monotonic() + 20
        while (sio.transport() != "websocket" or state["worker"] is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        with lock:
            members.append((sio, state))

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(one, range(CLIENTS)))
    connect_s = time.monotonic() - t0
    per_worker = {}
    for _, s in members:
        per_worker[s["worker"]] = per_worker.get(s["worker"], 0) + 1
    expected = sum(n * n for n in per_worker.values())
    t0 = time.monotonic()
    for sio, s in members:
        sio.emit("broadcast", {"from": s["i"], "room": "all"})
    deadline = time.monotonic() + 30
    while sum(s["got"] for _, s in members) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    deliver_s = time.monotonic() - t0
    delivered = sum(s["got"] for _, s in members)
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(lambda m: m[0].disconnect(), members))
    return CLIENTS / connect_s, delivered / deliver_s, sorted(per_worker.values(), reverse=True)


def main():
    work = Path(tempfile.mkdtemp())
    (work / "tmp").mkdir()
    workers = []
    ports = [free_port(), free_port()]
    for port in ports:
        workers.append(start([str(VENV / "gunicorn"), "-w", "1", "--threads", "100", "-b",
                              f"127.0.0.1:{port}", "--chdir", str(APPS), "chat_app:create_app()"],
                             env={**os.environ, "CORRAL_WORKER_ID": f"w{port}"}))
    for port in ports:
        wait_http(f"http://127.0.0.1:{port}/health")
    results = {}
    try:
        for name in PROXIES:
            port = free_port()
            if name == "corral":
                cfg = work / "corral.toml"
                cfg.write_text(f'listen = ["127.0.0.1:{port}"]\nupstreams = ["127.0.0.1:{ports[0]}", '
                               f'"127.0.0.1:{ports[1]}"]\nadmin_socket = "{work}/c.sock"\n')
                proxy = start([CORRAL, "run", "-c", str(cfg)])
            else:
                cfg = work / "nginx.conf"
                cfg.write_text(f"""worker_processes auto; pid {work}/nginx.pid; error_log {work}/err.log;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  upstream gunicorns {{ ip_hash; server 127.0.0.1:{ports[0]}; server 127.0.0.1:{ports[1]}; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header Host $host; proxy_pass http://gunicorns; }}
    location /socket.io {{ proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade"; proxy_set_header Host $host; proxy_read_timeout 90s; proxy_pass http://gunicorns; }} }} }}
""")
                proxy = start(["nginx", "-p", str(work), "-c", str(cfg), "-g", "daemon off;"])
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health")
            rows = []
            for _ in range(ROUNDS):
                p0 = group_cpu(proxy.pid)
                w0 = sum(group_cpu(w.pid) for w in workers)
                sessions, deliveries, spread = run_clients(url)
                p1 = group_cpu(proxy.pid)
                w1 = sum(group_cpu(w.pid) for w in workers)
                rows.append((sessions, deliveries, (p1 - p0) / max(0.01, w1 - w0), spread))
                time.sleep(1)
            stop(proxy)
            results[name] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows),
                             statistics.median(r[2] for r in rows), rows[-1][3])
    finally:
        for w in workers:
            stop(w)
    if len(results) < 2:
        for name, r in results.items():
            print(f"{name}: {r[0]:.1f} sessions/s, {r[1]:.0f} deliveries/s, "
                  f"proxy CPU {r[2] * 100:.1f} % of the workers', spread {r[3]}")
        return
    c, n = results["corral"], results["nginx"]
    print(f"| scenario ({CLIENTS} clients, 2 workers) | corral | nginx ip_hash | corral / nginx |")
    print("|---|---:|---:|---:|")
    print(f"| sessions/s (handshake + upgrade) | {c[0]:.1f} | {n[0]:.1f} | {c[0] / n[0]:.2f} |")
    print(f"| broadcast deliveries/s | {c[1]:.0f} | {n[1]:.0f} | {c[1] / n[1]:.2f} |")
    print(f"| proxy CPU / workers' CPU | {c[2] * 100:.1f} % | {n[2] * 100:.1f} % | {c[2] / max(n[2], 1e-9):.2f} |")
    print(f"| sessions per worker | {c[3]} | {n[3]} | |")


if __name__ == "__main__":
    main()
