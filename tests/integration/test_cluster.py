"""Beyond one box: a 3-node NATS cluster on loopback ports with R3 streams; the pipeline survives the
loss of a stream leader's node, and detectors on several "hosts" share one durable consumer."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
import structlog

from services.cli.stack import NatsCluster
from services.runtime.provision import provision
from tests.integration.test_service_lifecycle import read_heartbeats
from tests.support import Services, drop, photo_bytes, query, tagged, vigil_json, wait_until, write_config
from tests.support import count_rows as rows

PIPELINE = ("watcher", "detector", "aggregator", "recorder")


def provision_when_ready(urls: list[str], replicas: int = 3, timeout: float = 60.0) -> None:
    """JetStream needs a meta leader before anything can be declared: retry until one is elected."""

    async def go():
        deadline = time.monotonic() + timeout
        nc = await nats.connect(servers=urls)
        try:
            while True:
                try:
                    await provision(nc.jetstream(timeout=5), structlog.get_logger(), replicas)
                    return
                except (TimeoutError, nats.errors.Error):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    asyncio.run(go())


def stream_cluster(urls: list[str], stream: str):
    async def go():
        nc = await nats.connect(servers=urls)
        try:
            return (await nc.jetstream().stream_info(stream)).cluster
        finally:
            await nc.close()

    return asyncio.run(go())


def caught_up(urls: list[str], node: str) -> bool:
    """`node` leads, or is a current, online replica of, every pipeline stream."""
    for stream in ("UPLOADS", "DETECTIONS", "EVENTS"):
        info = stream_cluster(urls, stream)
        peers = {info.leader: True} | {r.name: bool(r.current) and not r.offline for r in info.replicas or []}
        if not peers.get(node):
            return False
    return True


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path / "cluster").start()
    provision_when_ready(c.urls)
    yield c
    c.kill()


def cluster_stack(tmp_path, media, database, cluster, logs: str = "logs", instance: str | None = None) -> Services:
    config = write_config(
        tmp_path / "vigil.toml",
        media=media,
        state=tmp_path / "state",
        nats_url=cluster.urls,
        dsn=database,
        model="none",
        models_dir=None,
        detector={"batch_size": 4},
    )
    env = {"VIGIL_NATS__REPLICAS": "3", "VIGIL_HEARTBEAT_SECONDS": "1"}
    if instance:
        env["VIGIL_INSTANCE"] = instance
    return Services(config, tmp_path / logs, env)


def test_losing_the_stream_leaders_node_loses_nothing(tmp_path, media, database, cluster):
    stack = cluster_stack(tmp_path, media, database, cluster)
    try:
        stack.start(*PIPELINE)
        stack.wait_ready(*PIPELINE, timeout=60)
        blob = photo_bytes("coffee", scale=0.1)
        n = 60
        for i in range(n):
            drop(media / ("front_door" if i % 2 else "backyard") / f"f{i:03}.jpg", tagged(blob, i))
            time.sleep(0.1)
            if i == 20:
                leader = stream_cluster(cluster.urls, "UPLOADS").leader
                cluster.node(leader).kill()  # mid-run: the leader of the work queue goes away
        wait_until(lambda: rows(database) >= n, timeout=180, what=f"{n} rows despite the lost node")
        time.sleep(2)
        assert query(database, "SELECT count(*), count(DISTINCT path) FROM detections")[0] == (
            n,
            n,
        )  # none lost, none twice
        new_leader = stream_cluster([u for u in cluster.urls if u != cluster.node(leader).url], "UPLOADS").leader
        assert new_leader and new_leader != leader

        # the operator sees it: three nodes, the new leader, the lost node as an offline or lagging replica
        # `vigil status` answers while the cluster settles; what it cannot read yet (a consumer still
        # electing its leader answers 503) it names instead of failing, and a rerun sees the whole.
        def settled_status() -> dict | None:
            status = vigil_json(stack.config, "status")
            return None if status["unreadable"] else status

        status = wait_until(settled_status, timeout=60, what="a status with every stream and consumer read")
        uploads = next(st for st in status["streams"] if st["name"] == "UPLOADS")
        assert status["nodes"] == ["n0", "n1", "n2"] and uploads["leader"] == new_leader
        assert any(r["node"] == leader and (r["offline"] or not r["current"]) for r in uploads["replicas"]), uploads
        for name in PIPELINE:
            assert stack.procs[name].poll() is None, f"{name} died with the node"

        cluster.node(leader).start()  # it rejoins and catches up
        wait_until(lambda: caught_up(cluster.urls, leader), timeout=90, what=f"{leader} current again on every stream")
    finally:
        stack.stop_all()


def test_detectors_on_two_hosts_share_the_work_and_one_can_leave(tmp_path, media, database, cluster):
    stack = cluster_stack(tmp_path, media, database, cluster)
    second = cluster_stack(tmp_path, media, database, cluster, logs="logs-b", instance="host-b")
    try:
        stack.start("watcher", "detector", "recorder")
        second.start("detector")
        stack.wait_ready("watcher", "detector", "recorder", timeout=60)
        second.wait_ready("detector", timeout=60)
        blob = photo_bytes("camera", scale=0.1)
        time.sleep(2)  # both in their fetch loops before work arrives
        for i in range(120):  # a steady stream (not one burst), so both keep asking for work
            drop(media / "front_door" / f"a{i:03}.jpg", tagged(blob, i))
            time.sleep(0.05)
        wait_until(lambda: rows(database) >= 120, timeout=120, what="first 120 rows")

        def served() -> dict[str, int]:
            beats = read_heartbeats(cluster.urls[0])
            return {k: v.counters.get("detected", 0) for k, v in beats.items() if k.startswith("detector.")}

        shares = wait_until(lambda: (d := served()) and sum(d.values()) >= 120 and d, what="both detectors' counts")
        assert len(shares) == 2 and all(n > 0 for n in shares.values()), shares  # both hosts did part of the work
        assert second.stop("detector") == 0  # host b leaves cleanly
        for i in range(40):
            drop(media / "front_door" / f"b{i:03}.jpg", tagged(blob, i, 1))
        wait_until(lambda: rows(database) >= 160, timeout=120, what="the rest on host a")
        time.sleep(1)
        assert query(database, "SELECT count(*), count(DISTINCT path) FROM detections")[0] == (160, 160)
    finally:
        second.stop_all()
        stack.stop_all()
