"""One measured run of a command, with its output in a log file, as a record for the results."""

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil

logger = logging.getLogger(__name__)

BENCHMARKS = Path(__file__).resolve().parent

# Values of RunRecord.status.
OK = "ok"
FAILED = "failed"
NOT_SUPPORTED = "not supported yet"

# Hugging Face libraries must not reach the network during a benchmark.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class RunRecord:
    """Measured numbers of one run. Sizes are in bytes, times in seconds."""

    label: str
    tool: str  # lowmem-moe, cp, mergekit-moe or python
    status: str  # ok, failed or "not supported yet"
    wall_seconds: float | None = None
    sampled_peak_rss_bytes: int | None = None  # psutil, summed over the process tree
    rusage_peak_rss_bytes: int | None = None  # ru_maxrss from wait4, the largest single process
    # Sampled like sampled_peak_rss_bytes, but only from the moment the
    # merge's copy phase starts (its "Writing shards" progress bar).
    copy_phase_peak_rss_bytes: int | None = None
    bytes_written: int | None = None
    page_cache: str | None = None  # how the page cache was dropped before the run
    # Load from other processes: the 1-minute load average before the run
    # and the busy share of all cores during it.
    load_average: float | None = None
    system_cpu_percent: float | None = None
    log: str | None = None  # log file, relative to the work folder
    note: str | None = None

    @property
    def peak_rss_bytes(self) -> int | None:
        if self.sampled_peak_rss_bytes is None or self.rusage_peak_rss_bytes is None:
            return None
        return max(self.sampled_peak_rss_bytes, self.rusage_peak_rss_bytes)

    @property
    def throughput_mb_s(self) -> float | None:
        """Bytes written per second of wall time, in MB/s (10^6 bytes)."""
        if not self.bytes_written or not self.wall_seconds:
            return None
        return self.bytes_written / self.wall_seconds / 1e6

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak_rss_bytes"] = self.peak_rss_bytes
        data["throughput_mb_s"] = self.throughput_mb_s
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunRecord":
        fields = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in fields})


def measure_logged(
    label: str,
    tool: str,
    command: Sequence[str | os.PathLike[str]],
    log_path: Path,
    work_folder: Path,
    page_cache: str | None,
    env: Mapping[str, str] | None = None,
    copy_phase_marker: str | None = None,
) -> RunRecord:
    """Run ``command`` under the resource monitor with stdout and stderr in ``log_path``.

    The monitor runs in a small child process (see measured_run.py), so that
    this process's memory does not enter the rusage peak. When the log shows
    ``copy_phase_marker``, the peak sampled from then on is the copy phase's.
    ``bytes_written`` is left for the caller.

    Raises:
        subprocess.CalledProcessError: the monitor itself failed, not the command.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Running %s: %s", label, " ".join(map(str, command)))
    load_average = os.getloadavg()[0]
    psutil.cpu_percent(interval=None)  # starts the interval that the next call measures
    marker = ["--marker", copy_phase_marker] if copy_phase_marker else []
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.measured_run", *marker, str(log_path), *map(str, command)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        cwd=BENCHMARKS.parent,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
    )
    system_cpu_percent = psutil.cpu_percent(interval=None)
    measurement = json.loads(completed.stdout)

    returncode = measurement["returncode"]
    status = OK if returncode == 0 else FAILED
    if status == FAILED:
        logger.error("%s exited with code %d; see %s", label, returncode, log_path)
    return RunRecord(
        label=label,
        tool=tool,
        status=status,
        wall_seconds=measurement["wall_seconds"],
        sampled_peak_rss_bytes=measurement["sampled_peak_rss_bytes"],
        rusage_peak_rss_bytes=measurement["rusage_peak_rss_bytes"],
        copy_phase_peak_rss_bytes=measurement.get("after_marker_peak_rss_bytes"),
        page_cache=page_cache,
        load_average=load_average,
        system_cpu_percent=system_cpu_percent,
        log=os.path.relpath(log_path, work_folder),
        note=None if status == OK else f"exit code {returncode}",
    )


def folder_bytes(folder: Path) -> int:
    """Return the summed size of the regular files directly in ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file())
