"""Fixtures for corral's end-to-end tests: real gunicorn workers, a real corral.

Every process starts in its own process group and the whole group is stopped at the
end of the test, so no stale worker can answer a later test; every test uses fresh
ports from the kernel, and corral listens on port 0 and is asked on its admin socket
where it is bound (`addresses`).
"""
import json
import os
import shutil
import tempfile
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "apps"
VENV_BIN = Path(sys.executable).parent


def corral_binary():
    explicit = os.environ.get("CORRAL_BIN")
    if explicit:
        return explicit
    return str(ROOT / "target" / "debug" / "corral")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20.0, proc=None, log=None):
    """Waits until `url` answers HTTP at all (any status): 'port open' is not 'ready'."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{read_log(log)}")
        try:
            return requests.get(url, timeout=2)
        except requests.RequestException as e:  # not up yet
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}\n{read_log(log)}")


def corral_addresses(sock, proc, timeout=20.0):
    """Where a starting corral is bound, asked of its admin socket (`addresses`);
    None if it exits before it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            return None
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(b"addresses\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return json.loads(data)
        except (OSError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"corral's admin socket {sock} did not answer within {timeout}s:\n{read_log(proc.log)}")


def read_log(path):
    if path is None:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-4000:]
    except OSError:
        return ""


class Proc:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, args, log, env=None, cwd=None):
        self.args = args
        self.log = Path(log)
        self._fh = open(self.log, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            args,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self):
        return self.popen.pid

    def output(self):
        self._fh.flush()
        return self.log.read_text(errors="replace")

    def signal_group(self, sig):
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace=5.0):
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group (a gunicorn worker that outlived its master).
        self.signal_group(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()


class Stack:
    """Starts workers and corral for one test and stops them all afterwards."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs = []
        self.workers = []
        self.dirs = []

    def gunicorn(self, app="chat_app:create_app()", env=None, worker_class=None, threads=100, port=None):
        port = port or free_port()
        n = len(self.workers)
        args = [str(VENV_BIN / "gunicorn"), "-w", "1", "-b", f"127.0.0.1:{port}",
                "--chdir", str(APPS), "--graceful-timeout", "2", "--timeout", "120"]
        if worker_class:
            args += ["-k", worker_class]
        else:
            args += ["--threads", str(threads)]
        args.append(app)
        return self._worker(args, port, f"worker-{n}", env)

    def uvicorn(self, app="asgi_app:app", env=None):
        port = free_port()
        args = [str(VENV_BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(port),
                "--app-dir", str(APPS), app]
        return self._worker(args, port, "uvicorn", env)

    def _worker(self, args, port, label, env):
        """Starts a worker named w<port> and waits until it answers HTTP."""
        wenv = {"PORT": str(port), "CORRAL_WORKER_ID": f"w{port}", "PYTHONUNBUFFERED": "1"}
        wenv.update(env or {})
        p = Proc(args, self.tmp / f"{label}-{port}.log", env=wenv)
        self.procs.append(p)
        p.port = port
        wait_http(f"http://127.0.0.1:{port}/health", proc=p.popen, log=p.log)
        self.workers.append(p)
        return p

    def corral(self, upstreams, extra="", listen_port=None, wait=True):
        """corral in front of `upstreams`, on `listen_port` or else port 0 (the port
        it got is read from its admin socket)."""
        n = len(self.procs)
        ups = ", ".join(f'"127.0.0.1:{u}"' for u in upstreams)
        # A short path: a Unix socket's path is limited to about 100 bytes.
        self.dirs.append(Path(tempfile.mkdtemp(prefix="corral-")))
        sock = self.dirs[-1] / "admin.sock"
        cfg = self.tmp / f"corral-{n}.toml"
        cfg.write_text(f'listen = ["127.0.0.1:{listen_port or 0}"]\nadmin_socket = "{sock}"\n'
                       f'upstreams = [{ups}]\n{extra}\n')
        p = Proc([corral_binary(), "run", "-c", str(cfg)], self.tmp / f"corral-{n}.log",
                 env={"CORRAL_LOG": os.environ.get("CORRAL_LOG", "info")})
        self.procs.append(p)
        told = corral_addresses(sock, p)
        p.addresses = told
        p.port = int(told["listeners"][0].rsplit(":", 1)[1]) if told else listen_port
        p.url = f"http://127.0.0.1:{p.port}"
        if wait:
            wait_http(p.url + "/health", proc=p.popen, log=p.log)
        return p

    def worker_logs(self):
        return "\n".join(w.output() for w in self.workers)

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.stop()


def rss_kb(pid, field="VmHWM"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped for a missing tool fails the run: CI installs
    everything, so a skip there means an install step is missing."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (an install step is missing?): {reason}"
