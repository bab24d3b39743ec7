"""CLI start-up: ``meshlens --help`` (and two sub-command helps) against a bare ``import duckdb``.

    .venv/bin/python benchmarks/bench_startup.py [--runs 15]

Each command runs ``--runs`` times as a fresh process, interleaved with the baseline so that a noisy
neighbour slows both alike; the ratio of medians is printed. Target (issue 12): ``meshlens --help``
within 3x of ``python -c "import duckdb"``. Exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET = 3.0
BASELINE = [sys.executable, "-c", "import duckdb"]
COMMANDS = {
    "meshlens --help": [sys.executable, "-m", "meshlens.cli", "--help"],
    "meshlens ingest file --help": [sys.executable, "-m", "meshlens.cli", "ingest", "file", "--help"],
    "meshlens analyze root-cause --help": [sys.executable, "-m", "meshlens.cli", "analyze", "root-cause", "--help"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    for cmd in [BASELINE, *COMMANDS.values()]:  # warm the page cache and .pyc files
        wall(cmd)
    base: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.runs):
        base.append(wall(BASELINE))
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    b = statistics.median(base)
    print(f"{'command':<38} {'median s':>9} {'ratio':>7}")
    print(f"{'python -c import duckdb (baseline)':<38} {b:9.3f} {1.0:7.2f}")
    worst = 0.0
    for name, ts in times.items():
        m = statistics.median(ts)
        worst = max(worst, m / b) if name == "meshlens --help" else worst
        print(f"{name:<38} {m:9.3f} {m / b:7.2f}")
    ok = worst <= TARGET
    print(f"meshlens --help: {worst:.2f}x the baseline (target <= {TARGET}x): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
