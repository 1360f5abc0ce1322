"""JetStream sync_interval: the default (fsync every 2 minutes) against `always` (fsync before every
PubAck), on this machine, in one run:

    python -m tests.bench.sync_interval [--files 2000]      (just bench-sync)

1. publish: one 1 KiB message at a time, each PubAck awaited (the watcher's worst case), and 256 in
   flight at a time (publish_many), messages/s;
2. end to end: the pipeline benchmark (model none) against a server in each mode, files/s.
Prints both, and the ratio always/default.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.cli.stack import NatsServer


async def publish_rates(url: str, n_seq: int = 2000, n_pipe: int = 20000) -> tuple[float, float]:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="SYNCBENCH", subjects=["syncbench.>"])
    payload = b"x" * 1024
    start = time.perf_counter()
    for _ in range(n_seq):
        await js.publish("syncbench.a", payload)
    seq_rate = n_seq / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n_pipe // 256):
        futures = [await js.publish_async("syncbench.b", payload) for _ in range(256)]
        await asyncio.gather(*futures)
    pipe_rate = (n_pipe // 256 * 256) / (time.perf_counter() - start)
    await nc.close()
    return seq_rate, pipe_rate


def pipeline_rate(sync: str, files: int) -> float | None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.pipeline", "--files", str(files), "--seconds", "2", "--sync", sync],
        capture_output=True,
        text=True,
        timeout=900,
    )
    m = re.search(r"([\d,.]+) files/s", out.stdout)
    if not m:
        print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
        return None
    return float(m.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    args = ap.parse_args()
    results = {}
    for mode in ("default", "always"):
        with tempfile.TemporaryDirectory(prefix="vigil-sync-") as tmp:
            server = NatsServer(Path(tmp) / "nats", sync_always=mode == "always").start()
            try:
                seq, pipe = asyncio.run(publish_rates(server.url))
            finally:
                server.stop()
        e2e = pipeline_rate(mode, args.files)
        results[mode] = (seq, pipe, e2e)
        print(
            f"sync_interval {mode:7}: publish {seq:9,.0f} msg/s one at a time, {pipe:9,.0f} msg/s 256 in flight;"
            f" pipeline {e2e or 0:7,.0f} files/s",
            flush=True,
        )
    d, a = results["default"], results["always"]
    print(
        f"always/default: one at a time {a[0] / d[0]:.2f}, in flight {a[1] / d[1]:.2f}, pipeline {(a[2] or 0) / (d[2] or 1):.2f}"
    )


if __name__ == "__main__":
    main()
