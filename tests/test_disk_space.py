"""The merge checks free disk space at the output before writing anything."""

import subprocess
import sys

import pytest

from merge_helpers import merge_yaml
from tmpfs import mounted_tmpfs


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs, which needs root; skipped where mounting is not allowed."""
    yield from mounted_tmpfs(tmp_path / "small", 1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lowmem_moe.cli", *map(str, args)], capture_output=True, text=True)


def test_merge_refused_when_disk_too_small(tmp_path, tiny_llama, tiny_experts, small_filesystem):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)
    out = small_filesystem / "out"

    result = run_cli("merge", config, out)

    assert result.returncode == 1
    assert "Not enough disk space" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(small_filesystem.iterdir()) == []


def test_plan_reports_missing_space(tmp_path, tiny_llama, tiny_experts, small_filesystem):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)

    result = run_cli("plan", config, small_filesystem / "out")

    assert result.returncode == 0
    assert "NOT ENOUGH" in result.stdout
    assert list(small_filesystem.iterdir()) == []
