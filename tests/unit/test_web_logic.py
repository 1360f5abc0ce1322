"""The web UI's pure logic: where a login may send the browser next, the failed-login limiter, the
event filters' query strings, log lines from journald and from `vigil up`'s files, unit names the
Services page may act on, and what an upload's first bytes say it is."""

from __future__ import annotations

import json

import pytest

from services.web import control, uploads
from services.web.auth import LoginLimiter
from services.web.pages import local_next
from services.web.queries import EventFilter


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example", "/\\evil.example", "/\t/evil.example", "/\n/evil.example", "https://evil.example",
        "javascript:alert(1)", "/%0a", "", None, "events", "/" + "a" * 600, "/\x00", "/ /evil",
    ],
)  # fmt: skip
def test_after_login_only_a_plain_local_path(value):
    assert local_next(value) == "/events" or (value == "/%0a" and local_next(value) == "/%0a")


def test_local_paths_survive():
    for value in (
        "/events",
        "/events?camera=front_door&page=2",
        "/services/vigil-detector@cpu.service/logs"[:0] + "/audit",
    ):
        assert local_next(value) == value


def test_failed_logins_per_client_then_wait_and_everyone_only_slows():
    lim = LoginLimiter(per_client=3, window=900, overall=5)
    for _ in range(3):
        assert lim.wait_for("a", now=0) == 0
        lim.failed("a", now=0)
    assert lim.wait_for("a", now=10) == 890 and lim.wait_for("b", now=10) == 0
    for c in "bc":
        lim.failed(c, now=0)
    assert lim.slowdown(now=10) == 2.0 and lim.wait_for("e", now=10) == 0  # slowed, never locked out
    assert lim.wait_for("a", now=901) == 0 and lim.slowdown(now=901) == 0.0  # the window slid past
    lim.succeeded("a")
    assert lim.wait_for("a", now=10) == 0


def test_filters_round_trip_and_drop_what_cannot_match():
    f = EventFilter.of(
        {"camera": "front_door", "level": "nonsense", "reviewed": "no", "from": "2026-13-40", "page": "x"}
    )
    assert (f.camera, f.level, f.reviewed, f.day_from, f.page) == ("front_door", None, "no", None, 1)
    assert f.query_string() == "camera=front_door&reviewed=no" and "page=3" in f.query_string(page=3)
    where, args = EventFilter(label="person'; DROP TABLE events; --").where()
    assert "DROP" not in where and args == ["person'; DROP TABLE events; --"]  # always a parameter


def test_log_lines_from_journald_and_from_files_are_text():
    entry = {"__REALTIME_TIMESTAMP": "1780000000000000", "PRIORITY": "4", "MESSAGE": "disk \x1b[31mlow", "CAMERA": "x"}
    line = control.parse_line(json.dumps(entry).encode(), "journal")
    assert line["level"] == "warning" and line["time"] == 1780000000.0 and "\x1b" not in line["event"]
    assert line["fields"] == {"camera": "x"}
    ours = control.parse_line(b'{"event": "ready", "level": "info", "timestamp": "t", "pid": 7}', "file")
    assert ours == {"time": "t", "level": "info", "event": "ready", "fields": {"pid": "7"}}
    assert control.parse_line(b"plain \xff text", "file")["event"].startswith("plain")
    assert control.level_ok(line, "info") and not control.level_ok(ours, "warning")


def test_only_vigil_service_units_and_never_stopping_itself():
    assert control.check("vigil-detector@cpu.service", "restart") == "detector"
    assert control.check("vigil-web.service", "restart") == "web"
    for unit, action in (
        ("vigil-nats.service", "stop"), ("vigil-postgresql.service", "stop"), ("sshd.service", "stop"),
        ("vigil-web.service", "stop"), ("vigil-watcher.service", "mask"), ("vigil-watcher.service;reboot", "stop"),
        ("vigil-detector@../x.service", "stop"),
    ):  # fmt: skip
        with pytest.raises(control.NotAllowed):
            control.check(unit, action)


def test_what_an_upload_is_by_its_magic_bytes():
    assert uploads.kind_of(b"\xff\xd8\xff\xe0" + bytes(12)) == ".jpg"
    assert uploads.kind_of(b"\x89PNG\r\n\x1a\n" + bytes(8)) == ".png"
    assert uploads.kind_of(b"\x00\x00\x00\x18ftypmp42" + bytes(4)) == ".mp4"
    assert uploads.kind_of(b"\x00\x00\x00\x14ftypqt  " + bytes(4)) == ".mov"
    assert uploads.kind_of(b"#!/bin/sh\nrm -rf /\n") is None and uploads.kind_of(b"GIF89a" + bytes(10)) is None
