"""The container image's entrypoint, run the way the image runs it but without a
container runtime (`make test-container` runs the image itself): the Dockerfile's
ENTRYPOINT + CMD run here as PID 1 of a new pid namespace (`unshare --pid --fork
--mount-proc`, as `docker run` makes it), on a copy of /app (examples/chat) whose
listeners are moved to free loopback ports. Checked: the Dockerfile's conventions, the
workers start and /readyz turns 200, the image's HEALTHCHECK command passes, a
Socket.IO client gets in over wss with basic auth, and SIGTERM (docker stop) ends it
cleanly."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from clients import WssClient, wait_until
from conftest import ROOT, VENV_BIN, corral_binary, free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name):
    """The last `NAME ...` line of the final stage, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    lines = [l for l in text.splitlines() if l.startswith(name + " ")]
    assert lines, f"no {name} in the Dockerfile"
    return lines[-1][len(name) + 1:].strip()


def test_dockerfile_is_conventional():
    assert DOCKERFILE.count("FROM ") >= 2, "multi-stage: build, then a slim runtime"
    final = DOCKERFILE.split("FROM ")[-1].splitlines()[0].strip()
    # The final base, through its build argument's default (make image may name another).
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.M))
    final = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), final)
    assert "slim" in final, final
    assert instruction("USER") not in ("root", "0")
    assert instruction("STOPSIGNAL") == "SIGTERM"
    assert set(instruction("EXPOSE").split()) >= {"8443", "8000", "9000"}
    assert "/readyz" in instruction("HEALTHCHECK")
    assert json.loads(instruction("ENTRYPOINT")) == ["corral"]


def test_entrypoint_as_pid_1(tmp_path):
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        assert os.environ.get("CI") != "true", f"unshare refused under CI: {probe.stderr!r}"
        import pytest
        pytest.skip(f"unshare --pid refused here: {probe.stderr!r}")
    cmd = json.loads(instruction("ENTRYPOINT")) + json.loads(instruction("CMD"))
    assert cmd[:3] == ["corral", "run", "-c"] and cmd[3].startswith("/app/"), cmd
    # /app as the image has it, its listeners on free loopback ports.
    app = tmp_path / "app"
    shutil.copytree(ROOT / "examples" / "chat", app)
    ports = {}
    config = app / Path(cmd[3]).name
    text = config.read_text()
    for old in sorted(set(re.findall(r'"0\.0\.0\.0:(\d+)"', text))):
        ports[old] = free_port()
        text = text.replace(f'"0.0.0.0:{old}"', f'"127.0.0.1:{ports[old]}"')
    config.write_text(text)
    https, admin = ports["8443"], ports["9000"]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", CORRAL_LOG="info")
    log = open(tmp_path / "corral.log", "wb")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         corral_binary(), *cmd[1:3], str(config)],
        cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    logtext = lambda: (tmp_path / "corral.log").read_text(errors="replace")
    try:
        def ready():
            try:
                return requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        assert wait_until(ready, 60), logtext()
        assert "running as PID 1" in logtext()
        # The image's HEALTHCHECK command, pointed at this admin port.
        health = json.loads(re.search(r"CMD (\[.*\])", instruction("HEALTHCHECK")).group(1))
        health = [a.replace("127.0.0.1:9000", f"127.0.0.1:{admin}") for a in health]
        health[0] = sys.executable
        assert subprocess.run(health, timeout=10).returncode == 0
        # A Socket.IO client over wss with the demo credentials (the asyncio client:
        # the sync one races on its own TLS socket, see WssClient).
        sio = WssClient()
        got = []
        sio.on("message", lambda d: got.append(d))
        sio.connect(f"https://127.0.0.1:{https}", wait_timeout=10,
                    headers={"Authorization": "Basic ZGVtbzpkZW1v"})
        try:
            assert wait_until(lambda: sio.transport() == "websocket", 10)
        finally:
            sio.disconnect()
        # docker stop: SIGTERM to PID 1.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, logtext()
        assert "every worker stopped" in logtext()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
