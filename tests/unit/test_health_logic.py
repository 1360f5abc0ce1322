"""health's pure logic: verdicts, alert bookkeeping, backlog trend, systemctl parsing, metrics text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proto import Heartbeat
from services.health.checks import (
    DiskStatus,
    ServiceStatus,
    Snapshot,
    StageStatus,
    UnitState,
    judge,
    parse_systemctl_show,
    unit_service,
)
from services.health.service import BacklogTrend, Conditions
from services.health.web import HealthState, render_page
from services.runtime.config import load_config

NOW = 1_800_000_000.0


def hb(service="watcher", instance="box", state="ready", age=1.0, **kw) -> Heartbeat:
    return Heartbeat(
        service=service,
        instance=instance,
        host="box",
        pid=1,
        version="0",
        started_at=NOW - 100,
        sent_at=NOW - age,
        state=state,
        last_progress=NOW - age,
        **kw,
    )


def verdicts(services):
    return {s.key: (s.verdict, s.reason) for s in services}


def test_heartbeat_verdicts():
    got = verdicts(
        judge(
            [
                hb(),
                hb("aggregator", state="stopped", age=3),
                hb("recorder", age=9),
                hb("detector", "box-0", state="degraded", backend="degraded: cpu fallback (cuda error)"),
            ],
            [],
            ["watcher", "aggregator", "recorder", "detector", "gpu-stats"],
            NOW,
            stale=7.5,
        )
    )
    assert got == {
        "aggregator.box": ("down", "stopped 3s ago"),
        "detector.box-0": ("degraded", "degraded: cpu fallback (cuda error)"),
        "gpu-stats.*": ("down", "no instance has sent a heartbeat"),
        "recorder.box": ("stale", "no heartbeat for 9s"),
        "watcher.box": ("healthy", "ready"),
    }


def test_a_loop_without_progress_degrades_and_an_expired_instance_stays_down():
    stuck = hb()
    stuck.last_progress = NOW - 120
    got = verdicts(judge([stuck], [], ["watcher"], NOW, stale=7.5, gone={"recorder.box": NOW - 40}))
    assert got["watcher.box"][0] == "degraded" and "no progress for 120s" in got["watcher.box"][1]
    assert got["recorder.box"] == ("down", "heartbeat expired (last seen 40s ago)")


def test_systemd_unit_state_overrides_a_fresh_looking_heartbeat():
    units = [
        UnitState(unit="vigil-watcher.service", active_state="activating", sub_state="auto-restart", restarts=4),
        UnitState(unit="vigil-detector@0.service", active_state="active", sub_state="running", restarts=1),
        UnitState(unit="vigil-detector@1.service", active_state="inactive", sub_state="dead", restarts=0),
        UnitState(unit="vigil-recorder.service", active_state="failed", sub_state="failed", restarts=5),
        UnitState(unit="vigil-nats.service", active_state="active", sub_state="running", restarts=0),
        UnitState(unit="vigil-aggregator.service", active_state="active", sub_state="running", restarts=0),
    ]
    services = judge(
        [hb(age=2), hb("detector", "box-0")], units, ["watcher", "detector", "recorder"], NOW, stale=7.5, host="box"
    )
    by_key = {s.key: s for s in services}
    assert (by_key["watcher.box"].verdict, by_key["watcher.box"].restarts) == ("down", 4)
    assert by_key["detector.box-0"].verdict == "healthy" and by_key["detector.box-0"].unit == "vigil-detector@0.service"
    assert "detector.box-1" not in by_key  # installed, never enabled, not needed: ignored
    assert by_key["recorder.box"].verdict == "down" and "failed" in by_key["recorder.box"].reason
    assert by_key["nats.box"].verdict == "healthy"  # no heartbeat expected: the unit state is the verdict
    assert (by_key["aggregator.box"].verdict, by_key["aggregator.box"].reason) == (
        "down",
        "unit active (running), no heartbeat",
    )


def test_parse_systemctl_show_and_unit_names():
    text = "Id=vigil-watcher.service\nActiveState=active\nSubState=running\nNRestarts=2\n\nId=vigil-detector@cpu.service\nActiveState=failed\nSubState=failed\nNRestarts=\n"
    assert parse_systemctl_show(text) == [
        UnitState(unit="vigil-watcher.service", active_state="active", sub_state="running", restarts=2),
        UnitState(unit="vigil-detector@cpu.service", active_state="failed", sub_state="failed", restarts=0),
    ]
    assert unit_service("vigil-detector@0.service") == ("detector", "0")
    assert unit_service("vigil-nats.service") == ("nats", None)
    assert unit_service("sshd.service") is None


def test_conditions_fire_after_hold_once_and_resolve_once():
    c = Conditions()
    cond = {"service_down:x": ("service_down", "system", "critical", "x is down", 10.0)}
    assert c.update(cond, NOW) == []
    assert c.update(cond, NOW + 5) == []
    (fired,) = c.update(cond, NOW + 10)
    assert (fired.kind, fired.state, fired.alert_id) == ("service_down", "firing", f"health-service_down:x-{int(NOW)}")
    assert c.update(cond, NOW + 20) == []  # once
    (resolved,) = c.update({}, NOW + 30)
    assert (resolved.state, resolved.alert_id) == ("resolved", fired.alert_id + "-resolved")
    assert c.update({}, NOW + 40) == []
    # a condition that clears before its hold never alerts
    assert c.update(cond, NOW + 50) == [] and c.update({}, NOW + 55) == []


def test_backlog_trend_needs_a_full_window_of_growth():
    t = BacklogTrend()
    series = [(0, 0), (1, 5), (2, 9), (3, 14), (4, 20)]
    assert [t.add("detector", NOW + s, b, window=3.0) for s, b in series] == [False, False, False, True, True]
    keeping_up = BacklogTrend()
    series = [(0, 5), (1, 9), (2, 4), (3, 8), (4, 12), (5, 3), (6, 9)]
    assert not any(keeping_up.add("detector", NOW + s, b, window=3.0) for s, b in series)


def test_metrics_text_parses_and_page_escapes(tmp_path):
    state = HealthState(load_config(environ={}))
    state.cameras["front<door>"] = NOW
    state.update(
        Snapshot(
            taken_at=NOW,
            services=[
                ServiceStatus(
                    service="watcher",
                    instance="box",
                    verdict="healthy",
                    reason="ready",
                    uptime_s=5.0,
                    counters={"published": 3},
                    last_error="<script>",
                )
            ],
            stages=[
                StageStatus(
                    consumer="detector", stream="UPLOADS", pending=4, ack_pending=2, redelivered=1, oldest_unacked_s=7.0
                )
            ],
            disks=[DiskStatus(path="/srv", total_bytes=100, free_bytes=5)],
            gpus=[],
            dead_letters={"detector": 2},
            systemd="x",
        ),
        {},
    )
    from prometheus_client import generate_latest

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(state.registry).decode())}
    assert {
        "vigil_service_up",
        "vigil_stage_backlog",
        "vigil_dead_letters",
        "vigil_service_operations",
        "vigil_disk_free_bytes",
        "vigil_detections",
        "vigil_inference_seconds",
    } <= set(families)
    assert [s.value for s in families["vigil_stage_backlog"].samples] == [6.0]
    assert [(s.labels["counter"], s.value) for s in families["vigil_service_operations"].samples] == [
        ("published", 3.0)
    ]
    page = render_page(state)
    assert "<script>" not in page and "&lt;script&gt;" in page and "front&lt;door&gt;" in page


def test_observe_raises_disk_cpu_fallback_and_silent_camera_conditions():
    from services.health.service import observe

    config = load_config(
        environ={"VIGIL_HEALTH__DISK_LOW_PERCENT": "10", "VIGIL_HEALTH__CAMERA_SILENT_SECONDS": "3600"}
    )
    config.health.cameras["driveway"] = 60.0  # per-camera override
    state = HealthState(config)
    state.cameras.update({"front": NOW - 7200, "back": NOW - 100, "driveway": NOW - 100})
    snap = Snapshot(
        taken_at=NOW,
        services=[
            ServiceStatus(
                service="detector",
                instance="box-0",
                verdict="degraded",
                reason="x",
                backend="degraded: cpu fallback (CUDA error)",
            ),
            ServiceStatus(service="recorder", instance=None, verdict="down", reason="no instance has sent a heartbeat"),
        ],
        stages=[],
        disks=[
            DiskStatus(path="/srv", total_bytes=1000, free_bytes=50),
            DiskStatus(path="/var", total_bytes=1000, free_bytes=500),
        ],
        gpus=[],
        dead_letters={},
        systemd="x",
    )
    got = observe(snap, state, config, BacklogTrend(), NOW)
    assert set(got) == {
        "detector_cpu_fallback:detector.box-0",
        "service_down:recorder.*",
        "disk_low:/srv",
        "camera_silent:front",
        "camera_silent:driveway",
    }
    assert got["camera_silent:front"][1] == "front" and got["disk_low:/srv"][2] == "critical"
    assert got["service_down:recorder.*"][4] == config.health.down_alert_seconds


def test_disk_alert_clears_only_with_some_margin():
    from services.health.service import observe

    config = load_config(environ={"VIGIL_HEALTH__DISK_LOW_PERCENT": "10", "VIGIL_HEALTH__CAMERA_SILENT_SECONDS": "0"})
    state = HealthState(config)

    def snap(free: int) -> Snapshot:
        return Snapshot(
            taken_at=NOW,
            services=[],
            stages=[],
            disks=[DiskStatus(path="/srv", total_bytes=1000, free_bytes=free)],
            gpus=[],
            dead_letters={},
            systemd="x",
        )

    assert "disk_low:/srv" in observe(snap(95), state, config, BacklogTrend(), NOW)
    assert "disk_low:/srv" in observe(
        snap(110), state, config, BacklogTrend(), NOW, frozenset({"disk_low:/srv"})
    )  # 11 %: still low
    assert observe(snap(125), state, config, BacklogTrend(), NOW, frozenset({"disk_low:/srv"})) == {}  # 12.5 %: clear
    assert observe(snap(110), state, config, BacklogTrend(), NOW) == {}  # 11 % without a firing alert: fine


def test_only_loopback_host_names_are_served():
    """DNS rebinding: a page on the internet makes the browser send its own name to 127.0.0.1."""
    from services.runtime.http import host_allowed

    for ok in (
        "localhost",
        "localhost:9470",
        "127.0.0.1",
        "127.0.0.1:9470",
        "127.8.9.10",
        "[::1]:9470",
        "[::1]",
        "LOCALHOST",
    ):
        assert host_allowed(ok), ok
    for bad in (
        "evil.example",
        "evil.example:9470",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "10.0.0.5",
        "[fe80::1]:80",
        "",
        None,
    ):
        assert not host_allowed(bad), bad
    assert host_allowed("vigil.lan:9470", ["Vigil.LAN"]) and not host_allowed("vigil.lan.evil", ["vigil.lan"])


def test_one_outage_is_one_service_down_alert_when_its_instance_expires_or_returns():
    """CI finding: the aggregator went stale (`aggregator.vm`), its heartbeat expired (`aggregator.*`) and
    health restarted in between: two service_down alerts for one outage. The firing key is kept."""
    from services.health.service import observe

    config = load_config(environ={"VIGIL_HEALTH__CAMERA_SILENT_SECONDS": "0"})
    state = HealthState(config)

    def snap(instance, verdict):
        return Snapshot(taken_at=NOW, services=[ServiceStatus(service="aggregator", instance=instance, verdict=verdict, reason="x")],
                        stages=[], disks=[], gpus=[], dead_letters={}, systemd="x")  # fmt: skip

    assert set(observe(snap("vm", "stale"), state, config, BacklogTrend(), NOW)) == {"service_down:aggregator.vm"}
    expired = observe(snap(None, "down"), state, config, BacklogTrend(), NOW, frozenset({"service_down:aggregator.vm"}))
    assert set(expired) == {"service_down:aggregator.vm"}  # the same alert, not a second one
    back = observe(snap("vm", "stale"), state, config, BacklogTrend(), NOW, frozenset({"service_down:aggregator.*"}))
    assert set(back) == {"service_down:aggregator.*"}
    two = frozenset({"service_down:aggregator.a", "service_down:aggregator.b"})
    assert set(observe(snap(None, "down"), state, config, BacklogTrend(), NOW, two)) == {"service_down:aggregator.*"}


class ElectingJetStream:
    """Answers like a JetStream whose consumer `detector` and stream UPLOADS are electing a leader after
    a node died (the 503 a cluster gives for a few seconds; cluster tests met it by chance)."""

    def __init__(self):
        import nats.js.errors

        self.errors = nats.js.errors
        self.busy = self.errors.ServiceUnavailableError(
            code=503, err_code=10008, description="JetStream system temporarily unavailable"
        )

    async def consumer_info(self, stream, durable):
        if durable == "detector":
            raise self.busy
        raise self.errors.NotFoundError()

    async def stream_info(self, name, subjects_filter=None):
        if name == "UPLOADS":
            raise self.busy
        raise self.errors.NotFoundError()


async def test_a_consumer_or_stream_electing_a_leader_is_noted_not_fatal():
    from services.health.checks import read_dead_letters, read_stages, read_streams

    js, unreadable = ElectingJetStream(), []
    assert await read_stages(js, NOW, unreadable) == []
    assert await read_streams(js, unreadable) == []
    assert await read_dead_letters(js, unreadable) == {}
    assert unreadable == [
        "consumer detector: JetStream temporarily unavailable (a leader election after a node left?)",
        "stream UPLOADS: JetStream temporarily unavailable (a leader election after a node left?)",
    ]
    snap = Snapshot(
        taken_at=NOW, services=[], stages=[], disks=[], gpus=[], dead_letters={}, systemd="x", unreadable=unreadable
    )
    state = HealthState(load_config(environ={}))
    state.snapshot = snap
    assert "not readable now: consumer detector" in render_page(state)
