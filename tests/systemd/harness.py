"""A real systemd, booted for a test in its own namespaces (see boot.sh), driven with nsenter."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class BootedSystemd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd's PID as the host sees it

    def boot(self, timeout: float = 60.0) -> BootedSystemd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir.parent / "boot.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount", "--net", str(HERE / "boot.sh"), str(self.workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd boot failed: {(self.workdir.parent / 'boot.log').read_text()[-2000:]}")
            pids = children.read_text().split() if children.exists() else []
            if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                self.pid = int(pids[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            time.sleep(0.2)
        raise RuntimeError("systemd did not come up")

    @property
    def root(self) -> Path:
        """The booted system's root, from the host (writes land in the overlay, not on the host)."""
        return Path(f"/proc/{self.pid}/root")

    def run(
        self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-p", "-m", "-n", "-r", "-w", *cmd],
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=timeout,
        )

    def run_on_its_network(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a host program inside the booted system's network namespace only (its private loopback)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-n", "--", *cmd], capture_output=True, text=True, timeout=timeout
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.strip().splitlines() if "=" in line)

    def shutdown(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: power off
        if self.proc:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                if self.pid:
                    os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: takes everything in it along
                self.proc.wait(10)


def can_boot() -> str | None:
    """None if this machine can boot systemd in namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (CI runs as root)"
    for tool in ("unshare", "nsenter", "ip", "systemctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces not allowed here: {probe.stderr.strip()}"
    return None
