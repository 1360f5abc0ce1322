"""The web UI and the event snapshots, measured (prints numbers; never pass/fail).

    just bench-web [--events 10000] [--requests 200]

1. pages: N events (4 cameras, each with its analysis, thumbnail name and one detection) in a real
   PostgreSQL, the real `vigil run web` process, a logged-in client on loopback asking each page
   `--requests` times one after another: p50 / p99 / max in ms per page (events first page, a deep
   page, a filtered page, one event, the JSON API).
2. snapshots: what the analyzer pays per event revision (`snapshot.make`: decode the best frame, draw,
   encode the snapshot and the thumbnail, write both atomically) for a 512 x 512 JPEG and a 1920 x 1080
   one, ms per event and bytes written.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import psycopg

from proto import Box, EventClosed, LabelSummary
from services.analyzer import snapshot
from services.cli.stack import NatsServer, Postgres, free_port, prepare_schema
from services.web.auth import hash_password
from tests.support import Services, photo_bytes, write_config

CAMERAS = ("front_door", "backyard", "garage", "driveway")
LEVELS = (("low", 10), ("medium", 40), ("high", 70), ("critical", 95))


def fill(dsn: str, n: int, t0: float) -> None:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY detections (detection_id, file_id, camera, path, captured_at, width, height, model, inference_ms,"
            " box_count, labels, boxes) FROM STDIN"
        ) as copy:
            for i in range(n):
                cam = CAMERAS[i % 4]
                copy.write_row((f"d{i}", f"d{i}", cam, f"{cam}/f{i}.jpg", time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(t0 + 30 * i)), 1920, 1080, "yolox_nano", 8.0, 1, "{person}", '[["person", 0.9, 100, 100, 300, 600]]'))  # fmt: skip
        with cur.copy(
            "COPY events (event_id, camera, started_at, ended_at, detection_count, labels, best_file_id, close_reason)"
            " FROM STDIN"
        ) as copy:
            for i in range(n):
                at = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(t0 + 30 * i))
                copy.write_row((f"ev-{i:06d}", CAMERAS[i % 4], at, at, 1, '{"person": {"count": 1, "max_score": 0.9}}', f"d{i}", "idle"))  # fmt: skip
        with cur.copy("COPY event_detections (detection_id, event_id) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row((f"d{i}", f"ev-{i:06d}"))
        with cur.copy(
            "COPY event_analysis (event_id, revision, camera, risk_score, risk_level, summary, factors, analyzer,"
            " analyzer_version, analyzed_at, snapshot, thumbnail) FROM STDIN"
        ) as copy:
            for i in range(n):
                level, score = LEVELS[i % 4]
                at = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(t0 + 30 * i))
                name = f"{CAMERAS[i % 4]}.{i:032x}-r1"
                copy.write_row((f"ev-{i:06d}", 1, CAMERAS[i % 4], score, level, f"Person on {CAMERAS[i % 4]}", '[{"name": "label person", "points": 40, "detail": "person seen"}]', "rules", "rules-1", at, f"{name}.jpg", f"{name}.thumb.jpg"))  # fmt: skip
        conn.commit()
        conn.execute("ANALYZE")


async def measure(url: str, password: str, n: int, requests: int) -> dict[str, list[float]]:
    pages = {
        "events (first page)": "/events",
        "events (page 100)": "/events?page=100",
        "events (camera + level)": "/events?camera=garage&level=high",
        "events (unreviewed)": "/events?reviewed=no",
        "event": f"/events/ev-{n // 2:06d}",
        "api events": "/api/v1/events",
    }
    out: dict[str, list[float]] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(f"{url}/login") as r:
            token = re.search(r'name="login_csrf" value="([^"]+)"', await r.text()).group(1)
        async with s.post(f"{url}/login", data={"login_csrf": token, "username": "admin", "password": password}) as r:
            assert r.status == 200, r.status
        for name, path in pages.items():
            times = []
            for _ in range(requests):
                start = time.perf_counter()
                async with s.get(url + path) as r:
                    await r.read()
                    assert r.status == 200, (path, r.status)
                times.append((time.perf_counter() - start) * 1000)
            out[name] = times
    return out


def pct(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * p))]


def bench_pages(home: Path, n: int, requests: int) -> None:
    pg = Postgres(home / "pg", port=free_port(), log_file=home / "pg.log").start()
    nats_server = NatsServer(home / "nats", log_file=home / "nats.log").start()
    try:
        prepare_schema(pg)
        t0 = time.time() - 30 * n
        start = time.perf_counter()
        fill(pg.dsn(), n, t0)
        print(f"{n} events with analyses and detections written in {time.perf_counter() - start:.1f} s")
        creds = home / "credentials"
        creds.mkdir(mode=0o700)
        (creds / "web-password").write_text(hash_password("bench-password") + "\n")
        (creds / "web-password").chmod(0o600)
        port = free_port()
        config = write_config(
            home / "vigil.toml", media=home / "media", state=home / "state", nats_url=nats_server.url,
            dsn=pg.dsn(), model="none", models_dir=None, web={"http_port": port},
        )  # fmt: skip
        (home / "media").mkdir()
        svc = Services(config, home / "logs", {"CREDENTIALS_DIRECTORY": str(creds)})
        svc.start("web")
        svc.wait_ready("web", timeout=60)
        while '"event": "serving"' not in svc.log("web"):
            time.sleep(0.1)
        results = asyncio.run(measure(f"http://127.0.0.1:{port}", "bench-password", n, requests))
        svc.stop_all()
        print(f"\npages over {n} events, {requests} requests each (one client, loopback), ms:")
        print(f"  {'page':28} {'p50':>7} {'p99':>7} {'max':>7}")
        for name, times in results.items():
            print(f"  {name:28} {statistics.median(times):7.1f} {pct(times, 0.99):7.1f} {max(times):7.1f}")
    finally:
        nats_server.kill()
        pg.stop()


def bench_snapshots(home: Path, rounds: int = 40) -> None:
    media, out = home / "snap-media", home / "snaps"
    (media / "cam").mkdir(parents=True)
    (media / "cam" / "small.jpg").write_bytes(photo_bytes("astronaut"))
    big = cv2.resize(cv2.imdecode(np.frombuffer(photo_bytes("astronaut"), np.uint8), cv2.IMREAD_COLOR), (1920, 1080))
    cv2.imwrite(str(media / "cam" / "big.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    boxes = [Box("person", 0.93, 100, 80, 420, 500), Box("car", 0.7, 30, 300, 200, 480)]
    print("\nsnapshot per event revision (decode, draw, encode snapshot + thumbnail, write both atomically):")
    for name, size in (("small.jpg", "512 x 512"), ("big.jpg", "1920 x 1080")):
        times, written = [], 0
        for i in range(rounds):
            ev = EventClosed(
                event_id=f"ev-{name}-{i}", camera="cam", started_at=0.0, ended_at=0.0, file_ids=["f"],
                labels={"person": LabelSummary(count=1, max_score=0.93)}, best_file_id="f", close_reason="idle",
                best_path=f"cam/{name}", best_boxes=boxes,
            )  # fmt: skip
            start = time.perf_counter()
            made = snapshot.make(str(media), out, ev, [])
            times.append((time.perf_counter() - start) * 1000)
            written += made.written_bytes
        print(
            f"  {size:12} p50 {statistics.median(times):6.1f} ms  p99 {pct(times, 0.99):6.1f} ms"
            f"  {written / rounds / 1024:6.1f} KiB written per event"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vigil-bench-web-") as tmp:
        home = Path(tmp)
        bench_snapshots(home)
        bench_pages(home, args.events, args.requests)


if __name__ == "__main__":
    main()
