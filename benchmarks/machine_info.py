"""Describe the machine and software versions that a benchmark ran with."""

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

PACKAGES = ("torch", "transformers", "safetensors", "numpy", "lowmem-moe")


def collect_machine_info(work_folder: Path) -> dict[str, Any]:
    """Return cores, memory, disk, kernel and package versions, for the results page."""
    usage = shutil.disk_usage(work_folder)
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "disk_free_bytes": usage.free,
        "disk_total_bytes": usage.total,
        "filesystem": _filesystem_type(work_folder),
        "block_device": _mount_device(work_folder),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cp": _first_line(["cp", "--version"]),
    }


def peer_versions(python: Path) -> dict[str, str]:
    """Return the mergekit, torch and transformers versions installed for the interpreter ``python``."""
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({n: m.version(n) for n in ('mergekit', 'torch', 'transformers', 'safetensors')}))"
    )
    completed = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _filesystem_type(folder: Path) -> str | None:
    partition = _mount_of(folder)
    return partition.fstype if partition else None


def _mount_device(folder: Path) -> str | None:
    partition = _mount_of(folder)
    return partition.device if partition else None


def _mount_of(folder: Path):
    # The mount with the longest mount point that contains the folder.
    folder = Path(folder).resolve()
    best = None
    for partition in psutil.disk_partitions(all=True):
        mount = Path(partition.mountpoint)
        if (folder == mount or mount in folder.parents) and (best is None or len(partition.mountpoint) > len(best.mountpoint)):
            best = partition
    return best


def _first_line(command: list[str]) -> str | None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.splitlines()[0] if completed.stdout else None


if __name__ == "__main__":
    json.dump(collect_machine_info(Path.cwd()), sys.stdout, indent=2)
