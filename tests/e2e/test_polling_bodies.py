"""Engine.IO polling POST bodies reach the worker whole: python-socketio on aiohttp
reads a POST body with one read of Content-Length bytes and gets only what has
arrived, so a proxy that streams the body in pieces cuts messages (nginx buffers it,
and so does corral on the Engine.IO path).

That one read also caps what aiohttp can take at all: asyncio reads at most 256 KiB
per recv and a fresh loopback connection holds ~128 KiB, so a 900 KiB message is cut
even with no proxy (0 of 10 direct on the development machine). The 900 KiB case is
therefore run on the same AsyncServer under ASGI (uvicorn), whose driver reads the
whole body."""
import os
import sys

import socketio

from conftest import APPS, free_port


def aiohttp_worker(stack):
    port = free_port()
    args = [sys.executable, str(APPS / "aiohttp_app.py"), str(port)]
    return stack._worker(args, port, "aiohttp", None)


def echo_over_polling(url, size, count):
    """Sends `count` binary messages of `size` bytes over long-polling, each waiting
    for its echo; returns how many came back whole. A session a cut message broke
    is replaced by a new one."""
    ok = 0
    client = None
    for _ in range(count):
        payload = os.urandom(size)
        try:
            if client is None or not client.connected:
                client = socketio.Client(reconnection=False, request_timeout=10)
                client.connect(url, transports=["polling"], wait_timeout=10)
            ok += client.call("echo", payload, timeout=10) == payload
        except Exception as e:  # counted as a failure; printed for the report
            print(f"message lost: {e!r}")
            client = None
    if client is not None:
        client.eio.disconnect(abort=True)
    return ok


def test_polling_messages_reach_aiohttp_whole(stack):
    """Streamed in pieces, 2-4 of 10 were lost (18 of 20 on a quiet machine)."""
    w = aiohttp_worker(stack)
    corral = stack.corral([w.port], extra='[limits]\nmax_body = "4M"\n')
    assert echo_over_polling(corral.url, 64 * 1024, 20) == 20, w.output()[-2000:]


def test_900k_polling_messages_arrive_whole(stack):
    w = stack.uvicorn()
    corral = stack.corral([w.port], extra='[limits]\nmax_body = "4M"\n')
    assert echo_over_polling(corral.url, 900 * 1024, 20) == 20, w.output()[-2000:]
