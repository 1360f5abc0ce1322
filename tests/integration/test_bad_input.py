"""Bad input, generated here (no binaries committed): every case ends recorded, dead-lettered with its
reason, or skipped with a log line - and the rest of the run is unaffected (no crash, no restart,
every good file recorded)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import msgspec
import nats
import numpy as np
import pytest

import proto
from tests.integration.test_pipeline import ALL
from tests.support import REPO, drop, photo_bytes, query, stream_messages, wait_until

RECORDED, DEAD, SKIPPED, IGNORED = "recorded", "dead-lettered", "skipped", "ignored"


def png_bytes(scale: float = 0.2) -> bytes:
    import skimage.data

    ok, data = cv2.imencode(".png", cv2.resize(skimage.data.chelsea(), None, fx=scale, fy=scale))
    assert ok
    return data.tobytes()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with one tiny IDAT: 2.5 Gpixels claimed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def jpeg_bomb() -> bytes:
    """A real JPEG whose SOF0 header is patched to claim 50,000 x 50,000 pixels."""
    data = bytearray(photo_bytes("camera", scale=0.2))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 50_000, 50_000)
    return bytes(data)


def clip_bytes(path: Path, frames: int = 12) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (160, 120))
    for i in range(frames):
        writer.write(np.full((120, 160, 3), i * 20, np.uint8))
    writer.release()
    data = path.read_bytes()
    path.unlink()
    return data


class Case:
    def __init__(self, name: str, rel: str, expect: str, reason: str = "", make=None) -> None:
        self.name, self.rel, self.expect, self.reason, self.make = name, rel, expect, reason, make


def file_cases(tmp: Path, media: Path) -> list[Case]:
    jpeg = lambda i: photo_bytes("astronaut", scale=0.25, quality=50 + i)  # noqa: E731 - distinct valid photos
    good_clip = clip_bytes(tmp / "good.mp4")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg(40))

    def put(rel: str, data: bytes):
        return lambda: drop(media / rel, data)

    def symlink(rel: str, target: Path):
        return lambda: (media / rel).symlink_to(target)

    def loop(rel: str):
        def make():
            a, b = media / rel, media / (rel + ".other.jpg")
            a.symlink_to(b)
            b.symlink_to(a)

        return make

    def fifo(rel: str):
        return lambda: os.mkfifo(media / rel)

    def unix_socket(rel: str):
        def make():
            here = os.getcwd()
            os.chdir((media / rel).parent)  # AF_UNIX paths are limited to 108 bytes: bind relative
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind((media / rel).name)
                s.close()
            finally:
                os.chdir(here)

        return make

    def sparse(rel: str):
        def make():
            path = media / rel
            tmp_path = path.with_name("." + path.name)
            with open(tmp_path, "wb") as f:
                f.write(jpeg(41)[:1024])
                f.truncate(2 * 1024**3)  # 2 GiB, nearly all hole...
                f.seek(2 * 1024**3 - 2)
                f.write(b"\xff\xd9")  # ...ending as a JPEG ends
            os.replace(tmp_path, path)

        return make

    def vanishing(rel: str):
        def make():
            (media / rel).write_bytes(jpeg(42))
            time.sleep(0.1)  # seen by inotify, gone before it settles
            (media / rel).unlink()

        return make

    def growing(rel: str):
        def make():
            data = jpeg(43)
            path = media / rel

            def grow():
                with open(path, "wb") as f:
                    for i in range(0, len(data), max(1, len(data) // 15)):
                        f.write(data[i : i + max(1, len(data) // 15)])
                        f.flush()
                        time.sleep(0.2)  # 3 s of writing; settle_seconds is 0.5 s

            threading.Thread(target=grow, daemon=True).start()

        return make

    def folder_named_like_an_image(rel: str):
        def make():
            (media / rel).mkdir()
            drop(media / rel / "inside.jpg", jpeg(44))

        return make

    bad_jpeg = jpeg(45)
    return [
        Case("good photo", "front_door/good.jpg", RECORDED, make=put("front_door/good.jpg", jpeg(1))),
        Case("good png", "front_door/good.png", RECORDED, make=put("front_door/good.png", png_bytes())),
        Case("good clip", "front_door/good.mp4", RECORDED, make=put("front_door/good.mp4", good_clip)),
        # cut short (a dropped upload): held incomplete_seconds for a resume, then refused by the watcher
        Case(
            "truncated JPEG",
            "front_door/truncated.jpg",
            SKIPPED,
            "jpeg without its end marker",
            put("front_door/truncated.jpg", bad_jpeg[: len(bad_jpeg) // 3]),
        ),
        Case(
            "truncated PNG",
            "front_door/truncated.png",
            SKIPPED,
            "png without its iend",
            put("front_door/truncated.png", png_bytes(0.3)[:400]),
        ),
        Case("zero bytes", "front_door/empty.jpg", SKIPPED, "not an image or clip", put("front_door/empty.jpg", b"")),
        Case(
            "header only",
            "front_door/header.jpg",
            SKIPPED,
            "truncated upload",
            put("front_door/header.jpg", bad_jpeg[:20]),
        ),
        # whole by its structure (its start and end markers), nothing the decoder can read: the detector's
        Case(
            "start and end marker only",
            "front_door/header-end.jpg",
            DEAD,
            "decod",
            put("front_door/header-end.jpg", bad_jpeg[:2] + b"\xff\xd9"),
        ),
        Case(
            "random bytes as .jpg",
            "front_door/random.jpg",
            SKIPPED,
            "not an image or clip",
            put("front_door/random.jpg", b"\x00" + os.urandom(4000)),
        ),
        Case(
            "random bytes as .png",
            "front_door/random.png",
            SKIPPED,
            "not an image or clip",
            put("front_door/random.png", b"\x01" + os.urandom(4000)),
        ),
        Case(
            "GIF named .jpg",
            "front_door/anim.jpg",
            SKIPPED,
            "not an image or clip",
            put("front_door/anim.jpg", b"GIF89a" + os.urandom(100)),
        ),
        Case("PNG bomb 50k x 50k", "front_door/bomb.png", DEAD, "pixels", put("front_door/bomb.png", png_bomb())),
        Case("JPEG bomb 50k x 50k", "front_door/bomb.jpg", DEAD, "pixels", put("front_door/bomb.jpg", jpeg_bomb())),
        Case(
            "clip with no frames",
            "front_door/noframes.mp4",
            DEAD,
            "clip",
            # its boxes whole (an empty index), its frames none
            put("front_door/noframes.mp4", b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2\x00\x00\x00\x08moov"),
        ),
        Case(
            "clip cut in half",
            "front_door/broken.mp4",
            SKIPPED,
            "mp4 cut inside its 'mdat' box",
            put("front_door/broken.mp4", good_clip[: len(good_clip) // 2]),
        ),
        Case("2 GiB sparse file", "front_door/sparse.jpg", DEAD, "limit", sparse("front_door/sparse.jpg")),
        Case(
            "name with spaces", "front_door/with spaces.jpg", RECORDED, make=put("front_door/with spaces.jpg", jpeg(2))
        ),
        Case("unicode name", "front_door/café_ü_夜.jpg", RECORDED, make=put("front_door/café_ü_夜.jpg", jpeg(3))),
        Case(
            "newline in name",
            "front_door/new\nline.jpg",
            SKIPPED,
            "control characters",
            put("front_door/new\nline.jpg", jpeg(4)),
        ),
        Case(
            "terminal escape in name",
            "front_door/a\x1b[2J\x1b]8;;https:x\x07.jpg",
            SKIPPED,
            "control characters",
            put("front_door/a\x1b[2J\x1b]8;;https:x\x07.jpg", jpeg(12)),
        ),
        # a Latin-1 camera: names that are not UTF-8 stopped the watcher (watchfiles) and its ledger before
        Case(
            "name not UTF-8",
            os.fsdecode(b"front_door/caf\xe9.jpg"),
            SKIPPED,
            "not valid utf-8",
            put(os.fsdecode(b"front_door/caf\xe9.jpg"), jpeg(13)),
        ),
        Case(
            "camera folder not UTF-8",
            os.fsdecode(b"gar\xe7age/a.jpg"),
            SKIPPED,
            "not valid utf-8",
            put(os.fsdecode(b"gar\xe7age/a.jpg"), jpeg(14)),
        ),
        # never folded into front_door, whose quota and evidence it would share
        Case(
            "camera folder not an id", "front.door/a.jpg", SKIPPED, "not a camera id", put("front.door/a.jpg", jpeg(15))
        ),
        Case(
            "camera folder with a space",
            "front door/a.jpg",
            SKIPPED,
            "not a camera id",
            put("front door/a.jpg", jpeg(16)),
        ),
        Case("leading dash", "front_door/-rf.jpg", RECORDED, make=put("front_door/-rf.jpg", jpeg(5))),
        Case("dots in name", "front_door/x..y.jpg", RECORDED, make=put("front_door/x..y.jpg", jpeg(6))),
        Case(
            "very long name",
            "front_door/" + "L" * 240 + ".jpg",
            RECORDED,
            make=put("front_door/" + "L" * 240 + ".jpg", jpeg(7)),
        ),
        Case(
            "JPEG named .png",
            "front_door/really-a-jpeg.png",
            RECORDED,
            make=put("front_door/really-a-jpeg.png", jpeg(8)),
        ),
        Case(
            "sub-folders",
            "front_door/2026/11/28/deep.jpg",
            RECORDED,
            make=put("front_door/2026/11/28/deep.jpg", jpeg(9)),
        ),
        Case(
            "symlink out of the root",
            "front_door/outside.jpg",
            SKIPPED,
            "not a regular file",
            symlink("front_door/outside.jpg", outside / "secret.jpg"),
        ),
        Case("symlinked folder", "front_door/linked/secret.jpg", IGNORED, make=symlink("front_door/linked", outside)),
        Case("symlink loop", "front_door/loop.jpg", SKIPPED, "not a regular file", loop("front_door/loop.jpg")),
        Case("FIFO", "front_door/pipe.jpg", SKIPPED, "not a regular file", fifo("front_door/pipe.jpg")),
        Case("socket", "front_door/sock.jpg", SKIPPED, "not a regular file", unix_socket("front_door/sock.jpg")),
        Case(
            "folder named like an image",
            "front_door/dir.jpg/inside.jpg",
            RECORDED,
            make=folder_named_like_an_image("front_door/dir.jpg"),
        ),
        Case(
            "deleted before it settled", "front_door/vanished.jpg", IGNORED, make=vanishing("front_door/vanished.jpg")
        ),
        Case("still growing", "front_door/growing.jpg", RECORDED, make=growing("front_door/growing.jpg")),
        Case("not a media extension", "front_door/notes.txt", IGNORED, make=put("front_door/notes.txt", b"hello")),
        Case(
            "hidden upload in progress",
            "front_door/.partial.jpg",
            IGNORED,
            make=put("front_door/.partial.jpg", jpeg(10)),
        ),
        Case("file at the media root", "stray.jpg", IGNORED, make=put("stray.jpg", jpeg(11))),
    ]


def text_paths(node, path: tuple = ()):
    """Every place in a message's JSON that holds text: string values, and the keys of its dict fields
    (other keys are field names: an unknown one is ignored, a missing one is another error)."""
    if isinstance(node, str):
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            if len(path) == 1:
                yield (*path, ("key", k))
            if path or k != "type":
                yield from text_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from text_paths(v, (*path, i))


def poisoned(msg, char: str = "\x00") -> list[tuple[str, bytes]]:
    """(where, JSON) for each text place of `msg` with `char` put into it."""
    doc, out = json.loads(proto.encode(msg)), []
    for path in text_paths(doc):
        copy = json.loads(json.dumps(doc))
        node = copy
        for p in path[:-1]:
            node = node[p]
        last = path[-1]
        if isinstance(last, tuple):
            node[last[1] + char] = node.pop(last[1])
        else:
            node[last] = node[last][:1] + char + node[last][1:]
        out.append(("/".join(map(str, path)), json.dumps(copy).encode()))
    return out


def poison_messages() -> list[tuple[str, str, bytes]]:
    """(stage input subject, where, JSON): a NUL or another control character in every text field of
    every message type a stage reads; each must be refused at decode and dead-lettered with the field."""
    now = time.time()
    samples = {
        "vigil.uploads.front_door": proto.FileUploaded(
            file_id="p1", camera="front_door", path="front_door/p.jpg", size=1, mtime=now, sha256="0" * 64, kind="image"
        ),
        "vigil.detections.front_door": proto.Detections(
            file_id="p2",
            camera="front_door",
            path="front_door/p.jpg",
            captured_at=now,
            width=1,
            height=1,
            model="m",
            inference_ms=1.0,
            boxes=[proto.Box("person", 0.9, 0, 0, 1, 1)],
        ),
        "vigil.events.front_door": proto.EventClosed(
            event_id="e",
            camera="front_door",
            started_at=now,
            ended_at=now,
            file_ids=["p2"],
            labels={"person": proto.LabelSummary(count=1, max_score=0.9)},
            best_file_id="p2",
            close_reason="idle",
        ),
        "vigil.alerts.front_door": proto.Alert(
            alert_id="a", camera="front_door", kind="person", message="m", created_at=now, file_id="p2", event_id="e"
        ),
        "vigil.gpu.host": proto.GpuSample(
            host="host",
            index=0,
            name="gpu",
            uuid="u",
            source="nvml",
            sampled_at=now,
            throttle_reasons=["none"],
            processes=[proto.GpuProcess(pid=1, used_mb=1, unit="u")],
        ),
    }
    out = []
    for subject, msg in samples.items():
        for _i, (where, data) in enumerate(poisoned(msg, "\x00")):
            out.append((subject, where, data))
        for where, data in poisoned(msg, "\x1b")[:2] + poisoned(msg, "\u009b")[:2]:  # ESC and CSI: terminal controls
            out.append((subject, where, data))
    return out


def publish(url: str, subject: str, data: bytes, headers: dict | None = None) -> None:
    async def go():
        nc = await nats.connect(url)
        await nc.jetstream().publish(subject, data, headers=headers)
        await nc.close()

    asyncio.run(go())


def watcher_skips(log: str) -> dict[str, str]:
    out = {}
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "skipped" in rec.get("event", "") and "path" in rec:
            out[rec["path"]] = rec["event"] + ": " + rec.get("reason", "")
    return out


def test_bad_files_and_messages_never_stop_the_pipeline(make_stack, media, database, nats_server, models_dir, tmp_path):
    stack = make_stack(model="yolox-nano", models=models_dir)  # default limits: 256 MiB per file, 50 Mpixels
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    cases = file_cases(tmp_path, media)
    for case in cases:
        case.make()
    # the camera folder removed and re-created
    drop(media / "backyard" / "before.jpg", photo_bytes("chelsea", scale=0.3))
    wait_until(
        lambda: query(database, "SELECT 1 FROM detections WHERE path = 'backyard/before.jpg'"),
        what="backyard/before.jpg",
    )
    shutil.rmtree(media / "backyard")
    time.sleep(0.5)
    drop(media / "backyard" / "after.jpg", photo_bytes("chelsea", scale=0.35))
    cases.append(Case("camera folder removed and re-created", "backyard/after.jpg", RECORDED))
    if os.geteuid() != 0:  # root reads anything: this case only means something for an unprivileged watcher
        drop(media / "front_door" / "locked.jpg", photo_bytes("coffee", scale=0.3))
        (media / "front_door" / "locked.jpg").chmod(0)
        cases.append(Case("permission denied", "front_door/locked.jpg", SKIPPED, "not readable"))

    # messages that do not decode, or point where they must not
    url = nats_server.url
    up = dict(
        file_id="m1",
        camera="front_door",
        path="front_door/good.jpg",
        size=1,
        mtime=time.time(),
        sha256="0" * 64,
        kind="image",
    )
    publish(url, "vigil.uploads.front_door", b"\x00not json")
    publish(
        url,
        "vigil.uploads.ghost",
        proto.encode(proto.FileUploaded(**{**up, "file_id": "m2", "camera": "ghost", "path": "ghost/x.jpg"})),
    )
    # another camera's file under this camera's name (a forged upload or retried letter)
    publish(
        url, "vigil.uploads.backyard", proto.encode(proto.FileUploaded(**{**up, "file_id": "m6", "camera": "backyard"}))
    )
    publish(
        url,
        "vigil.uploads.front_door",
        json.dumps({**up, "type": "FileUploaded", "file_id": "m3", "camera": "../etc"}).encode(),
    )
    publish(
        url,
        "vigil.uploads.front_door",
        proto.encode(proto.FileUploaded(**{**up, "file_id": "m4", "path": "../../etc/passwd"})),
    )
    publish(
        url,
        "vigil.uploads.front_door",
        proto.encode(proto.FileUploaded(**{**up, "file_id": "m5"})),
        {"Vigil-Version": "99"},
    )
    publish(url, "vigil.detections.front_door", b'{"type": "Detections", "boxes": "lots"}')
    publish(url, "vigil.events.front_door", b"[1, 2, 3]")
    poisons = poison_messages()
    for subject, _, data in poisons:
        publish(url, subject, data)
    # one NUL in Detections.path stalled the recorder forever (psycopg's DataError taken for "database away")
    readers = {
        "vigil.uploads.front_door": ["detector"],
        "vigil.detections.front_door": ["aggregator", "recorder"],
        "vigil.events.front_door": ["recorder"],
        "vigil.alerts.front_door": ["recorder"],
        "vigil.gpu.host": ["recorder"],
    }
    expected_messages = {  # (stage, original subject) -> reason substring
        (
            "detector",
            "vigil.uploads.front_door",
            "not a valid FileUploaded",
        ): 3,  # garbage, bad camera id, unknown version
        ("detector", "vigil.uploads.ghost", "vanished"): 1,
        ("detector", "vigil.uploads.backyard", "is not in camera backyard's folder"): 1,
        ("detector", "vigil.uploads.front_door", "escapes the media root"): 1,
        ("aggregator", "vigil.detections.front_door", ""): 1,
        ("recorder", "vigil.detections.front_door", ""): 1,
        ("recorder", "vigil.events.front_door", ""): 1,
    }
    for (
        subject,
        _,
        data,
    ) in poisons:  # each refused with its own reason: a control character, a bad camera id or enum value
        try:
            proto.decode(data)
            raise AssertionError(f"{data!r} decodes")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            why = proto.printable(str(exc))
        for stage in readers[subject]:
            expected_messages[(stage, subject, why)] = expected_messages.get((stage, subject, why), 0) + 1
    assert sum("control character in text field" in why for _, _, why in expected_messages) >= 20

    def letters():
        return [m for m in stream_messages(url, "DLQ") if isinstance(m, proto.DeadLetter)]

    def file_letters():
        out = {}
        for m in letters():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out[json.loads(m.original_payload)["path"]] = m.reason
        return out

    recorded_expected = {c.rel for c in cases if c.expect == RECORDED}
    dead_expected = {c.rel for c in cases if c.expect == DEAD}

    def not_recorded():
        return recorded_expected - {r[0] for r in query(database, "SELECT DISTINCT path FROM detections")}

    try:
        wait_until(lambda: not not_recorded(), timeout=180, what="every good file recorded")
        wait_until(lambda: dead_expected <= set(file_letters()), timeout=120, what="every bad file dead-lettered")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: not recorded {not_recorded()}, not dead-lettered {dead_expected - set(file_letters())}, "
            f"skipped {watcher_skips(stack.log('watcher'))}"
        ) from None
    wait_until(
        lambda: len(letters()) >= len(dead_expected) + sum(expected_messages.values()),
        timeout=60,
        what="every bad message dead-lettered",
    )
    time.sleep(3)  # give skipped and ignored files time to (wrongly) show up

    recorded = {r[0] for r in query(database, "SELECT DISTINCT path FROM detections")}
    dead, skips = file_letters(), watcher_skips(stack.log("watcher"))
    outcome = {}
    for c in cases:
        # the watcher logs (and dead-letters) a refused name escaped: the log line stays one clean line
        got = (
            RECORDED
            if c.rel in recorded
            else DEAD
            if c.rel in dead
            else SKIPPED
            if proto.printable(c.rel) in skips
            else IGNORED
        )
        detail = dead.get(c.rel, skips.get(proto.printable(c.rel), ""))
        if got != c.expect or (c.reason and c.reason not in detail.lower()):
            outcome[c.name] = f"expected {c.expect} ({c.reason}), got {got}: {detail}"
    for (stage, subject, reason), n in expected_messages.items():
        found = [m for m in letters() if m.stage == stage and m.original_subject == subject and reason in m.reason]
        if len(found) < n:
            outcome[f"{stage} {subject} {reason}"] = (
                f"expected {n} dead letters, found {len(found)}: {[m.reason for m in letters() if m.stage == stage]}"
            )
    assert outcome == {}
    assert (
        query(database, "SELECT count(*), count(DISTINCT detection_id) FROM detections")[0][0]
        == query(database, "SELECT count(DISTINCT detection_id) FROM detections")[0][0]
    )  # nothing recorded twice
    assert not (tmp_path / "outside" / "secret.jpg").is_symlink() and (tmp_path / "outside" / "secret.jpg").exists()
    for name in ALL:  # nothing crashed or restarted
        assert stack.procs[name].poll() is None, name
        assert stack.log(name).count('"event": "ready"') == 1, name
    print(
        f"{len(cases) + sum(expected_messages.values())} bad-input cases: "
        f"{sum(c.expect == RECORDED for c in cases)} recorded, {len(dead_expected)} files + {sum(expected_messages.values())} messages "
        f"dead-lettered, {sum(c.expect == SKIPPED for c in cases)} skipped with a log line, {sum(c.expect == IGNORED for c in cases)} ignored"
    )


CONFIGS = [
    ("not TOML", "media_root = \n", "not valid TOML"),
    ("wrong type", '[watcher]\nsettle_seconds = "fast"\n', "$.watcher.settle_seconds"),
    ("unknown field", '[watcher]\ncolour = "blue"\n', "colour"),
    ("unknown section", "[bogus]\nx = 1\n", "bogus"),
    ("negative settle time", "[watcher]\nsettle_seconds = -1.0\n", "watcher.settle_seconds"),
    ("unknown backend", '[detector]\nbackend = "quantum"\n', "detector.backend"),
    ("bad watermark", '[retention]\nlow_watermark = "lots"\n', "retention.low_watermark"),
    ("heartbeat out of range", "heartbeat_seconds = 0\n", "heartbeat_seconds"),
    ("list where a string belongs", "media_root = [1, 2]\n", "$.media_root"),
    ("webhook without scheme", '[health]\nwebhook_url = "hooks.example"\n', "health.webhook_url"),
]


@pytest.mark.parametrize("text, field", [(t, f) for _, t, f in CONFIGS], ids=[n for n, _, _ in CONFIGS])
def test_malformed_config_names_the_field_and_exits_78(tmp_path, text, field):
    path = tmp_path / "vigil.toml"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "config", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 78 and field in out.stderr, out.stderr
    run = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "run", "watcher", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 78 and field in run.stderr, run.stderr  # a service stops at start, naming it too
