"""Run inside `unshare --mount` by test_retention.py: mount a 24 MiB tmpfs, fill it with recorded
files (old ones, then a young burst), run retention once, print JSON. Exit 77 if mounting is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from services.database import connect
from services.retention.media import free_space, scan, watermark_bytes
from services.retention.service import run_once
from services.runtime.config import load_config
from tests.integration.retention_support import DAY, put_file, record


def main() -> int:
    dsn, work = sys.argv[1], Path(sys.argv[2])
    media = work / "tmpfs-media"
    media.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(media)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        print(f"cannot mount a tmpfs here: {mount.stderr.strip()}", file=sys.stderr)
        return 77
    environ = {
        "VIGIL_MEDIA_ROOT": str(media),
        "VIGIL_DATABASE__DSN": dsn,
        "VIGIL_RETENTION__LOW_WATERMARK": "25%",
        "VIGIL_RETENTION__HIGH_WATERMARK": "50%",
        "VIGIL_RETENTION__MIN_KEEP_SECONDS": "3600",
    }
    config = load_config(environ=environ)
    now = time.time()
    old, young = [], []
    for i in range(12):  # 12 MiB, recorded, a day apart (oldest first)
        rel = f"{'front_door' if i % 2 else 'backyard'}/old-{i:02}.jpg"
        put_file(media, rel, now - (20 - i) * DAY, size=1 << 20)
        record(dsn, rel, now - (20 - i) * DAY)
        old.append(rel)
    for i in range(8):  # the burst: 8 MiB written just now
        rel = f"front_door/burst-{i:02}.jpg"
        put_file(media, rel, now - 60, size=1 << 20)
        record(dsn, rel, now - 60)
        young.append(rel)
    free_before, total = free_space(media)
    with connect(config, "retention", autocommit=True) as conn:
        report = run_once(config, conn, now, "watermark", dry_run=False)
    free_after, _ = free_space(media)
    print(
        json.dumps(
            {
                "total": total,
                "low": watermark_bytes("25%", total),
                "high": watermark_bytes("50%", total),
                "free_before": free_before,
                "free_after": free_after,
                "old": old,
                "young": young,
                "left": sorted(f.rel for f in scan(media)),
                "report": json.loads(__import__("proto").encode(report)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
