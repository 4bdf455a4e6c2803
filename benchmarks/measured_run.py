"""Run one command under lowmem_moe's resource monitor from a small process, and print the measurement as JSON.

Usage: ``python -m benchmarks.measured_run LOG_FILE COMMAND [ARG...]``

On Linux a child's ``ru_maxrss`` starts at its parent's peak RSS, because
exec copies the high-water mark of the memory map it replaces, and fork
copies the parent's map. Measured from the harness, which has imported
torch, every rusage peak would therefore be at least the harness's few
hundred MB. This process imports only the resource monitor, psutil and the
standard library, so the floor it adds is about 16 MB.
"""

import json
import sys
from dataclasses import asdict

from lowmem_moe.resource_monitor import run_measured


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m benchmarks.measured_run LOG_FILE COMMAND [ARG...]", file=sys.stderr)
        return 2
    log_file, command = argv[0], argv[1:]
    # The shell opens the log and then execs the command, so the measured
    # process is the command itself.
    wrapped = ["sh", "-c", 'log="$1"; shift; exec "$@" >"$log" 2>&1', "sh", log_file, *command]
    measurement = run_measured(wrapped)
    json.dump(asdict(measurement), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
