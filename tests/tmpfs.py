"""A small tmpfs for tests that need a full disk. Mounting needs root."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mounted_tmpfs(mount_point: Path, size_mib: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mib`` MiB at a new folder, yield it and unmount it; skip the test where mounting fails."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)
