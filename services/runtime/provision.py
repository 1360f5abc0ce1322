"""Streams, consumers and KV buckets declared in proto/topology.py, applied idempotently: every service at
start (as its least-privilege user only checks they exist: wait_provisioned), `vigil provision` as the admin."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from proto.topology import (
    AGGREGATOR_STATE_BUCKET,
    CONSUMERS,
    EVENT_INDEX_BUCKET,
    EVENT_INDEX_TTL,
    GPU_BUCKET,
    GPU_TTL,
    HEALTH_BUCKET,
    HEARTBEAT_BUCKET,
    HEARTBEAT_TTL,
    NOTIFIER_BUCKET,
    NOTIFIER_TTL,
    STREAMS,
    ConsumerSpec,
    StreamSpec,
)

if TYPE_CHECKING:
    from services.runtime.service import Runtime


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy(spec.retention),
        max_age=spec.max_age,
        max_bytes=spec.max_bytes,
        max_msg_size=spec.max_msg_size,
        duplicate_window=spec.duplicate_window,
        discard=DiscardPolicy(spec.discard),
        storage=StorageType.FILE,
        num_replicas=replicas,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable,
        description=spec.description,
        filter_subject=spec.filter_subject,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        backoff=list(spec.backoff) or None,
    )


async def provision(js: JetStreamContext, log, replicas: int = 1) -> None:
    """Create or update every declared stream, consumer and KV bucket, with `replicas` copies each
    (consumers follow their stream). Safe to run concurrently."""
    for spec in STREAMS:
        config = stream_config(spec, replicas)
        try:
            await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(config)
                log.info("stream created", stream=spec.name)
                continue
            except nats.js.errors.BadRequestError:
                pass  # another service created it a moment ago: fall through to update
        await js.update_stream(config)
    for cspec in CONSUMERS:
        # CONSUMER.CREATE without an action is create-or-update on nats-server >= 2.10.
        await js.add_consumer(cspec.stream, consumer_config(cspec))
    for bucket, description, ttl in (
        (
            AGGREGATOR_STATE_BUCKET,
            "Current event, grouping point and outbox per camera (aggregator crash safety)",
            None,
        ),
        (
            EVENT_INDEX_BUCKET,
            "Published events by camera and start hour (late detections find their event)",
            EVENT_INDEX_TTL,
        ),
        (HEARTBEAT_BUCKET, "Latest heartbeat of every vigil service instance", HEARTBEAT_TTL),
        (GPU_BUCKET, "Latest GPU sample per GPU (gpu-stats)", GPU_TTL),
        (HEALTH_BUCKET, "health's alert bookkeeping: conditions held and alerts fired", None),
        (NOTIFIER_BUCKET, "The notifier's firings, cooldowns and deliveries", NOTIFIER_TTL),
    ):
        try:
            await js.key_value(bucket)
            info = await js.stream_info(f"KV_{bucket}")
            if info.config.num_replicas != replicas:  # scale an existing bucket like the streams
                info.config.num_replicas = replicas
                await js.update_stream(info.config)
        except nats.js.errors.BucketNotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
                await js.create_key_value(bucket=bucket, description=description, history=1, ttl=ttl, replicas=replicas)


async def wait_provisioned(rt: Runtime) -> None:
    """With nats.provision = false (per-service users may not create streams), wait until an
    administrator (`vigil provision`, run by the installer) has declared everything this build needs."""
    while True:
        missing = []
        for spec in STREAMS:
            try:
                await rt.js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                missing.append(spec.name)
        for cspec in CONSUMERS if not missing else ():
            try:
                await rt.js.consumer_info(cspec.stream, cspec.durable)
            except nats.js.errors.NotFoundError:
                missing.append(f"{cspec.stream}/{cspec.durable}")
        if not missing:
            return
        rt.log.error("streams or consumers missing: run `vigil provision` as the NATS admin", missing=missing)
        rt.notifier.status(f"waiting for {', '.join(missing[:5])} (vigil provision)")
        await asyncio.sleep(5.0)
