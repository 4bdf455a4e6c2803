"""`lowmem-moe verify`: an intact merge passes, and a changed byte, config key or file is reported."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_moe.cli import main
from lowmem_moe.errors import SourceError, UserError
from lowmem_moe.verify import verify_output
from merge_helpers import merge, merge_yaml
from model_factory import TinyModelSpec, edit_json, make_model

EXPERT_TENSOR = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
ROUTER_TENSOR = "model.layers.0.block_sparse_moe.gate.weight"
NOISY_EXPERT = '"prompt number 1"]\n    noise_scale: 0.01\n    residual_scale: 0.5'


def tensor_location(folder: Path, name: str) -> tuple[Path, int, int]:
    """Return the shard of a tensor, the file offset where its data starts and its size in bytes."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    with open(shard, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    start, end = header[name]["data_offsets"]
    return shard, 8 + header_size + start, end - start


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x01]))


def run_verify(out_dir: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", "verify", str(out_dir), *options],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def merged(tmp_path, tiny_llama, tiny_experts) -> Path:
    """A random-gate merge of three experts, split into several shards."""
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)
    return merge(config, tmp_path / "out", shard_size=200_000, seed=5)


@pytest.fixture
def own_sources(tmp_path, tiny_llama, tiny_experts) -> Path:
    """Copies of the base and two experts next to a YAML that names them by relative path."""
    root = tmp_path / "sources"
    shutil.copytree(tiny_llama, root / "base")
    for index in range(2):
        shutil.copytree(tiny_experts[index], root / f"expert{index}")
    merge_yaml(root / "merge.yml", Path("base"), [Path("expert0"), Path("expert1")])
    return root


def test_per_expert_sharded_passes(merged, capsys):
    assert len(list(merged.glob("*.safetensors"))) > 1
    assert main(["verify", str(merged)]) == 0
    assert "matches its sources" in capsys.readouterr().out


def test_fused_layout_passes(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2])
    out = merge(config, tmp_path / "out", layout="fused")

    assert main(["verify", str(out)]) == 0


def test_noise_residual_bfloat16_passes(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2], dtype="bfloat16")
    config.write_text(config.read_text().replace('"prompt number 1"]', NOISY_EXPERT))
    out = merge(config, tmp_path / "out", seed=3)

    assert main(["verify", str(out)]) == 0


def test_noise_changed_seed_detected(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2])
    config.write_text(config.read_text().replace('"prompt number 1"]', NOISY_EXPERT))
    out = merge(config, tmp_path / "out", seed=3)
    card = out / "README.md"
    card.write_text(card.read_text().replace('"seed": 3', '"seed": 4'))

    report = verify_output(out)

    assert report.mismatch is not None
    assert report.mismatch.tensor is not None


def test_hidden_gates_pass(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2], gate_mode="hidden")
    out = merge(config, tmp_path / "out")

    assert main(["verify", str(out)]) == 0


def test_hidden_gates_bfloat16_pass(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2], gate_mode="hidden_avg")
    out = merge(config, tmp_path / "out", gate_dtype="BF16")

    assert main(["verify", str(out)]) == 0


def test_widening_small_chunks_pass(tmp_path):
    # bfloat16 sources become float32 output, so each output chunk is twice
    # the read buffer and the output is compared in several pieces per chunk.
    spec = TinyModelSpec(dtype=torch.bfloat16)
    base = make_model(tmp_path / "base", spec, seed=0)
    experts = [make_model(tmp_path / f"expert{i}", spec, seed=0, mlp_seed=10 + i) for i in range(2)]
    config = merge_yaml(tmp_path / "merge.yml", base, experts, dtype="float32")
    out = merge(config, tmp_path / "out")

    report = verify_output(out, chunk_size=256)

    assert report.ok, report.summary()
    assert report.bytes_compared == json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def test_flipped_byte_named(merged):
    shard, data_start, nbytes = tensor_location(merged, EXPERT_TENSOR)
    offset = 1234
    assert offset < nbytes
    flip_byte(shard, data_start + offset)

    mismatch = verify_output(merged).mismatch

    assert mismatch is not None
    assert mismatch.file_name == shard.name
    assert mismatch.tensor == EXPERT_TENSOR
    assert mismatch.tensor_offset == offset
    assert mismatch.file_offset == data_start + offset
    assert mismatch.expected_byte ^ mismatch.found_byte == 0x01


def test_flipped_byte_small_chunks(merged):
    shard, data_start, nbytes = tensor_location(merged, EXPERT_TENSOR)
    offset = nbytes - 3  # in the last piece of the tensor when read 256 bytes at a time
    flip_byte(shard, data_start + offset)

    mismatch = verify_output(merged, chunk_size=256).mismatch

    assert mismatch is not None
    assert mismatch.tensor == EXPERT_TENSOR
    assert mismatch.tensor_offset == offset


def test_flipped_byte_exit_code(merged):
    shard, data_start, _ = tensor_location(merged, EXPERT_TENSOR)
    flip_byte(shard, data_start + 1234)

    result = run_verify(merged)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"tensor {EXPERT_TENSOR} differs at byte 1,234 of its data" in result.stderr, result.stderr
    assert f"(byte {data_start + 1234:,} of the file)" in result.stderr, result.stderr


def test_intact_exit_code(merged):
    result = run_verify(merged, "--chunk-size", "64KiB")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "matches its sources" in result.stdout


def test_router_byte_detected(merged):
    shard, data_start, nbytes = tensor_location(merged, ROUTER_TENSOR)
    flip_byte(shard, data_start + nbytes - 1)

    mismatch = verify_output(merged).mismatch

    assert mismatch is not None
    assert mismatch.tensor == ROUTER_TENSOR
    assert mismatch.tensor_offset == nbytes - 1


def test_header_byte_detected(merged):
    shard, _, _ = tensor_location(merged, EXPERT_TENSOR)
    data = shard.read_bytes()
    position = data.index(b'"shape":[') + len(b'"shape":[')
    digit = data[position : position + 1]
    replacement = b"7" if digit != b"7" else b"8"
    shard.write_bytes(data[:position] + replacement + data[position + 1 :])

    mismatch = verify_output(merged).mismatch

    assert mismatch is not None
    assert mismatch.file_name == shard.name
    assert mismatch.file_offset == position
    assert "header" in mismatch.message


def test_config_edit_detected(merged, capsys):
    edit_json(merged / "config.json", rms_norm_eps=0.5)

    assert main(["verify", str(merged)]) == 1
    assert "config.json: key 'rms_norm_eps' is 0.5" in capsys.readouterr().err


def test_config_extra_key_detected(merged):
    edit_json(merged / "config.json", added_by_hand=1)

    mismatch = verify_output(merged).mismatch

    assert mismatch is not None
    assert "'added_by_hand'" in mismatch.message


def test_tokenizer_edit_detected(merged, capsys):
    tokenizer = merged / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")

    assert main(["verify", str(merged)]) == 1
    assert "tokenizer.json: differs from the base model's" in capsys.readouterr().err


def test_missing_tokenizer_file_detected(merged, capsys):
    (merged / "tokenizer_config.json").unlink()

    assert main(["verify", str(merged)]) == 1
    assert "tokenizer_config.json: missing, but the base model has it" in capsys.readouterr().err


def test_index_edit_detected(merged):
    path = merged / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    other = next(name for name in shards if name != index["weight_map"][EXPERT_TENSOR])
    index["weight_map"][EXPERT_TENSOR] = other
    path.write_text(json.dumps(index))

    mismatch = verify_output(merged).mismatch

    assert mismatch is not None
    assert EXPERT_TENSOR in mismatch.message


def test_truncated_shard_reported(merged):
    shard, _, _ = tensor_location(merged, EXPERT_TENSOR)
    size = shard.stat().st_size
    with open(shard, "r+b") as file:
        file.truncate(size - 100)

    result = run_verify(merged)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{shard.name}: file is {size - 100:,} bytes" in result.stderr, result.stderr
    assert "truncated" in result.stderr, result.stderr


def test_missing_shard_reported(merged):
    shard, _, _ = tensor_location(merged, EXPERT_TENSOR)
    shard.unlink()

    mismatch = verify_output(merged).mismatch

    assert mismatch is not None
    assert mismatch.file_name == shard.name
    assert "missing" in mismatch.message


def test_deleted_yaml_relative_paths_pass(tmp_path, own_sources):
    out = merge(own_sources / "merge.yml", tmp_path / "out")
    (own_sources / "merge.yml").unlink()

    assert main(["verify", str(out)]) == 0


def test_deleted_source_named(tmp_path, own_sources):
    out = merge(own_sources / "merge.yml", tmp_path / "out")
    shutil.rmtree(own_sources / "expert1")

    with pytest.raises(SourceError) as error:
        verify_output(out)

    assert str(own_sources / "expert1") in str(error.value)


def test_deleted_source_exit_code(tmp_path, own_sources):
    out = merge(own_sources / "merge.yml", tmp_path / "out")
    shutil.rmtree(own_sources / "expert1")

    result = run_verify(out)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"Model folder not found: {own_sources / 'expert1'}" in result.stderr, result.stderr


def test_missing_record_reported(merged):
    card = merged / "README.md"
    text = card.read_text()
    card.write_text(text[: text.index("<!-- lowmem-moe-record")])

    with pytest.raises(UserError) as error:
        verify_output(merged)

    assert "no lowmem-moe record" in str(error.value)


def test_folder_without_card_exit_code(tmp_path):
    folder = tmp_path / "not-a-merge"
    folder.mkdir()

    result = run_verify(folder)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "README.md" in result.stderr, result.stderr


def test_missing_hub_like_source_hint(tmp_path, tiny_llama, tiny_experts, monkeypatch):
    # Folders named like Hub repositories, so that a missing one is looked up in the cache.
    root = tmp_path / "sources"
    shutil.copytree(tiny_llama, root / "acme" / "base")
    for index in range(2):
        shutil.copytree(tiny_experts[index], root / "acme" / f"expert{index}")
    config = merge_yaml(root / "merge.yml", Path("acme/base"), [Path("acme/expert0"), Path("acme/expert1")])
    out = merge(config, tmp_path / "out")
    shutil.rmtree(root / "acme" / "expert1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    with pytest.raises(SourceError) as error:
        verify_output(out)

    message = str(error.value)
    assert f"Model folder not found: {root / 'acme' / 'expert1'}" in message
    assert "downloads nothing" in message
    assert "`hf download acme/expert1" in message
    assert "unset the variable" not in message
    assert "HF_HUB_OFFLINE" not in message
