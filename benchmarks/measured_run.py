"""Run one command under lowmem_moe's resource monitor from a small process, and print the measurement as JSON.

Usage: ``python -m benchmarks.measured_run [--marker TEXT] LOG_FILE COMMAND [ARG...]``

On Linux a child's ``ru_maxrss`` starts at its parent's peak RSS, because
fork copies the parent's memory map and exec keeps the high-water mark of
the map it replaces. The harness has imported torch and transformers, so a
command it started would show at least the harness's few hundred MB. This
process imports only the resource monitor, psutil and the standard
library, so the harness's memory never reaches the measured command.

``--marker`` also reports the peak RSS sampled after TEXT first appears in
the log, for example the progress bar that starts a merge's copy phase.
The resource monitor returns only whole-run peaks, so this sampling is done
here, in a thread, at the monitor's interval.
"""

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from lowmem_moe.resource_monitor import DEFAULT_SAMPLE_INTERVAL_S, run_measured, tree_rss_bytes


class MarkerSampler(threading.Thread):
    """Samples the RSS of ``command``'s process tree from the moment ``marker`` appears in ``log_file``.

    The command's process is found by its command line among this process's
    descendants, so a launcher that the resource monitor may put between
    them is not counted.
    """

    def __init__(self, log_file: Path, marker: str, command: list[str]):
        super().__init__(daemon=True)
        self.log_file = log_file
        self.marker = marker.encode()
        self.command = command
        self.started_at = time.perf_counter()
        self.marker_seconds: float | None = None  # seconds from start until the marker appeared
        self.peak_rss_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        position = 0
        tail = b""
        while not self._stop_event.wait(DEFAULT_SAMPLE_INTERVAL_S):
            if self.marker_seconds is None:
                position, tail = self._scan(position, tail)
                continue
            process = self._command_process()
            if process is not None:
                self.peak_rss_bytes = max(self.peak_rss_bytes, tree_rss_bytes(process))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def _command_process(self) -> psutil.Process | None:
        for process in psutil.Process().children(recursive=True):
            try:
                if process.cmdline() == self.command:
                    return process
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return None

    def _scan(self, position: int, tail: bytes) -> tuple[int, bytes]:
        # Reads what the log gained since the last call. The end of the
        # previous read is kept, so that a marker split across reads is found.
        try:
            with open(self.log_file, "rb") as log:
                log.seek(position)
                data = log.read()
        except FileNotFoundError:
            return position, tail
        text = tail + data
        if self.marker in text:
            self.marker_seconds = time.perf_counter() - self.started_at
        return position + len(data), text[-len(self.marker):]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measured_run")
    parser.add_argument("--marker", help="also report the peak RSS sampled after this text first appears in the log")
    parser.add_argument("log_file", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("COMMAND is missing")

    # A log left by an earlier run must not show the marker before this run writes it.
    args.log_file.unlink(missing_ok=True)
    sampler = MarkerSampler(args.log_file, args.marker, args.command) if args.marker else None
    if sampler:
        sampler.start()
    # The shell opens the log and then execs the command, so the measured
    # process is the command itself.
    wrapped = ["sh", "-c", 'log="$1"; shift; exec "$@" >"$log" 2>&1', "sh", str(args.log_file), *args.command]
    measurement = asdict(run_measured(wrapped))
    if sampler:
        sampler.stop()
        measurement["marker_seconds"] = sampler.marker_seconds
        measurement["after_marker_peak_rss_bytes"] = sampler.peak_rss_bytes if sampler.marker_seconds is not None else None
    json.dump(measurement, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
