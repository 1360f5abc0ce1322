"""Known models and `vigil models pull NAME`: download, verify size and sha256, install atomically.

Nothing downloads weights at run time; this is an explicit operator step. Plain urllib on purpose:
one streaming GET needs no extra dependency on an appliance.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: str
    url: str
    size: int
    sha256: str
    family: str
    licence: str


CATALOG: dict[str, CatalogEntry] = {
    "yolox-nano": CatalogEntry(
        name="yolox-nano",
        file="yolox_nano.onnx",
        url="https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx",
        size=3_659_407,
        sha256="c789161ed43c8269fcd4e67c67eeeb4e80c622da2eb296a20bc6007bd18a0b7d",
        family="yolox",
        licence="Apache-2.0 (Megvii-BaseDetection/YOLOX)",
    ),
}


class PullError(Exception):
    pass


def model_file(model: str) -> str:
    """Config value -> file name: a catalog name maps to its file, anything else is a file name."""
    if model in CATALOG:
        return CATALOG[model].file
    return model if model.endswith(".onnx") else f"{model.replace('-', '_')}.onnx"


def pull(entry: CatalogEntry, models_dir: Path, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download `entry` into models_dir; refuses (and leaves nothing behind) on a size or hash mismatch."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / entry.file
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.file}.", dir=models_dir)
    tmp = Path(tmp_name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url or entry.url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 16):
                size += len(chunk)
                if size > entry.size:
                    raise PullError(f"download is larger than the expected {entry.size} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != entry.size:
            raise PullError(f"downloaded {size} bytes, expected {entry.size}")
        if digest.hexdigest() != entry.sha256:
            raise PullError(f"sha256 {digest.hexdigest()} does not match the expected {entry.sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        return target
    except OSError as exc:
        raise PullError(f"download failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
