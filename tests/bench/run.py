"""`make bench`: every benchmark, each figure beside its baseline from the same run.

python -m tests.bench.run [--only boot] [--runs N]

``save`` runs 10 MB, 100 MB and 1 GB; ``save-small`` the first two, ``save-1g`` the last.
"""

from __future__ import annotations

import argparse

from tests.bench import (
    bench_apps,
    bench_boot,
    bench_cells,
    bench_channel,
    bench_exec,
    bench_insave,
    bench_insave_boot,
    bench_kube,
    bench_lean_save,
    bench_memwatch,
    bench_mounts,
    bench_pool,
    bench_save,
    bench_secret_save,
    bench_swarm,
    bench_swarm_mounts,
    bench_transfer,
)

BENCHMARKS = {
    "boot": bench_boot.run,
    "exec": bench_exec.run,
    "channel": bench_channel.run,
    "cells": bench_cells.run,
    "save": bench_save.run,
    "save-small": lambda **kw: bench_save.run(sizes=(10, 100), **kw),
    "save-1g": lambda **kw: bench_save.run(sizes=(1024,), **kw),
    "deep-boot": bench_save.run_deep,
    "lean-save": bench_lean_save.run,
    "mounts": bench_mounts.run,
    "transfer": bench_transfer.run,
    "secret-save": bench_secret_save.run,
    "pool": bench_pool.run,
    "insave": bench_insave.run,
    "insave-boot": bench_insave_boot.run,
    "swarm": bench_swarm.run,
    "swarm-mounts": bench_swarm_mounts.run,
    "apps": bench_apps.run,
    "kube": bench_kube.run,
    "memwatch": bench_memwatch.run,
}
#: parts of the benchmarks above, for running alone; ``make bench`` leaves them out
PARTS = {"save-small", "save-1g"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--runs", type=int, default=None, help="override the number of runs")
    args = parser.parse_args()
    for name in args.only or [n for n in BENCHMARKS if n not in PARTS]:
        kwargs = {"runs": args.runs} if args.runs else {}
        BENCHMARKS[name](**kwargs)
        print()


if __name__ == "__main__":
    main()
