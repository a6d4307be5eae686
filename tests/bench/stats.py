"""Small helpers shared by the benchmarks: percentiles and the report line format."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
    }


def report(
    name: str,
    ours: list[float],
    baseline: list[float],
    baseline_name: str,
    unit: str = "ms",
    target: float | None = None,
) -> dict[str, float]:
    a, b = summary(ours), summary(baseline)
    ratio = a["median"] / b["median"]
    verdict = ""
    if target is not None:
        verdict = f"  target <= {target:g}x: {'met' if ratio <= target else 'NOT met'}"
    width = max(len("envctl"), len(baseline_name))
    print(f"{name}")
    for label, st in (("envctl", a), (baseline_name, b)):
        print(f"  {label:<{width}}  median {st['median']:8.1f} {unit}  p95 {st['p95']:8.1f} {unit}  (n={st['n']:.0f})")
    print(f"  ratio of medians, envctl / {baseline_name}: {ratio:.2f}x{verdict}")
    return {
        "ours_median": a["median"],
        "ours_p95": a["p95"],
        "base_median": b["median"],
        "base_p95": b["p95"],
        "ratio": ratio,
    }
