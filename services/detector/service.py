"""detector: FileUploaded -> Detections. A durable pull consumer shared by any number of detectors.

Two stages joined by a one-slot queue, so decoding the next batch overlaps inference of this one:
  prepare: fetch up to `batch_size` messages (or what arrived within `batch_wait_ms`), read, decode and
           letterbox them in the decoder threads (clips: sample frames at `clip_fps`);
  infer:   run the backend in the single inference thread, decode boxes, publish Detections, await
           every PubAck, then ack.
A file that can never be processed is dead-lettered with its reason and term()ed. Messages held by
either stage get in_progress() so a long clip or a slow CPU is not redelivered elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from nats.aio.msg import Msg

from proto import Alert, Detections, FileUploaded, subject
from proto.topology import consumer
from services.detector.decoders import Letterboxed
from services.detector.engine import Engine, keep_for_camera
from services.detector.engine_build import PreReady, build_engine
from services.detector.fallback import FallbackBackend
from services.detector.media import Undecodable, decode_image, read_media, sample_clip
from services.runtime import jetstream
from services.runtime.config import Config
from services.runtime.files import safe_parts
from services.runtime.service import RestartRequested, Runtime, StoppedBeforeReady
from services.watcher.files import camera_id

STAGE = "detector"


@dataclass
class Unit:
    """One fetched message and the frames it became (one for an image, several for a clip)."""

    msg: Msg
    up: FileUploaded
    frames: list[tuple[Letterboxed, int | None, float]] = field(default_factory=list)  # (frame, index, offset)
    start: float = 0.0  # capture time of frame 0 (clip: mtime - duration)
    error: BaseException | None = None


class Detector:
    def __init__(self, rt: Runtime, config: Config, engine: Engine) -> None:
        self.rt = rt
        self.cfg = config.detector
        self.root = Path(config.media_root)
        self.camera_prefix = config.watcher.camera_prefix
        self.engine = engine
        self.decoders = ThreadPoolExecutor(max_workers=self.cfg.decode_threads, thread_name_prefix="decode")
        # One inference thread: a hung inference stalls the infer loop, which stops the watchdog pings.
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self.queue: asyncio.Queue[list[Unit] | None] = asyncio.Queue(maxsize=1)
        self.held: dict[int, Msg] = {}  # every message either stage holds (by id: Msg is unhashable)

    # ---- stage 1: fetch + decode ----------------------------------------------------------
    def load(self, up: FileUploaded, msg: Msg) -> Unit:
        """Decoder thread: read, decode and letterbox one file's frames; errors land in unit.error."""
        unit = Unit(msg, up, start=up.mtime)
        try:
            try:
                safe_parts(up.path)
            except ValueError:
                raise Undecodable(f"path {up.path!r} escapes the media root") from None
            if camera_id(up.path.split("/", 1)[0], self.camera_prefix) != up.camera:
                # the watcher names a file's camera after its folder; anything else is forged (a retried
                # letter, another user's upload), and would put one camera's file into another's events
                raise Undecodable(f"path {up.path!r} is not in camera {up.camera}'s folder")
            if up.kind == "clip":
                frames, duration = sample_clip(
                    self.root, up.path, self.cfg.clip_fps, self.cfg.clip_max_frames, self.cfg.max_file_bytes
                )
                unit.start = up.mtime - duration  # a clip's mtime is when recording ended
                unit.frames = [(self._letterbox(img, img.shape[1], img.shape[0]), idx, off) for idx, off, img in frames]
            else:
                image, w, h = decode_image(
                    read_media(self.root, up.path, self.cfg.max_file_bytes), self.engine.size, self.cfg.max_pixels
                )
                unit.frames = [(self._letterbox(image, w, h), None, 0.0)]
        except Exception as exc:  # noqa: BLE001 - sorted per file by the caller
            unit.error = exc
        return unit

    def _letterbox(self, image, width: int, height: int) -> Letterboxed:
        lb = self.engine.prepare(image)
        if (width, height) == (image.shape[1], image.shape[0]):
            return lb
        scale = image.shape[1] / width  # decoded at reduced size: map boxes back to the source pixels
        return Letterboxed(lb.pixels, lb.ratio * scale, lb.pad_x, lb.pad_y, width, height)

    async def prepare_loop(self) -> None:
        """Stage 1: batches.consume's fetch loop, each batch decoded and handed to the inference stage."""
        try:
            await self.rt.bus.consume(
                "detector",
                self.prepare,
                self.cfg.batch_size,
                self.cfg.fetch_timeout,
                stage=STAGE,
                batch_wait=self.cfg.batch_wait_ms / 1000,
            )
        finally:
            if not asyncio.current_task().cancelling():  # a forced stop must not wait on a full queue
                await self.queue.put(None)

    async def prepare(self, msgs: list[Msg]) -> None:
        self.held.update((id(m), m) for m in msgs)
        units = []
        for msg in msgs:
            up = jetstream.decode_as(msg, FileUploaded)
            if isinstance(up, str):
                try:
                    await self.dead_letter(msg, up)
                except jetstream.TRANSIENT:  # the DLQ is away: this one comes back later, the rest go on
                    self.held.pop(id(msg), None)
                    with contextlib.suppress(*jetstream.TRANSIENT):
                        await msg.nak(delay=5.0)
            else:
                units.append((up, msg))
        for group in self.frame_budget_groups(units):
            await self.hand_over(await self.decode_group(group))

    async def decode_group(self, group: list[tuple[FileUploaded, Msg]]) -> list[Unit]:
        """Decode a group over the decoder threads: one thread hop per thread, not one per file."""
        loop = asyncio.get_running_loop()
        n = self.cfg.decode_threads
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(self.decoders, lambda chunk=group[i::n]: [self.load(up, msg) for up, msg in chunk])
                for i in range(n)
                if group[i::n]
            )
        )
        units: list = [None] * len(group)
        for i, part in enumerate(parts):
            units[i::n] = part
        return units

    def frame_budget_groups(self, units: list[tuple[FileUploaded, Msg]]) -> list[list[tuple[FileUploaded, Msg]]]:
        """Split a batch so no group decodes more than max(batch_size, clip_max_frames) frames: a batch
        of clips would otherwise hold gigabytes of frames and run past the watchdog in one go."""
        budget = max(self.cfg.batch_size, self.cfg.clip_max_frames)
        groups, current, used = [], [], 0
        for up, msg in units:
            cost = self.cfg.clip_max_frames if up.kind == "clip" else 1
            if current and used + cost > budget:
                groups.append(current)
                current, used = [], 0
            current.append((up, msg))
            used += cost
        return groups + ([current] if current else [])

    async def hand_over(self, units: list[Unit]) -> None:
        """Queue a decoded group for inference, beating while waiting: waiting is not hanging."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.put(units), timeout=1.0)  # a timed-out put inserts nothing
            except TimeoutError:
                self.rt.beat("detector")  # batches.consume's beat for this stage: waiting on inference is not hanging

    # ---- stage 2: infer + publish + ack ----------------------------------------------------
    async def infer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self.rt.beat("infer")
        while True:
            try:
                units = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except TimeoutError:
                self.rt.beat("infer")  # idle with nothing to do
                continue
            if units is None:
                return
            good = []
            for unit in units:
                if unit.error is None:
                    good.append(unit)
                elif isinstance(unit.error, Undecodable):
                    await self.dead_letter(unit.msg, str(unit.error), unit.up)
                else:
                    self.rt.log.error(
                        "decode failed unexpectedly, will retry", file=unit.up.path, error=repr(unit.error)
                    )
                    await self.rt.bus.give_up_or_retry(STAGE, "detector", [unit.msg], unit.error)
                    self.held.pop(id(unit.msg), None)
            frames = [f for u in good for f, _, _ in u.frames]
            try:
                progress = lambda: loop.call_soon_threadsafe(self.rt.beat, "infer")  # noqa: E731
                results = iter(await loop.run_in_executor(self.inference, self.engine.run, frames, progress))
            except Exception as exc:  # noqa: BLE001 - the CPU backend itself failed: retry later, never crash-loop
                self.rt.log.error("inference failed, batch will be retried", frames=len(frames), error=repr(exc))
                self.rt.note_error(f"inference failed: {exc!r}")
                await self.rt.bus.give_up_or_retry(STAGE, "detector", [u.msg for u in good], exc)
                for u in good:
                    self.held.pop(id(u.msg), None)
                self.rt.beat("infer")
                continue
            self.rt.status_extra = f"backend {self.engine.name}, model {self.engine.model}"
            out = []
            for unit in good:
                up = unit.up
                for frame, index, offset in unit.frames:
                    boxes, ms = next(results)
                    out.append(
                        Detections(
                            file_id=up.file_id,
                            camera=up.camera,
                            path=up.path,
                            captured_at=round(unit.start + offset, 3),
                            width=frame.width,
                            height=frame.height,
                            model=self.engine.model,
                            inference_ms=round(ms, 2),
                            boxes=keep_for_camera(boxes, up.camera, self.cfg),
                            published_at=up.published_at,
                            frame=index,
                            offset_s=offset,
                            clock_suspect=up.clock_suspect,
                            file_size=up.size,
                            file_mtime=up.camera_mtime if up.camera_mtime is not None else up.mtime,
                        )
                    )
            await self.rt.bus.publish_many([(subject("detections", d.camera), d, f"det-{d.key}") for d in out])
            # Ack only after every Detections message is durable in its stream (a lost ack is a harmless
            # redelivery: the Detections carry deterministic ids).
            await asyncio.gather(*(u.msg.ack() for u in good), return_exceptions=True)
            for u in good:
                self.held.pop(id(u.msg), None)
            self.rt.count("detected", len(good))
            self.rt.count("frames", len(frames))
            self.rt.beat("infer")
            if self.engine.restart_reason is not None:  # this batch is done (on the CPU) and acked: now go
                self.engine.sticky.record()
                raise RestartRequested(
                    f"sticky CUDA error, a new process gets a fresh CUDA context: {self.engine.restart_reason}"
                )

    async def dead_letter(self, msg: Msg, reason: str, up: FileUploaded | None = None) -> None:
        await self.rt.bus.dead_letter(
            STAGE, msg, reason, camera=up.camera if up else None, file_id=up.file_id if up else None
        )
        self.held.pop(id(msg), None)

    async def keep_in_progress(self) -> None:
        """Tell the server we are still working on what we hold, so it is not redelivered elsewhere."""
        interval = consumer("detector").ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for msg in list(self.held.values()):
                if not msg.is_acked:  # in_progress() after an ack is an error
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    def backend_changed(self, state: str, reason: str | None) -> None:
        """Called from the inference thread when the GPU is dropped or restored."""
        self.rt.loop.call_soon_threadsafe(lambda: self.rt.spawn(self.announce(state, reason)))

    async def announce(self, state: str, reason: str | None) -> None:
        now = time.time()
        if state == "degraded":
            self.rt.log.error("GPU backend failed: running on the CPU", reason=reason)
            self.rt.note_error(f"GPU backend failed: {reason}")
            alert = Alert(
                alert_id=f"detector-{os.getpid()}-fallback-{int(now)}",
                camera="system",
                kind="detector_cpu_fallback",
                severity="critical",
                message=f"detector on {os.uname().nodename} fell back to the CPU: {reason}",
                created_at=now,
            )
        else:
            self.rt.log.info("GPU backend restored")
            alert = Alert(
                alert_id=f"detector-{os.getpid()}-restored-{int(now)}",
                camera="system",
                kind="detector_gpu_restored",
                severity="info",
                message=f"detector on {os.uname().nodename} is back on the GPU",
                created_at=now,
            )
        self.rt.status_extra = f"backend {self.engine.name}, model {self.engine.model}"
        await self.rt.bus.publish(subject("alerts", "system"), alert, msg_id=alert.alert_id)


async def open_engine(engine: Engine, config: Config) -> bool:
    """Before READY: build the engine the accelerator lacks (a child process, with systemd's start
    timeout extended), then open and warm up the backends. False when a stop was asked for meanwhile."""
    async with PreReady(structlog.get_logger(service=STAGE)) as pre:
        pre.remove_stale_temporaries(engine.cache_dir)
        job = await pre.run_in_thread(engine.build_job)
        failure = None
        if job is not None and not pre.stopping.is_set():
            failure = await build_engine(
                pre, job.command, job.what, job.target, config.detector.engine_build_timeout_seconds
            )
        if pre.stopping.is_set():
            return False
        opening = pre.run_in_thread(engine.start_backend, failure)
        if not await pre.wait(opening, "opening the inference backend") or pre.stopping.is_set():
            return False  # the thread is a daemon: main() exits without waiting for it
        opening.result()
    if engine.restart_reason is not None:  # poisoned already (the warm-up): a fresh process, before READY
        engine.sticky.record()
        raise RestartRequested(f"sticky CUDA error while opening the GPU: {engine.restart_reason}")
    return True


async def run(config: Config) -> None:
    # OpenCV's own guard against decompression bombs, read on first decode.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(config.detector.max_pixels)
    cache_dir = Path(config.detector.engine_cache_dir or Path(config.state_dir) / "engines")
    pending: list = []
    engine = Engine(config.detector, cache_dir, on_change=lambda *a: pending.append(a), start=False)
    if not await open_engine(engine, config):
        raise StoppedBeforeReady
    async with Runtime.start("detector", config) as rt:
        detector = Detector(rt, config, engine)
        if isinstance(engine.backend, FallbackBackend):
            engine.backend.on_change = detector.backend_changed
        for state, reason in pending:  # a GPU that failed during start-up is reported once the bus is up
            await detector.announce(state, reason)
        rt.status_extra = f"backend {engine.name}, model {engine.model}"
        rt.log.info(
            "detector started",
            backend=engine.name,
            model=engine.model,
            family=engine.info.family if engine.info else None,
            input=engine.size,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                keepalive = tg.create_task(detector.keep_in_progress())
                tg.create_task(detector.prepare_loop())
                tg.create_task(rt.bus.exhausted_loop("detector", STAGE))
                await detector.infer_loop()
                keepalive.cancel()
        finally:
            detector.decoders.shutdown(wait=False, cancel_futures=True)
            detector.inference.shutdown(wait=False, cancel_futures=True)
