"""What corral shows: /metrics parsed by the Prometheus parser and moving with the
traffic, /status.json agreeing with what the clients saw, the status page served
whole by corral, the access log."""
import json
import time

import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from clients import connect_many, disconnect_all, spread, wait_until
from conftest import free_port


def scrape(url):
    r = requests.get(url + "/metrics")
    assert r.status_code == 200
    # OpenMetrics, parsed by the Prometheus client's strict OpenMetrics parser.
    assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = s.value
    return samples


def total(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == str(val) for k, val in labels.items()))


def test_metrics_and_status_follow_the_traffic(stack):
    workers = [stack.gunicorn() for _ in range(2)]
    admin = free_port()
    corral = stack.corral([w.port for w in workers], extra=f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    admin_url = f"http://127.0.0.1:{admin}"
    wait_until(lambda: requests.get(admin_url + "/metrics").status_code == 200, 5)
    before = scrape(admin_url)
    assert total(before, "corral_engineio_sessions") == 0
    for _ in range(10):
        assert requests.get(corral.url + "/whoami").status_code == 200
    members = connect_many(corral.url, 12)
    try:
        assert not [m.error for m in members if m.error]
        assert wait_until(lambda: all(m.transport == "websocket" for m in members), 15)
        time.sleep(0.5)
        after = scrape(admin_url)
        assert total(after, "corral_requests_total", **{"class": "2xx"}) >= total(before, "corral_requests_total", **{"class": "2xx"}) + 10
        assert total(after, "corral_engineio_sessions") == 12
        assert total(after, "corral_websocket_tunnels") == 12
        assert total(after, "corral_engineio_handshakes_total") == 12
        assert total(after, "corral_engineio_unknown_sid_total") == 0  # the thrash counter
        assert total(after, "corral_request_duration_seconds_count") >= 10
        assert total(after, "corral_bytes_out_total") > total(before, "corral_bytes_out_total")
        assert total(after, "corral_worker_up") == 2

        # /status.json agrees with where the clients landed.
        status = requests.get(admin_url + "/status.json").json()
        by_port = {w["port"]: w["sessions"] for w in status["workers"]}
        seen = spread(members)  # worker names are w<port>
        assert {int(name[1:]): n for name, n in seen.items()} == by_port
        assert status["totals"]["sessions"] == 12 and status["totals"]["tunnels"] == 12
        assert status["totals"]["unknown_sid"] == 0
        assert all(w["state"] == "up" for w in status["workers"])
    finally:
        disconnect_all(members)
    # A dead sid moves the thrash counter.
    requests.get(corral.url + "/socket.io/?EIO=4&transport=polling&sid=gone")
    assert total(scrape(admin_url), "corral_engineio_unknown_sid_total") == 1
    assert wait_until(lambda: total(scrape(admin_url), "corral_websocket_tunnels") == 0, 10)
    # A plain request leaves its worker connection kept alive for the next one...
    assert requests.get(corral.url + "/whoami").status_code == 200
    assert total(scrape(admin_url), "corral_upstream_idle_connections") >= 1
    # ...until the worker closes it (gunicorn's keep-alive is 2 s).
    assert wait_until(lambda: total(scrape(admin_url), "corral_upstream_idle_connections") == 0, 10)
    # The history behind the charts fills in.
    assert wait_until(lambda: len(requests.get(admin_url + "/status.json").json()["history"]) >= 2, 8)


def test_status_page_is_self_contained(stack):
    w = stack.gunicorn()
    admin = free_port()
    stack.corral([w.port], extra=f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    page = requests.get(f"http://127.0.0.1:{admin}/status")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.text
    assert "status.json" in html and "<canvas" in html
    assert "<script src" not in html and "https://" not in html and "http://" not in html


def test_admin_auth(stack, tmp_path):
    import subprocess
    w = stack.gunicorn()
    admin = free_port()
    pw = tmp_path / "admin.htpasswd"
    subprocess.run(["htpasswd", "-c", "-b", "-m", str(pw), "ops", "secret"], check=True, capture_output=True)
    stack.corral([w.port], extra=f'[admin]\nlisten = "127.0.0.1:{admin}"\nhtpasswd = "{pw}"\n')
    url = f"http://127.0.0.1:{admin}/metrics"
    assert requests.get(url).status_code == 401
    assert requests.get(url, auth=("ops", "secret")).status_code == 200
    assert requests.get(url, auth=("ops", "nope")).status_code == 401


def test_access_log_json_skips_engineio_by_default(stack):
    w = stack.gunicorn()
    log = stack.tmp / "access.log"
    corral = stack.corral([w.port], extra=f'[access_log]\nenabled = true\nformat = "json"\npath = "{log}"\n')
    requests.get(corral.url + "/whoami?x=1", headers={"User-Agent": "tester/1", "Referer": "http://r/"})
    requests.get(corral.url + "/socket.io/?EIO=4&transport=polling")
    requests.get(corral.url + "/nothing-here")
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, 5)
    time.sleep(0.3)
    # (the /health lines are the test harness waiting for corral)
    lines = [json.loads(l) for l in log.read_text().splitlines() if '"/health"' not in l]
    assert [(l["target"], l["status"]) for l in lines] == [("/whoami?x=1", 200), ("/nothing-here", 404)]
    assert lines[0]["user_agent"] == "tester/1" and lines[0]["remote_addr"] == "127.0.0.1"


def test_access_log_combined(stack):
    w = stack.gunicorn()
    log = stack.tmp / "combined.log"
    corral = stack.corral([w.port], extra=f'[access_log]\nenabled = true\nengineio = true\npath = "{log}"\n')
    requests.get(corral.url + "/whoami", headers={"User-Agent": "ua"})
    requests.get(corral.url + "/socket.io/?EIO=4&transport=polling")
    def ours():
        return [l for l in log.read_text().splitlines() if "GET /health " not in l] if log.exists() else []
    assert wait_until(lambda: len(ours()) == 2, 5)
    first = ours()[0]
    assert "/socket.io/" in ours()[1]
    import re
    assert re.match(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /whoami HTTP/1\.1" 200 \S+ "-" "ua"$', first), first
