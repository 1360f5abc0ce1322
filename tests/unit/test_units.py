"""The systemd units and the appliance config template, checked without booting anything."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from services.runtime.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))


def test_config_template_parses_and_lists_every_option(tmp_path):
    """ops/vigil.toml is a valid config, and every option of every section appears in it (commented or not)."""
    text = (REPO / "ops" / "vigil.toml").read_text().replace("@MEDIA@", "/srv/vigil/media")
    path = tmp_path / "vigil.toml"
    path.write_text(text)
    load_config(path, environ={})

    def walk(struct, prefix=""):
        for f in msgspec.structs.fields(struct):
            t = f.type
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                yield from walk(t, f"{f.name}.")
            else:
                yield prefix, f.name

    for section, name in walk(Config):
        pattern = rf"^#?\s*\[{section}{name}[.\]]" if name == "cameras" else rf"^#?\s*{name}\s*="  # a table of tables
        assert re.search(pattern, text, re.M), f"{section}{name} missing from ops/vigil.toml"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_notify_with_watchdog_and_bounded_stop(unit):
    text = unit.read_text()
    if unit.name != "vigil-nats.service":  # nats-server has no sd_notify; services wait for it
        assert ("Type=notify" in text and "WatchdogSec=" in text) or unit.name == "vigil-postgresql.service"
    assert "Restart=on-failure" in text and "StartLimitBurst=" in text
    assert "PartOf=vigil.target" in text
    stop = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))
    assert stop > 15  # drain_seconds (10) + bus drain (5)
    assert "Environment=" not in text or "PASSWORD" not in text.upper()
    assert "LoadCredential=" in text or unit.name in ("vigil-nats.service", "vigil-postgresql.service")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_every_unit_exposure_is_ok():
    """`systemd-analyze security --offline=yes` scores each unit <= 2.0 ("OK")."""
    scores = {}
    for unit in UNITS:
        out = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
        ).stdout
        scores[unit.name] = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out).group(1))
    print("\nexposure: " + ", ".join(f"{k} {v}" for k, v in scores.items()))
    assert all(v <= 2.0 for v in scores.values()), scores


def test_gpu_units_may_open_the_nvidia_nodes_read_write():
    """NVML and CUDA are clients of the driver's resource manager: they open /dev/nvidiactl and the
    GPU nodes O_RDWR, which a device cgroup allowing only "r" refuses (every GPU figure would be lost)."""
    for name in ("vigil-gpu-stats.service", "vigil-detector@.service"):
        allowed = re.findall(r"^DeviceAllow=(\S+) (\w+)$", (REPO / "systemd" / name).read_text(), re.M)
        assert allowed and all("r" in mode and "w" in mode for _, mode in allowed), (name, allowed)
        assert any(node in ("/dev/nvidiactl", "char-nvidia-frontend") for node, _ in allowed)
