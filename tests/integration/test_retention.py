"""retention against real files and a real PostgreSQL: ages, keep, missing media, safety, dry run,
disk pressure on a real size-limited tmpfs, and the service reacting to the watcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import proto
from services.database import connect
from services.retention.service import run_once
from services.runtime.config import load_config
from tests.integration.retention_support import DAY, migrate, put_file, record, rows
from tests.support import REPO, drop, photo_bytes, stream_messages, vigil_json, wait_until, write_config


def config_for(tmp_path: Path, media: Path, database: str, nats_url: str = "nats://127.0.0.1:1", **retention):
    path = write_config(
        tmp_path / "vigil.toml",
        media=media,
        state=tmp_path / "state",
        nats_url=nats_url,
        dsn=database,
        model="none",
        models_dir=None,
        retention=retention,
    )
    return path, load_config(path, environ={})


def run(config, now: float, dry_run: bool = False, **kw):
    with connect(config, "retention", autocommit=True) as conn:
        return run_once(config, conn, now, "cli", dry_run, **kw)


def cli(config_path: Path, *args: str) -> dict:
    return vigil_json(config_path, *args, timeout=120)


def test_ages_per_camera_keep_and_dry_run(tmp_path, media, database, nats_server):
    migrate(database)
    now = time.time()
    path, _config = config_for(
        tmp_path, media, database, nats_server.url, max_age_days=10.0, cameras={"front_door": {"max_age_days": 2.0}}
    )
    ages = {
        "front_door/1d.jpg": 1,
        "front_door/3d.jpg": 3,
        "front_door/2026/05d.jpg": 5,
        "front_door/kept.jpg": 6,
        "backyard/1d.jpg": 1,
        "backyard/5d.jpg": 5,
        "backyard/12d.jpg": 12,
        "backyard/unrecorded.jpg": 40,
    }
    for rel, days in ages.items():
        put_file(media, rel, now - days * DAY)
        if rel != "backyard/unrecorded.jpg":
            record(database, rel, now - days * DAY, event_id=f"ev-{rel}")
    assert cli(path, "events", "keep", "ev-front_door/kept.jpg") == {"event_id": "ev-front_door/kept.jpg", "keep": True}
    expected = ["backyard/12d.jpg", "front_door/2026/05d.jpg", "front_door/3d.jpg"]

    dry = cli(path, "retention", "run", "--dry-run")
    assert dry["dry_run"] and dry["deleted_paths"] == expected
    assert all((media / rel).exists() for rel in ages)  # a dry run changes nothing
    assert rows(database, "SELECT count(*) FROM detections")[0][0] == 7

    real = cli(path, "retention", "run")
    assert real["deleted_paths"] == dry["deleted_paths"] and real["cameras"] == dry["cameras"]
    assert real["cameras"]["front_door"] == {"files": 2, "bytes": 8192, "reasons": {"age": 2}}
    assert {rel for rel in ages if (media / rel).exists()} == set(ages) - set(expected)
    assert not (media / "front_door" / "2026").exists()  # the emptied date folder went too
    assert (real["kept_skipped"], real["unrecorded_skipped"]) == (1, 1)
    # rows follow their files: detections, event links and the events left empty
    assert sorted(r[0] for r in rows(database, "SELECT path FROM detections")) == sorted(
        set(ages) - set(expected) - {"backyard/unrecorded.jpg"}
    )
    assert real["rows_deleted"] == {"detections": 3, "event_detections": 3, "events": 3}
    assert rows(database, "SELECT keep FROM events WHERE event_id = 'ev-front_door/kept.jpg'") == [(True,)]
    report = wait_until(
        lambda: [m for m in stream_messages(nats_server.url, "RETENTION") if isinstance(m, proto.RetentionReport)],
        what="the report on the bus",
    )
    assert report[0].deleted_paths == expected and report[0].unbounded_streams == []


def test_missing_media_is_marked_restored_and_deleted_after_the_grace_period(tmp_path, media, database):
    migrate(database)
    now = time.time()
    _, config = config_for(tmp_path, media, database, missing_grace_days=7.0)
    for rel in ("front_door/a.jpg", "front_door/b.jpg"):
        put_file(media, rel, now - DAY)
        record(database, rel, now - DAY, event_id=f"ev-{rel}")
    moved = media / "front_door" / "a.jpg"
    held = moved.read_bytes()
    moved.unlink()
    shutil.rmtree(media / "backyard")  # a whole camera folder gone: its rows would be marked the same way
    first = run(config, now)
    assert (first.missing_marked, first.missing_restored, first.rows_deleted) == (1, 0, {})
    assert rows(database, "SELECT path FROM detections WHERE missing_since IS NOT NULL") == [("front_door/a.jpg",)]

    moved.write_bytes(held)  # it came back (a remounted disk, a restore)
    assert run(config, now + DAY).missing_restored == 1
    assert rows(database, "SELECT count(*) FROM detections WHERE missing_since IS NOT NULL") == [(0,)]

    moved.unlink()
    assert run(config, now + 2 * DAY).missing_marked == 1
    assert run(config, now + 8 * DAY).rows_deleted == {}  # 6 days missing: still within the grace period
    late = run(config, now + 9.5 * DAY)
    assert late.rows_deleted == {"detections": 1, "event_detections": 1, "events": 1}
    assert rows(database, "SELECT path FROM detections") == [("front_door/b.jpg",)]


def test_symlinks_and_dotdot_paths_are_never_followed_or_deleted(tmp_path, media, database):
    migrate(database)
    now = time.time()
    _, config = config_for(tmp_path, media, database, max_age_days=1.0, detections_days=30.0)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    put_file(outside.parent, "outside/secret.jpg", now - 10 * DAY)
    (media / "front_door" / "link.jpg").symlink_to(secret)
    os.symlink(outside, media / "evil_cam")  # a camera folder that is a symlink
    for rel in ("front_door/link.jpg", "evil_cam/secret.jpg", "front_door/../../outside/secret.jpg"):
        record(database, rel, now - 10 * DAY)
    put_file(media, "front_door/x..y.jpg", now - 10 * DAY)  # ".." inside a name is just a name
    record(database, "front_door/x..y.jpg", now - 10 * DAY)
    report = run(config, now)
    assert report.deleted_paths == ["front_door/x..y.jpg"] and report.errors == []
    assert secret.exists() and (media / "front_door" / "link.jpg").is_symlink() and (media / "evil_cam").is_symlink()
    assert report.missing_marked == 3  # what the rows point at is not a file under the root
    late = run(config, now + 8 * DAY)
    assert late.rows_deleted["detections"] == 3 and secret.exists()


def test_uploads_that_never_finished_under_a_hidden_name_go_after_stale_upload_hours(tmp_path, media, database):
    """The watcher never takes a hidden file, so a camera's temporary upload left by a dropped
    connection (or a stolen camera password writing dot-files) would fill the disk past every quota;
    one older than stale_upload_hours goes, a younger one (an upload in progress) stays."""
    migrate(database)
    now = time.time()
    _, config = config_for(tmp_path, media, database, stale_upload_hours=24.0)
    old = put_file(media, "front_door/upload/.p3.jpg.tmp", now - 2 * DAY, size=5000)
    young = put_file(media, "front_door/upload/.p4.jpg.tmp", now - 3600)
    put_file(media, "front_door/.hidden-dir/x.jpg", now - 2 * DAY)  # inside a hidden folder: not walked
    dry = run(config, now, dry_run=True)
    assert (dry.stale_uploads_deleted, dry.stale_upload_bytes_freed) == (1, 5000) and old.exists()
    report = run(config, now)
    assert (report.stale_uploads_deleted, report.stale_upload_bytes_freed, report.errors) == (1, 5000, [])
    assert not old.exists() and young.exists() and (media / "front_door/.hidden-dir/x.jpg").exists()
    assert (media / "front_door" / "upload").is_dir()  # an FTP camera's upload folder stays, emptied or not
    assert report.deleted_paths == []  # not media: no rows, no events


def test_names_that_are_not_text_or_not_cameras_never_stop_a_run(tmp_path, media, database):
    """A Latin-1 name stopped retention before (the name cannot be queried); a folder "front.door" was
    folded into front_door, its files counted against front_door's quota. Both are left alone now:
    the watcher refused them visibly, so nothing was recorded for them."""
    migrate(database)
    now = time.time()
    _, config = config_for(tmp_path, media, database, max_age_days=1.0, camera_max_bytes=8192)
    put_file(media, os.fsdecode(b"front_door/caf\xe9.jpg"), now - 10 * DAY)
    put_file(media, "front_door/esc\x1b[2J.jpg", now - 10 * DAY)
    for i in range(4):  # 16 KiB in a folder that is not a camera id: front_door's quota must not see it
        put_file(media, f"front.door/{i}.jpg", now - 0.5 * DAY)
    put_file(media, "front_door/old.jpg", now - 10 * DAY)
    record(database, "front_door/old.jpg", now - 10 * DAY)
    put_file(media, "front_door/recent.jpg", now - 0.5 * DAY)
    record(database, "front_door/recent.jpg", now - 0.5 * DAY)
    report = run(config, now)
    assert report.deleted_paths == ["front_door/old.jpg"] and report.errors == []
    assert (media / "front_door" / "recent.jpg").exists() and len(list((media / "front.door").iterdir())) == 4
    assert set(report.cameras) == {"front_door"} and report.cameras["front_door"].reasons == {"age": 1}


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="mounting a tmpfs needs root and unshare"
)
def test_disk_pressure_on_a_small_tmpfs(tmp_path, database):
    """A burst fills a 24 MiB tmpfs below the low watermark; one run frees the oldest recorded files
    until free space is above the high watermark, and leaves everything younger than min_keep alone."""
    migrate(database)
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "tests.integration.pressure_scenario",
            database,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    if out.returncode == 77:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    total, low, high = result["total"], result["low"], result["high"]
    assert result["free_before"] < low <= high <= result["report"]["free_bytes_after"] == result["free_after"]
    deleted = result["report"]["deleted_paths"]
    old = result["old"]  # oldest first
    assert sorted(deleted) == sorted(old[: len(deleted)])  # oldest first, none skipped
    assert set(result["young"]) <= set(result["left"])  # younger than min_keep: untouched
    assert result["report"]["cameras"] and all(
        set(c["reasons"]) == {"watermark"} for c in result["report"]["cameras"].values()
    )
    print(
        f"tmpfs {total >> 20} MiB: free {result['free_before'] >> 20} MiB -> {result['free_after'] >> 20} MiB,"
        f" {len(deleted)} of {len(old)} old files deleted, {len(result['young'])} young kept"
    )


def test_the_service_runs_when_the_watcher_asks(make_stack, nats_server, media, database):
    """Free space is (by configuration) always below the low watermark: the watcher asks for a check
    as files arrive, and retention answers with a run it reports as triggered by the watcher."""
    migrate(database)
    stack = make_stack(
        model="none",
        retention={
            "low_watermark": "99.999%",
            "high_watermark": "99.999%",
            "disk_check_seconds": 3600.0,
            "interval_seconds": 3600.0,
        },
    )
    stack.start("retention", "watcher")
    stack.wait_ready("retention", "watcher")
    drop(media / "front_door" / "a.jpg", photo_bytes("camera", scale=0.25))
    reports = wait_until(
        lambda: [m for m in stream_messages(nats_server.url, "RETENTION") if m.trigger == "watcher"],
        what="a watcher-triggered run",
    )
    assert reports[0].deleted_count == 0 and reports[0].young_skipped == 1  # a.jpg is younger than min_keep_seconds
    assert "asking retention for a check" in stack.log("watcher")
    assert stack.stop("retention") == 0


def test_refuses_to_start_on_slash(make_stack):
    stack = make_stack(model="none")
    stack.config.write_text(
        stack.config.read_text().replace("media_root = ", 'media_root = "/"\n# was: media_root = ', 1)
    )
    stack.start("retention")
    assert stack.procs["retention"].wait(30) == 78
    assert "home directory" in stack.log("retention")


def test_two_folder_hosts_with_camera_prefixes_keep_out_of_each_others_rows(tmp_path, media, database):
    """Host A (watcher.camera_prefix = "a-") and host B share the database. The same relative path exists
    on both; A's retention judges only rows of its own cameras."""
    migrate(database)
    now = time.time()
    _, config = config_for(tmp_path, media, database, max_age_days=1.0)
    config.watcher.camera_prefix = "a-"
    put_file(media, "front_door/old.jpg", now - 5 * DAY)
    with connect(config, "retention", autocommit=True) as conn:
        for camera, rel in (
            ("a-front_door", "front_door/old.jpg"),
            ("b-front_door", "front_door/old.jpg"),
            ("b-front_door", "front_door/only-on-b.jpg"),
            ("a-front_door", "front_door/gone-from-a.jpg"),
        ):
            conn.execute(
                "INSERT INTO detections (detection_id, file_id, camera, path, captured_at, width, height, model, inference_ms,"
                " box_count, labels, boxes) VALUES (%s, %s, %s, %s, to_timestamp(%s), 1, 1, 'none', 1, 0, '{}', '[]')",
                (f"{camera}:{rel}", f"{camera}:{rel}", camera, rel, now - 5 * DAY),
            )
    report = run(config, now)
    assert report.deleted_paths == ["front_door/old.jpg"] and report.missing_marked == 1  # only gone-from-a.jpg
    assert sorted(rows(database, "SELECT camera, path FROM detections")) == [
        ("a-front_door", "front_door/gone-from-a.jpg"),
        ("b-front_door", "front_door/old.jpg"),
        ("b-front_door", "front_door/only-on-b.jpg"),
    ]


def test_first_start_waits_for_the_recorders_schema(make_stack, database):
    """Retention started before the recorder ever ran: no failed runs, it says it waits; once the
    recorder has migrated, its runs go through."""
    from tests.support import wait_until

    stack = make_stack(model="none", retention={"interval_seconds": 1.0})
    stack.start("retention")
    stack.wait_ready("retention")
    wait_until(
        lambda: "waiting for the recorder to migrate the schema" in stack.log("retention"), timeout=30, what="the wait"
    )
    assert "retention run failed" not in stack.log("retention")
    stack.start("recorder")
    wait_until(
        lambda: '"event": "retention run"' in stack.log("retention"), timeout=60, what="a run after the migration"
    )


def test_snapshots_go_with_their_events_and_within_their_quota(tmp_path, media, database):
    """A snapshot whose event went (here: its media aged out) is deleted in the same run; one no row
    names is deleted once past the grace (an older revision, a crash) but not while its analysis may
    still be on its way; over snapshots_max_bytes the oldest of events not kept go, and say why."""
    from services.retention.snapshots import ORPHAN_GRACE, QUOTA_REASON

    migrate(database)
    now = time.time()
    _, config = config_for(tmp_path, media, database, max_age_days=10.0, snapshots_max_bytes=25_000)
    snaps = tmp_path / "state" / "snapshots"
    snaps.mkdir(parents=True)

    def snapshot(event_id: str, name: str, age_days: float, size: int = 10_000) -> None:
        for suffix in (".jpg", ".thumb.jpg"):
            path = snaps / f"{name}{suffix}"
            path.write_bytes(b"\xff\xd8\xff" + bytes(size - 3))
            os.utime(path, (now - age_days * DAY, now - age_days * DAY))
        if event_id:
            with connect(config, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO event_analysis (event_id, revision, camera, risk_score, risk_level, summary, factors,"
                    " analyzer, analyzer_version, analyzed_at, snapshot, thumbnail) VALUES (%s, 1, 'front_door', 10,"
                    " 'low', 's', '[]', 'rules', '1', to_timestamp(%s), %s, %s)",
                    (event_id, now - age_days * DAY, f"{name}.jpg", f"{name}.thumb.jpg"),
                )

    for rel, days, keep in (("front_door/old.jpg", 12, False), ("front_door/kept.jpg", 9, True),
                            ("front_door/mid.jpg", 5, False), ("front_door/new.jpg", 1, False)):  # fmt: skip
        put_file(media, rel, now - days * DAY)
        record(database, rel, now - days * DAY, event_id=f"ev-{rel}", keep=keep)
        snapshot(f"ev-{rel}", f"front_door.{rel[11:-4]:0<32}-r1", days, size=6_000)
    snapshot("", "front_door.orphan_old".ljust(43, "0") + "-r1", 1)  # no row names it, a day old
    young = "front_door.orphan_young".ljust(43, "0") + "-r1"
    snapshot("", young, ORPHAN_GRACE / 2 / DAY)  # written a moment ago: its analysis may still come

    report = run(config, now)
    left = sorted(p.name.split("-r1")[0] for p in snaps.iterdir() if p.name.endswith(".thumb.jpg"))
    # old.jpg aged out: its event, its analysis and its snapshot went with it; the old orphan went;
    # then 3 x 12 kB + the young orphan is over 25 kB: the oldest not kept (mid) went, kept stayed
    assert left == sorted(["front_door.kept".ljust(43, "0"), "front_door.new".ljust(43, "0"), young.split("-r1")[0]])
    assert report.snapshots_deleted == 6 and report.snapshot_bytes_freed == 6_000 * 4 + 10_000 * 2
    assert rows(database, "SELECT event_id, snapshot_error FROM event_analysis WHERE snapshot IS NULL") == [
        ("ev-front_door/mid.jpg", QUOTA_REASON)
    ]
    assert rows(database, "SELECT count(*) FROM event_analysis WHERE event_id = 'ev-front_door/old.jpg'") == [(0,)]
