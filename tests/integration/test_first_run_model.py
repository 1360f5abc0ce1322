"""`vigil up`'s first run on a fresh clone: no model anywhere, so it pulls yolox_nano.onnx into
<home>/models once, through `vigil models pull`'s hash-checked code (here from a real HTTP server on
loopback serving the real file, or a corrupted one), and says so; offline it falls back to model "none"
and says that too. Never a half-written model left behind."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from aiohttp import web

from services.cli.up import find_or_pull_model
from services.detector.catalog import CATALOG
from tests.support import LoopbackHTTP

ENTRY = CATALOG["yolox-nano"]


def serve(body: bytes) -> LoopbackHTTP:
    async def handler(request, n):
        return web.Response(body=body, content_type="application/octet-stream")

    return LoopbackHTTP(handler)


def test_pulled_once_verified_and_used(tmp_path, models_dir, monkeypatch):
    """The workplace's copy of the model is another export than the release the catalog pins, so the
    catalog entry is pointed at that copy's size and hash here: the pull, check and use are the same."""
    body = (models_dir / ENTRY.file).read_bytes()
    pinned = dataclasses.replace(ENTRY, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(CATALOG, "yolox-nano", pinned)
    server = serve(body)
    try:
        monkeypatch.setenv("VIGIL_MODEL_URL", f"{server.url}/yolox_nano.onnx")
        home = tmp_path / "home"
        folder, model, note = find_or_pull_model(tmp_path / "nowhere", home)
        assert (folder, model) == ((home / "models").resolve(), "yolox-nano") and note.startswith("pulled")
        again = find_or_pull_model(tmp_path / "nowhere", home)
        assert again == (folder, "yolox-nano", None) and len(server.requests) == 1  # once
    finally:
        server.close()


@pytest.mark.parametrize("body", [b"\x00" * 1000, bytes(ENTRY.size)], ids=["short", "wrong-hash"])
def test_a_bad_download_is_refused_and_leaves_nothing(tmp_path, monkeypatch, body):
    server = serve(body)
    try:
        monkeypatch.setenv("VIGIL_MODEL_URL", f"{server.url}/yolox_nano.onnx")
        _, model, note = find_or_pull_model(tmp_path / "nowhere", tmp_path / "home")
        assert model == "none" and "could not pull the model" in note, note
        assert list((tmp_path / "home" / "models").iterdir()) == []
    finally:
        server.close()


def test_offline_falls_back_to_none_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("VIGIL_MODEL_URL", "http://127.0.0.1:9/yolox_nano.onnx")  # nothing listens there
    folder, model, note = find_or_pull_model(tmp_path / "nowhere", tmp_path / "home")
    assert (folder, model) == (tmp_path / "nowhere", "none") and "offline?" in note
