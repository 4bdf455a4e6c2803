"""Interrupted merges resume: killed with SIGKILL at random points, or stopped by a full disk."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_factory import make_tokenizer
from tmpfs import mounted_tmpfs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_checkpoint import ModelShape, write_synthetic_model  # noqa: E402

# Large enough that a merge spends a few seconds in the gate pass and in
# the copy phase, small enough for the test suite.
SHAPE = ModelShape(
    hidden_size=512,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=8000,
    num_hidden_layers=4,
    dtype="F32",
)
MERGE_OPTIONS = ["--shard-size", "4MB", "--chunk-size", "256KiB", "-q"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    base = write_synthetic_model(root / "base", SHAPE, seed=0)
    make_tokenizer(base, vocab_size=128, bos_token="<s>")
    for index in range(4):
        write_synthetic_model(root / f"expert{index}", SHAPE, seed=1 + index, mlp_only=True)
    lines = ["base_model: base", "gate_mode: hidden", "dtype: bfloat16", "experts:"]
    for index, topic in enumerate(["solve the equation", "python code", "hello there", "numbers"]):
        lines += [f"  - source_model: expert{index}", f'    positive_prompts: ["{topic}", "{topic} again"]']
        if index == 1:
            lines.append("    noise_scale: 0.01")
    (root / "merge.yml").write_text("\n".join(lines) + "\n")
    return root


def merge_command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lowmem_moe.cli", "merge", str(config), str(out), *MERGE_OPTIONS]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> tuple[dict[str, bytes], float]:
    out = tmp_path_factory.mktemp("reference") / "out"
    started = time.monotonic()
    subprocess.run(merge_command(sources / "merge.yml", out), check=True, capture_output=True)
    return folder_bytes(out), time.monotonic() - started


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.lowmem-moe-partial"


def finished_shards(staging: Path) -> list[Path]:
    return list(staging.glob("model-*.safetensors"))


def wait_until(condition, process: subprocess.Popen) -> bool:
    """Wait until ``condition()`` is true; return False when the process ended first."""
    while not condition():
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def test_resume_after_random_kills(sources, reference, tmp_path):
    expected, _ = reference
    out = tmp_path / "out"
    command = merge_command(sources / "merge.yml", out)
    staging = staging_of(out)
    journal = staging / ".lowmem-moe-staging"
    routers = staging / ".lowmem-moe-routers.safetensors"
    rng = random.Random(1234)
    kills = {"gates": 0, "copy": 0}

    # Kills soon after the staging folder appears, before the router weights
    # are saved, and then kills after a shard is finished. The gate pass and
    # the copy run side by side, so the copy stage may come before or after
    # the routers. Delays are random within each stage.
    for stage, has_marker, target in (("gates", journal.exists, 4), ("copy", lambda: finished_shards(staging), 6)):
        attempts = 0
        while kills[stage] < target and attempts < 30:
            attempts += 1
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not wait_until(has_marker, process):
                break
            time.sleep(rng.uniform(0.0, 0.4))
            if process.poll() is not None:
                break
            in_gate_pass = not routers.exists()
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            if out.exists():
                # The kill came after the output was published, while the process exited.
                break
            if stage == "copy" or in_gate_pass:
                kills[stage] += 1
            assert journal.exists()

    if not out.exists():
        subprocess.run(command, check=True, capture_output=True)

    assert kills == {"gates": 4, "copy": 6}
    assert folder_bytes(out) == expected
    assert not staging.exists()


def kill_during_copy(command: list[str], out: Path) -> None:
    # The gate pass runs beside the copy, so the kill waits for its saved
    # routers as well as for a finished shard.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = staging_of(out)
    routers = staging / ".lowmem-moe-routers.safetensors"
    while process.poll() is None and not (routers.exists() and finished_shards(staging)):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(staging.glob("model-*.safetensors")), "the merge finished before the kill"


def test_changed_source_restarts(sources, reference, tmp_path):
    expected, _ = reference
    out = tmp_path / "out"
    command = merge_command(sources / "merge.yml", out)
    kill_during_copy(command, out)
    source = sources / "expert2" / "model.safetensors"
    os.utime(source, ns=(time.time_ns(), time.time_ns()))

    result = subprocess.run([c for c in command if c != "-q"], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "Not resuming" in result.stderr
    assert f"source file {source} changed" in result.stderr
    assert folder_bytes(out) == expected


def test_changed_options_restart(sources, reference, tmp_path):
    out = tmp_path / "out"
    command = merge_command(sources / "merge.yml", out)
    kill_during_copy(command, out)

    result = subprocess.run([c for c in command if c != "-q"] + ["--seed", "5"], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "the merge YAML, the options or the lowmem-moe version changed" in result.stderr


def test_resume_reuses_finished_shards(sources, reference, tmp_path):
    expected, _ = reference
    out = tmp_path / "out"
    command = merge_command(sources / "merge.yml", out)
    kill_during_copy(command, out)

    result = subprocess.run([c for c in command if c != "-q"], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "Resuming the interrupted merge" in result.stderr
    assert "Reusing the router weights" in result.stderr
    assert folder_bytes(out) == expected


@pytest.fixture
def small_filesystem(tmp_path, reference):
    """A tmpfs with room for the merge's output and the 64 MiB margin, which needs root.

    Skipped where mounting is not allowed.
    """
    output_bytes = sum(len(data) for data in reference[0].values())
    yield from mounted_tmpfs(tmp_path / "small", (output_bytes >> 20) + 64 + 16)


def test_disk_full_resumes(sources, reference, small_filesystem):
    expected, _ = reference
    out = small_filesystem / "out"
    command = [c for c in merge_command(sources / "merge.yml", out) if c != "-q"]
    filler = small_filesystem / "filler"

    # Stop the merge once its first shard is written, fill the disk, and let it go on.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staging = staging_of(out)
    while process.poll() is None and not list(staging.glob("model-*.safetensors")):
        time.sleep(0.005)
    assert process.poll() is None, process.communicate()[1]
    os.kill(process.pid, signal.SIGSTOP)
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 1024**2)
                handle.flush()
        except OSError:
            pass
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate()

    assert process.returncode == 1
    assert "full" in stderr
    assert "still needs" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(staging.glob("model-*.safetensors"))

    filler.unlink()
    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "Resuming the interrupted merge" in result.stderr
    assert folder_bytes(out) == expected


def test_changed_tokenizer_restarts(sources, tmp_path):
    # A private copy, because the base's tokenizer changes.
    root = Path(shutil.copytree(sources, tmp_path / "sources"))
    out = tmp_path / "out"
    command = merge_command(root / "merge.yml", out)
    kill_during_copy(command, out)
    tokenizer = root / "base" / "tokenizer.json"
    # Without a BOS token every prompt has other tokens, so the routers change.
    make_tokenizer(root / "base", vocab_size=128, bos_token=None)

    result = subprocess.run([c for c in command if c != "-q"], capture_output=True, text=True)
    fresh = tmp_path / "fresh"
    subprocess.run(merge_command(root / "merge.yml", fresh), check=True, capture_output=True)

    assert result.returncode == 0, result.stderr
    assert f"base file {tokenizer} changed" in result.stderr
    assert folder_bytes(out) == folder_bytes(fresh)


def test_interrupt_in_gate_pass_exits_cleanly(sources, tmp_path):
    # An interpreter that exits while torch runs in the gate pass thread
    # aborted with "terminate called without an active exception" (exit 134).
    out = tmp_path / "out"
    command = [c for c in merge_command(sources / "merge.yml", out) if c != "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = ""
    while "distinct prompts through" not in stderr and process.poll() is None:
        stderr += process.stderr.readline()
    os.kill(process.pid, signal.SIGINT)
    stderr += process.communicate()[1]

    assert process.returncode == 130, stderr
    assert "terminate called" not in stderr
    assert "Traceback" not in stderr
    assert "Interrupted" in stderr
    assert not out.exists()
