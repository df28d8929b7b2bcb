"""A worker deaf to the message queue: of two supervised workers, one runs the app
without `message_queue`. corral traces each embedded-queue connection to the worker
holding it: /status.json says `mq_subscribed: false` for that worker and true for the
other, /metrics has corral_worker_mq_subscribed, and once the deaf worker has had
sessions for the grace period (`message_queue.unsubscribed_grace`, short here)
/status.json calls it `deaf`. With the queue everywhere no worker is ever deaf."""
import time

import requests

from clients import connect_many, disconnect_all, wait_until
from test_supervisor import Supervised, gunicorn_args

GRACE = 2
ADMIN = f'[admin]\nlisten = "127.0.0.1:0"\n[message_queue]\nunsubscribed_grace = "{GRACE}s"\n'


def test_a_worker_without_the_queue_is_found_and_named(stack):
    # Worker 0 starts without the queue's URL, as an app that forgot message_queue.
    script = ('if [ "{id}" = "0" ]; then unset CORRAL_MESSAGE_QUEUE; fi; '
              "exec " + " ".join(f"'{a}'" for a in gunicorn_args()))
    c = Supervised(stack, 2, command=["/bin/sh", "-c", script], extra=ADMIN).wait()

    def states():
        return {w["id"]: w["mq"] for w in c.status_json()["workers"]}

    # Idle, neither has subscribed (python-socketio does at its first session):
    # both waiting, neither called deaf, well past the grace period.
    assert wait_until(lambda: states() == {0: "waiting", 1: "waiting"}, 10), states()
    time.sleep(GRACE + 2)
    assert states() == {0: "waiting", 1: "waiting"}, states()
    members = connect_many(c.url, 10)
    try:
        assert not [m.error for m in members if m.error]

        def flags():
            return {w["id"]: w["mq_subscribed"] for w in c.status_json()["workers"]}

        assert wait_until(lambda: sorted(map(str, flags().values())) == ["False", "True"], 20), flags()
        status = {w["index"]: w for w in c.status()}
        assert status[0]["mq_subscribed"] is False and status[1]["mq_subscribed"] is True, status
        deaf = status[0]
        metrics = requests.get(f"http://{c.status_addr}/metrics", timeout=10).text
        assert "corral_worker_mq_subscribed" in metrics
        # Deaf once it has had sessions for the grace period; the other never.
        assert wait_until(lambda: states() == {0: "deaf", 1: "subscribed"}, 20), states()
        assert deaf["pid"] == c.status_json()["workers"][0]["pid"]
    finally:
        disconnect_all(members)


def test_workers_with_the_queue_are_never_warned_of(stack):
    c = Supervised(stack, 2, extra=ADMIN).wait()
    members = connect_many(c.url, 10)
    try:
        assert wait_until(lambda: all(w["mq"] == "subscribed" for w in c.status_json()["workers"]), 20)
        # Past the grace period and two looks of the watch (every 2 s): never deaf.
        deadline = time.monotonic() + GRACE + 5
        while time.monotonic() < deadline:
            assert all(w["mq"] == "subscribed" for w in c.status_json()["workers"])
            time.sleep(0.5)
    finally:
        disconnect_all(members)
