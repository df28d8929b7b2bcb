"""A python-socketio AsyncServer on aiohttp, used by corral's tests.

    python aiohttp_app.py PORT

python-engineio's aiohttp driver reads a polling POST body with one
`request.content.read(CONTENT_LENGTH)`, which returns only what has arrived: a proxy
that streams the body in pieces loses messages here, so this app tests that corral
sends an Engine.IO POST whole.
"""
import sys

import socketio
from aiohttp import web

# Room for the 900 KiB messages of the test (python-engineio's default is 1 MB).
sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=4_000_000)
app = web.Application()
sio.attach(app)


async def health(request):
    return web.Response(text="ok")


app.router.add_get("/health", health)


@sio.event
async def echo(sid, data):
    return data


if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
