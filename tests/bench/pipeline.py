"""Pipeline benchmark (prints numbers; never pass/fail).

    just bench [--files 5000] [--rate 50] [--seconds 10]

With the `none` model: end-to-end files/s from "file settled" (FileUploaded.published_at) to the
row committed in PostgreSQL, p50/p99 latency at a fixed drop rate, the raw nats-py fetch(64)+ack
rate on the same server for comparison, and each service's peak RSS (VmHWM).

With `--model synthetic` (one whole-frame person per file) the aggregator groups every file, so the
run also reports when the aggregator had acked the whole burst (its events durable): the end-to-end
figure that includes the reorder buffer. tests/bench/reorder.py compares it with the buffer off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from services.cli.stack import NatsCluster, NatsServer, Postgres
from tests.support import Services, query, wait_until, write_config

SERVICES = ("watcher", "detector", "aggregator", "recorder")


def tiny_jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        base[0, 0, 0] = i % 256
        base[0, 1, 0] = (i // 256) % 256
        out.append(cv2.imencode(".jpg", base)[1].tobytes())
    return out


def stage(folder: Path, blobs: list[bytes], prefix: str) -> list[tuple[Path, Path]]:
    """Write files into a hidden folder inside the camera folder (the watcher ignores it).

    Writing thousands of small files costs ~0.6 ms each on this disk, slower than the pipeline,
    so the timed part only renames them into place (~30 us each), as an uploader's final rename does.
    """
    hidden = folder / f".staging-{prefix}"
    hidden.mkdir(parents=True, exist_ok=True)
    moves = []
    for i, blob in enumerate(blobs):
        src = hidden / f"{prefix}{i:06}.jpg"
        src.write_bytes(blob)
        moves.append((src, folder / src.name))
    return moves


def release(moves: list[tuple[Path, Path]], rate: float | None = None) -> None:
    start = time.perf_counter()
    for i, (src, dst) in enumerate(moves):
        if rate:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        os.rename(src, dst)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


async def raw_fetch_ack(url: str, n: int = 20000) -> float:
    """Publish n small messages, then time fetch(64)+ack of all of them on one pull consumer."""
    import nats
    from nats.js.api import ConsumerConfig, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"]))
    payload = b"x" * 330
    for _i in range(0, n, 1000):
        await asyncio.gather(*(js.publish("bench.a", payload) for _ in range(1000)))
    await js.add_consumer("BENCH", ConsumerConfig(durable_name="b", ack_wait=60))
    sub = await js.pull_subscribe_bind(durable="b", stream="BENCH")
    got = 0
    t = time.perf_counter()
    while got < n:
        msgs = await sub.fetch(64, timeout=5)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    rate = n / (time.perf_counter() - t)
    await js.delete_stream("BENCH")
    await nc.close()
    return rate


async def redeliveries(url: str) -> dict[str, int]:
    """Messages each consumer had to redeliver: should be 0 in a healthy run."""
    import nats

    from proto.topology import CONSUMERS

    nc = await nats.connect(url)
    js = nc.jetstream()
    out = {c.durable: (await js.consumer_info(c.stream, c.durable)).num_redelivered for c in CONSUMERS}
    await nc.close()
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def aggregator_done_at(url: str, files: int, timeout: float = 600.0) -> float:
    """Wall time (epoch) at which the aggregator had acked all `files` detections of the burst."""
    import nats

    from proto.topology import consumer

    c = consumer("aggregator")
    nc = await nats.connect(url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            info = await js.consumer_info(c.stream, c.durable)
            if info.ack_floor.stream_seq >= files and not info.num_ack_pending and not info.num_pending:
                return time.time()
            await asyncio.sleep(0.02)
        raise TimeoutError("the aggregator did not ack the burst")
    finally:
        await nc.close()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--sync", choices=["default", "always"], default="default", help="JetStream sync_interval of the server"
    )
    ap.add_argument(
        "--replicas", type=int, choices=[1, 3], default=1, help="3: a 3-node NATS cluster on loopback, R3 streams"
    )
    ap.add_argument(
        "--model",
        choices=["none", "synthetic"],
        default="none",
        help="synthetic: one person per file, so every file is grouped",
    )
    ap.add_argument(
        "--reorder-window", type=int, default=None, help="aggregator.reorder_window (default: the config's)"
    )
    ap.add_argument(
        "--reorder-seconds", type=float, default=None, help="aggregator.reorder_seconds (default: the config's)"
    )
    return ap


def main() -> None:
    report(measure(parser().parse_args()))


def measure(args: argparse.Namespace) -> dict:
    aggregator = {
        k: v
        for k, v in (("reorder_window", args.reorder_window), ("reorder_seconds", args.reorder_seconds))
        if v is not None
    }

    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        root = Path(tmp)
        if args.replicas == 3:
            from tests.integration.test_cluster import provision_when_ready

            cluster = NatsCluster(root / "cluster", sync_always=args.sync == "always").start()
            provision_when_ready(cluster.urls)
            nats_server, urls = cluster.nodes[0], cluster.urls
        else:
            cluster = None
            nats_server = NatsServer(root / "nats", sync_always=args.sync == "always").start()
            urls = nats_server.url
        pg = Postgres(root / "pg").start()
        media = root / "media"
        media.mkdir()
        config = write_config(
            root / "vigil.toml",
            media=media,
            state=root / "state",
            nats_url=urls,
            dsn=pg.dsn(),
            model=args.model,
            models_dir=None,
            aggregator=aggregator,
            watcher={"settle_seconds": 0.05, "rescan_seconds": 3600.0},
            detector={"batch_size": 64, "fetch_timeout": 0.5},
            recorder={"batch_size": 256, "fetch_timeout": 0.05},
        )
        text = config.read_text().replace('log_level = "debug"', 'log_level = "info"')
        config.write_text(text)
        services = Services(config, root / "logs", {"VIGIL_NATS__REPLICAS": str(args.replicas)})
        try:
            services.start(*SERVICES)
            services.wait_ready(*SERVICES)

            # 1. throughput: a burst of files, settled -> committed row
            blobs = tiny_jpegs(args.files)
            burst = stage(media / "burst", blobs, "b")
            steady = stage(media / "steady", tiny_jpegs(args.files + int(args.rate * args.seconds))[args.files :], "s")
            cpu0 = {name: cpu_seconds(proc.pid) for name, proc in services.procs.items()}
            cpu0["nats-server"] = cpu_seconds(nats_server.proc.pid)
            release(burst)
            done = asyncio.run(aggregator_done_at(nats_server.url, args.files)) if args.model == "synthetic" else None
            wait_until(
                lambda: query(pg.dsn(), "SELECT count(*) FROM detections")[0][0] >= args.files,
                timeout=600,
                interval=0.5,
                what="burst recorded",
            )
            first, last_pub, last = map(
                float,
                query(
                    pg.dsn(),
                    "SELECT extract(epoch from min(published_at)),"
                    " extract(epoch from max(published_at)), extract(epoch from max(recorded_at)) FROM detections",
                )[0],
            )
            burst_rate = args.files / (last - first)
            grouped_rate = args.files / (done - first) if done else None
            cpu = {name: cpu_seconds(proc.pid) - cpu0[name] for name, proc in services.procs.items()}
            cpu["nats-server"] = cpu_seconds(nats_server.proc.pid) - cpu0["nats-server"]
            watcher_rate = args.files / (last_pub - first)

            # 2. latency at a fixed rate
            n = int(args.rate * args.seconds)
            release(steady, rate=args.rate)
            wait_until(
                lambda: query(pg.dsn(), "SELECT count(*) FROM detections WHERE camera = 'steady'")[0][0] >= n,
                timeout=120,
                what="steady recorded",
            )
            lat = [
                float(r[0]) * 1000
                for r in query(
                    pg.dsn(),
                    "SELECT extract(epoch from recorded_at - published_at) FROM detections WHERE camera = 'steady'",
                )
            ]

            rss = {name: peak_rss_mb(proc.pid) for name, proc in services.procs.items()}
            redelivered = asyncio.run(redeliveries(nats_server.url))
            # 3. the raw single-hop limit on the same server
            raw = asyncio.run(raw_fetch_ack(nats_server.url))
        finally:
            services.stop_all()
            pg.stop()
            if cluster is not None:
                cluster.kill()
            else:
                nats_server.stop()

    return dict(
        args=args,
        burst_rate=burst_rate,
        grouped_rate=grouped_rate,
        watcher_rate=watcher_rate,
        raw=raw,
        lat=lat,
        cpu=cpu,
        wall=last - first,
        redelivered=redelivered,
        rss=rss,
    )


def report(r: dict) -> None:
    args, burst_rate, raw, lat, cpu, rss = r["args"], r["burst_rate"], r["raw"], r["lat"], r["cpu"], r["rss"]
    print(
        f"\nvigil pipeline benchmark ({os.cpu_count()} CPUs, model {args.model}, R{args.replicas}, sync_interval {args.sync})"
    )
    print(f"  burst: {args.files} files, settled -> row in PostgreSQL   {burst_rate:8.0f} files/s")
    if r["grouped_rate"]:
        print(f"    settled -> grouped, aggregator acked (events durable) {r['grouped_rate']:8.0f} files/s")
    watcher_rate, redelivered = r["watcher_rate"], r["redelivered"]
    print(f"    of which the watcher published at                {watcher_rate:8.0f} files/s")
    print(f"  raw nats-py fetch(64)+ack, same server             {raw:8.0f} msg/s")
    print(f"  ratio end-to-end / raw single hop                  {burst_rate / raw:8.3f}")
    print(
        f"  steady {args.rate:.0f} files/s for {args.seconds:.0f} s: latency settled -> row   p50 {pct(lat, 50):6.1f} ms   p99 {pct(lat, 99):6.1f} ms   max {max(lat):6.1f} ms"
    )
    print(
        f"  CPU seconds spent on the burst ({r['wall']:.2f} s wall): "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    )
    print("  redelivered: " + ", ".join(f"{k} {v}" for k, v in redelivered.items()))
    print("  peak RSS (VmHWM): " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))


if __name__ == "__main__":
    main()
