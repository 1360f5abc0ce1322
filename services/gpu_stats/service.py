"""gpu-stats: a GpuSample per GPU every interval on vigil.gpu.<host> (latest also in KV vigil_gpu).

NVML when the library loads, `nvidia-smi` CSV when it does not; on a machine without a GPU it says so
once, keeps heartbeating (STATUS "no GPU"), and never crash-loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import proto
from proto import subject
from proto.topology import GPU_BUCKET, token
from services.gpu_stats.readers import open_reader
from services.runtime import jetstream
from services.runtime.config import Config
from services.runtime.service import Runtime


async def run(config: Config) -> None:
    cfg = config.gpu_stats
    reader, why = await asyncio.to_thread(open_reader, cfg.nvidia_smi)
    host = socket.gethostname()
    async with Runtime.start("gpu-stats", config) as rt:
        if reader is None:
            rt.log.info("no GPU: nothing to sample", reason=why)
            rt.status_extra = "no GPU"
        else:
            rt.status_extra = f"source {reader.source}"
        kv = await rt.js.key_value(GPU_BUCKET)
        rt.beat("sample")
        while not rt.stopping.is_set():
            if reader is not None:
                try:
                    samples = await asyncio.to_thread(reader.read, host)
                except Exception as exc:  # noqa: BLE001 - a driver hiccup must not stop the sampler
                    rt.log.warning("GPU read failed", error=repr(exc))
                    rt.note_error(f"GPU read failed: {exc!r}")
                    samples = []
                key = subject("gpu", token(host))
                await rt.bus.publish_many([(key, s, f"gpu-{host}-{s.index}-{int(s.sampled_at)}") for s in samples])
                for s in samples:
                    with contextlib.suppress(*jetstream.TRANSIENT):
                        await kv.put(f"{token(host)}.{s.index}", proto.encode(s))
                rt.count("samples", len(samples))
            rt.beat("sample")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rt.stopping.wait(), timeout=cfg.interval_seconds)
