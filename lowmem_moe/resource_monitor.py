"""Measure the wall time and peak memory of a command run as a subprocess.

Two peak-memory numbers are reported because each misses something:

* The sampled peak is the maximum, over samples taken every
  ``sample_interval_s``, of the summed resident set size (RSS) of the
  process and all its live descendants. It includes memory held by children
  that run at the same time, but it misses spikes shorter than the
  interval, and it counts a page shared by two processes (shared libraries,
  copy-on-write after fork) once per process.
* The rusage peak is the kernel's ``ru_maxrss`` for the child, read from
  ``os.wait4``. It catches spikes of any length, but it is the maximum of
  single processes (the child and the descendants it waited for), never a
  sum. ``os.wait4`` returns the usage of this one child, unlike
  ``resource.getrusage(resource.RUSAGE_CHILDREN)``, which is the maximum
  over every child that the calling process ever waited for.

Only Linux and other POSIX systems are supported, because ``os.wait4``
and the unit of ``ru_maxrss`` are POSIX-specific.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import psutil

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_INTERVAL_S = 0.05

# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
_RU_MAXRSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024


@dataclass(frozen=True)
class RunMeasurement:
    """Result of one measured run of a command."""

    command: tuple[str, ...]
    returncode: int
    wall_seconds: float
    sampled_peak_rss_bytes: int
    rusage_peak_rss_bytes: int
    sample_count: int

    @property
    def peak_rss_bytes(self) -> int:
        """Larger of the two peaks, the safer number to quote as peak memory."""
        return max(self.sampled_peak_rss_bytes, self.rusage_peak_rss_bytes)


def tree_rss_bytes(root: psutil.Process) -> int:
    """Return the summed RSS in bytes of ``root`` and its live descendants.

    Processes that exit while being read are skipped, so the result can be
    lower than the true total for one sample.
    """
    try:
        processes = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0

    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return total


def run_measured(
    command: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
    timeout_s: float | None = None,
) -> RunMeasurement:
    """Run ``command`` to completion and measure its wall time and peak RSS.

    The command inherits stdin, stdout and stderr, so its logs appear as
    usual. A non-zero exit code is returned in the result, not raised.

    Args:
        command: Program and arguments, as for ``subprocess.Popen``.
        cwd: Working directory of the command; the current one if None.
        env: Full environment of the command; the current one if None.
        sample_interval_s: Seconds between two RSS samples of the process tree.
        timeout_s: Seconds after which the command and its descendants are
            killed; no limit if None.

    Returns:
        The exit code, wall time in seconds and both peak RSS values in bytes.

    Raises:
        FileNotFoundError: The program in ``command[0]`` does not exist.
        subprocess.TimeoutExpired: The command ran longer than ``timeout_s``.
        ValueError: ``command`` is empty or ``sample_interval_s`` is not positive.
    """
    if not command:
        raise ValueError("command is empty. Pass the program and its arguments.")
    if sample_interval_s <= 0:
        raise ValueError(f"sample_interval_s must be positive, got {sample_interval_s}")

    command = tuple(str(part) for part in command)
    logger.debug("Running %s", " ".join(command))

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=None if env is None else dict(env))
    watched = psutil.Process(process.pid)

    sampled_peak = 0
    sample_count = 0
    try:
        while True:
            sampled_peak = max(sampled_peak, tree_rss_bytes(watched))
            sample_count += 1

            # wait4 instead of Popen.wait because it returns this child's rusage.
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break

            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                raise subprocess.TimeoutExpired(command, timeout_s)

            time.sleep(sample_interval_s)
    except BaseException:
        # On a timeout or Ctrl-C, leave no orphaned or unreaped process behind.
        _kill_tree(watched)
        try:
            _, status, _ = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            process.returncode = -signal.SIGKILL  # reaped just before the interrupt
        raise

    wall_seconds = time.perf_counter() - started

    # The child is reaped above, so Popen must not wait for it again.
    process.returncode = os.waitstatus_to_exitcode(status)

    return RunMeasurement(
        command=command,
        returncode=process.returncode,
        wall_seconds=wall_seconds,
        sampled_peak_rss_bytes=sampled_peak,
        rusage_peak_rss_bytes=usage.ru_maxrss * _RU_MAXRSS_UNIT_BYTES,
        sample_count=sample_count,
    )


def _kill_tree(root: psutil.Process) -> None:
    try:
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []

    for process in [root, *descendants]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


def format_bytes(size: int) -> str:
    """Format a byte count with a binary unit, for example ``1.5 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def _main(argv: Sequence[str]) -> int:
    """Run ``python -m lowmem_moe.resource_monitor COMMAND...`` and print the result."""
    if not argv:
        print("usage: python -m lowmem_moe.resource_monitor COMMAND [ARG...]", file=sys.stderr)
        return 2

    measurement = run_measured(argv)
    print(
        f"exit code {measurement.returncode}, "
        f"wall {measurement.wall_seconds:.2f} s, "
        f"peak RSS sampled {format_bytes(measurement.sampled_peak_rss_bytes)}, "
        f"rusage {format_bytes(measurement.rusage_peak_rss_bytes)}",
        file=sys.stderr,
    )
    return measurement.returncode


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
