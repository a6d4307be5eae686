"""`make bench`: every benchmark, each figure beside its baseline from the same run.

python -m tests.bench.run [--only boot] [--runs N]
"""

from __future__ import annotations

import argparse

from tests.bench import (
    bench_boot,
    bench_channel,
    bench_exec,
    bench_lean_save,
    bench_mounts,
    bench_save,
    bench_secret_save,
    bench_swarm,
    bench_transfer,
)

BENCHMARKS = {
    "boot": bench_boot.run,
    "exec": bench_exec.run,
    "channel": bench_channel.run,
    "save": bench_save.run,
    "lean-save": bench_lean_save.run,
    "mounts": bench_mounts.run,
    "transfer": bench_transfer.run,
    "secret-save": bench_secret_save.run,
    "swarm": bench_swarm.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--runs", type=int, default=None, help="override the number of runs")
    args = parser.parse_args()
    for name in args.only or list(BENCHMARKS):
        kwargs = {"runs": args.runs} if args.runs else {}
        BENCHMARKS[name](**kwargs)
        print()


if __name__ == "__main__":
    main()
