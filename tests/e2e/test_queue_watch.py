"""A worker deaf to the message queue: of two supervised workers, one runs the app
without `message_queue`. corral traces each embedded-queue connection to the worker
holding it: /status.json says `mq_subscribed: false` for that worker and true for the
other, /metrics has corral_worker_mq_subscribed, and once the deaf worker has had
sessions for the grace period the log names it, once. With the queue everywhere
nothing is said."""
import time

import requests

from clients import connect_many, disconnect_all, wait_until
from test_supervisor import Supervised, gunicorn_args

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'


def test_a_worker_without_the_queue_is_found_and_named(stack):
    # Worker 0 starts without the queue's URL, as an app that forgot message_queue.
    script = ('if [ "{id}" = "0" ]; then unset CORRAL_MESSAGE_QUEUE; fi; '
              "exec " + " ".join(f"'{a}'" for a in gunicorn_args()))
    c = Supervised(stack, 2, command=["/bin/sh", "-c", script], extra=ADMIN).wait()
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
        # The warning comes once the deaf worker has had sessions for the grace period.
        assert wait_until(lambda: "no subscription on the message queue" in c.proc.output(), 40)
        log = c.proc.output()
        line = next(l for l in log.splitlines() if "no subscription on the message queue" in l)
        assert f"pid={deaf['pid']}" in line, line
        time.sleep(3)
        assert c.proc.output().count("no subscription on the message queue") == 1
    finally:
        disconnect_all(members)


def test_workers_with_the_queue_are_never_warned_of(stack):
    c = Supervised(stack, 2, extra=ADMIN).wait()
    members = connect_many(c.url, 10)
    try:
        assert wait_until(lambda: all(w["mq_subscribed"] is True for w in c.status_json()["workers"]), 20)
        time.sleep(24)
        assert "no subscription on the message queue" not in c.proc.output()
        assert all(w["mq_subscribed"] is True for w in c.status_json()["workers"])
    finally:
        disconnect_all(members)
