"""The analyzer and the notifier, measured (prints numbers; never pass/fail).

    just bench-analyzer [--events 5000] [--latency-events 300] [--rate 20]

1. rules alone: `rules.judge` on realistic events (3 labels, 50 spots, 2 zones) in this process, events/s.
2. the analyzer service: a backlog of N EventClosed in EVENTS, the real `vigil run analyzer` process
   (rules), events/s from its start to the last EventAnalyzed stored, and its CPU seconds.
3. end to end: EventClosed published at a fixed rate, analyzer + notifier running, one rule for every
   event with a JSON webhook on loopback as its target: latency from the EventClosed's publish to the
   target's "accepted", p50/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import nats

import proto
from proto import Box, EventClosed, LabelSummary, Spot
from services.analyzer import rules
from services.cli.stack import NatsServer
from tests.support import LoopbackHTTP, Services, write_config

ZONES = {
    "front_door": {
        "zones": [
            {
                "name": "porch",
                "points": 30,
                "labels": ["person"],
                "polygon": [[0, 400], [640, 400], [640, 720], [0, 720]],
            },
            {"name": "street", "points": 0, "polygon": [[0, 0], [1280, 0], [1280, 200], [0, 200]]},
        ]
    }
}


def event(i: int, t0: float, frame: str | None = None) -> EventClosed:
    """An event of 12 files; with `frame`, its best frame (a photo under the media root) and boxes, so
    the analyzer draws its snapshot as it does for every real event."""
    spots = [Spot("person" if k % 3 else "car", 20 * k % 1280, 300 + 9 * k % 420, 0.95 - k / 100) for k in range(50)]
    return EventClosed(
        best_path=frame,
        best_boxes=[Box(label="person", score=0.93, x1=400.0, y1=200.0, x2=640.0, y2=700.0)] if frame else [],
        event_id=f"ev-bench-{i:07d}",
        camera="front_door",
        started_at=t0 + 60 * i,
        ended_at=t0 + 60 * i + 12,
        file_ids=[f"f{i}-{k}" for k in range(12)],
        labels={
            "person": LabelSummary(count=8, max_score=0.93),
            "car": LabelSummary(count=3, max_score=0.8),
            "dog": LabelSummary(count=1, max_score=0.6),
        },
        best_file_id=f"f{i}-0",
        close_reason="idle",
        spots=spots,
    )


def bench_rules(n: int) -> float:
    from services.runtime.config import AnalyzerConfig

    cfg = msgspec.convert({"timezone": "Europe/Berlin", "cameras": ZONES}, AnalyzerConfig)
    evs = [event(i, 1.78e9) for i in range(n)]
    start = time.perf_counter()
    for ev in evs:
        rules.judge(ev, rules.camera_rules(cfg, ev.camera))
    return n / (time.perf_counter() - start)


async def publish_all(url: str, evs: list[EventClosed]) -> dict[str, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sent = {}
    futures = []
    for ev in evs:
        sent[ev.event_id] = time.time()
        futures.append(
            await js.publish_async(
                proto.subject("events", ev.camera), proto.encode(ev), headers=proto.headers_for(ev, ev.event_id)
            )
        )
    await asyncio.gather(*futures)
    await nc.close()
    return sent


async def stored(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def config_for(home: Path, nats_url: str, **sections) -> Path:
    """A config for the analyzer (and notifier): no database, no model; the camera's zones."""
    return write_config(
        home / "vigil.toml",
        media=home / "media",
        state=home / "state",
        nats_url=nats_url,
        dsn="postgresql://x@127.0.0.1:1/x",
        model="none",
        models_dir=None,
        **sections,
    )


def bench_service(home: Path, n: int, frames: bool = False) -> tuple[float, float]:
    frame = None
    if frames:  # one 1280x720 photo as every event's best frame (each revision still decodes, draws, encodes)
        import cv2
        import skimage.data

        (home / "media" / "front_door").mkdir(parents=True, exist_ok=True)
        photo = cv2.resize(cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR), (1280, 720))
        cv2.imwrite(str(home / "media" / "front_door" / "best.jpg"), photo)
        frame = "front_door/best.jpg"
    server = NatsServer(home / "nats", log_file=home / "nats.log").start()
    try:
        config = config_for(home, server.url, analyzer={"timezone": "UTC", "cameras": ZONES, "batch_size": 256})
        svc = Services(config, home / "logs")
        svc.start("analyzer")  # provisions EVENTS' consumer first, so the backlog is kept for it
        svc.wait_ready("analyzer")
        svc.stop("analyzer")
        asyncio.run(publish_all(server.url, [event(i, 1.78e9, frame) for i in range(n)]))
        cpu0 = children_cpu()
        start = time.perf_counter()
        svc.start("analyzer")
        while asyncio.run(stored(server.url, "ANALYSIS")) < n:
            time.sleep(0.05)
        took = time.perf_counter() - start
        svc.stop_all()
        return n / took, children_cpu() - cpu0
    finally:
        server.kill()


def bench_latency(home: Path, n: int, rate: float) -> list[float]:
    accepted: dict[str, float] = {}

    async def handler(request, k):
        from aiohttp import web

        body = json.loads(await request.read())
        accepted[body["message"].rsplit("/", 1)[-1]] = time.time()
        return web.Response(text="ok")

    hook = LoopbackHTTP(handler)
    server = NatsServer(home / "nats", log_file=home / "nats.log").start()
    try:
        notify = {
            "web_url": "http://vigil.local",
            "rules": [{"name": "all", "cameras": ["front_door"], "urls": [f"json://127.0.0.1:{hook.port}/hook"]}],
        }
        config = config_for(home, server.url, analyzer={"timezone": "UTC", "cameras": ZONES}, notify=notify)
        svc = Services(config, home / "logs")
        svc.start("analyzer", "notifier")
        svc.wait_ready("analyzer", "notifier")
        sent: dict[str, float] = {}
        t0 = time.time()
        for i in range(n):
            ev = event(i, t0)
            sent.update(asyncio.run(publish_all(server.url, [ev])))
            time.sleep(max(0.0, t0 + (i + 1) / rate - time.time()))
        deadline = time.time() + 60
        while len(accepted) < n and time.time() < deadline:
            time.sleep(0.1)
        svc.stop_all()
        return sorted(accepted[k] - sent[k] for k in sent if k in accepted)
    finally:
        server.kill()
        hook.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--latency-events", type=int, default=300)
    ap.add_argument("--rate", type=float, default=20.0, help="events/s for the latency run")
    args = ap.parse_args()
    print(f"rules.judge alone: {bench_rules(20000):10.0f} events/s (one core, 3 labels, 50 spots, 2 zones)", flush=True)
    with tempfile.TemporaryDirectory() as d:
        rate, cpu = bench_service(Path(d), args.events)
    print(
        f"analyzer service:  {rate:10.0f} events/s ({args.events} events backlog, rules; {cpu:.1f} CPU s, {cpu / args.events * 1000:.2f} ms CPU per event)",
        flush=True,
    )
    print(f"  goal >= 1,000 events/s: ratio {rate / 1000:.2f}")
    with tempfile.TemporaryDirectory() as d:
        n = max(50, args.events // 10)
        drawn, cpu = bench_service(Path(d), n, frames=True)
    print(
        f"  with snapshots:  {drawn:10.0f} events/s ({n} events, each a 1280x720 best frame decoded, drawn and"
        f" encoded twice; {cpu / n * 1000:.2f} ms CPU per event): ratio to the rules alone {drawn / rate:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        lat = bench_latency(Path(d), args.latency_events, args.rate)
    if lat:
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        print(
            f"EventClosed -> notification accepted by a loopback JSON webhook, {len(lat)}/{args.latency_events} at {args.rate:g}/s:"
        )
        print(
            f"  p50 {p(0.5):7.1f} ms   p99 {p(0.99):7.1f} ms   max {lat[-1] * 1000:7.1f} ms   mean {statistics.mean(lat) * 1000:7.1f} ms"
        )
    else:
        print("no notification arrived")


if __name__ == "__main__":
    main()
