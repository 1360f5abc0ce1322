"""The reorder buffer's cost end to end (prints numbers; never pass/fail).

    just bench-reorder [--files 5000] [--runs 3]

Runs the pipeline benchmark with the synthetic model (one person per file, so the aggregator groups
every file) twice per round: with the configured reorder buffer, and with it as small as it can be
(reorder_window 1, reorder_seconds 0: each detection is grouped as soon as the next one arrives or
the next tick comes). The figure is files/s from "settled" to "the aggregator acked the whole burst",
best of the runs; the issue's rule is that the buffer costs at most 20 %.
"""

from __future__ import annotations

import argparse

from tests.bench.pipeline import measure, parser


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base = ["--model", "synthetic", "--files", str(args.files), "--seconds", "2"]
    rates: dict[str, list[float]] = {"buffer": [], "no buffer": []}
    for _ in range(args.runs):
        for name, extra in (("buffer", []), ("no buffer", ["--reorder-window", "1", "--reorder-seconds", "0"])):
            r = measure(parser().parse_args(base + extra))
            rates[name].append(r["grouped_rate"])
            print(
                f"  {name:9}: settled -> grouped {r['grouped_rate']:7.0f} files/s, -> row {r['burst_rate']:7.0f} files/s",
                flush=True,
            )
    on, off = max(rates["buffer"]), max(rates["no buffer"])
    print(f"\nreorder buffer, {args.files} files of one camera, best of {args.runs}")
    print(f"  with the buffer (window 512, 30 s)   {on:8.0f} files/s")
    print(f"  without (window 1, 0 s)              {off:8.0f} files/s")
    print(f"  ratio with / without                 {on / off:8.3f}   (cost {100 * (1 - on / off):.1f} %)")


if __name__ == "__main__":
    main()
