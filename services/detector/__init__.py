"""detector: FileUploaded -> Detections. A durable pull consumer shared by any number of detectors.

Per batch: decode files in a thread pool, infer in one worker thread (the event loop stays live and
keeps `in_progress()` flowing for long batches), publish Detections, await every PubAck, then ack.
A file that can never be processed is dead-lettered with its reason and term()ed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nats.aio.msg import Msg

from proto import Detections, FileUploaded, subject
from proto.topology import consumer
from services.detector.backends import Backend, load_backend
from services.detector.media import Undecodable, decode_clip_frame, decode_image, read_media
from services.runtime import bus
from services.runtime.config import Config
from services.runtime.service import Runtime

STAGE = "detector"
DECODE_THREADS = 2  # cv2.imdecode releases the GIL: two threads overlap decoding with the event loop


class Detector:
    def __init__(self, rt: Runtime, config: Config, backend: Backend) -> None:
        self.rt = rt
        self.cfg = config.detector
        self.root = Path(config.media_root)
        self.backend = backend
        self.decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
        # One inference thread: a hung inference stalls this loop, which stops the watchdog pings.
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")

    def load(self, up: FileUploaded):
        """Read and decode one file (decoder thread); returns a BGR frame or raises Undecodable."""
        if up.kind == "clip":
            return decode_clip_frame(self.root, up.path)
        return decode_image(read_media(self.root, up.path, self.cfg.max_file_bytes))

    def load_many(self, ups: list[FileUploaded]) -> list:
        """Decode a slice of the batch in one thread hop; failures are returned, not raised."""
        out = []
        for up in ups:
            try:
                out.append(self.load(up))
            except Exception as exc:  # noqa: BLE001 - sorted per file by handle_batch
                out.append(exc)
        return out

    def infer_many(self, frames: list) -> list[tuple[list, float]]:
        """Run the backend over every frame of the batch in the inference thread."""
        results = []
        for frame in frames:
            started = time.perf_counter()
            boxes = self.backend.detect(frame)
            results.append((boxes, (time.perf_counter() - started) * 1000))
        return results

    async def decode_batch(self, ups: list[FileUploaded]) -> list:
        """Split the batch over the decoder threads (one hop per thread, not per file)."""
        loop = asyncio.get_running_loop()
        n = self.decoders._max_workers
        chunks = [ups[i::n] for i in range(n)]
        parts = await asyncio.gather(*(loop.run_in_executor(self.decoders, self.load_many, c) for c in chunks if c))
        frames: list = [None] * len(ups)
        for i, part in enumerate(parts):
            frames[i::n] = part
        return frames

    async def handle_batch(self, msgs: list[Msg]) -> None:
        loop = asyncio.get_running_loop()
        keepalive = asyncio.create_task(self._keep_in_progress(msgs))
        try:
            work: list[tuple[Msg, FileUploaded]] = []
            for msg in msgs:
                up = bus.decode_or_none(msg, FileUploaded)
                if up is None:
                    await bus.dead_letter(self.rt, STAGE, msg, "payload is not a valid FileUploaded")
                else:
                    work.append((msg, up))
            frames = await self.decode_batch([up for _, up in work])
            ready = []
            for (msg, up), frame in zip(work, frames):
                if isinstance(frame, Undecodable):
                    await bus.dead_letter(self.rt, STAGE, msg, str(frame), camera=up.camera, file_id=up.file_id)
                elif isinstance(frame, BaseException):
                    self.rt.log.error("decode failed unexpectedly, will retry", file=up.path, error=repr(frame))
                    await msg.nak(delay=5)
                else:
                    ready.append((msg, up, frame))
            inferred = await loop.run_in_executor(self.inference, self.infer_many, [f for _, _, f in ready])
            results = []
            for (msg, up, frame), (boxes, ms) in zip(ready, inferred):
                h, w = frame.shape[:2]
                det = Detections(
                    file_id=up.file_id, camera=up.camera, path=up.path, captured_at=up.mtime, width=w, height=h,
                    model=self.backend.model, inference_ms=round(ms, 2), boxes=boxes, published_at=up.published_at,
                )
                results.append((msg, det))
            await bus.publish_many(self.rt, [(subject("detections", d.camera), d, f"det-{d.file_id}") for _, d in results])
            # Ack only after every Detections message is durable in its stream.
            await asyncio.gather(*(msg.ack() for msg, _ in results))
            self.rt.count("detected", len(results))
        finally:
            keepalive.cancel()

    async def _keep_in_progress(self, msgs: list[Msg]) -> None:
        """Tell the server we are still working, so a slow batch is not redelivered to another detector."""
        interval = consumer("detector").ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for msg in msgs:
                if not msg._ackd:  # nats-py keeps this private flag; in_progress() after ack is an error
                    with contextlib.suppress(Exception):
                        await msg.in_progress()


async def run(config: Config) -> None:
    # OpenCV's own guard against decompression bombs, read on first decode.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(config.detector.max_pixels)
    backend = load_backend(config.detector)  # refuses to start without a model, naming the fix
    async with Runtime.start("detector", config) as rt:
        rt.status_extra = f"backend {backend.name}, model {backend.model}"
        detector = Detector(rt, config, backend)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    bus.consume(rt, "detector", detector.handle_batch, config.detector.batch_size, config.detector.fetch_timeout)
                )
        finally:
            detector.decoders.shutdown(wait=False, cancel_futures=True)
            detector.inference.shutdown(wait=False, cancel_futures=True)

