"""Deploys nobody notices: `corral reload --keep-workers` applies a changed config
file under 20 websocket clients without disconnecting one, and refuses a broken
file by name, changing nothing; a rolling restart of the seed's gevent workers
under websocket clients ends in seconds, each client reconnecting once (close code
1012) and receiving broadcasts after, and each old worker exits on SIGTERM instead
of being killed."""
import re
import threading
import time

import requests
import websocket

from clients import connect_many, disconnect_all, wait_until
from conftest import APPS, VENV_BIN
from test_supervisor import Supervised


def gevent_websocket_args():
    # gunicorn's own graceful timeout (30 s) is left as a user has it: a worker that
    # waits for an idle keep-alive connection of corral's would wait all of it.
    return [str(VENV_BIN / "gunicorn"), "-w", "1",
            "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
            "-b", "127.0.0.1:{port}", "--chdir", str(APPS), "chat_app:create_app()"]


class CloseWatcher:
    """A raw Engine.IO websocket that answers pings and records the close code it
    is sent."""

    def __init__(self, port):
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=90)
        assert self.ws.recv().startswith("0")
        self.ws.send("40")
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
                    return
                if data == b"2":
                    self.ws.send("3")
        except Exception as e:  # the test asserts on the code
            self.code = self.code or repr(e)


def test_rolling_restart_of_gevent_workers_under_websockets(stack):
    c = Supervised(stack, 4, command=gevent_websocket_args(), env={"ASYNC_MODE": "gevent"},
                   stop_grace="10s", drain_timeout="30s").wait()
    old = {w["pid"] for w in c.status()}
    members = connect_many(c.url, 40, reconnection=True)
    watcher = CloseWatcher(c.port)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 20)
        started = time.monotonic()
        out = c.admin_cmd("reload")
        took = time.monotonic() - started
        assert out.returncode == 0 and out.stdout.startswith("ok"), (out.stdout, out.stderr)
        assert took <= 60, f"rolling restart took {took:.0f} s"
        new = {str(w["index"]) for w in c.status()}
        assert not old & {w["pid"] for w in c.status()}
        assert wait_until(lambda: watcher.code is not None, 10)
        assert watcher.code == 1012, watcher.code
        assert wait_until(lambda: all(m.sio.connected and m.worker in new for m in members), 30), \
            [(m.idx, m.worker, m.sio.connected) for m in members if m.worker not in new]
        # Drained once: the first worker, then the one it reconnected to.
        assert [len(m.workers_seen) for m in members] == [2] * 40, \
            [(m.idx, m.workers_seen) for m in members if len(m.workers_seen) != 2]
        for m in members:
            m.sio.emit("broadcast", {"from": m.idx, "room": "all"})
        everyone = {m.idx for m in members}
        assert wait_until(lambda: all(everyone <= m.received for m in members), 20), \
            [(m.idx, sorted(everyone - m.received)[:5]) for m in members if not everyone <= m.received]
    finally:
        disconnect_all(members)
    log = c.proc.output()
    assert "SIGKILL" not in log, log[-3000:]
    exits = [float(n) / (1000 if unit == "ms" else 1)
             for n, unit in re.findall(r"worker exited on SIGTERM.*?after=([0-9.]+)(ms|s)\b", log)]
    # Each of the four old workers, each within a few seconds.
    assert len(exits) >= 4 and all(t < 5 for t in exits), (exits, log[-3000:])


def test_reload_keep_workers_changes_the_config_under_websockets(stack):
    c = Supervised(stack, 2, extra='[limits]\nmax_body = "1M"\n[admin]\nlisten = "127.0.0.1:0"\n').wait()
    members = connect_many(c.url, 20, reconnection=True)
    access = stack.tmp / f"access-{c.mark}.log"
    big = b"x" * (2 * 1024 * 1024)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 20)
        assert requests.post(c.url + "/upload", data=big, timeout=30).status_code == 413
        original = c.config.read_text()
        changed = (original.replace('max_body = "1M"', 'max_body = "4M"').replace("count = 2", "count = 3")
                   + f'\n[access_log]\nenabled = true\npath = "{access}"\n')
        c.config.write_text(changed)
        out = c.admin_cmd("reload", "--keep-workers")
        assert out.returncode == 0, (out.stdout, out.stderr)
        for key in ["limits.max_body", "workers.count", "access_log.enabled"]:
            assert key in out.stdout, out.stdout
        r = requests.post(c.url + "/upload", data=big, timeout=30)
        assert r.status_code == 200 and r.json()["received"] == len(big)
        assert [w["state"] for w in c.status()] == ["up"] * 3
        assert wait_until(lambda: "POST /upload" in (access.read_text() if access.exists() else ""), 10)
        # A broken file: refused, named, and the running config stays.
        c.config.write_text(changed.replace('max_body = "4M"', 'max_body = "4MB"'))
        out = c.admin_cmd("reload", "--keep-workers")
        assert out.returncode != 0, out.stdout
        assert "limits.max_body" in out.stderr and str(c.config) in out.stderr, out.stderr
        assert requests.post(c.url + "/upload", data=big, timeout=30).status_code == 200
        assert len(c.status()) == 3
        time.sleep(1)
        assert all(m.sio.connected for m in members)
        assert [m.disconnects for m in members] == [0] * 20
        for m in members:
            m.sio.emit("broadcast", {"from": m.idx, "room": "all"})
        everyone = {m.idx for m in members}
        assert wait_until(lambda: all(everyone <= m.received for m in members), 20)
    finally:
        disconnect_all(members)
    reloads = c.status_json()["reloads"]
    assert [r["applied"] for r in reloads] == [True, False], reloads
    assert "limits.max_body" in reloads[0]["changed"] and "limits.max_body" in reloads[1]["error"]
