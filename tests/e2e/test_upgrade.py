"""`corral upgrade` under load: websocket and polling-only python-socketio clients of
a Flask-SocketIO app under the seed's gevent gunicorn workers, with the embedded
message queue, and a loop of fresh HTTP connections, go through an upgrade to
another file in the same process with nothing refused, failed or disconnected,
and every broadcast after it heard by every client; a binary that cannot take
over is refused and nothing changes."""
import os
import shutil
import time

import requests

from clients import WssClient, connect_many, disconnect_all, wait_until
from conftest import corral_binary, free_port
from test_reload import gevent_websocket_args
from test_supervisor import Load, Supervised


def broadcast_heard_by_all(members, senders):
    """Each sender broadcasts in turn and every member must hear it. One at a time:
    python-engineio's polling client misses messages of a burst of broadcasts from
    many clients at once (measured straight against the worker, no corral)."""
    for sender in senders:
        token = f"{sender.idx}-{time.monotonic()}"
        sender.sio.emit("broadcast", {"from": token, "room": "all"})
        if not wait_until(lambda: all(token in m.received for m in members), 20):
            return [m.idx for m in members if token not in m.received]
    return []


def test_upgrade_in_place_under_websockets_polling_and_fresh_connections(stack, tmp_path):
    c = Supervised(stack, 2, command=gevent_websocket_args(), env={"ASYNC_MODE": "gevent"},
                   extra='[admin]\nlisten = "127.0.0.1:0"\n').wait()
    pid = c.proc.pid
    workers = sorted(w["pid"] for w in c.status())
    # No reconnection: a dropped client stays dropped, and is counted.
    sockets = connect_many(c.url, 30)
    polling = connect_many(c.url, 10, transports=["polling"])
    for i, m in enumerate(polling):
        m.idx = 100 + i
    members = sockets + polling
    senders = [sockets[0], polling[0], sockets[-1], polling[-1]]
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in sockets), 20)
        assert all(m.transport == "polling" for m in polling)
        assert broadcast_heard_by_all(members, senders) == []
        # Another file: this build copied, or the build CORRAL_NEXT_BIN names.
        next_build = tmp_path / "corral-next"
        shutil.copy2(os.environ.get("CORRAL_NEXT_BIN") or corral_binary(), next_build)
        with Load(c.url, seconds=120, fresh=True) as load:
            assert wait_until(lambda: load.ok >= 20, 20), load.failures[:5]
            started = time.monotonic()
            out = c.admin_cmd("upgrade", "--binary", str(next_build))
            took = time.monotonic() - started
            assert out.returncode == 0, (out.stdout, out.stderr)
            assert "upgraded: pid" in out.stdout, out.stdout
            after = load.ok
            assert wait_until(lambda: load.ok >= after + 20, 20), load.failures[:5]
        print(f"upgrade took {took:.2f} s; {load.ok} fresh requests around it")
        assert load.failures == [], load.failures[:5]
        assert os.readlink(f"/proc/{pid}/exe") == str(next_build)
        assert sorted(w["pid"] for w in c.status()) == workers
        assert broadcast_heard_by_all(members, senders) == []
        assert [m.disconnects for m in members] == [0] * len(members)
        assert all(m.sio.connected for m in members)
        record = c.status_json()["upgrades"][-1]
        assert record["binary"] == str(next_build), record
        assert record["carried"]["workers"] == 2, record
        assert record["carried"]["tunnels"] == 30, record
        assert record["carried"]["sessions"] >= 10, record
        assert record["carried"]["message queue clients"] >= 2, record
        assert record["closed"] == {}, record

        # A binary that cannot take over: refused, nothing let go.
        out = c.admin_cmd("upgrade", "--binary", "/bin/false")
        assert out.returncode != 0 and "/bin/false" in out.stderr, (out.stdout, out.stderr)
        assert os.readlink(f"/proc/{pid}/exe") == str(next_build)
        assert len(c.status_json()["upgrades"]) == 1
        assert broadcast_heard_by_all(members, senders) == []
        assert [m.disconnects for m in members] == [0] * len(members)
    finally:
        disconnect_all(members)


def test_upgrade_over_tls_closes_what_it_cannot_carry_and_clients_come_back(stack):
    """Over TLS (this kernel has no kTLS to hold a session): each wss client gets
    1012 after the frame in flight and reconnects at once; an https long-poll in
    flight is answered or cut at the drain period and its client reconnects. The
    figures are printed for docs/upgrade.md; every client hears broadcasts after."""
    import socketio
    port = free_port()
    c = Supervised(stack, 2, command=gevent_websocket_args(), env={"ASYNC_MODE": "gevent"},
                   extra=f'[[listener]]\naddress = "127.0.0.1:{port}"\ntls = "self-signed"\n'
                         '[admin]\nlisten = "127.0.0.1:0"\n').wait()
    url = f"https://127.0.0.1:{port}"
    received = {}
    wss, polling = [], []
    try:
        for i in range(10):
            # The asyncio client: the sync one races on its own TLS socket (WssClient).
            sio = WssClient(reconnection=True)
            got = received.setdefault(i, set())
            sio.on("message", lambda d, got=got: got.add(d["from"]))
            sio.connect(url, wait_timeout=10)
            wss.append(sio)
        for i in range(100, 105):
            session = requests.Session()
            session.trust_env = False
            session.verify = False
            sio = socketio.Client(ssl_verify=False, http_session=session, reconnection=True,
                                  reconnection_delay=0.2, reconnection_delay_max=0.5)
            got = received.setdefault(i, set())
            sio.on("message", lambda d, got=got: got.add(d["from"]))
            sio.connect(url, transports=["polling"], wait_timeout=10)
            polling.append(sio)
        assert wait_until(lambda: all(s.transport() == "websocket" for s in wss), 15)
        started = time.monotonic()
        out = c.admin_cmd("upgrade")
        took = time.monotonic() - started
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert wait_until(lambda: all(s.connected_at and s.connected_at[-1] > started for s in wss), 15)
        assert all(s.disconnects == 1 for s in wss), [s.disconnects for s in wss]
        back = [s.connected_at[-1] - s.disconnected_at[-1] for s in wss]
        assert wait_until(lambda: all(p.connected for p in polling), 15)
        record = c.status_json()["upgrades"][-1]
        assert record["closed"].get("tunnels (TLS: 1012 sent)") == 10, record
        assert record["closed"].get("long-polls (TLS or HTTP/2: answered 503)", 0) <= 5, record
        assert "requests (still open after the drain period)" not in record["closed"], record
        print(f"TLS upgrade took {took:.2f} s; wss reconnect took "
              f"{min(back) * 1000:.0f}-{max(back) * 1000:.0f} ms; closed: {record['closed']}")
        for n, sender in enumerate([wss[0], polling[0]]):
            sender.emit("broadcast", {"from": n, "room": "all"})
            assert wait_until(lambda: all(n in got for got in received.values()), 20), \
                [i for i, got in received.items() if n not in got]
    finally:
        for s in wss:
            s.disconnect()
        for p in polling:
            p.disconnect()
