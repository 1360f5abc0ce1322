"""retention's decisions (pure) and its safe unlink (on real files in a temporary folder)."""

from __future__ import annotations

import os

import pytest

from services.retention.media import FallingFast, MediaFile, check_root, plan, scan, unlink_under
from services.runtime.config import ConfigError, RetentionCamera, RetentionConfig, load_config, parse_watermark

NOW = 1_800_000_000.0
DAY = 86400.0
MiB = 2**20


def f(rel: str, days: float, size: int = MiB) -> MediaFile:
    return MediaFile(rel, rel.split("/")[0], size, NOW - days * DAY)


def test_age_rules_per_camera_and_only_finished_not_kept_files():
    cfg = RetentionConfig(max_age_days=10, cameras={"a": RetentionCamera(max_age_days=2)})
    files = [f("a/1", 1), f("a/3", 3), f("a/5", 5), f("b/5", 5), f("b/11", 11), f("b/12", 12), f("a/kept", 9)]
    finished = {x.rel for x in files} - {"b/12"}
    p = plan(files, finished, kept={"a/kept"}, cfg=cfg, now=NOW, free=900 * MiB, total=1000 * MiB)
    assert [(x.rel, rule) for x, rule in p.delete] == [("b/11", "age"), ("a/5", "age"), ("a/3", "age")]
    assert (p.kept_skipped, p.unrecorded_skipped, p.young_skipped) == (1, 1, 0)


def test_quota_deletes_oldest_until_under():
    cfg = RetentionConfig(camera_max_bytes=3 * MiB)
    files = [f(f"a/{i}", i / 10) for i in range(6)] + [f("b/0", 0.5)]
    p = plan(files, {x.rel for x in files}, set(), cfg, NOW, free=900 * MiB, total=1000 * MiB)
    assert [(x.rel, rule) for x, rule in p.delete] == [("a/5", "quota"), ("a/4", "quota"), ("a/3", "quota")]


def test_watermark_oldest_first_across_cameras_never_young():
    cfg = RetentionConfig(low_watermark="10%", high_watermark="20%", min_keep_seconds=3600)
    files = [f("a/old", 5), f("b/older", 6), f("a/mid", 2), f("b/young", 0.01), f("a/young", 0.02)]
    # 100 MiB disk, 5 MiB free: needs 15 MiB more than there is to delete among the old ones
    p = plan(files, {x.rel for x in files}, set(), cfg, NOW, free=5 * MiB, total=100 * MiB)
    assert [x.rel for x, _ in p.delete] == ["b/older", "a/old", "a/mid"] and {r for _, r in p.delete} == {"watermark"}
    assert p.young_skipped == 2
    # above the low watermark: nothing under pressure
    assert plan(files, {x.rel for x in files}, set(), cfg, NOW, free=11 * MiB, total=100 * MiB).delete == []


def test_watermarks_parse_as_percent_or_size_and_bad_ones_name_the_field():
    assert parse_watermark("10%") == ("percent", 10.0)
    assert parse_watermark("20GiB") == ("bytes", 20 * 2**30)
    assert parse_watermark("500 MB") == ("bytes", 500e6)
    assert parse_watermark("1024") == ("bytes", 1024.0)
    with pytest.raises(ConfigError, match=r"retention\.low_watermark"):
        load_config(environ={"VIGIL_RETENTION__LOW_WATERMARK": "lots"})
    with pytest.raises(ConfigError, match="detections_days"):
        load_config(environ={"VIGIL_RETENTION__MAX_AGE_DAYS": "60"})


def test_falling_fast_warns_before_the_low_watermark():
    watch = FallingFast("10%", horizon=20)
    assert watch.check(0, 50 * MiB, 100 * MiB) is None
    assert watch.check(1, 49 * MiB, 100 * MiB) is None  # 1 MiB/s: 20 s from now still 29 MiB free
    assert "falling" in watch.check(2, 40 * MiB, 100 * MiB)  # 9 MiB/s: below 10 MiB within 20 s
    assert "below" in FallingFast("10%", 20).check(0, 9 * MiB, 100 * MiB)


def test_check_root_refuses_slash_and_homes(tmp_path):
    for bad in ("/", "/root", "/home", os.path.expanduser("~")):
        with pytest.raises(ConfigError, match="home directory"):
            check_root(bad)
    assert check_root(str(tmp_path)) == tmp_path.resolve()


def test_unlink_under_refuses_symlinks_dotdot_and_non_files(tmp_path):
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "cam" / "2026").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(b"x")
    (root / "cam" / "link.jpg").symlink_to(secret)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "cam" / "dir.jpg").mkdir()
    os.mkfifo(root / "cam" / "fifo.jpg")
    for rel in (
        "cam/link.jpg",
        "linked/secret.jpg",
        "cam/../../outside/secret.jpg",
        "/etc/passwd",
        "cam/dir.jpg",
        "cam/fifo.jpg",
    ):
        with pytest.raises(ValueError):
            unlink_under(root, rel)
    assert secret.exists() and (root / "cam" / "link.jpg").is_symlink()
    (root / "cam" / "2026" / "a..b.jpg").write_bytes(b"12345")
    assert unlink_under(root, "cam/2026/a..b.jpg") == 5
    assert (
        not (root / "cam" / "2026").exists() and (root / "cam").is_dir()
    )  # the emptied date folder goes, the camera stays
    assert unlink_under(root, "cam/gone.jpg") == 0
    assert sorted(x.rel for x in scan(root)) == []  # symlinks, FIFOs and folders are not media
    # an FTP camera's upload folder stays when emptied (its account may not make it again); the date
    # folder the camera made inside it goes
    (root / "cam" / "upload" / "2026-12-02").mkdir(parents=True)
    (root / "cam" / "upload" / "2026-12-02" / "x.jpg").write_bytes(b"123")
    assert unlink_under(root, "cam/upload/2026-12-02/x.jpg") == 3
    assert (root / "cam" / "upload").is_dir() and not (root / "cam" / "upload" / "2026-12-02").exists()


def test_quota_never_takes_files_younger_than_min_keep():
    cfg = RetentionConfig(camera_max_bytes=2 * MiB, min_keep_seconds=3600)
    files = [f("a/old", 2), f("a/young1", 0.001), f("a/young2", 0.002), f("a/young3", 0.003)]
    p = plan(files, {x.rel for x in files}, set(), cfg, NOW, free=900 * MiB, total=1000 * MiB)
    assert [(x.rel, rule) for x, rule in p.delete] == [("a/old", "quota")] and p.young_skipped == 3


def test_scan_names_cameras_as_the_watcher_does(tmp_path):
    """Only folders whose names are camera ids, and only names that can travel as text: "front.door"
    is not folded into front_door (whose quota and evidence it would share), and a name that is not
    UTF-8 never reaches a query (it stopped retention before)."""
    for folder, name in (
        ("front_door", "a.jpg"),
        ("front.door", "b.jpg"),
        ("front door", "c.jpg"),
        (".hidden", "d.jpg"),
    ):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"x")
    (tmp_path / "front_door" / "ctl\x1b.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"front_door", b"\xff.jpg"), "wb") as out:
        out.write(b"x")
    assert [(x.rel, x.camera) for x in scan(tmp_path, "site2-")] == [("front_door/a.jpg", "site2-front_door")]


def test_watermark_takes_from_cameras_over_their_share_first():
    """One camera filling the disk cannot push out another's evidence: under pressure the cameras above
    an equal share give first, oldest first, and only while they stay above it."""
    cfg = RetentionConfig(low_watermark="10%", high_watermark="12%", min_keep_seconds=0)
    quiet = [f("quiet/1", 10), f("quiet/2", 9)]  # the oldest files on the disk
    busy = [f(f"busy/{i}", 5 - i / 10) for i in range(8)]
    files = quiet + busy
    p = plan(files, {x.rel for x in files}, set(), cfg, NOW, free=9 * MiB, total=100 * MiB)  # needs 3 MiB
    assert {x.rel for x, _ in p.delete} == {"busy/0", "busy/1", "busy/2"}  # oldest first would take quiet's
    # past its share, a camera's oldest compete with everyone's again
    p = plan(files, {x.rel for x in files}, set(), cfg, NOW, free=5 * MiB, total=100 * MiB)  # needs 7 MiB
    assert {x.rel for x, _ in p.delete} == {"busy/0", "busy/1", "busy/2", "quiet/1", "quiet/2", "busy/3", "busy/4"}
