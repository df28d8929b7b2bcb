"""The user's own server command line, prefixed with `corral`: `corral gunicorn -k
GeventWebSocketWorker -w 4 -b …` runs four one-worker gunicorns behind corral on
that bind, and Socket.IO works across them (every client upgrades, every broadcast
reaches everyone); the same for uvicorn. `corral run` refuses a worker command that
asks its server for several workers, saying why and what to write."""
import json
import subprocess
import tempfile
import uuid
from pathlib import Path

import requests

from clients import connect_many, disconnect_all, spread, wait_until
from conftest import APPS, VENV_BIN, Proc, corral_addresses, corral_binary


class Prefixed:
    """`corral -c <admin socket only> <server> ARGS…`, on the port the args bind (0)."""

    def __init__(self, stack, args, env=None):
        mark = uuid.uuid4().hex
        stack.dirs.append(Path(tempfile.mkdtemp(prefix="corral-")))
        self.admin = stack.dirs[-1] / "admin.sock"
        own = stack.dirs[-1] / "corral.toml"
        own.write_text(f'admin_socket = "{self.admin}"\n')
        # The server is found on PATH, as from the user's virtualenv.
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "CORRAL_TEST_MARK": mark, **(env or {})}
        self.proc = Proc([corral_binary(), "-c", str(own), *args], stack.tmp / f"prefix-{mark}.log", env=env)
        stack.procs.append(self.proc)
        told = corral_addresses(self.admin, self.proc, timeout=60)
        assert told, f"corral exited:\n{self.proc.output()}"
        self.url = "http://" + told["listeners"][0]
        assert wait_until(lambda: corral_addresses(self.admin, self.proc)["ready"], 60), self.proc.output()[-3000:]

    def status(self):
        import json
        out = subprocess.run([corral_binary(), "status", "--socket", str(self.admin)],
                             capture_output=True, text=True, timeout=30)
        return json.loads(out.stdout)


def all_hear_all(members):
    for m in members:
        m.sio.emit("broadcast", {"from": m.idx, "room": "all"})
    everyone = {m.idx for m in members}
    ok = wait_until(lambda: all(everyone <= m.received for m in members), 20)
    return ok, [(m.idx, sorted(everyone - m.received)[:5]) for m in members if not everyone <= m.received]


def test_the_seed_gunicorn_line_prefixed_with_corral(stack):
    c = Prefixed(stack, ["gunicorn", "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                         "-w", "4", "--threads", "100", "-b", "127.0.0.1:0", "--chdir", str(APPS),
                         "chat_app:create_app()"], env={"ASYNC_MODE": "gevent"})
    workers = c.status()
    assert len(workers) == 4 and all(w["state"] == "up" for w in workers), workers
    members = connect_many(c.url, 20, reconnection=False)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 20)
        assert len(spread(members)) == 4, spread(members)
        ok, missing = all_hear_all(members)
        assert ok, missing
    finally:
        disconnect_all(members)
    assert "Invalid session" not in c.proc.output()
    # Each gunicorn master runs one worker process (`-w 4` became four masters).
    for w in workers:
        children = Path(f"/proc/{w['pid']}/task/{w['pid']}/children").read_text().split()
        assert len(children) == 1, (w, children)


def test_a_uvicorn_line_prefixed_with_corral(stack):
    c = Prefixed(stack, ["uvicorn", "--workers", "3", "--host", "127.0.0.1", "--port", "0",
                         "--app-dir", str(APPS), "asgi_app:app"])
    assert len(c.status()) == 3
    members = connect_many(c.url, 12)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 20)
        assert len(spread(members)) == 3, spread(members)
        ok, missing = all_hear_all(members)
        assert ok, missing
    finally:
        disconnect_all(members)


def test_run_refuses_a_worker_command_with_several_workers(stack):
    out = subprocess.run(
        [corral_binary(), "run", "-w", "2", "--listen", "127.0.0.1:0", "--",
         str(VENV_BIN / "gunicorn"), "-w", "4", "-b", "127.0.0.1:{port}", "chat_app:create_app()"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out
    assert "asks gunicorn for 4 workers" in out.stderr and "thrash" in out.stderr, out.stderr
    assert "corral gunicorn" in out.stderr, out.stderr


def corral_cmd(*args, timeout=120):
    return subprocess.run([corral_binary(), *args], capture_output=True, text=True, timeout=timeout)


def seed_line_with_file(stack, own, port, label):
    """`corral -c OWN gunicorn …` (the seed's line, two gevent workers, bound on
    `port`) once both workers are up; returns how to ask for its workers with only
    `-c OWN`, as an operator would."""
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "ASYNC_MODE": "gevent"}
    proc = Proc([corral_binary(), "-c", str(own), "gunicorn", "-k",
                 "geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "-w", "2",
                 "-b", f"127.0.0.1:{port}", "--chdir", str(APPS), "chat_app:create_app()"],
                stack.tmp / f"prefix-{label}-{port}.log", env=env)
    stack.procs.append(proc)

    def workers():
        out = corral_cmd("status", "-c", str(own), timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else []

    assert wait_until(lambda: len(workers()) == 2 and all(w["state"] == "up" for w in workers()), 60), \
        proc.output()[-3000:]
    return workers


def test_operator_commands_find_a_prefix_mode_corral_by_its_file(stack):
    """`corral -c corral.toml gunicorn …` with TLS, basic auth and a body limit in the
    file (as the README shows: no [workers], no upstreams) and `-b` naming the file's
    TLS listener (one listener, the file's TLS). Then each operator command given only
    `-c corral.toml`: `check` validates the file as the part of a config it is,
    `status` lists the workers, `reload --keep-workers` applies a smaller body limit
    with no websocket dropped, `scale 3` makes three."""
    from test_frontdoor import basic, htpasswd_file
    from clients import WssClient
    from conftest import free_port
    d = Path(tempfile.mkdtemp(prefix="corral-"))
    stack.dirs.append(d)
    pw = htpasswd_file(d, "md5")
    port = free_port()
    own = d / "corral.toml"

    def write(limit):
        own.write_text(f'[[listener]]\naddress = "127.0.0.1:{port}"\ntls = "self-signed"\n'
                       f'[auth]\nhtpasswd = "{pw}"\n[limits]\nmax_body = "{limit}"\n')

    write("1M")
    workers = seed_line_with_file(stack, own, port, "file")
    check = corral_cmd("check", "-c", str(own))
    assert check.returncode == 0, check.stderr
    assert "part of a config" in check.stderr, check.stderr
    url = f"https://127.0.0.1:{port}"
    auth = {"Authorization": basic("alice", "correct horse")}
    def fresh():
        """A new connection each time: an open one keeps the config it began with."""
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=False
        session.verify = False
        return session

    assert fresh().get(url + "/health").status_code == 401
    assert fresh().post(url + "/x", data=b"y" * 4096, headers=auth).status_code != 413
    clients = []
    try:
        for _ in range(6):
            c = WssClient()
            c.connect(url, headers=auth)
            clients.append(c)
        assert wait_until(lambda: all(c.transport() == "websocket" for c in clients), 20)
        write("1K")
        reload = corral_cmd("reload", "--keep-workers", "-c", str(own))
        assert reload.returncode == 0, reload.stderr
        assert fresh().post(url + "/x", data=b"y" * 4096, headers=auth).status_code == 413
        scale = corral_cmd("scale", "3", "-c", str(own))
        assert scale.returncode == 0, scale.stderr
        assert wait_until(lambda: len(workers()) == 3, 30), workers()
        assert [c.disconnects for c in clients] == [0] * len(clients)
        assert all(c.transport() == "websocket" for c in clients)
    finally:
        for c in clients:
            c.disconnect()


def test_upgrade_finds_a_prefix_mode_corral_by_its_file(stack):
    """`corral -c corral.toml gunicorn …`, then `corral upgrade -c corral.toml`: the
    probe reads the same command line, the upgrade finds the corral by its file, and
    the workers and websocket clients are carried over (same pids, no disconnect)."""
    from conftest import free_port
    d = Path(tempfile.mkdtemp(prefix="corral-"))
    stack.dirs.append(d)
    own = d / "corral.toml"
    own.write_text("")
    port = free_port()
    workers = seed_line_with_file(stack, own, port, "upgrade")
    before = sorted(w["pid"] for w in workers())
    members = connect_many(f"http://127.0.0.1:{port}", 10)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 20)
        out = corral_cmd("upgrade", "-c", str(own))
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert sorted(w["pid"] for w in workers()) == before
        ok, missing = all_hear_all(members)
        assert ok, missing
        assert [m.disconnects for m in members] == [0] * len(members)
    finally:
        disconnect_all(members)
