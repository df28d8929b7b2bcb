"""A Flask-SocketIO app used by corral's end-to-end tests.

Run one worker per port, e.g.
    gunicorn -w 1 --threads 100 -b 127.0.0.1:5000 'chat_app:create_app()'

Environment:
    ASYNC_MODE       threading (default), gevent or gevent_uwsgi...
    CORRAL_MESSAGE_QUEUE  message queue URL (optional)
    PING_INTERVAL    Engine.IO ping interval in seconds (default 25)
    PORT / CORRAL_WORKER_ID  shown by /whoami
"""
import os
import time

from flask import Flask, jsonify, request
from flask_socketio import SocketIO, emit, join_room

socketio = SocketIO()


def worker_name():
    return os.environ.get("CORRAL_WORKER_ID") or os.environ.get("PORT") or str(os.getpid())


def create_app():
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test"

    @app.get("/health")
    def health():
        return "ok"

    @app.get("/whoami")
    def whoami():
        return jsonify(worker=worker_name(), pid=os.getpid())

    @app.route("/echo", methods=["GET", "POST", "PUT"])
    def echo():
        return jsonify(
            worker=worker_name(),
            method=request.method,
            path=request.full_path,
            headers={k: v for k, v in request.headers.items()},
            remote_addr=request.remote_addr,
        )

    @app.post("/upload")
    def upload():
        # Reads the body in chunks: the worker never holds it whole either.
        total = 0
        stream = request.stream
        while True:
            chunk = stream.read(1 << 16)
            if not chunk:
                break
            total += len(chunk)
        return jsonify(worker=worker_name(), received=total)

    @app.get("/sleep")
    def sleep():
        time.sleep(float(request.args.get("s", "1")))
        return "slept"

    @app.get("/big")
    def big():
        n = int(request.args.get("n", "1048576"))
        return b"x" * n

    mode = os.environ.get("ASYNC_MODE", "threading")
    socketio.init_app(
        app,
        async_mode=mode,
        message_queue=os.environ.get("CORRAL_MESSAGE_QUEUE") or None,
        ping_interval=float(os.environ.get("PING_INTERVAL", "25")),
        cors_allowed_origins=os.environ.get("CORS_ORIGINS") or None,
    )
    return app


@socketio.on("connect")
def on_connect(auth=None):
    join_room("all")
    emit("welcome", {"worker": worker_name(), "sid": request.sid})


@socketio.on("join")
def on_join(data):
    join_room(data["room"])
    return {"worker": worker_name()}


@socketio.on("broadcast")
def on_broadcast(data):
    socketio.emit("message", data, to=data.get("room", "all"))
    return "ok"


@socketio.on("whoami")
def on_whoami():
    return {"worker": worker_name()}
