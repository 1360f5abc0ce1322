"""A real network partition: three nats-server nodes, each in its own network namespace on a bridge
(as root, which CI is); the test takes one node's link down mid-run. The majority keeps working, the
services move off the cut-off node, and after healing the node catches up and the counts add up."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from services.cli.stack import NatsServer, die_with_parent
from tests.integration.test_cluster import PIPELINE, caught_up, provision_when_ready, stream_cluster
from tests.support import Services, drop, photo_bytes, query, tagged, wait_until, write_config
from tests.support import count_rows as rows

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)

SUBNET = "10.231.{}.{}"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class NetnsCluster:
    """Bridge `br` on the host (10.231.X.1/24), node i in namespace `<tag>n<i>` at 10.231.X.(i+2)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.tag = f"vg{os.getpid() % 100000}"
        self.net = os.getpid() % 200 + 20
        self.bridge = f"{self.tag}br"
        self.root, self.size = root, size
        self.procs: dict[int, subprocess.Popen] = {}

    def ip(self, i: int) -> str:
        return SUBNET.format(self.net, i + 2)

    def veth(self, i: int) -> str:
        return f"{self.tag}h{i}"

    @property
    def urls(self) -> list[str]:
        return [f"nats://{self.ip(i)}:4222" for i in range(self.size)]

    def up(self) -> NetnsCluster:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", SUBNET.format(self.net, 1) + "/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.size):
            ns = f"{self.tag}n{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.veth(i), "type", "veth", "peer", "name", f"{self.tag}p{i}")
            sh("ip", "link", "set", f"{self.tag}p{i}", "netns", ns)
            sh("ip", "link", "set", self.veth(i), "master", self.bridge)
            sh("ip", "link", "set", self.veth(i), "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", self.ip(i) + "/24", "dev", f"{self.tag}p{i}")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{self.tag}p{i}", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for i in range(self.size):
            self.start(i)
        return self

    def start(self, i: int) -> None:
        store = self.root / f"n{i}"
        store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f'"nats-route://{self.ip(j)}:6222"' for j in range(self.size) if j != i)
        (store / "nats.conf").write_text(
            f'server_name: "n{i}"\nlisten: "{self.ip(i)}:4222"\n'
            f'cluster {{\n  name: "vigil"\n  listen: "{self.ip(i)}:6222"\n  routes: [{routes}]\n}}\n'
            f'jetstream {{\n  store_dir: "{store}"\n}}\n'
        )
        with open(self.root / f"n{i}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.procs[i] = subprocess.Popen(
                ["ip", "netns", "exec", f"{self.tag}n{i}", NatsServer.binary(), "-c", str(store / "nats.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.ip(i), 4222), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"node n{i} did not listen")

    def cut(self, i: int) -> None:
        sh("ip", "link", "set", self.veth(i), "down")

    def heal(self, i: int) -> None:
        sh("ip", "link", "set", self.veth(i), "up")

    def down(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        for i in range(self.size):
            subprocess.run(["ip", "netns", "del", f"{self.tag}n{i}"], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def netns_cluster(tmp_path):
    cluster = NetnsCluster(tmp_path / "cluster")
    try:
        cluster.up()
    except subprocess.CalledProcessError as exc:
        cluster.down()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    try:
        provision_when_ready(cluster.urls)
        yield cluster
    finally:
        cluster.down()


def test_a_partitioned_node_does_not_stop_the_majority(tmp_path, media, database, netns_cluster):
    cluster = netns_cluster
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
    # leave a silent server after 3 s (default 30 s) so the test does not wait half a minute
    env = {"VIGIL_NATS__REPLICAS": "3", "VIGIL_NATS__PING_INTERVAL": "1", "VIGIL_NATS__MAX_OUTSTANDING_PINGS": "3"}
    stack = Services(config, tmp_path / "logs", env)
    blob = photo_bytes("coffee", scale=0.1)
    try:
        stack.start(*PIPELINE)
        stack.wait_ready(*PIPELINE, timeout=60)
        for i in range(30):
            drop(media / "front_door" / f"before{i:03}.jpg", tagged(blob, i))
        wait_until(lambda: rows(database) >= 30, timeout=90, what="30 rows before the partition")

        leader = stream_cluster(cluster.urls, "UPLOADS").leader
        cut = int(leader[1:])
        cluster.cut(cut)  # the work queue's leader is cut off from everyone
        for i in range(30):
            drop(media / "backyard" / f"during{i:03}.jpg", tagged(blob, i, 1))
            time.sleep(0.1)
        wait_until(lambda: rows(database) >= 60, timeout=180, what="30 more rows on the majority side")
        majority = [u for j, u in enumerate(cluster.urls) if j != cut]
        assert stream_cluster(majority, "UPLOADS").leader not in (None, leader)

        cluster.heal(cut)
        wait_until(lambda: caught_up(cluster.urls, leader), timeout=120, what=f"{leader} back and current")
        for i in range(10):
            drop(media / "front_door" / f"after{i:03}.jpg", tagged(blob, i, 2))
        wait_until(lambda: rows(database) >= 70, timeout=90, what="rows after healing")
        time.sleep(2)
        assert query(database, "SELECT count(*), count(DISTINCT path) FROM detections")[0] == (70, 70)
        for name in PIPELINE:
            assert stack.procs[name].poll() is None, name
    finally:
        stack.stop_all()
