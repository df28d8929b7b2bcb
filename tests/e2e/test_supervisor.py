"""corral as the supervisor: it starts the gunicorn workers itself, restarts crashed
ones, rolls them without failing a request, and leaves no process behind."""
import os
import signal
import subprocess
import threading
import time
import tempfile
import uuid
from pathlib import Path

import pytest
import requests

from clients import connect_many, disconnect_all, spread, wait_until
from conftest import APPS, VENV_BIN, Proc, corral_addresses, corral_binary, wait_http


def gunicorn_args():
    return [str(VENV_BIN / "gunicorn"), "-w", "1", "--threads", "100",
            "-b", "127.0.0.1:{port}", "--chdir", str(APPS),
            "--graceful-timeout", "2", "chat_app:create_app()"]


def toml_list(items):
    return "[" + ", ".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "]"


class Supervised:
    """A corral that runs its own workers, tagged so leftovers can be found."""

    def __init__(self, stack, count, command=None, extra_workers="", extra="", env=None,
                 stop_grace="3s", drain_timeout="3s"):
        self.mark = uuid.uuid4().hex
        # Port 0: the port it got is asked of its admin socket.
        stack.dirs.append(Path(tempfile.mkdtemp(prefix="corral-")))
        self.admin = stack.dirs[-1] / "admin.sock"
        cfg = stack.tmp / f"corral-{self.mark}.toml"
        env_items = {"CORRAL_TEST_MARK": self.mark, **(env or {})}
        env_toml = ", ".join(f'{k} = "{v}"' for k, v in env_items.items())
        cfg.write_text(
            f'listen = ["127.0.0.1:0"]\nadmin_socket = "{self.admin}"\n{extra}\n'
            f"[workers]\ncommand = {toml_list(command or gunicorn_args())}\ncount = {count}\n"
            f'stop_grace = "{stop_grace}"\ndrain_timeout = "{drain_timeout}"\nenv = {{ {env_toml} }}\n'
            f"{extra_workers}\n")
        self.config = cfg
        self.proc = Proc([corral_binary(), "run", "-c", str(cfg)], stack.tmp / f"corral-{self.mark}.log")
        stack.procs.append(self.proc)
        self.stack = stack
        told = corral_addresses(self.admin, self.proc)
        assert told, f"corral exited:\n{self.proc.output()}"
        self.port = int(told["listeners"][0].rsplit(":", 1)[1])
        self.status_addr = told.get("status")
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self):
        wait_http(self.url + "/health", timeout=60, proc=self.proc.popen, log=self.proc.log)
        return self

    def admin_cmd(self, *words):
        out = subprocess.run([corral_binary(), *words, "--socket", str(self.admin)],
                             capture_output=True, text=True, timeout=120)
        return out

    def status(self):
        import json
        out = self.admin_cmd("status")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def status_json(self):
        """/status.json from the status listener (`[admin] listen` in `extra`)."""
        return requests.get(f"http://{self.status_addr}/status.json", timeout=10).json()

    def leftovers(self):
        """Processes still carrying this corral's mark in their environment."""
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if f"CORRAL_TEST_MARK={self.mark}".encode() in env:
                found.append(int(d.name))
        return found


class Load:
    """A bounded HTTP load loop through corral, recording every failure; `fresh`: each
    request on a connection of its own."""

    def __init__(self, url, seconds=30, max_requests=20000, fresh=False):
        self.url, self.seconds, self.max = url, seconds, max_requests
        self.fresh = fresh
        self.ok = 0
        self.failures = []
        self.workers = set()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(4)]

    def _run(self):
        s = requests.Session()
        headers = {"Connection": "close"} if self.fresh else {}
        end = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < end and self.ok + len(self.failures) < self.max:
            try:
                r = s.get(self.url + "/whoami", timeout=10, headers=headers)
                if r.status_code == 200:
                    self.ok += 1
                    self.workers.add(r.json()["worker"])
                else:
                    self.failures.append((r.status_code, r.text[:200], time.monotonic()))
            except requests.RequestException as e:
                self.failures.append((None, repr(e)[:200], time.monotonic()))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads:
            t.join(30)


def test_corral_starts_four_workers_and_spreads_clients(stack):
    c = Supervised(stack, 4).wait()
    st = c.status()
    assert [w["state"] for w in st] == ["up"] * 4
    assert len({w["pid"] for w in st}) == 4 and len({w["port"] for w in st}) == 4
    log = c.proc.output()
    assert "worker ready" in log and "[worker 3]" in log  # worker output forwarded with its id
    members = connect_many(c.url, 50)
    try:
        assert not [m.error for m in members if m.error]
        counts = spread(members)
        assert sorted(counts) == ["0", "1", "2", "3"], counts
        assert all(abs(n - 12.5) <= 2.5 for n in counts.values()), counts
    finally:
        disconnect_all(members)


def test_kill_9_worker_under_load(stack):
    c = Supervised(stack, 3, extra='[health]\ninterval = "500ms"\n').wait()
    members = connect_many(c.url, 15, reconnection=True)
    try:
        assert not [m.error for m in members if m.error]
        victim = next(w for w in c.status() if w["index"] == 0)
        on_victim = [m for m in members if m.worker == "0"]
        assert on_victim
        with Load(c.url, seconds=12) as load:
            time.sleep(1)
            os.kill(victim["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            load.killed_at = time.monotonic()

            def back():
                w = next(w for w in c.status() if w["index"] == 0)
                return w["state"] == "up" and w["pid"] != victim["pid"]

            assert wait_until(back, 5, step=0.1), c.status()
            back_after = time.monotonic() - t0
            # Its clients came back, on other workers (or on the restarted one).
            assert wait_until(lambda: all(m.sio.connected for m in members), 15)
            time.sleep(1)
        assert back_after < 5
        # Only requests that were in flight on the killed worker may have failed: a 502
        # naming it, or a response cut off mid-body right at the kill (at most one per
        # load thread).
        other = [f for f in load.failures
                 if f"{victim['port']}" not in (f[1] or "")
                 and not (f[0] is None and "IncompleteRead" in f[1] and -0.2 < f[2] - load.killed_at < 1.0)]
        assert other == [], other
        assert len(load.failures) <= len(load.threads), load.failures
        assert load.ok > 100
        # The restarted worker takes new sessions.
        fresh = connect_many(c.url, 12)
        try:
            assert "0" in spread(fresh), spread(fresh)
        finally:
            disconnect_all(fresh)
        assert "exited" in c.proc.output()
    finally:
        disconnect_all(members)


def test_rolling_restart_under_load(stack):
    c = Supervised(stack, 2).wait()
    before = {w["pid"] for w in c.status()}
    members = connect_many(c.url, 10, reconnection=True)
    try:
        assert not [m.error for m in members if m.error]
        with Load(c.url, seconds=40) as load:
            time.sleep(1)
            out = c.admin_cmd("reload")
            assert out.returncode == 0 and out.stdout.startswith("ok"), (out.stdout, out.stderr)
            time.sleep(1)
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
        after = c.status()
        assert len(after) == 2 and all(w["state"] == "up" for w in after)
        assert not before & {w["pid"] for w in after}, "every worker pid replaced"
        new_names = {str(w["index"]) for w in after}
        assert wait_until(lambda: all(m.sio.connected and m.worker in new_names for m in members), 20), \
            [(m.idx, m.worker, m.sio.connected) for m in members]
    finally:
        disconnect_all(members)
    # SIGHUP does the same.
    c.proc.popen.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not {w["pid"] for w in after} & {w["pid"] for w in c.status()}, 30)


def test_scale_up_and_down(stack):
    c = Supervised(stack, 1).wait()
    out = c.admin_cmd("scale", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [w["state"] for w in c.status()] == ["up"] * 3
    c.proc.popen.send_signal(signal.SIGTTOU)
    assert wait_until(lambda: len(c.status()) == 2, 15)
    seen = {requests.get(c.url + "/whoami").json()["worker"] for _ in range(20)}
    assert len(seen) == 2


def test_sigterm_stops_everything(stack):
    c = Supervised(stack, 3).wait()
    members = connect_many(c.url, 6)
    try:
        assert len(c.leftovers()) >= 6  # 3 gunicorn masters + 3 workers
        t0 = time.monotonic()
        c.proc.popen.send_signal(signal.SIGTERM)
        assert c.proc.popen.wait(20) == 0
        assert time.monotonic() - t0 < 3 + 5 + 3  # stop_grace + shutdown drain + slack
        assert c.leftovers() == []
    finally:
        disconnect_all(members)


def test_sigkill_leaves_no_worker(stack):
    c = Supervised(stack, 2).wait()
    members = connect_many(c.url, 4)
    try:
        assert len(c.leftovers()) >= 4
        c.proc.popen.send_signal(signal.SIGKILL)
        c.proc.popen.wait(5)
        assert wait_until(lambda: c.leftovers() == [], 10), c.leftovers()
    finally:
        disconnect_all(members)


def test_crashing_worker_is_reported_and_others_serve(stack):
    script = ('if [ "{id}" = "1" ]; then echo "boom: missing settings for worker {id}" >&2; exit 3; fi; '
              "exec " + " ".join(f"'{a}'" for a in gunicorn_args()))
    c = Supervised(stack, 2, command=["/bin/sh", "-c", script],
                   extra_workers='backoff_max = "1s"\nstart_timeout = "10s"\n').wait()
    for _ in range(10):
        r = requests.get(c.url + "/whoami")
        assert r.status_code == 200 and r.json()["worker"] == "0"
    assert wait_until(lambda: {w["index"]: w for w in c.status()}[1]["restarts"] >= 3, 15)
    log = c.proc.output()
    assert "exited (exit status: 3)" in log
    # Its output is shown once, not again for each restart (the same every time).
    assert log.count("boom: missing settings") == 1, log[-3000:]
    st = {w["index"]: w for w in c.status()}
    assert st[1]["state"] != "up"
    assert c.proc.popen.poll() is None
