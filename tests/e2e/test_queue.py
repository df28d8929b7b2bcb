"""The message queue joining the workers: Flask-SocketIO on 3 gunicorn workers started
by corral, with the embedded broker, with a real redis-server, and with none (which
must fail); Node socket.io with @socket.io/redis-adapter through the embedded broker."""
import json
import shutil
import subprocess

import pytest

from clients import connect_many, disconnect_all, spread, wait_until
from conftest import APPS
from test_broker import start_redis
from test_supervisor import Supervised, toml_list

N = 60


def broadcast_all(members):
    for m in members:
        m.sio.emit("broadcast", {"from": m.idx, "room": "all"})


@pytest.mark.parametrize("mode", ["embedded", "redis-server", "no-queue"])
def test_room_broadcast_reaches_every_client(stack, mode):
    extra = ""
    if mode == "redis-server":
        port = start_redis(stack)
        extra = f'[message_queue]\nurl = "redis://127.0.0.1:{port}/0"\n'
    elif mode == "no-queue":
        extra = "[message_queue]\nembedded = false\n"
    c = Supervised(stack, 3, extra=extra).wait()
    members = connect_many(c.url, N)
    try:
        assert not [m.error for m in members if m.error]
        counts = spread(members)
        assert sorted(counts.values()) == [20, 20, 20], counts
        broadcast_all(members)
        everyone = set(range(N))
        if mode == "no-queue":
            # Negative control: each broadcast stays on its own worker.
            wait_until(lambda: all(len(m.received) >= 20 for m in members), 20)
            import time
            time.sleep(1)
            assert all(len(m.received) == 20 for m in members), [len(m.received) for m in members]
        else:
            ok = wait_until(lambda: all(m.received == everyone for m in members), 30)
            missing = [(m.idx, len(m.received)) for m in members if m.received != everyone]
            assert ok, f"clients missing broadcasts: {missing[:10]}"
    finally:
        disconnect_all(members)
    log = c.proc.output()
    if mode == "embedded":
        assert "embedded broker listening" in log
    assert "Invalid session" not in log


@pytest.mark.skipif(shutil.which("node") is None or not (APPS / "node" / "node_modules" / "@socket.io").is_dir(),
                    reason="node packages missing")
def test_node_redis_adapter_through_embedded_broker(stack):
    node = APPS / "node"
    c = Supervised(stack, 2, command=["node", str(node / "server.js")]).wait()
    out = subprocess.run(["node", str(node / "clients.js"), c.url, "20", "all"],
                         capture_output=True, text=True, timeout=60, cwd=node)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r for r in report if r["error"]] == []
    workers = {r["worker"] for r in report}
    assert len(workers) == 2, workers
    assert all(len(r["received"]) == r["expected"] == 20 for r in report), \
        [(r["worker"], len(r["received"])) for r in report]
    assert "message queue redis://" in c.proc.output()
