"""The output folder's lifecycle, and the lock that keeps two merges out of one staging folder."""

import subprocess
import sys
import textwrap

import pytest

from lowmem_moe.errors import OutputError
from lowmem_moe.output_folder import OutputFolder

FINGERPRINT = {"config": "0" * 64, "sources": {}}


def test_second_open_rejected(tmp_path):
    first = OutputFolder(tmp_path / "out")
    second = OutputFolder(tmp_path / "out")
    first.open_staging(FINGERPRINT)
    (first.staging / "model-00001-of-00001.safetensors").write_bytes(b"partial")

    with pytest.raises(OutputError) as caught:
        second.open_staging(FINGERPRINT)

    message = str(caught.value)
    assert message.startswith(f"Another lowmem-moe merge is writing to {tmp_path / 'out'}")
    assert str(first.staging) in message
    assert "choose another OUT_DIR" in message
    assert (first.staging / "model-00001-of-00001.safetensors").read_bytes() == b"partial"


def test_changed_merge_keeps_live_staging(tmp_path):
    first = OutputFolder(tmp_path / "out")
    first.open_staging(FINGERPRINT)
    other_merge = {"config": "1" * 64, "sources": {}}

    with pytest.raises(OutputError):
        OutputFolder(tmp_path / "out").open_staging(other_merge)

    assert first.staging.is_dir()


@pytest.mark.parametrize("release", ["keep", "discard", "publish"])
def test_lock_released(tmp_path, release):
    first = OutputFolder(tmp_path / "out")
    first.open_staging(FINGERPRINT)
    getattr(first, release)()
    second = OutputFolder(tmp_path / "out", overwrite=True)

    resumed = second.open_staging(FINGERPRINT)

    assert resumed == (release == "keep")


def test_published_folder_has_no_lock_file(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    folder.open_staging(FINGERPRINT)
    (folder.staging / "config.json").write_text("{}")

    published = folder.publish()

    assert sorted(path.name for path in published.iterdir()) == ["config.json"]


def test_lock_held_by_other_process(tmp_path):
    # The child opens the staging folder, reports that, and waits for its stdin to close.
    child_code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from lowmem_moe.output_folder import OutputFolder
        folder = OutputFolder(Path({str(tmp_path / "out")!r}))
        folder.open_staging({FINGERPRINT!r})
        print("open", flush=True)
        sys.stdin.read()
        folder.keep()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "open\n"
        with pytest.raises(OutputError) as caught:
            OutputFolder(tmp_path / "out").open_staging(FINGERPRINT)
        assert "Another lowmem-moe merge is writing" in str(caught.value)
    finally:
        child.stdin.close()
        child.wait()

    assert child.returncode == 0
    assert OutputFolder(tmp_path / "out").open_staging(FINGERPRINT) is True
