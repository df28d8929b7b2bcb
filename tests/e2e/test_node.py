"""Node socket.io workers and the JS socket.io-client (in Node) through corral, and
Engine.IO v3 handshakes from a real server (socket.io with allowEIO3)."""
import json
import re
import shutil
import subprocess

import pytest
import requests

from conftest import APPS, Proc, free_port, wait_http

NODE_DIR = APPS / "node"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir(),
    reason="node or tests/apps/node/node_modules missing (make test-deps installs them)")


def node_worker(stack, name):
    port = free_port()
    p = Proc(["node", str(NODE_DIR / "server.js")], stack.tmp / f"node-{port}.log",
             env={"PORT": str(port), "WORKER": name})
    stack.procs.append(p)
    p.port = port
    wait_http(f"http://127.0.0.1:{port}/health", proc=p.popen, log=p.log)
    stack.workers.append(p)
    return p


def test_js_clients_stick_to_node_workers(stack):
    workers = [node_worker(stack, f"n{i}") for i in range(2)]
    corral = stack.corral([w.port for w in workers])
    out = subprocess.run(["node", str(NODE_DIR / "clients.js"), corral.url, "20"],
                         capture_output=True, text=True, timeout=60, cwd=NODE_DIR)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r for r in report if r["error"]] == []
    assert all(r["upgraded"] for r in report), report
    counts = {}
    for r in report:
        counts[r["worker"]] = counts.get(r["worker"], 0) + 1
    assert sorted(counts.values()) == [10, 10], counts
    assert all(len(r["received"]) == r["expected"] == 10 for r in report), report


def eio3_open(url):
    r = requests.get(url + "/socket.io/?EIO=3&transport=polling&b64=1")
    assert r.status_code == 200, r.text
    m = re.match(r'^(\d+):0(\{.*?\})', r.text)
    assert m, f"not EIO=3 text framing: {r.text!r}"
    return json.loads(m.group(2))["sid"], r.text


def test_eio3_sessions_learned_and_sticky(stack):
    workers = [node_worker(stack, f"n{i}") for i in range(2)]
    corral = stack.corral([w.port for w in workers])
    for _ in range(6):
        sid, first = eio3_open(corral.url)
        base = corral.url + f"/socket.io/?EIO=3&transport=polling&b64=1&sid={sid}"
        for _ in range(4):
            # A ping each time: every request must reach the worker holding the session.
            r = requests.post(base, data="1:2")
            assert r.status_code == 200, r.text
            r = requests.get(base)
            assert r.status_code == 200 and "3" in r.text, r.text
    # Both workers took sessions.
    assert "Session ID unknown" not in corral.output()


def test_eio3_binary_framing_learned(stack):
    """Without b64, an EIO=3 server may answer in binary framing; the sid is found."""
    w1, w2 = node_worker(stack, "a"), node_worker(stack, "b")
    corral = stack.corral([w1.port, w2.port])
    s = requests.Session()
    for _ in range(4):
        r = s.get(corral.url + "/socket.io/?EIO=3&transport=polling",
                  headers={"Accept": "*/*"})
        assert r.status_code == 200
        body = r.content
        start = body.index(b"{")
        sid = json.JSONDecoder().raw_decode(body[start:].decode("utf-8", "replace"))[0]["sid"]
        r = s.post(corral.url + f"/socket.io/?EIO=3&transport=polling&b64=1&sid={sid}", data="1:2")
        assert r.status_code == 200, r.text
