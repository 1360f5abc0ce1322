"""End to end on one NATS server with R1 streams against a 3-node cluster on this machine with R3
streams, in the same run:

    python -m tests.bench.cluster [--files 3000]      (just bench-cluster)

Runs the pipeline benchmark (model none) once per layout and prints files/s, p50/p99 latency at a
fixed rate, and the ratios R3/R1. All three nodes share this machine's CPUs and disk, so the figures
show the replication protocol's cost, not a network's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys


def run(replicas: int, files: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.pipeline", "--files", str(files), "--replicas", str(replicas)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    rate = re.search(r"settled -> row in PostgreSQL\s+([\d.]+) files/s", out.stdout)
    lat = re.search(r"p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", out.stdout)
    if not rate or not lat:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"R{replicas} run failed")
    return {"files_s": float(rate.group(1)), "p50": float(lat.group(1)), "p99": float(lat.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    args = ap.parse_args()
    r1, r3 = run(1, args.files), run(3, args.files)
    for name, r in (("R1, one server", r1), ("R3, 3-node cluster", r3)):
        print(
            f"{name:20}: {r['files_s']:7.0f} files/s   latency at 50 files/s p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms"
        )
    print(
        f"R3/R1: throughput {r3['files_s'] / r1['files_s']:.2f}, p50 {r3['p50'] / r1['p50']:.2f}, p99 {r3['p99'] / r1['p99']:.2f}"
    )


if __name__ == "__main__":
    main()
