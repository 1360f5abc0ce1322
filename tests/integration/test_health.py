"""health as a process against real services: verdict changes, alerts, backlog, HTTP, metrics."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import proto
from services.cli.stack import free_port
from tests.support import drop, photo_bytes, stream_messages, vigil_json, wait_until

HEARTBEAT = 1.0


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def status(port: int) -> dict:
    return json.loads(get(port, "/status")[1])


def verdicts(port: int) -> dict[str, str]:
    """{service: verdict} of everything but health itself ("<service>.*" when no instance exists)."""
    return {
        s["service"] + ("" if s["instance"] else ".*"): s["verdict"]
        for s in status(port).get("services", [])
        if s["service"] != "health"
    }


def health_stack(make_stack, port: int, **health):
    # stale after two intervals (default 1.5): test machines are loaded, and the bound asserted is two
    settings = {
        "http_port": port,
        "check_seconds": 0.5,
        "stale_seconds": 2 * HEARTBEAT,
        "down_alert_seconds": 0.0,
        "systemd": False,
        "expected_services": ["watcher", "aggregator"],
        "camera_silent_seconds": 0.0,
        **health,
    }
    return make_stack(model="none", env={"VIGIL_HEARTBEAT_SECONDS": str(HEARTBEAT)}, health=settings)


def messages(url: str, stream: str, kind: type) -> list:
    return [m for m in stream_messages(url, stream) if isinstance(m, kind)]


def test_a_stopped_service_goes_down_alerts_and_recovers(make_stack, nats_server, tmp_path):
    port = free_port()
    stack = health_stack(make_stack, port)
    stack.start("watcher", "aggregator", "health")
    stack.wait_ready("watcher", "aggregator", "health")
    wait_until(lambda: verdicts(port) == {"watcher": "healthy", "aggregator": "healthy"}, what="both healthy")
    assert get(port, "/health/ready")[0] == 200 and get(port, "/health/live")[0] == 200

    # SIGKILL: no "stopped" heartbeat, so the entry just stops changing -> stale
    killed_at = time.time()
    stack.kill("aggregator")
    stale = wait_until(
        lambda: next(
            (
                m
                for m in messages(nats_server.url, "HEALTH", proto.HealthChanged)
                if m.service == "aggregator" and m.verdict == "stale"
            ),
            None,
        ),
        timeout=20,
        what="stale",
    )
    # Within two heartbeat intervals, plus one check period and scheduling slack on a loaded machine.
    assert stale.previous == "healthy" and stale.changed_at - killed_at <= 2 * HEARTBEAT + 0.5 + 1.0, stale
    alert = wait_until(
        lambda: next(
            (
                a
                for a in messages(nats_server.url, "ALERTS", proto.Alert)
                if a.kind == "service_down" and "aggregator" in a.message and a.state == "firing"
            ),
            None,
        ),
        what="alert",
    )
    assert alert.camera == "system" and alert.severity == "critical"
    code, body = get(port, "/health/ready")
    assert code == 503 and json.loads(body)["not_ready"][0]["service"].startswith("aggregator.")

    # health itself restarts while the alert fires: it must still resolve it later, and not fire it twice
    assert stack.stop("health") == 0
    stack.start("health")
    wait_until(lambda: "alert state restored" in stack.log("health"), what="health back, with its alert state")

    # SIGTERM: a clean stop says so at once -> down
    stack.stop("watcher")
    wait_until(
        lambda: any(
            m.service == "watcher" and m.verdict == "down"
            for m in messages(nats_server.url, "HEALTH", proto.HealthChanged)
        ),
        timeout=20,
        what="watcher down",
    )

    stack.start("aggregator", "watcher")
    stack.wait_ready("aggregator", "watcher")
    wait_until(lambda: verdicts(port) == {"watcher": "healthy", "aggregator": "healthy"}, what="healthy again")
    changes = [m for m in messages(nats_server.url, "HEALTH", proto.HealthChanged) if m.service == "aggregator"]
    transitions = [(c.previous, c.verdict) for c in changes]
    # healthy -> stale; after health's own restart it reports what it finds (None -> stale); then back
    assert ("healthy", "stale") in transitions and transitions[-1] == ("stale", "healthy"), transitions
    resolved = wait_until(
        lambda: [
            a
            for a in messages(nats_server.url, "ALERTS", proto.Alert)
            if a.state == "resolved" and a.kind == "service_down"
        ],
        what="resolved alerts",
    )
    assert {a.alert_id for a in resolved} >= {alert.alert_id + "-resolved"}
    firing = [
        a
        for a in messages(nats_server.url, "ALERTS", proto.Alert)
        if a.kind == "service_down" and "aggregator" in a.message and a.state == "firing"
    ]
    assert [a.alert_id for a in firing] == [alert.alert_id]  # once, across the restart of health
    assert get(port, "/health/ready")[0] == 200
    assert "stale" in stack.log("health") and '"event": "alert"' in stack.log("health")


class FlakyWebhook:
    """A webhook receiver that answers 500 to the first POST of each alert, then 200, recording every body."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                first = all(b["alert_id"] != body["alert_id"] for b in received)
                received.append(body)
                self.send_response(500 if first else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_growing_backlog_raises_the_backlog_alert_and_the_webhook_gets_it(make_stack, nats_server, media):
    port = free_port()
    hook = FlakyWebhook()
    stack = health_stack(
        make_stack, port, backlog_alert_seconds=2.0, backlog_min=3, expected_services=["watcher"], webhook_url=hook.url
    )
    stack.start("watcher", "health")  # no detector: uploads pile up
    stack.wait_ready("watcher", "health")
    jpeg = photo_bytes("camera", scale=0.25)
    deadline = time.time() + 30
    n = 0
    while time.time() < deadline and not any(
        a.kind == "backlog_growing" for a in messages(nats_server.url, "ALERTS", proto.Alert)
    ):
        drop(media / "front_door" / f"{n:04}.jpg", jpeg)
        n += 1
        time.sleep(0.3)
    # (other stages may also alert: nobody records the alerts themselves in this test)
    (alert,) = [
        a
        for a in messages(nats_server.url, "ALERTS", proto.Alert)
        if a.kind == "backlog_growing" and "stage detector" in a.message
    ]
    assert "stage detector" in alert.message and alert.state == "firing"
    stage = next(s for s in status(port)["stages"] if s["consumer"] == "detector")
    assert stage["backlog"] >= 3 and stage["oldest_unacked_s"] > 0
    # the first POST failed (500) and was retried: the same alert arrives twice, the second accepted
    posted = wait_until(
        lambda: (p := [b for b in hook.received if b["alert_id"] == alert.alert_id]) and len(p) >= 2 and p,
        what="webhook retried",
    )
    assert posted[0] == posted[1] == json.loads(proto.encode(alert))
    hook.server.shutdown()


def test_metrics_and_status_agree_with_the_cli(make_stack, nats_server, media):
    port = free_port()
    stack = health_stack(make_stack, port, expected_services=["watcher", "detector"])
    stack.start("watcher", "detector", "health")
    stack.wait_ready("watcher", "detector", "health")
    drop(media / "front_door" / "a.jpg", photo_bytes("astronaut", scale=0.3))
    wait_until(
        lambda: 'vigil_files_detected_total{camera="front_door"} 1.0' in get(port, "/metrics")[1].decode(),
        what="detection counted",
    )
    wait_until(lambda: verdicts(port) == {"watcher": "healthy", "detector": "healthy"}, what="healthy")

    code, body = get(port, "/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    documented = {
        "vigil_service_up",
        "vigil_service_verdict",
        "vigil_service_uptime_seconds",
        "vigil_service_in_flight",
        "vigil_service_operations",
        "vigil_stage_backlog",
        "vigil_stage_pending",
        "vigil_stage_ack_pending",
        "vigil_stage_redelivered",
        "vigil_stage_oldest_unacked_seconds",
        "vigil_dead_letters",
        "vigil_files_detected",
        "vigil_detections",
        "vigil_inference_seconds",
        "vigil_detect_latency_seconds",
        "vigil_camera_last_upload_timestamp_seconds",
        "vigil_alerts_firing",
        "vigil_disk_free_bytes",
        "vigil_disk_total_bytes",
    }
    assert documented <= set(families), documented - set(families)
    up = {s.labels["service"]: s.value for s in families["vigil_service_up"].samples}
    assert up == {"watcher": 1.0, "detector": 1.0, "health": 1.0}
    assert {s.labels["stage"] for s in families["vigil_stage_backlog"].samples} >= {"detector", "aggregator"}

    served = status(port)
    cli = vigil_json(stack.config, "status")
    pick = lambda doc: {(s["service"], s["instance"], s["verdict"], s["pid"]) for s in doc["services"]}  # noqa: E731
    assert pick(served) == pick(cli)
    assert {s["consumer"] for s in served["stages"]} == {s["consumer"] for s in cli["stages"]}
    assert [d["path"] for d in served["disks"]] == [d["path"] for d in cli["disks"]]
    assert served["cameras"]["front_door"] > 0 and served["systemd"] == cli["systemd"]

    page = get(port, "/")[1].decode()
    assert "<h2>services</h2>" in page and "detector" in page
    for method in ("POST", "PUT", "DELETE"):  # read-only: nothing over HTTP changes state
        request = urllib.request.Request(f"http://127.0.0.1:{port}/status", method=method, data=b"{}")
        try:
            urllib.request.urlopen(request, timeout=5)
            raise AssertionError(f"{method} accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 405, (method, exc.code)

    # DNS rebinding: a hostile name resolved to 127.0.0.1 reaches the port, with its own Host header
    for host, code in (
        ("evil.example", 421),
        ("evil.example:9470", 421),
        ("127.0.0.1.nip.io", 421),
        ("", 421),
        (f"localhost:{port}", 200),
        (f"[::1]:{port}", 200),
        ("127.0.0.1", 200),
    ):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/status", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                got = resp.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == code, (host, got)

    stack.procs["health"].send_signal(signal.SIGTERM)
    assert stack.procs["health"].wait(20) == 0


def test_a_port_in_use_stops_health_at_start_with_the_field_named(make_stack):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stack = health_stack(make_stack, busy.getsockname()[1])
        stack.start("health")
        assert stack.procs["health"].wait(30) == 78
        assert "health.http_host/http_port" in stack.log("health")
