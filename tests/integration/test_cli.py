"""The operator CLI against a seeded pipeline: every command in a subprocess, its --json checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.integration.test_pipeline import FULL, drained
from tests.support import REPO, drop, photo_bytes, query, vigil_json, wait_until

vigil = vigil_json


def test_every_command_on_a_seeded_pipeline(make_stack, media, database, nats_server, models_dir):
    stack = make_stack(model="yolox-nano", models=models_dir, aggregator={"idle_seconds": 2.0, "max_seconds": 20.0})
    stack.config.write_text(
        stack.config.read_text().replace("drain_seconds = 5.0", "drain_seconds = 5.0\nheartbeat_seconds = 0.5")
        + "[health]\nstale_seconds = 3.0\n"
    )
    stack.start(*FULL)
    stack.wait_ready(*FULL)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "tail",
            "detections",
            "--camera",
            "front_door",
            "--count",
            "2",
            "--json",
            "--config",
            str(stack.config),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # let the follower subscribe
    t0 = time.time() - 60
    drop(media / "front_door" / "astronaut.jpg", photo_bytes("astronaut"), t0)
    drop(media / "front_door" / "camera.jpg", photo_bytes("camera"), t0 + 1)
    drop(media / "backyard" / "broken.jpg", photo_bytes("coffee")[:20] + b"\x00" * 64 + b"\xff\xd9")
    wait_until(lambda: query(database, "SELECT 1 FROM events"), what="the front_door event")
    wait_until(lambda: query(database, "SELECT 1 FROM event_analysis"), what="the event's analysis")
    wait_until(lambda: drained(nats_server.url, FULL), what="quiet pipeline")

    lines = follower.communicate(timeout=30)[0].splitlines()
    assert sorted(json.loads(line)["path"] for line in lines) == ["front_door/astronaut.jpg", "front_door/camera.jpg"]

    status = wait_until(
        lambda: (
            (s := vigil(stack.config, "status"))
            and sum(x["instance"] is not None for x in s["services"]) == len(FULL)
            and s
        ),
        what=f"{len(FULL)} heartbeats",
    )
    running = [s for s in status["services"] if s["instance"] is not None]
    assert {s["service"] for s in running} == set(FULL)
    assert all(s["state"] == "ready" and s["verdict"] == "healthy" for s in running)
    # gpu-stats, retention and web are expected by default and were not started: each is down as a whole
    assert [(s["service"], s["verdict"]) for s in status["services"] if s["instance"] is None] == [
        ("gpu-stats", "down"),
        ("retention", "down"),
        ("web", "down"),
    ]
    assert {st["consumer"] for st in status["stages"]} >= {"detector", "aggregator", "recorder-detections"}
    assert all(st["backlog"] == 0 and st["oldest_unacked_s"] == 0 for st in status["stages"])
    assert status["dead_letters"] == {"detector": 1}
    assert {d["path"] for d in status["disks"]} == {str(media), str(stack.config.parent / "state")}

    streams = {s["name"]: s for s in vigil(stack.config, "streams")}
    assert set(streams) == {
        "UPLOADS",
        "DETECTIONS",
        "EVENTS",
        "ALERTS",
        "GPU",
        "HEALTH",
        "RETENTION",
        "ADVISORIES",
        "DLQ",
        "ANALYSIS",
        "NOTIFY",
    }
    assert [c["name"] for c in streams["DETECTIONS"]["consumers"]] == ["aggregator", "recorder-detections"]
    assert streams["DLQ"]["messages"] == 1

    events = vigil(stack.config, "events", "--camera", "front_door", "--since", "1h")
    assert len(events) == 1 and events[0]["detections"] == 2 and "person" in events[0]["labels"]
    assert events[0]["risk_level"] in ("medium", "high", "critical") and events[0]["summary"].startswith("Person")

    traced = vigil(stack.config, "trace", "astronaut.jpg")
    assert traced["stage"] == "recorded" and traced["events"] == [events[0]["event_id"]]
    assert vigil(stack.config, "trace", "broken.jpg")["stage"] == "dead-lettered"

    (letter,) = vigil(stack.config, "dlq", "list")
    assert letter["stage"] == "detector" and letter["camera"] == "backyard" and letter["path"] == "backyard/broken.jpg"
    assert letter["retry"].startswith("no: its content was refused") and letter["retry_at"] is None
    # the same file by its absolute path under the media root
    assert vigil(stack.config, "trace", str(media / "backyard" / "broken.jpg"))["stage"] == "dead-lettered"
    assert vigil(stack.config, "trace", str(media / "front_door" / "astronaut.jpg"))["stage"] == "recorded"
    assert "decode" in vigil(stack.config, "dlq", "show", str(letter["seq"]))["reason"]
    # a retry shows its checked target and asks; with no terminal to ask on, only --yes does it
    asked = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "dlq", "retry", str(letter["seq"]), "--config", str(stack.config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "VIGIL_CONFIG": ""},
        stdin=subprocess.DEVNULL,
    )
    assert asked.returncode == 2 and "vigil.uploads.backyard: pass --yes" in asked.stderr
    assert vigil(stack.config, "dlq", "list")[0]["seq"] == letter["seq"]  # nothing happened
    retried = vigil(stack.config, "dlq", "retry", str(letter["seq"]), "--yes")
    assert retried["subject"] == "vigil.uploads.backyard"
    # still corrupt: dead-lettered again by the detector, once
    again = wait_until(
        lambda: (d := vigil(stack.config, "dlq", "list")) and d[0]["seq"] != letter["seq"] and d,
        what="re-dead-lettered",
    )
    assert len(again) == 1
    # a file the watcher refuses is visible where an operator looks: trace, dlq list (not retryable), health
    (media / "backyard" / "notes.jpg").write_text("not an image")
    rejected = wait_until(
        lambda: [d for d in vigil(stack.config, "dlq", "list") if d["stage"] == "watcher"], what="the rejection"
    )
    assert rejected[0]["path"] == "backyard/notes.jpg" and rejected[0]["camera"] == "backyard"
    assert rejected[0]["retry"].startswith("no:")
    assert (
        vigil(stack.config, "trace", str(media / "backyard" / "notes.jpg"))["stage"]
        == "rejected by the watcher: unrecognised content"
    )
    assert vigil(stack.config, "dlq", "purge") == {"purged": 2}
    assert vigil(stack.config, "dlq", "list") == []


def test_dlq_retry_of_a_fixed_problem_is_recorded_once(make_stack, media, database, nats_server):
    """A file that vanished before the detector read it is dead-lettered; once it is back, `vigil dlq
    retry` re-injects the upload and it is recorded exactly once."""
    stack = make_stack(model="none")
    stack.start("watcher", "aggregator", "recorder")
    stack.wait_ready("watcher", "aggregator", "recorder")
    path = media / "front_door" / "gone.jpg"
    data = photo_bytes("coffee", scale=0.2)
    drop(path, data)
    wait_until(
        lambda: next(s for s in vigil(stack.config, "streams") if s["name"] == "UPLOADS")["messages"] == 1,
        what="the upload waiting for a detector",
    )
    saved = path.read_bytes()
    path.unlink()  # gone before any detector reads it
    stack.start("detector")
    (letter,) = wait_until(lambda: vigil(stack.config, "dlq", "list"), what="dead letter")
    assert "vanished" in letter["reason"]
    # The file comes back (same bytes, hidden while written); the watcher's ledger already knows it
    # only if size and mtime match, so it may publish it again itself: either way, one row.
    path.write_bytes(saved)
    vigil(stack.config, "dlq", "retry", str(letter["seq"]), "--yes")
    wait_until(lambda: query(database, "SELECT count(*) FROM detections")[0][0] == 1, what="recorded after retry")
    wait_until(lambda: drained(nats_server.url, FULL), what="quiet")
    assert query(database, "SELECT count(*) FROM detections WHERE path = 'front_door/gone.jpg'")[0][0] == 1
    assert vigil(stack.config, "dlq", "list") == []
