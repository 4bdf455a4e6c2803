"""Peak resident memory of a command, measured from a separate process."""

import subprocess
import sys

# ru_maxrss of the only child of a fresh interpreter is that child's peak,
# in KiB on Linux, and includes mapped file pages that were touched.
MEASURE = """
import resource, subprocess, sys
completed = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(completed.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.stderr.write(completed.stderr[-2000:])
"""


def peak_rss(command: list[str]) -> int:
    """Run ``command``, assert that it exits with 0, and return its peak RSS in bytes."""
    completed = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    returncode, peak = completed.stdout.split()
    assert returncode == "0", completed.stderr
    return int(peak)
