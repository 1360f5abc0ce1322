"""Camera clocks, retention's view of a file (arrival, reused paths), the watcher's ledger and ordering."""

from __future__ import annotations

import time

from proto import FileUploaded
from services.health.checks import Snapshot
from services.health.service import BacklogTrend, observe
from services.health.web import HealthState
from services.retention.media import MediaFile, plan
from services.retention.service import with_pipeline_times
from services.runtime.config import RetentionConfig, load_config
from services.watcher.files import Ledger
from services.watcher.service import sane_capture_time

NOW = 1_800_000_000.0
DAY = 86400.0
MiB = 2**20


def test_capture_time_is_the_arrival_when_the_camera_clock_is_not_plausible():
    floor = 30 * DAY
    assert sane_capture_time(NOW - 10, NOW, 300, floor) == (NOW - 10, False)
    assert sane_capture_time(NOW + 200, NOW, 300, floor) == (NOW + 200, False)  # a few minutes of skew is fine
    assert sane_capture_time(NOW + 3600, NOW, 300, floor) == (NOW, True)  # an hour ahead
    assert sane_capture_time(946_684_800.0, NOW, 300, floor) == (NOW, True)  # reset to 2000-01-01
    assert sane_capture_time(NOW - 29 * DAY, NOW, 300, floor) == (
        NOW - 29 * DAY,
        False,
    )  # an old backlog within retention


def upload(camera: str, suspect: bool) -> FileUploaded:
    return FileUploaded(
        file_id="x",
        camera=camera,
        path=f"{camera}/a.jpg",
        size=1,
        mtime=NOW,
        sha256="0",
        kind="image",
        clock_suspect=suspect,
        camera_mtime=946_684_800.0 if suspect else None,
    )


def test_health_raises_camera_clock_while_the_latest_upload_has_a_wrong_clock():
    config = load_config(environ={"VIGIL_HEALTH__CAMERA_SILENT_SECONDS": "0"})
    state = HealthState(config)
    snap = Snapshot(taken_at=NOW, services=[], stages=[], disks=[], gpus=[], dead_letters={}, systemd="x")
    state.observe(upload("porch", True))
    state.observe(upload("yard", False))
    got = observe(snap, state, config, BacklogTrend(), NOW)
    assert set(got) == {"camera_clock:porch"} and "2000-01-01" in got["camera_clock:porch"][3]
    state.observe(upload("porch", False))  # the camera's clock was fixed: the alert resolves
    assert observe(snap, state, config, BacklogTrend(), NOW) == {}


def test_retention_judges_youth_by_arrival_and_age_by_the_sane_capture_time():
    """A camera reset to 2000 and one an hour ahead: neither is deleted just after upload, and under
    disk pressure the future-dated files go in arrival order like any other."""
    cfg = RetentionConfig(max_age_days=30, low_watermark="10%", high_watermark="20%", min_keep_seconds=3600)
    on_disk = [
        MediaFile("reset/a.jpg", "reset", MiB, 946_684_800.0),
        MediaFile("ahead/b.jpg", "ahead", MiB, NOW + 3600),
        MediaFile("old/c.jpg", "old", MiB, NOW - 2 * DAY),
        MediaFile("late/d.jpg", "late", MiB, NOW - 3 * DAY),
    ]
    # what the pipeline recorded: the watcher's sane capture time and its arrival time
    times = {
        "reset/a.jpg": (NOW - 60, NOW - 60, MiB, 946_684_800.0),
        "ahead/b.jpg": (NOW - 7200, NOW - 7200, MiB, NOW + 3600),
        "old/c.jpg": (NOW - 2 * DAY, NOW - 2 * DAY, MiB, NOW - 2 * DAY),
        "late/d.jpg": (NOW - 3 * DAY, NOW - 30, MiB, NOW - 3 * DAY),
    }  # a backlog file, captured 3 days ago, arrived now
    files, finished = with_pipeline_times(on_disk, times)
    assert finished == set(times)
    p = plan(files, finished, set(), cfg, NOW, free=1 * MiB, total=100 * MiB)  # disk nearly full
    assert [(f.rel, rule) for f, rule in p.delete] == [("old/c.jpg", "watermark"), ("ahead/b.jpg", "watermark")]
    assert p.young_skipped == 2  # reset/a.jpg and late/d.jpg arrived a minute ago: kept, whatever their times say


def test_a_new_upload_at_a_reused_path_is_still_pending():
    cfg = RetentionConfig(max_age_days=1)
    recorded = {"cam/x.jpg": (NOW - 5 * DAY, NOW - 5 * DAY, MiB, NOW - 5 * DAY)}
    same = [MediaFile("cam/x.jpg", "cam", MiB, NOW - 5 * DAY)]
    replaced = [
        MediaFile("cam/x.jpg", "cam", 2 * MiB, NOW - 5 * DAY)
    ]  # another file, same name (and even the same mtime)
    for files, deleted in ((same, ["cam/x.jpg"]), (replaced, [])):
        files, finished = with_pipeline_times(files, recorded)
        assert [
            f.rel for f, _ in plan(files, finished, set(), cfg, NOW, free=90 * MiB, total=100 * MiB).delete
        ] == deleted


def test_ledger_is_pruned_of_files_that_are_gone(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.mark(
        [("cam/a.jpg", 1, 1, "a", "published", time.time()), ("cam/b.jpg", 1, 1, "b", "published", time.time())]
    )
    assert ledger.prune({"cam/a.jpg"}) == 1
    assert ledger.known("cam/a.jpg", 1, 1) and not ledger.known("cam/b.jpg", 1, 1)
    ledger.close()
