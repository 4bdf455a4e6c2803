"""The performance targets of lowmem-moe, evaluated on measured results."""

import statistics
from dataclasses import dataclass
from typing import Any

from .measure import OK, RunRecord

COPY_PHASE_PEAK_LIMIT_BYTES = 512 * 10**6
GATE_PASS_PEAK_LIMIT_BYTES = 3 * 10**9
MAX_TIME_OVER_CP = 1.25
MIN_RSS_ADVANTAGE_OVER_MERGEKIT = 10.0

PEAK_TARGET = "copy phase peak RSS under 512 MB"
GATE_PASS_TARGET = "hidden gate pass peak RSS under 3 GB (float32)"
TIME_TARGET = "merge time at most 1.25x cp of the same bytes"
# Gate modes whose pass runs the base model. lowmem-moe runs that pass
# while it copies, so such a merge has no copy phase of its own.
MODEL_GATE_MODES = ("hidden", "hidden_last", "hidden_avg")


@dataclass(frozen=True)
class TargetResult:
    """One target on one merge: the measured value as text and whether it meets the target (None: not measured)."""

    target: str
    merge: str
    measured: str
    met: bool | None


def bench_targets(bench: dict[str, Any]) -> list[TargetResult]:
    """Evaluate the memory and time targets on the headline merges of ``make bench``.

    The peak is the largest over the repetitions, the time ratio the median
    of the repetitions' ratios.
    """
    results = []
    for row in bench["headline"]:
        name = row["case"]["name"]
        merges = [RunRecord.from_json(run["merge"]) for run in row["repeats"]]
        failed = [merge for merge in merges if merge.status != OK]
        if failed:
            results.append(TargetResult(PEAK_TARGET, name, failed[0].status, None))
            continue
        whole = max(merge.peak_rss_bytes for merge in merges)
        copy_peaks = [merge.copy_phase_peak_rss_bytes for merge in merges]
        if row["case"]["gate_mode"] in MODEL_GATE_MODES:
            # The whole process's peak includes the copy that runs beside the gate pass.
            measured = f"{whole / 1e6:.0f} MB whole process, gate pass and copy together"
            results.append(TargetResult(GATE_PASS_TARGET, name, measured, whole < GATE_PASS_PEAK_LIMIT_BYTES))
        elif None in copy_peaks:
            # Without a copy phase sample, the whole run's peak is the bound.
            measured = f"{whole / 1e6:.0f} MB (whole process)"
            results.append(TargetResult(PEAK_TARGET, name, measured, whole < COPY_PHASE_PEAK_LIMIT_BYTES))
        else:
            peak = max(copy_peaks)
            measured = f"{peak / 1e6:.0f} MB in the copy phase, {whole / 1e6:.0f} MB whole process"
            results.append(TargetResult(PEAK_TARGET, name, measured, peak < COPY_PHASE_PEAK_LIMIT_BYTES))

        ratios = []
        for run, merge in zip(row["repeats"], merges):
            copy = RunRecord.from_json(run["copy"]) if run.get("copy") else None
            if copy is not None and copy.status == OK:
                ratios.append(merge.wall_seconds / copy.wall_seconds)
        if not ratios:
            results.append(TargetResult(TIME_TARGET, name, "cp not measured", None))
            continue
        median = statistics.median(ratios)
        spread = f", {min(ratios):.2f}x to {max(ratios):.2f}x over {len(ratios)} runs" if len(ratios) > 1 else ""
        results.append(TargetResult(TIME_TARGET, name, f"median {median:.2f}x{spread}", median <= MAX_TIME_OVER_CP))
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
