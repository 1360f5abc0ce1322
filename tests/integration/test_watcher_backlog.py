"""A start-up backlog: files written while vigil was down, in random order with their mtimes set.

The watcher publishes each camera's files by mtime (not in directory order), and keeps its systemd
watchdog fed while it works through them. Command B runs 20,000 files; `just backlog` runs 100,000
(VIGIL_BACKLOG_FILES)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import time

from tests.integration.test_service_lifecycle import NotifyReader
from tests.support import REPO, stream_messages, wait_until

WATCHDOG_S = 3.0  # without the per-batch beat the loop starved it for 4.4 s here


def test_a_large_backlog_is_published_in_capture_order_without_starving_the_watchdog(tmp_path, media, nats_server):
    n = int(os.environ.get("VIGIL_BACKLOG_FILES", "20000"))
    rng = random.Random(1)
    jpeg = b"\xff\xd8\xff\xe0" + bytes(60)
    names = [(rng.choice(["front_door", "backyard"]), i) for i in range(n)]
    rng.shuffle(names)  # creation order != capture order
    t0 = time.time() - 86400
    for cam, i in names:
        path = media / cam / f"{rng.getrandbits(48):012x}.jpg"
        path.write_bytes(jpeg + i.to_bytes(4, "big"))
        os.utime(path, (t0 + i, t0 + i))
    config = tmp_path / "vigil.toml"
    config.write_text(
        f'media_root = "{media}"\nstate_dir = "{tmp_path}/state"\n[nats]\nservers = ["{nats_server.url}"]\n'
        "[watcher]\nsettle_seconds = 0.5\n"
    )
    os.environ.pop("WATCHDOG_PID", None)
    reader = NotifyReader(tmp_path / "notify.sock")
    stamps: list[float] = []
    seen = len(reader.seen)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "run", "watcher", str(config)],
        cwd=REPO,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def published() -> int:
            nonlocal seen
            for line in reader.seen[seen:]:
                if line == "WATCHDOG=1":
                    stamps.append(time.monotonic())
            seen = len(reader.seen)
            status = [s for s in reader.seen if s.startswith("STATUS=") and "published" in s]
            return int(status[-1].split("published ")[1].split(",")[0]) if status else 0

        wait_until(lambda: published() >= n, timeout=600, interval=0.2, what=f"{n} files published")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
        reader.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert stamps and max(gaps, default=0) < WATCHDOG_S, (
        f"watchdog starved for {max(gaps):.1f}s (systemd kills at {WATCHDOG_S}s)"
    )
    ups = stream_messages(nats_server.url, "UPLOADS")
    assert len(ups) == n
    for cam in ("front_door", "backyard"):
        times = [u.mtime for u in ups if u.camera == cam]
        assert times == sorted(times), f"{cam}: not in capture order"
