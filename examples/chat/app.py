"""A small Flask-SocketIO chat: the app the seed's user runs, in miniature.

    gunicorn -w 1 --threads 100 -b 127.0.0.1:5000 'app:create_app()'

Several of these run behind corral; each page shows which worker served its session.
The socket.io client is vendored in static/ (from the socket.io-client npm package),
so the page needs no CDN.
"""
import os

from flask import Flask, render_template_string
from flask_socketio import SocketIO, emit

socketio = SocketIO()

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>corral chat</title>
<style>
 body { font: 15px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
 #log { border: 1px solid #ccc; height: 20em; overflow-y: auto; padding: .5em; }
 #worker { color: #555; }
</style></head>
<body>
<h1>corral chat</h1>
<p id="worker">connecting…</p>
<div id="log"></div>
<form id="form"><input id="text" autocomplete="off" size="40"> <button>Send</button></form>
<script src="{{ url_for('static', filename='socket.io.min.js') }}"></script>
<script>
  const socket = io();
  const log = document.getElementById('log');
  function line(text) {
    const p = document.createElement('div');
    p.className = 'msg';
    p.textContent = text;
    log.appendChild(p);
    log.scrollTop = log.scrollHeight;
  }
  socket.on('welcome', d => {
    document.getElementById('worker').textContent =
      'session ' + d.sid + ' on worker ' + d.worker;
    document.body.dataset.worker = d.worker;
  });
  socket.on('chat', d => line(d.worker + ': ' + d.text));
  document.getElementById('form').addEventListener('submit', e => {
    e.preventDefault();
    const t = document.getElementById('text');
    if (t.value) socket.emit('chat', t.value);
    t.value = '';
  });
</script>
</body></html>
"""


def worker_name():
    return os.environ.get("CORRAL_WORKER_ID") or os.environ.get("PORT") or str(os.getpid())


def create_app():
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY", "change-me")

    @app.get("/")
    def index():
        return render_template_string(PAGE)

    @app.get("/health")
    def health():
        return "ok"

    # Without a message queue a message reaches the clients of one worker only.
    queue = os.environ.get("CORRAL_MESSAGE_QUEUE") or os.environ.get("REDIS_URL")
    socketio.init_app(app, async_mode=os.environ.get("ASYNC_MODE", "threading"),
                      message_queue=queue or None)
    return app


@socketio.on("connect")
def on_connect(auth=None):
    from flask import request
    emit("welcome", {"worker": worker_name(), "sid": request.sid})


@socketio.on("chat")
def on_chat(text):
    socketio.emit("chat", {"worker": worker_name(), "text": str(text)[:500]})
