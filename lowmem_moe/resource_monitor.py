"""Measure the wall time and peak memory of a command run as a subprocess.

Two peak-memory numbers are reported because each misses something:

* The sampled peak is the maximum, over samples taken every
  ``sample_interval_s``, of the summed resident set size (RSS) of the
  command and all its live descendants. It includes memory held by
  children that run at the same time, but it misses spikes shorter than the
  interval, and it counts a page shared by two processes (shared libraries,
  copy-on-write after fork) once per process.
* The rusage peak is the kernel's ``ru_maxrss`` of the command, which
  catches spikes of any length. It is the maximum of single processes (the
  command and the descendants it waited for), never a sum.

On Linux a child's ``ru_maxrss`` starts at its parent's peak RSS, because
exec keeps the high-water mark of the memory map it replaces, and after
fork or vfork that map is the parent's. Measured directly, every command
would show at least the caller's peak, which is large in a caller that has
loaded a model. So the command is started by a small launcher interpreter
that imports only ``os``, ``signal`` and ``sys``. The launcher reports the
command's own ``ru_maxrss`` from ``os.wait4``, which also avoids
``resource.getrusage(resource.RUSAGE_CHILDREN)``, the maximum over every
child the caller ever waited for. The launcher's own peak, about 9 MB with
CPython 3.11 on Linux, is the floor of the rusage number.

Only Linux and other POSIX systems are supported, because of ``os.wait4``,
``os.posix_spawnp`` and the unit of ``ru_maxrss``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_INTERVAL_S = 0.05

# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
_RU_MAXRSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024

# Run as ``python -I -S -c _LAUNCHER REPORT_FD COMMAND...``. It writes the
# command's ru_maxrss as decimal text to REPORT_FD and exits as the command
# did, with the same code or by the same signal.
_LAUNCHER = """
import os, signal, sys

report_fd = int(sys.argv[1])
command = sys.argv[2:]

# The command must not hold the report pipe open after the launcher exits.
os.set_inheritable(report_fd, False)
pid = os.posix_spawnp(command[0], command, os.environ)

# Ctrl-C reaches the command through the terminal's process group, and the
# launcher still has to report after the command exits.
signal.signal(signal.SIGINT, signal.SIG_IGN)

_, status, usage = os.wait4(pid, 0)
os.write(report_fd, str(usage.ru_maxrss).encode())
os.close(report_fd)

code = os.waitstatus_to_exitcode(status)
if code < 0:
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


@dataclass(frozen=True)
class RunMeasurement:
    """Result of one measured run of a command."""

    command: tuple[str, ...]
    returncode: int  # negative signal number if a signal ended the command
    wall_seconds: float
    sampled_peak_rss_bytes: int
    rusage_peak_rss_bytes: int
    sample_count: int

    @property
    def peak_rss_bytes(self) -> int:
        """Larger of the two peaks, the safer number to quote as peak memory."""
        return max(self.sampled_peak_rss_bytes, self.rusage_peak_rss_bytes)


def tree_rss_bytes(root: psutil.Process, *, include_root: bool = True) -> int:
    """Return the summed RSS in bytes of ``root``'s live descendants, and of ``root`` by default.

    Processes that exit while being read are skipped, so the result can be
    lower than the true total for one sample.
    """
    try:
        processes = root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0
    if include_root:
        processes.insert(0, root)

    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return total


def run_measured(
    command: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
    timeout_s: float | None = None,
) -> RunMeasurement:
    """Run ``command`` to completion and measure its wall time and peak RSS.

    The command inherits stdin, stdout and stderr, so its logs appear as
    usual. A non-zero exit code is returned in the result, not raised.
    The wall time includes starting the launcher, a few tens of milliseconds.

    Args:
        command: Program and arguments. A program without a slash is looked
            up in the PATH of ``env``.
        cwd: Working directory of the command; the current one if None.
        env: Full environment of the command; the current one if None.
        sample_interval_s: Seconds between two RSS samples of the process tree.
        timeout_s: Seconds after which the command and its descendants are
            killed; no limit if None.

    Returns:
        The exit code, wall time in seconds and both peak RSS values in bytes.

    Raises:
        FileNotFoundError: The program in ``command[0]`` is not found or not executable.
        subprocess.TimeoutExpired: The command ran longer than ``timeout_s``.
        ValueError: ``command`` is empty or ``sample_interval_s`` is not positive.
        RuntimeError: The launcher exited without reporting the command's rusage.
    """
    if not command:
        raise ValueError("command is empty. Pass the program and its arguments.")
    if sample_interval_s <= 0:
        raise ValueError(f"sample_interval_s must be positive, got {sample_interval_s}")

    command = tuple(os.fspath(part) for part in command)
    environment = dict(os.environ if env is None else env)
    _check_executable(command[0], cwd, environment.get("PATH", os.defpath))
    logger.debug("Running %s", " ".join(command))

    report_read, report_write = os.pipe()
    try:
        started = time.perf_counter()
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report_write), *command],
            cwd=cwd,
            env=environment,
            pass_fds=(report_write,),
        )
        os.close(report_write)
        report_write = -1

        sampled_peak, sample_count = _sample_until_exit(launcher, command, sample_interval_s, timeout_s, started)
        wall_seconds = time.perf_counter() - started

        report = _read_all(report_read)
    finally:
        os.close(report_read)
        if report_write >= 0:
            os.close(report_write)

    if not report.isdigit():
        raise RuntimeError(
            f"The launcher of {command[0]} exited with code {launcher.returncode} without "
            "reporting the command's rusage. Its error output is above."
        )

    return RunMeasurement(
        command=command,
        returncode=launcher.returncode,
        wall_seconds=wall_seconds,
        sampled_peak_rss_bytes=sampled_peak,
        rusage_peak_rss_bytes=int(report) * _RU_MAXRSS_UNIT_BYTES,
        sample_count=sample_count,
    )


def _check_executable(program: str, cwd: str | os.PathLike[str] | None, search_path: str) -> None:
    # Checked here because the launcher could only report a missing program
    # as a traceback and exit code 1.
    if os.sep in program:
        found = Path(cwd or ".", program)
        if not (found.is_file() and os.access(found, os.X_OK)):
            raise FileNotFoundError(f"Program {found} not found or not executable")
    elif not shutil.which(program, path=search_path):
        raise FileNotFoundError(f"Program {program!r} not found in PATH={search_path}")


def _sample_until_exit(
    launcher: subprocess.Popen,
    command: tuple[str, ...],
    sample_interval_s: float,
    timeout_s: float | None,
    started: float,
) -> tuple[int, int]:
    """Sample the RSS of the launcher's descendants until it exits, and return the peak in bytes and the sample count."""
    watched = psutil.Process(launcher.pid)
    sampled_peak = 0
    sample_count = 0

    try:
        while True:
            # The launcher itself is left out because it is not part of the command.
            sampled_peak = max(sampled_peak, tree_rss_bytes(watched, include_root=False))
            sample_count += 1

            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                raise subprocess.TimeoutExpired(list(command), timeout_s)

            # wait() polls with short sleeps, so the exit is seen within
            # milliseconds, not at the next sample.
            try:
                launcher.wait(timeout=sample_interval_s)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        # On a timeout or Ctrl-C, kill the process tree and reap the launcher.
        # NOTE: a descendant whose parent has already exited is reparented
        # away from the tree, so it is neither sampled nor killed.
        _kill_tree(watched)
        launcher.wait()
        raise

    return sampled_peak, sample_count


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


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("ascii", errors="replace").strip()


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
