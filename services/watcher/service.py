"""watcher: publish FileUploaded for every camera file once it has settled on disk.

Layout: <media_root>/<camera>/<any sub-folders>/<file>. New camera folders are picked up live
(recursive inotify through watchfiles); a scan at start and every `rescan_seconds` catches files
that landed while the watcher was down or that an inotify overflow hid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import NamedTuple

import watchfiles

from proto import DeadLetter, FileUploaded, printable, subject
from proto.topology import RETENTION_CHECK_SUBJECT, dlq_subject
from services.retention.media import FallingFast, free_space
from services.runtime import jetstream
from services.runtime.config import Config, ConfigError
from services.runtime.service import Runtime
from services.watcher.files import (
    Ledger,
    NotRegularFile,
    Settler,
    camera_id,
    file_id,
    hash_file,
    is_candidate,
    ledger_key,
    name_problem,
    sniff_kind,
)

# Longest a settled file waits for an earlier file of its camera that is still being written.
HOLD_FOR_EARLIER = 60.0
# Shortest time between two full scans asked for by watch failures (the regular ones: rescan_seconds).
RESCAN_MIN_GAP = 10.0


class Rejected(NamedTuple):
    """A settled file that is not a camera image/clip: logged once and remembered in the ledger."""

    path: str
    size: int
    mtime_ns: int
    reason: str
    # not remembered in the ledger: tried again every UNREADABLE_RETRY_SECONDS until it can be read
    # (or is gone), so a chmod or a default ACL fixes it without the file changing
    retry: bool = False


UNREADABLE_RETRY_SECONDS = 5.0


def not_readable(path: str) -> str:
    """Why vigil cannot read a file it may see, in the operator's words: its owner and mode."""
    import pwd

    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"not readable by vigil ({exc.strerror})"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"not readable by vigil (owner {printable(owner)}, mode {stat.S_IMODE(st.st_mode):04o})"


class Watcher:
    def __init__(self, rt: Runtime, config: Config) -> None:
        self.rt = rt
        self.cfg = config.watcher
        self.root = Path(config.media_root).resolve()
        self.extensions = {e.lower() for e in self.cfg.image_extensions + self.cfg.clip_extensions}
        self.settler = Settler(self.cfg.settle_seconds)
        self.ledger = Ledger(Path(config.state_dir) / "watcher" / "ledger.sqlite3")
        self.wakeup = asyncio.Event()
        self.rescan_now = asyncio.Event()  # the file watch failed: what it missed is found by a scan
        self.scanned = asyncio.Event()  # the start-up scan has observed every file
        self.skipped: set[str] = set()  # paths already reported as not regular files
        # files vigil may not read: path -> (camera, relative path, reason); and the versions already
        # dead-lettered (one letter per version, however often it is tried again)
        self.unreadable: dict[str, tuple[str, str, str]] = {}
        self.reported_unreadable: set[tuple[str, int, int]] = set()
        # files cut short (a dropped upload): path -> (size, mtime_ns, held since): looked at again
        # with the unreadable ones until they are whole or incomplete_seconds have passed unchanged
        self.incomplete: dict[str, tuple[int, int, float]] = {}
        self.disk = FallingFast(config.retention.low_watermark, horizon=2 * config.retention.disk_check_seconds)
        self.disk_checked_at = self.retention_asked_at = -1e9
        ages = [config.retention.max_age_days] + [
            c.max_age_days for c in config.retention.cameras.values() if c.max_age_days
        ]
        self.clock_floor = (self.cfg.clock_floor_days or max(ages)) * 86400.0

    # ---- discovering files --------------------------------------------------------------
    def observe(self, path: str) -> None:
        """Stat a path that may be a new or changed camera file and track it until it settles."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return
        if not is_candidate(rel, self.extensions):
            return
        try:
            st = os.lstat(path)
            # Never through a symlink, at any level: a linked directory inside a camera folder
            # would otherwise let the pipeline read files from anywhere on the machine.
            inside = os.path.realpath(path) == os.path.join(self.root, rel)
        except OSError:  # vanished, unsearchable directory, stale network handle: nothing to read now
            self.settler.forget(path)
            return
        if not inside or not stat.S_ISREG(st.st_mode):
            # symlinks (at any level), FIFOs, sockets, folders named like images: never read. Said once
            # per path, not at every rescan.
            if path not in self.skipped:
                if len(self.skipped) > 10_000:
                    self.skipped.clear()
                self.skipped.add(path)
                kind = (
                    "symlink"
                    if not inside
                    else "fifo"
                    if stat.S_ISFIFO(st.st_mode)
                    else "socket"
                    if stat.S_ISSOCK(st.st_mode)
                    else "directory"
                    if stat.S_ISDIR(st.st_mode)
                    else "special file"
                )
                self.rt.log.warning(
                    "not a regular file inside the media root, skipped", path=printable(str(rel)), kind=kind
                )
            return
        if self.ledger.known(ledger_key(str(rel)), st.st_size, st.st_mtime_ns):
            return
        self.settler.observe(path, st.st_size, st.st_mtime_ns, time.monotonic(), camera=rel.parts[0])
        self.wakeup.set()

    def list_files(self, top: Path | None = None) -> list[str]:
        """Walk the media root, or a folder in it (in a thread), without following symlinks."""
        found = []
        for dirpath, dirnames, filenames in os.walk(top or self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(os.path.join(dirpath, name) for name in filenames)
        return found

    async def scan(self) -> int:
        paths = await asyncio.to_thread(self.list_files)
        for i, path in enumerate(paths):
            self.observe(path)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # keep the loop responsive on a huge backlog
        # forget ledger rows of files that are gone (deleted by retention or by hand): the ledger stays
        # the size of the media root, and a file that comes back later is published again
        rels = {ledger_key(Path(p).relative_to(self.root).as_posix()) for p in paths}
        pruned = self.ledger.prune(rels)  # one SELECT and a DELETE: tens of ms for 100,000 rows
        if pruned:
            self.rt.log.info("ledger pruned", rows=pruned)
        return len(paths)

    async def watch_loop(self) -> None:
        """inotify through watchfiles, restarted when it fails: it raises on a name that is not UTF-8
        ("Unable to decode path"), and the events of that moment are lost, so a scan follows at once."""
        while not self.rt.stopping.is_set():
            try:
                await self.watch_once()
            except Exception as exc:  # noqa: BLE001 - one bad name or a watch error must never stop ingestion
                self.rt.count("watch_errors")
                self.rt.log.warning(
                    "file watch failed: restarting it, with a scan for what it missed", error=printable(repr(exc))[:300]
                )
                self.rescan_now.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.rt.stopping.wait(), timeout=1.0)

    async def watch_once(self) -> None:
        self.rt.beat("watch")
        async for changes in watchfiles.awatch(
            self.root,
            stop_event=self.rt.stopping,
            recursive=True,
            force_polling=self.cfg.force_polling,
            yield_on_timeout=True,
            rust_timeout=1000,
            debounce=50,
            step=20,
            ignore_permission_denied=True,
        ):
            for change, path in changes:
                if change == watchfiles.Change.deleted:
                    self.settler.forget(path)
                elif change == watchfiles.Change.added and os.path.isdir(path) and not os.path.islink(path):
                    # a new folder (a camera's new date folder at midnight): inotify watches it only once it
                    # has seen it, so files written into it before that raise no event. Walk it now, or
                    # its first file would wait for the next rescan and reach the events after later ones.
                    for found in await asyncio.to_thread(self.list_files, Path(path)):
                        self.observe(found)
                else:
                    self.observe(path)
            self.rt.beat("watch")

    async def rescan_loop(self) -> None:
        while not self.rt.stopping.is_set():
            started = time.monotonic()
            self.rescan_now.clear()  # before the scan: a watch failure during it asks for the next one
            n = await self.scan()
            self.scanned.set()
            self.rt.log.info(
                "scan done", files=n, pending=len(self.settler), seconds=round(time.monotonic() - started, 3)
            )
            waits = [asyncio.ensure_future(self.rt.stopping.wait()), asyncio.ensure_future(self.rescan_now.wait())]
            try:
                await asyncio.wait(waits, timeout=self.cfg.rescan_seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            # a camera that keeps writing names watchfiles cannot decode must not turn this into a busy
            # loop of full scans: at most one asked-for scan every RESCAN_MIN_GAP seconds
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.rt.stopping.wait(), timeout=max(0.0, started + RESCAN_MIN_GAP - time.monotonic())
                )

    # ---- publishing settled files -------------------------------------------------------
    async def settle_loop(self) -> None:
        self.rt.beat("settle")
        tick = max(min(self.cfg.settle_seconds / 4, 0.5), 0.02)
        while not self.rt.stopping.is_set():
            # re-stat (a growing upload resets its clock) in a thread: a backlog of 100,000 files would
            # hold the event loop for a good part of a second on every tick
            for path, st in await asyncio.to_thread(_restat, self.settler.paths()):
                if st is None:
                    self.settler.forget(path)
                else:
                    self.settler.observe(path, st.st_size, st.st_mtime_ns, time.monotonic())
            # by capture time (mtime, then path): a backlog listed in directory order (hash order on
            # ext4, newest first on tmpfs) must reach the aggregator in the order it happened. Nothing
            # before the start-up scan has seen every file, and nothing while an earlier file of the
            # same camera is still settling.
            ready = self.settler.settled_in_order(time.monotonic(), HOLD_FOR_EARLIER) if self.scanned.is_set() else []
            for i in range(0, len(ready), self.cfg.publish_batch):
                await self.publish_batch(ready[i : i + self.cfg.publish_batch])
                self.rt.beat("settle")  # working through a backlog is progress, not a hang
            self.rt.counters["pending"] = len(self.settler)
            if ready or len(self.settler):
                await self.warn_retention()
            self.rt.beat("settle")
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=tick)
                await asyncio.sleep(tick)  # let a burst of events accumulate into one batch
            except TimeoutError:
                pass

    async def warn_retention(self) -> None:
        """While files arrive, at most once a second: ask retention for a check now if free space is
        low or falling fast, so a burst cannot fill the disk between its regular checks."""
        now = time.monotonic()
        if now - self.disk_checked_at < 1.0:
            return
        self.disk_checked_at = now
        try:
            free, total = free_space(self.root)
        except OSError:
            return
        reason = self.disk.check(now, free, total)
        if reason and now - self.retention_asked_at >= 2.0:
            self.retention_asked_at = now
            self.rt.log.info("asking retention for a check", reason=reason)
            with contextlib.suppress(*jetstream.TRANSIENT):
                await self.rt.nc.publish(RETENTION_CHECK_SUBJECT, reason.encode())

    async def publish_batch(self, ready: list[tuple[str, int, int]]) -> None:
        prepared = await asyncio.to_thread(lambda: [self.prepare_one(*r) for r in ready])
        now = time.time()
        rows, sends = [], []
        for item in prepared:
            if item is None:
                continue
            if isinstance(item, Rejected):
                if not item.retry:
                    rows.append((item.path, item.size, item.mtime_ns, "", f"rejected: {item.reason}", now))
                if (item.path, item.size, item.mtime_ns) not in self.reported_unreadable:
                    sends.append(self.rejection(item, now))
                    if item.retry:
                        self.reported_unreadable.add((item.path, item.size, item.mtime_ns))
                continue
            msg, size, mtime_ns = item
            self.readable_again(str(self.root / msg.path))
            rows.append((msg.path, size, mtime_ns, msg.file_id, "published", now))
            if self.ledger.published_before(msg.file_id):
                self.rt.count("unchanged")  # touched or re-sent with the same bytes: remembered, not re-published
                continue
            sends.append((subject("uploads", msg.camera), msg, f"upload-{msg.file_id}"))
        await self.rt.bus.publish_many(sends)
        self.ledger.mark(rows)  # only after every PubAck
        self.rt.count("published", sum(1 for _, m, _ in sends if isinstance(m, FileUploaded)))

    # ---- files vigil may not read ---------------------------------------------------------------
    def report_unreadable(self) -> None:
        """The heartbeat's per-camera summary (health's camera_unreadable alert)."""
        by_camera: dict[str, list[tuple[str, str]]] = {}
        for camera, rel, reason in self.unreadable.values():
            by_camera.setdefault(camera, []).append((rel, reason))
        self.rt.unreadable = {
            camera: f"{rel}: {reason}" + (f" (and {len(files) - 1} more)" if len(files) > 1 else "")
            for camera, files in by_camera.items()
            for rel, reason in [min(files)]
        }

    def readable_again(self, path: str) -> None:
        gone = self.unreadable.pop(path, None)
        if gone is not None:
            self.reported_unreadable = {k for k in self.reported_unreadable if k[0] != gone[1]}
            self.report_unreadable()

    async def retry_loop(self) -> None:
        """Try the unreadable and the incomplete files again: a chmod, a default ACL or the FTP server's
        umask fixed makes a file readable without changing it (no watch event, no new version), and a
        truncated upload must be looked at again to be rejected once its time is up."""
        while not self.rt.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), timeout=UNREADABLE_RETRY_SECONDS)
            now = time.monotonic()
            for path, st in await asyncio.to_thread(_restat, list(self.unreadable) + list(self.incomplete)):
                held = self.incomplete.get(path)
                if st is None:  # deleted (by hand, by retention): nothing left to read
                    self.readable_again(path)
                    self.incomplete.pop(path, None)
                elif (
                    held is not None
                    and held[:2] == (st.st_size, st.st_mtime_ns)
                    and now - held[2] < self.cfg.incomplete_seconds
                ):
                    continue  # unchanged and its time not up: nothing to look at (thousands may wait)
                else:
                    self.observe(path)
            self.rt.counters["incomplete"] = len(self.incomplete)

    def hold_incomplete(self, path: str, rel: str, size: int, mtime_ns: int, cut: str) -> Rejected | None:
        """A file that is not whole: None (held, looked at again) until it has stayed so, unchanged, for
        incomplete_seconds; then its rejection. A resume after that is a new version, processed."""
        now = time.monotonic()
        held = self.incomplete.get(path)
        if held is None or held[:2] != (size, mtime_ns):
            if held is None:
                self.rt.log.info("upload not complete yet: held for the camera to resume it", path=rel, reason=cut)
            held = self.incomplete[path] = (size, mtime_ns, now)
        if now - held[2] < self.cfg.incomplete_seconds:
            return None
        self.incomplete.pop(path, None)  # not del: the retry loop may have dropped it (deleted meanwhile)
        reason = f"truncated upload: {cut}, unchanged for {now - held[2]:.0f} s"
        self.rt.log.warning("truncated upload not resumed, skipped", path=rel, reason=reason)
        self.rt.count("rejected")
        return Rejected(rel, size, mtime_ns, reason)

    def rejection(self, item: Rejected, now: float) -> tuple[str, DeadLetter, str]:
        """A refused file as a dead letter of stage watcher: `vigil dlq list`, `vigil trace PATH` and
        health's dead-letter counts show it (once per version of the file: the msg id names it)."""
        camera = camera_id(item.path.split("/", 1)[0], self.cfg.camera_prefix)  # None: the folder is not a camera id
        letter = DeadLetter(
            stage="watcher",
            reason=f"rejected by the watcher: {item.reason}",
            original_subject=subject("uploads", camera or "_"),
            original_payload="",
            original_size=item.size,
            camera=camera,
            path=item.path,
            failed_at=now,
        )
        key = hashlib.sha256(f"{camera}\0{item.path}\0{item.size}\0{item.mtime_ns}".encode()).hexdigest()[:32]
        return dlq_subject("watcher", camera), letter, f"rejected-{key}"

    def prepare_one(self, path: str, size: int, mtime_ns: int):
        """`prepare`, with any error it did not foresee made a rejection of this one file (in a thread)."""
        try:
            return self.prepare(path, size, mtime_ns)
        except Exception as exc:
            rel = ledger_key(Path(path).relative_to(self.root).as_posix())
            self.rt.log.exception("file could not be prepared, rejected", path=rel)
            self.rt.count("rejected")
            return Rejected(rel, size, mtime_ns, f"internal error: {printable(repr(exc))[:300]}")

    def prepare(self, path: str, size: int, mtime_ns: int):
        """Hash and sniff a settled file: (FileUploaded, size, mtime_ns), Rejected, or None (changed/vanished)."""
        rel = str(Path(path).relative_to(self.root).as_posix())
        problem = name_problem(rel, self.cfg.camera_prefix)
        if problem:  # never read: its name could not travel in a message or a row
            self.rt.log.warning("file name refused, skipped", path=ledger_key(rel), reason=problem)
            self.rt.count("rejected")
            return Rejected(ledger_key(rel), size, mtime_ns, problem)
        try:
            digest, head, size2, mtime2, cut = hash_file(self.root, rel)
        except (FileNotFoundError, NotRegularFile):
            return None
        except PermissionError:
            reason = not_readable(path)
            camera = camera_id(rel.split("/", 1)[0], self.cfg.camera_prefix) or rel.split("/", 1)[0]
            if path not in self.unreadable:
                self.rt.log.warning("file not readable by vigil, tried again until it is", path=rel, reason=reason)
                self.rt.count("unreadable")
            self.unreadable[path] = (camera, rel, reason)
            self.report_unreadable()
            return Rejected(rel, size, mtime_ns, reason, retry=True)
        except OSError as exc:  # swapped for a symlink (ELOOP), I/O error, stale NFS handle...
            self.rt.log.warning("file could not be read, skipped until it changes", path=rel, error=str(exc))
            self.rt.count("rejected")
            return Rejected(rel, size, mtime_ns, f"unreadable: {exc.strerror or exc}")
        if (size2, mtime2) != (size, mtime_ns):  # still being written after all
            self.settler.observe(path, size2, mtime2, time.monotonic(), camera=Path(rel).parts[0])
            return None
        kind = sniff_kind(head)
        if kind is None:
            self.rt.log.warning("not an image or clip (magic bytes), skipped", path=rel, size=size)
            self.rt.count("rejected")
            return Rejected(rel, size, mtime_ns, "unrecognised content")
        if cut is not None:
            return self.hold_incomplete(path, rel, size, mtime_ns, cut)
        self.incomplete.pop(path, None)
        camera = camera_id(rel.split("/", 1)[0], self.cfg.camera_prefix)
        assert camera is not None  # name_problem refused every other folder
        arrived = time.time()
        mtime, suspect = sane_capture_time(mtime_ns / 1e9, arrived, self.cfg.clock_skew_seconds, self.clock_floor)
        if suspect:
            self.rt.count("clock_suspect")
            self.rt.log.warning(
                "camera clock not plausible: using the arrival time",
                camera=camera,
                path=rel,
                mtime=mtime_ns / 1e9,
                arrived=round(arrived, 3),
            )
        return (
            FileUploaded(
                file_id=file_id(camera, rel, digest),
                camera=camera,
                path=rel,
                size=size,
                mtime=mtime,
                sha256=digest,
                kind=kind,
                published_at=arrived,
                clock_suspect=suspect,
                camera_mtime=mtime_ns / 1e9 if suspect else None,
            ),
            size,
            mtime_ns,
        )


def sane_capture_time(mtime: float, arrived: float, skew: float, floor: float) -> tuple[float, bool]:
    """(capture time, clock_suspect): a camera whose clock is far ahead, or reset to 2000, would keep
    an event open for hours or have its files deleted at once; their arrival time is used instead."""
    if mtime > arrived + skew or mtime < arrived - floor:
        return arrived, True
    return mtime, False


def _restat(paths: list[str]) -> list[tuple[str, os.stat_result | None]]:
    out: list[tuple[str, os.stat_result | None]] = []
    for path in paths:
        try:
            out.append((path, os.lstat(path)))
        except OSError:
            out.append((path, None))
    return out


async def run(config: Config) -> None:
    root = Path(config.media_root)
    if not root.is_dir():
        raise ConfigError(f"config error: media_root {root} is not a directory")
    async with Runtime.start("watcher", config) as rt:
        watcher = Watcher(rt, config)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watcher.watch_loop())
                tg.create_task(watcher.rescan_loop())
                tg.create_task(watcher.settle_loop())
                tg.create_task(watcher.retry_loop())
        finally:
            watcher.ledger.close()
