#!/usr/bin/env python3
"""Socket.IO through a proxy: corral (least-connections, sid routing) against the
seed's nginx (ip_hash), in front of the same two Flask-SocketIO gunicorn workers.

Measures sessions per second (handshake + upgrade to websocket, CLIENTS clients,
50 at a time), broadcast deliveries per second (every client broadcasts to the room
of its worker), where the sessions landed, and the proxy's CPU time as a share of
the workers' CPU time over the run.

With ip_hash every client here (all from 127.0.0.1) lands on one worker, so behind
nginx the workers do other work than behind corral. A second setup puts one worker
behind each proxy, so both carry the same sessions and frames, and splits the
proxy's CPU by phase: connecting (handshake, polling, upgrade), the broadcasts'
frames, disconnecting.

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
# A before/after pair: PROXIES=corral,before BEFORE=path/to/the/other/build.
# CORRAL_EXTRA adds TOML to corral's config, e.g. "[timeouts]\nwebsocket_idle = \"60s\"".
PROXIES = os.environ.get("PROXIES", "corral,nginx").split(",")
CORRAL = os.environ.get("CORRAL", str(ROOT / "target" / "profiling" / "corral"))
BINARIES = {"corral": CORRAL, "before": os.environ.get("BEFORE", CORRAL)}


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


def group_procs(pgid):
    """The /proc directories of every process in a process group."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            yield d, fields


def group_cpu(pgid):
    """CPU seconds of every process in a process group (/proc/PID/stat, 10 ms ticks;
    threads that have ended included)."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum((int(f[11]) + int(f[12])) / tick for _, f in group_procs(pgid))


def kernel_workers_ns():
    """The scheduler's nanoseconds of the kernel's worker threads (kworker,
    ksoftirqd): where corral's kernel relay has its forwarding done."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().startswith(("kworker", "ksoftirqd")):
                total += int((d / "schedstat").read_text().split()[0])
        except OSError:
            continue
    return total


def proxy_cpu(pgid):
    """As group_cpu, from the scheduler's nanosecond count of each thread
    (/proc/PID/task/TID/schedstat): ticks are too coarse for one phase of a round,
    and a proxy's threads live as long as it does. The kernel's workers are added
    for every proxy alike (idle background for one that relays in user space)."""
    total = kernel_workers_ns()
    for d, _ in group_procs(pgid):
        try:
            for t in (d / "task").iterdir():
                total += int((t / "schedstat").read_text().split()[0])
        except OSError:
            continue
    return total / 1e9


def run_clients(url, cpu=lambda: 0.0):
    """One round: CLIENTS sessions, every client's broadcast, the disconnects. Returns
    sessions/s, deliveries/s, sessions per worker, deliveries, and the proxy CPU
    seconds (from `cpu`) spent connecting, broadcasting and disconnecting."""
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

    c0 = cpu()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(one, range(CLIENTS)))
    connect_s = time.monotonic() - t0
    # Let the last upgrades' polling requests end before the broadcasts start.
    time.sleep(0.5)
    c1 = cpu()
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
    c2 = cpu()
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(lambda m: m[0].disconnect(), members))
    time.sleep(0.5)
    c3 = cpu()
    return (CLIENTS / connect_s, delivered / deliver_s, sorted(per_worker.values(), reverse=True),
            delivered, (c1 - c0, c2 - c1, c3 - c2))


def start_workers(n, threads):
    ports = [free_port() for _ in range(n)]
    workers = [start([str(VENV / "gunicorn"), "-w", "1", "--threads", str(threads), "-b",
                      f"127.0.0.1:{port}", "--chdir", str(APPS), "chat_app:create_app()"],
                     env={**os.environ, "CORRAL_WORKER_ID": f"w{port}"})
               for port in ports]
    for port in ports:
        wait_http(f"http://127.0.0.1:{port}/health")
    return ports, workers


def start_proxy(name, work, port, ports):
    """corral, or nginx with the seed's config (ip_hash, the /socket.io location)."""
    if name in BINARIES:
        cfg = work / f"{name}.toml"
        upstreams = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
        extra = os.environ.get("CORRAL_EXTRA", "").replace("\\n", "\n")
        cfg.write_text(f'listen = ["127.0.0.1:{port}"]\nupstreams = [{upstreams}]\n'
                       f'admin_socket = "{work}/{name}.sock"\n{extra}\n')
        return start([BINARIES[name], "run", "-c", str(cfg)])
    cfg = work / "nginx.conf"
    servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
    cfg.write_text(f"""worker_processes auto; pid {work}/nginx.pid; error_log {work}/err.log;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  upstream gunicorns {{ ip_hash; {servers} }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header Host $http_host; proxy_pass http://gunicorns; }}
    location /socket.io {{ proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade"; proxy_set_header Host $http_host; proxy_read_timeout 90s; proxy_pass http://gunicorns; }} }} }}
""")
    return start(["nginx", "-p", str(work), "-c", str(cfg), "-g", "daemon off;"])


def measure(work, ports, workers):
    """Each proxy in turn, ROUNDS rounds each: per round sessions/s, deliveries/s,
    proxy CPU over workers' CPU, sessions per worker, deliveries, proxy CPU by phase."""
    results = {}
    for name in PROXIES:
        port = free_port()
        proxy = start_proxy(name, work, port, ports)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health")
        rows = []
        for _ in range(ROUNDS):
            p0 = proxy_cpu(proxy.pid)
            w0 = sum(group_cpu(w.pid) for w in workers)
            sessions, deliveries, spread, delivered, phases = run_clients(url, lambda: proxy_cpu(proxy.pid))
            p1 = proxy_cpu(proxy.pid)
            w1 = sum(group_cpu(w.pid) for w in workers)
            rows.append((sessions, deliveries, (p1 - p0) / max(0.01, w1 - w0), spread, delivered, phases,
                         w1 - w0))
            time.sleep(1)
        stop(proxy)
        results[name] = rows
    return results


def med(rows, f):
    return statistics.median(f(r) for r in rows)


def seed_table(results):
    """Two workers, nginx with the seed's ip_hash: what a user of the seed gets."""
    if len(results) < 2:
        for name, rows in results.items():
            print(f"{name}: {med(rows, lambda r: r[0]):.1f} sessions/s, {med(rows, lambda r: r[1]):.0f} deliveries/s, "
                  f"proxy CPU {med(rows, lambda r: r[2]) * 100:.1f} % of the workers', spread {rows[-1][3]}")
        return
    if "nginx" not in results:
        return
    c, n = results["corral"], results["nginx"]
    print(f"| scenario ({CLIENTS} clients, 2 workers) | corral | nginx ip_hash | corral / nginx |")
    print("|---|---:|---:|---:|")
    for label, f, fmt in [("sessions/s (handshake + upgrade)", lambda r: r[0], ".1f"),
                          ("broadcast deliveries/s", lambda r: r[1], ".0f"),
                          ("proxy CPU / workers' CPU", lambda r: r[2] * 100, ".1f")]:
        a, b = med(c, f), med(n, f)
        unit = " %" if "CPU" in label else ""
        print(f"| {label} | {a:{fmt}}{unit} | {b:{fmt}}{unit} | {a / max(b, 1e-9):.2f} |")
    print(f"| sessions per worker | {c[-1][3]} | {n[-1][3]} | |")


def same_work_table(results):
    """One worker behind each proxy, so both relay the same sessions and frames: the
    proxy's CPU per session (handshake, polling, upgrade), per delivered broadcast
    frame, and per disconnect, and over the workers' CPU."""
    rows = {
        "proxy CPU / workers' CPU": (lambda r: r[2] * 100, " %"),
        "proxy CPU per session, connect (µs)": (lambda r: r[5][0] * 1e6 / CLIENTS, ""),
        "proxy CPU per delivered frame (µs)": (lambda r: r[5][1] * 1e6 / max(r[4], 1), ""),
        "proxy CPU per session, disconnect (µs)": (lambda r: r[5][2] * 1e6 / CLIENTS, ""),
        "proxy CPU per round (ms)": (lambda r: sum(r[5]) * 1e3, ""),
        "workers' CPU per round (ms)": (lambda r: r[6] * 1e3, ""),
        "broadcast deliveries/s": (lambda r: r[1], ""),
    }
    names = list(results)
    print(f"| same work ({CLIENTS} clients, 1 worker) | " + " | ".join(names) +
          (f" | {names[0]} / {names[1]} |" if len(names) == 2 else " |"))
    print("|---|" + "---:|" * (len(names) + (1 if len(names) == 2 else 0)))
    for label, (f, unit) in rows.items():
        vals = [med(results[n], f) for n in names]
        cells = " | ".join(f"{v:.1f}{unit}" for v in vals)
        ratio = f" | {vals[0] / max(vals[1], 1e-9):.2f}" if len(names) == 2 else ""
        print(f"| {label} | {cells}{ratio} |")


def main():
    work = Path(tempfile.mkdtemp())
    (work / "tmp").mkdir()
    ports, workers = start_workers(2, 100)
    try:
        seed = measure(work, ports, workers)
    finally:
        for w in workers:
            stop(w)
    # Each websocket session holds a thread, and one more for a long-poll while it
    # upgrades: enough threads for all of them on the one worker.
    ports, workers = start_workers(1, 2 * CLIENTS + 50)
    try:
        same = measure(work, ports, workers)
    finally:
        for w in workers:
            stop(w)
    seed_table(seed)
    print()
    same_work_table(same)


if __name__ == "__main__":
    main()
