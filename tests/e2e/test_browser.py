"""A real browser (Debian's Chromium, driven by playwright-core) uses the chat example
through corral: two browser contexts on different workers, over TLS with basic auth,
see each other's messages through the embedded message queue; the status page is
screenshotted."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import APPS, ROOT, free_port
from test_supervisor import Supervised

NODE = APPS / "node"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or not (NODE / "node_modules" / "playwright-core").is_dir(),
    reason="chromium and playwright-core are installed by .ci/run")


def test_two_browsers_chat_across_workers(stack):
    example = ROOT / "examples" / "chat"
    https, admin = free_port(), free_port()
    extra = (f'[[listener]]\naddress = "127.0.0.1:{https}"\ntls = "self-signed"\n'
             f'[auth]\nhtpasswd = "{example / "htpasswd"}"\nexempt = ["/health"]\n'
             f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    command = [str(Path(__import__("sys").executable).parent / "gunicorn"), "-w", "1", "--threads", "100",
               "-b", "127.0.0.1:{port}", "--chdir", str(example), "app:create_app()"]
    c = Supervised(stack, 2, command=command, extra=extra).wait()
    shot = stack.tmp / "status.png"
    out = subprocess.run(["node", str(NODE / "browser.js"), f"https://127.0.0.1:{https}/",
                          f"http://127.0.0.1:{admin}", str(shot), "demo", "demo"],
                         capture_output=True, text=True, timeout=120, cwd=NODE)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = report["pages"]
    assert a["worker"] != b["worker"], report["pages"]
    for p in (a, b):
        assert p["transport"] == "websocket"
        assert any("hello from A" in m for m in p["messages"]) and any("hello from B" in m for m in p["messages"])
    status = report["status"]
    assert sorted(w["sessions"] for w in status["workers"]) == [1, 1]
    assert status["message_queue"]["kind"] == "embedded"
    assert shot.stat().st_size > 10_000
    if __import__("os").environ.get("CORRAL_UPDATE_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "status.png")
