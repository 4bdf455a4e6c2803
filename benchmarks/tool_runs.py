"""Measured runs of each tool: lowmem-moe plan and merge, cp, mergekit-moe.

Every run starts from a dropped page cache, so that each reads its input
from disk. Every run that writes a model also flushes it to disk before it
exits: lowmem-moe calls fsync on each shard, and the cp run ends with
``sync FILE...``, which calls fsync on each copied file. mergekit-moe 0.1.5
calls no fsync in its Python code, so its run is followed by ``sync FILE...``
on its output files in the same measured command.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .measure import NOT_SUPPORTED, OFFLINE_ENV, OK, RunRecord, folder_bytes, measure_logged
from .page_cache import drop_page_cache

logger = logging.getLogger(__name__)

LOWMEM_COMMAND = (sys.executable, "-m", "lowmem_moe.cli")
# The phrase in lowmem-moe's error for a feature that is not built yet.
NOT_SUPPORTED_PHRASE = "not supported yet"
SEED = 0
# The progress bar that lowmem-moe shows when its copy phase starts.
COPY_PHASE_MARKER = "Writing shards"
# Room left free beyond the bytes a run writes.
DISK_MARGIN_BYTES = 2 * 10**9

# The modules a merge imports and nothing else, to separate what importing
# costs from what the merge itself adds.
IMPORT_BASELINE_SCRIPT = "import torch, transformers, lowmem_moe.cli, lowmem_moe.merge"


@dataclass(frozen=True)
class PlanCheck:
    """Result of ``lowmem-moe plan --json`` for a case."""

    supported: bool
    bytes_written: int | None  # planned shard bytes
    message: str  # the error output when not supported


def check_plan(config: Path, out_dir: Path) -> PlanCheck:
    """Run ``lowmem-moe plan --json`` and return whether lowmem-moe can run the merge.

    Raises:
        RuntimeError: the plan failed for another reason than an unsupported feature.
    """
    completed = subprocess.run(
        [*LOWMEM_COMMAND, "plan", str(config), str(out_dir), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
    )
    if completed.returncode == 0:
        plan = json.loads(completed.stdout)
        return PlanCheck(supported=True, bytes_written=plan["bytes_written"], message="")
    if NOT_SUPPORTED_PHRASE in completed.stderr:
        return PlanCheck(supported=False, bytes_written=None, message=completed.stderr.strip())
    raise RuntimeError(f"lowmem-moe plan {config} failed with exit code {completed.returncode}:\n{completed.stderr}")


def not_supported_record(label: str, tool: str, check: PlanCheck) -> RunRecord:
    """Return the record of a run that was skipped because lowmem-moe does not support it yet."""
    return RunRecord(label=label, tool=tool, status=NOT_SUPPORTED, note=check.message.splitlines()[-1] if check.message else None)


def require_disk_space(folder: Path, needed: int) -> None:
    """Raise OSError unless the filesystem of ``folder`` has ``needed`` bytes free beyond the margin."""
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN_BYTES > free:
        raise OSError(
            f"{folder}: {free / 1e9:.1f} GB free, but the next run writes {needed / 1e9:.1f} GB and "
            f"{DISK_MARGIN_BYTES / 1e9:.0f} GB are kept free. Free disk space and rerun."
        )


def measure_plan(label: str, config: Path, out_dir: Path, work: Path, input_files: list[Path]) -> RunRecord:
    """Measure ``lowmem-moe plan``: imports, config, source headers and the plan, without the gate pass or copying."""
    cache = drop_page_cache(input_files)
    command = [*LOWMEM_COMMAND, "plan", config, out_dir]
    return measure_logged(label, "lowmem-moe plan", command, work / "logs" / f"{label}.log", work, cache)


def measure_lowmem_merge(label: str, config: Path, out_dir: Path, work: Path, input_files: list[Path]) -> RunRecord:
    """Measure ``lowmem-moe merge`` with the default chunk and shard sizes into a new ``out_dir``."""
    _remove(out_dir)
    cache = drop_page_cache(input_files)
    command = [*LOWMEM_COMMAND, "merge", config, out_dir, "--seed", str(SEED)]
    log = work / "logs" / f"{label}.log"
    record = measure_logged(label, "lowmem-moe", command, log, work, cache, copy_phase_marker=COPY_PHASE_MARKER)
    return _with_output_size(record, out_dir)


def measure_copy(label: str, source_dir: Path, target_dir: Path, work: Path) -> RunRecord:
    """Measure cp of every file of ``source_dir`` into a new ``target_dir`` on the same filesystem, with fsync."""
    _remove(target_dir)
    target_dir.mkdir(parents=True)
    files = sorted(path for path in source_dir.iterdir() if path.is_file())
    cache = drop_page_cache(files)
    # cp, then fsync of each copy, as the merge does for its shards.
    script = 'target="$1"; shift; cp -- "$@" "$target"/ && cd "$target" && sync -- *'
    command = ["sh", "-c", script, "sh", target_dir, *files]
    record = measure_logged(label, "cp", command, work / "logs" / f"{label}.log", work, cache)
    return _with_output_size(record, target_dir)


def measure_mergekit(
    label: str, mergekit_moe: Path, config: Path, out_dir: Path, work: Path, input_files: list[Path]
) -> RunRecord:
    """Measure mergekit-moe on CPU into a new ``out_dir``.

    ``--lazy-unpickle`` only changes how PyTorch .bin files load, so it does
    nothing for safetensors sources. It is passed as a user who wants low
    memory would pass it. Shards keep mergekit-moe's default limit of 5e9
    bytes, the same as lowmem-moe's default.
    """
    _remove(out_dir)
    cache = drop_page_cache(input_files)
    merge = [mergekit_moe, config, out_dir, "--device", "cpu", "--random-seed", str(SEED), "--lazy-unpickle"]
    # fsync of each output file after the merge, so that both tools are timed until their output is on disk.
    script = 'out="$1"; shift; "$@" && cd "$out" && sync -- *'
    command = ["sh", "-c", script, "sh", out_dir, *merge]
    record = measure_logged(label, "mergekit-moe", command, work / "logs" / f"{label}.log", work, cache)
    return _with_output_size(record, out_dir)


def measure_import_baseline(work: Path) -> RunRecord:
    """Measure a Python process that only imports what a merge imports."""
    command = [sys.executable, "-c", IMPORT_BASELINE_SCRIPT]
    return measure_logged("import-baseline", "python", command, work / "logs" / "import-baseline.log", work, None)


def _with_output_size(record: RunRecord, folder: Path) -> RunRecord:
    if record.status != OK or not folder.is_dir():
        return record
    return replace(record, bytes_written=folder_bytes(folder))


def _remove(folder: Path) -> None:
    # Clears the way for a new output: lowmem-moe needs the parent folder to exist.
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
