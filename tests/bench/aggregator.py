"""Aggregator benchmark (prints numbers; never pass/fail).

    just bench-aggregator [--repo DIR] [--detections 20000] [--backlog 100000]

The aggregator process alone against a real nats-server: a backlog of detections with boxes is
published first, then the aggregator is started; detections/s is the backlog over the time from its
READY to the last ack. Cases: one camera, 50 cameras, and peak RSS (VmHWM) over a 100,000-detection
backlog. `--repo` runs another checkout's aggregator (e.g. a worktree of an older commit) with the
same driver, for before/after figures in one session.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

import proto
from proto import Box, Detections
from services.cli.stack import NatsServer
from services.runtime import provision

CAT = Box("cat", 0.6, 0, 0, 10, 10)


class _Quiet:
    """A logger that keeps provisioning chatter out of the figures."""

    def __getattr__(self, name):
        return lambda *a, **kw: None


async def publish_backlog(url: str, n: int, cameras: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision.provision(js, _Quiet())
    t0 = time.time() - n
    pending = []
    for i in range(n):
        cam = f"cam{i % cameras:02}"
        # one file per second per camera, with a 40 s gap every 60 files: events of ~60 detections
        t = t0 + (i // cameras) + 40 * ((i // cameras) // 60)
        d = Detections(
            file_id=f"{i:08x}",
            camera=cam,
            path=f"{cam}/{i:08x}.jpg",
            captured_at=float(t),
            width=640,
            height=480,
            model="bench",
            inference_ms=1.0,
            boxes=[CAT],
        )
        pending.append(
            await js.publish_async(
                proto.subject("detections", cam), proto.encode(d), headers=proto.headers_for(d, f"det-{i}")
            )
        )
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await nc.close()


async def acked(url: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().consumer_info("DETECTIONS", "aggregator")
    await nc.close()
    return info.ack_floor.stream_seq if info.ack_floor else 0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def case(repo: Path, n: int, cameras: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(root / "nats", log_file=root / "nats.log").start()
        try:
            asyncio.run(publish_backlog(server.url, n, cameras))
            config = root / "vigil.toml"
            config.write_text(
                f'state_dir = "{root}/state"\nlog_level = "warning"\n[nats]\nservers = ["{server.url}"]\n'
                "[aggregator]\nidle_seconds = 30.0\nmax_seconds = 90.0\nbatch_size = 256\n"
            )
            with open(root / "aggregator.log", "w") as log:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(
                    [sys.executable, "-m", "services.cli.main", "run", "aggregator", str(config)],
                    cwd=repo,
                    env={**os.environ, "PYTHONPATH": str(repo)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            started = time.monotonic()
            while asyncio.run(acked(server.url)) == 0:
                time.sleep(0.05)
            first = time.monotonic()
            while asyncio.run(acked(server.url)) < n:
                time.sleep(0.1)
                if time.monotonic() - started > 900:
                    raise SystemExit(f"aggregator did not finish; see {root}/aggregator.log")
            elapsed = time.monotonic() - first
            rss = peak_rss_mb(proc.pid)
            proc.terminate()
            proc.wait(30)
            return n / elapsed, rss
        finally:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--detections", type=int, default=20000)
    ap.add_argument("--backlog", type=int, default=100000)
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    print(f"vigil aggregator benchmark ({os.cpu_count()} CPUs, repo {repo})")
    one, rss1 = case(repo, args.detections, 1)
    print(f"  {args.detections} detections, 1 camera                {one:8.0f} detections/s   peak RSS {rss1:.0f} MB")
    many, rss50 = case(repo, args.detections, 50)
    print(f"  {args.detections} detections, 50 cameras              {many:8.0f} detections/s   peak RSS {rss50:.0f} MB")
    big, rss = case(repo, args.backlog, 10)
    print(f"  {args.backlog} detection backlog, 10 cameras      {big:8.0f} detections/s   peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
