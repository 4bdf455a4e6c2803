"""Print the demo's replies and measurements for the user."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lowmem_moe.demo.generate import Reply
from lowmem_moe.resource_monitor import RunMeasurement, format_bytes


def print_report(
    replies: Sequence[Reply],
    expert_labels: Sequence[str],
    merge: RunMeasurement,
    output_dir: Path,
    stage_seconds: Mapping[str, float],
) -> None:
    """Print each reply with its routing shares, then the merge's cost and the stage times."""
    print()
    for reply in replies:
        shares = ", ".join(f"{label} {share:.0%}" for label, share in zip(expert_labels, reply.expert_shares))
        print(f"[{reply.domain}] {reply.prompt}")
        print(f"  reply:   {reply.text}")
        print(f"  routing: {shares} of the top-k expert slots")
        print()

    print(f"Merged model: {output_dir}, {format_bytes(folder_size_bytes(output_dir))} on disk")
    print(
        f"Merge:        {merge.wall_seconds:.1f} s wall, peak RSS "
        f"{format_bytes(merge.sampled_peak_rss_bytes)} (sampled process tree), "
        f"{format_bytes(merge.rusage_peak_rss_bytes)} (rusage)"
    )
    print("Stage times:")
    for stage, seconds in stage_seconds.items():
        print(f"  {stage + ':':<20} {seconds:6.1f} s")


def folder_size_bytes(folder: Path) -> int:
    """Return the summed size in bytes of the regular files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
