"""Detector benchmark (prints numbers; never pass/fail).

    just bench-detector [--images 200]

Images/s of the detector service on the real model (FileUploaded published straight to UPLOADS,
counted when its Detections are stored in the stream) against a plain onnxruntime loop doing the
same read + decode + letterbox + inference on the same files, in the same run; then the effect of
batch size and decode threads.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

import cv2
import nats
import numpy as np

import proto
from proto import FileUploaded
from services.cli.stack import NatsServer
from services.detector import decoders
from services.detector.media import decode_image
from services.watcher.files import file_id
from tests.support import Services, find_models_dir, photo_bytes, write_config

PHOTOS = ("astronaut", "camera", "chelsea", "coffee")


def make_images(folder: Path, n: int) -> list[Path]:
    """n JPEG snapshots at 1280x720, like a typical camera's."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        image = decode_image(photo_bytes(PHOTOS[i % 4]))[0]
        image = cv2.resize(image, (1280, 720))
        cv2.putText(image, f"{i:05}", (20, 700), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)  # distinct bytes
        path = folder / f"img{i:05}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def raw_loop(model: Path, paths: list[Path], threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    start = time.perf_counter()
    for path in paths:
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        frame = decoders.letterbox(image, 416, "yolox")
        raw = session.run(None, {name: decoders.to_tensor([frame], "yolox")})[0]
        decoders.decode(raw[0], "yolox", 416, frame, 0.3, 0.45)
    return len(paths) / (time.perf_counter() - start)


async def feed_and_time(url: str, media: Path, paths: list[Path], camera: str) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    before = (await js.stream_info("DETECTIONS")).state.messages
    start = time.perf_counter()
    for p in paths:
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        rel = str(p.relative_to(media))
        msg = FileUploaded(
            file_id=file_id(camera, rel, sha),
            camera=camera,
            path=str(p.relative_to(media)),
            size=len(data),
            mtime=p.stat().st_mtime,
            sha256=sha,
            kind="image",
            published_at=time.time(),
        )
        await js.publish(f"vigil.uploads.{camera}", proto.encode(msg), headers=proto.headers_for(msg))
    while (await js.stream_info("DETECTIONS")).state.messages < before + len(paths):
        await asyncio.sleep(0.05)
    rate = len(paths) / (time.perf_counter() - start)
    await nc.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    models = find_models_dir()
    if models is None:
        raise SystemExit("yolox_nano.onnx not found: set VIGIL_MODELS_DIR")
    threads = 2
    with tempfile.TemporaryDirectory(prefix="vigil-bench-det-") as tmp:
        root = Path(tmp)
        media = root / "media"
        paths = make_images(media / "cam", args.images)
        raw = raw_loop(models / "yolox_nano.onnx", paths, threads)
        server = NatsServer(root / "nats").start()
        results = []
        try:
            for batch, decode_threads in ((1, 1), (8, 1), (8, 2), (16, 2)):
                config = write_config(
                    root / f"vigil-{batch}-{decode_threads}.toml",
                    media=media,
                    state=root / "state",
                    nats_url=server.url,
                    dsn="postgresql://unused",
                    model="yolox-nano",
                    models_dir=models,
                    detector={
                        "batch_size": batch,
                        "decode_threads": decode_threads,
                        "threads": threads,
                        "backend": "cpu",
                        "batch_wait_ms": 50.0,
                    },
                )
                services = Services(config, root / f"logs-{batch}-{decode_threads}")
                services.start("detector")
                services.wait_ready("detector")
                rate = asyncio.run(feed_and_time(server.url, media, paths, f"b{batch}d{decode_threads}"))
                rss = (
                    int(
                        Path(f"/proc/{services.procs['detector'].pid}/status").read_text().split("VmHWM:")[1].split()[0]
                    )
                    / 1024
                )
                services.stop_all()
                results.append((batch, decode_threads, rate, rss))
        finally:
            server.stop()
    print(
        f"\nvigil detector benchmark: YOLOX-Nano 416, onnxruntime CPU, {threads} intra-op threads, "
        f"{args.images} JPEGs 1280x720, {os.cpu_count()} CPUs"
    )
    print(f"  raw onnxruntime loop (read, decode, letterbox, infer, decode boxes)   {raw:6.1f} images/s")
    for batch, dthreads, rate, rss in results:
        print(
            f"  detector service, batch {batch:2}, decode threads {dthreads}                     {rate:6.1f} images/s"
            f"   {rate / raw:5.0%} of raw   peak RSS {rss:.0f} MB"
        )


if __name__ == "__main__":
    main()
