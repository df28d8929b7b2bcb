"""Engine.IO sticky routing with real Flask-SocketIO workers under gunicorn.

Every client comes from 127.0.0.1, so nothing but corral's sid routing can keep a
session on its worker, and nothing but its balancing can spread the sessions.
"""
import pytest

from clients import connect_many, disconnect_all, spread, wait_until

N_CLIENTS = 50


def broadcast_and_check(members):
    """Each client broadcasts to room 'all'; without a message queue a broadcast
    reaches exactly the clients on the sender's worker."""
    for m in members:
        m.sio.emit("broadcast", {"from": m.idx, "room": "all"})
    expected = {}
    for m in members:
        expected.setdefault(m.worker, set()).add(m.idx)

    def done():
        return all(m.received == expected[m.worker] for m in members)

    wait_until(done, 20)
    wrong = [(m.idx, m.worker, sorted(expected[m.worker] - m.received), sorted(m.received - expected[m.worker]))
             for m in members if m.received != expected[m.worker]]
    assert not wrong, f"clients missing/extra broadcasts (idx, worker, missing, extra): {wrong[:5]}"


@pytest.mark.parametrize("n_workers", [2, 4])
def test_fifty_clients_stick_upgrade_and_spread(stack, n_workers):
    workers = [stack.gunicorn() for _ in range(n_workers)]
    corral = stack.corral([w.port for w in workers])
    members = connect_many(corral.url, N_CLIENTS)
    try:
        errors = [m.error for m in members if m.error]
        assert not errors, f"{len(errors)} clients failed to connect: {errors[:3]}"
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 20), \
            f"not upgraded: {[m.idx for m in members if m.transport != 'websocket']}"
        broadcast_and_check(members)
        counts = spread(members)
        assert len(counts) == n_workers, counts
        even = N_CLIENTS / n_workers
        for worker, n in counts.items():
            assert abs(n - even) <= 0.2 * even, f"uneven spread {counts}"
    finally:
        disconnect_all(members)
    logs = stack.worker_logs()
    assert "Invalid session" not in logs
    assert "Session ID unknown" not in corral.output()


def test_without_stickiness_sessions_thrash(stack):
    """Negative control: the same test with sid routing turned off (what
    `gunicorn -w N` does) must fail, proving the test can see the difference."""
    workers = [stack.gunicorn() for _ in range(2)]
    corral = stack.corral([w.port for w in workers], extra="[engineio]\nsticky = false\n")
    members = connect_many(corral.url, 20)
    try:
        failed = [m for m in members if m.error]
        # Sessions that did connect are still broken somewhere: the worker logs it.
        assert failed or "Invalid session" in stack.worker_logs(), "round-robin routing did not break sessions?"
    finally:
        disconnect_all(members)
    assert "Invalid session" in stack.worker_logs()


def test_ip_hash_puts_one_address_on_one_worker(stack):
    """What the seed's nginx ip_hash did: every client from one address lands on one
    worker. The default least-connections spreads them (test above)."""
    workers = [stack.gunicorn() for _ in range(2)]
    corral = stack.corral([w.port for w in workers], extra='[balance]\npolicy = "ip-hash"\n')
    members = connect_many(corral.url, 20)
    try:
        assert not [m.error for m in members if m.error]
        assert list(spread(members).values()) == [20]
    finally:
        disconnect_all(members)


def test_polling_only_clients_stick(stack):
    """Clients that never upgrade: every GET and POST must reach the session's worker,
    and a long-poll that waits a whole ping interval must not time out."""
    env = {"PING_INTERVAL": "3"}
    workers = [stack.gunicorn(env=env) for _ in range(3)]
    corral = stack.corral([w.port for w in workers], extra='[timeouts]\nread = "1s"\n')
    members = connect_many(corral.url, 12, transports=["polling"])
    try:
        assert not [m.error for m in members if m.error]
        assert all(m.transport == "polling" for m in members)
        # Idle longer than a ping interval: long-polls wait ~3 s each, above `read`.
        import time
        time.sleep(5)
        assert all(m.sio.connected for m in members)
        broadcast_and_check(members)
        assert len(spread(members)) == 3
    finally:
        disconnect_all(members)
    assert "Invalid session" not in stack.worker_logs()


# (worker spec, transport the sessions end on). gunicorn's plain gevent worker cannot
# serve websockets with gevent-websocket installed (python-engineio refuses), so its
# sessions stay on long-polling: the harder case for stickiness.
STACKS = {
    "gunicorn-gevent": (dict(worker_class="gevent", env={"ASYNC_MODE": "gevent"}), "polling"),
    "gunicorn-geventwebsocket": (dict(
        worker_class="geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
        env={"ASYNC_MODE": "gevent"}), "websocket"),
    "uvicorn-asgi": (None, "websocket"),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_other_stacks_stick_and_spread(stack, name):
    """The same guarantees with the seed's GeventWebSocketWorker, gunicorn's gevent
    worker, and python-socketio's ASGI server under uvicorn."""
    spec, transport = STACKS[name]
    if spec is None:
        workers = [stack.uvicorn() for _ in range(2)]
    else:
        workers = [stack.gunicorn(**spec) for _ in range(2)]
    corral = stack.corral([w.port for w in workers])
    members = connect_many(corral.url, 20)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == transport for m in members), 20)
        broadcast_and_check(members)
        assert all(m.transport == transport for m in members)
        assert sorted(spread(members).values()) == [10, 10]
    finally:
        disconnect_all(members)
    assert "Invalid session" not in stack.worker_logs()
