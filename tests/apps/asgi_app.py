"""A python-socketio ASGI app (AsyncServer) for uvicorn, used by corral's tests.

    uvicorn --port 5000 asgi_app:app
"""
import os

import socketio

# The message queue corral runs, when it supervises this app's workers.
queue = os.environ.get("CORRAL_MESSAGE_QUEUE")
# Room for the 900 KiB polling messages of the body tests (base64 on polling).
sio = socketio.AsyncServer(async_mode="asgi", max_http_buffer_size=4_000_000,
                           client_manager=socketio.AsyncRedisManager(queue) if queue else None)


def worker_name():
    return os.environ.get("CORRAL_WORKER_ID") or os.environ.get("PORT") or str(os.getpid())


async def health(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


app = socketio.ASGIApp(sio, other_asgi_app=health)


@sio.event
async def connect(sid, environ, auth=None):
    await sio.enter_room(sid, "all")
    await sio.emit("welcome", {"worker": worker_name(), "sid": sid}, to=sid)


@sio.event
async def broadcast(sid, data):
    await sio.emit("message", data, room=data.get("room", "all"))
    return "ok"


@sio.event
async def echo(sid, data):
    return data
