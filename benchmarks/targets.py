"""The performance targets of lowmem-moe, evaluated on measured results."""

from dataclasses import dataclass
from typing import Any

from .measure import OK, RunRecord

COPY_PHASE_PEAK_LIMIT_BYTES = 512 * 10**6
MAX_TIME_OVER_CP = 1.25
MIN_RSS_ADVANTAGE_OVER_MERGEKIT = 10.0


@dataclass(frozen=True)
class TargetResult:
    """One target on one merge: the measured value as text and whether it meets the target (None: not measured)."""

    target: str
    merge: str
    measured: str
    met: bool | None


def bench_targets(bench: dict[str, Any]) -> list[TargetResult]:
    """Evaluate the memory and time targets on the headline merges of ``make bench``."""
    results = []
    for row in bench["headline"]:
        name = row["case"]["name"]
        merge = RunRecord.from_json(row["merge"])
        if merge.status != OK:
            results.append(TargetResult("copy phase peak RSS under 512 MB", name, merge.status, None))
            continue
        peak = merge.peak_rss_bytes
        results.append(
            TargetResult(
                "copy phase peak RSS under 512 MB",
                name,
                f"{peak / 1e6:.0f} MB (whole process)",
                peak < COPY_PHASE_PEAK_LIMIT_BYTES,
            )
        )
        copy = RunRecord.from_json(row["copy"]) if row.get("copy") else None
        if copy is None or copy.status != OK:
            results.append(TargetResult("merge time at most 1.25x cp of the same bytes", name, "cp not measured", None))
            continue
        ratio = merge.wall_seconds / copy.wall_seconds
        results.append(
            TargetResult(
                "merge time at most 1.25x cp of the same bytes",
                name,
                f"{ratio:.2f}x ({merge.wall_seconds:.1f} s against {copy.wall_seconds:.1f} s)",
                ratio <= MAX_TIME_OVER_CP,
            )
        )
    return results


def peer_targets(peer: dict[str, Any]) -> list[TargetResult]:
    """Evaluate the peak memory target against mergekit-moe on the merges of ``make bench-peer``."""
    results = []
    for row in peer["cases"]:
        name = row["case"]["name"]
        lowmem = RunRecord.from_json(row["lowmem"])
        mergekit = RunRecord.from_json(row["mergekit"]) if row.get("mergekit") else None
        target = "peak RSS at least 10x lower than mergekit-moe's"
        if lowmem.status != OK:
            results.append(TargetResult(target, name, lowmem.status, None))
            continue
        if mergekit is None or mergekit.status != OK:
            results.append(TargetResult(target, name, mergekit.status if mergekit else "not run", None))
            continue
        advantage = mergekit.peak_rss_bytes / lowmem.peak_rss_bytes
        measured = f"{advantage:.1f}x ({lowmem.peak_rss_bytes / 1e6:.0f} MB against {mergekit.peak_rss_bytes / 1e6:.0f} MB)"
        results.append(TargetResult(target, name, measured, advantage >= MIN_RSS_ADVANTAGE_OVER_MERGEKIT))
    return results
