"""Bad inputs through the command line: a clear message, a non-zero exit and no finished-looking output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from model_factory import TinyModelSpec, edit_json, make_model

STAGING_SUFFIX = ".lowmem-moe-partial"
RETIRED_SUFFIX = ".lowmem-moe-replaced"


def run_merge(tmp_path: Path, config: Path, out_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """Run ``lowmem-moe merge`` in a subprocess, from a working folder unrelated to the YAML."""
    workdir = tmp_path / "cwd"
    workdir.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", "merge", str(config), str(out_dir), "-q", *options],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_config(folder: Path, base: Path, experts: list[Path], extra: str = "", gate_mode: str = "random") -> Path:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "experts:"]
    for index, expert in enumerate(experts):
        lines.append(f"  - source_model: {expert}")
        lines.append(f'    positive_prompts: ["python code number {index}"]')
    path = folder / "merge.yml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def copy_model(source: Path, destination: Path) -> Path:
    return Path(shutil.copytree(source, destination))


def assert_clean_failure(result: subprocess.CompletedProcess, out_dir: Path) -> None:
    """Check the parts shared by every rejected merge, one assert per condition."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr, result.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    assert not (out_dir.parent / f".{out_dir.name}{STAGING_SUFFIX}").exists()
    assert not (out_dir.parent / f".{out_dir.name}{RETIRED_SUFFIX}").exists()


def error_text(result: subprocess.CompletedProcess) -> str:
    """Return the stderr lines that the command line marked as errors."""
    return "\n".join(line for line in result.stderr.splitlines() if line.startswith("error: "))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="module")
def wide_expert(tmp_path_factory) -> Path:
    """An expert with intermediate_size 128, where the base has 96."""
    folder = tmp_path_factory.mktemp("wide") / "wide"
    return make_model(folder, TinyModelSpec(intermediate_size=128), seed=0, mlp_seed=7)


# Bad sources.


def test_missing_model_folder(tmp_path, out_dir, tiny_llama, tiny_experts):
    config = write_config(tmp_path, tiny_llama, [tiny_experts[0], tmp_path / "no_such_model"])
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert str(tmp_path / "no_such_model") in error_text(result)
    assert "not found" in error_text(result)
    assert "line 6" in error_text(result)


def test_missing_expert_tensor(tmp_path, out_dir, tiny_llama, tiny_experts):
    expert = copy_model(tiny_experts[1], tmp_path / "expert")
    tensors = load_file(expert / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})

    config = write_config(tmp_path, tiny_llama, [tiny_experts[0], expert])
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert str(expert) in error_text(result)
    assert "'model.layers.1.mlp.up_proj.weight'" in error_text(result)
    assert "not found" in error_text(result)


def test_expert_with_other_shape(tmp_path, out_dir, tiny_llama, tiny_experts, wide_expert):
    config = write_config(tmp_path, tiny_llama, [tiny_experts[0], wide_expert])
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert str(wide_expert / "config.json") in error_text(result)
    assert "intermediate_size is 128, but the base model has 96" in error_text(result)


# Bad YAML.


def test_experts_per_token_above_expert_count(tmp_path, out_dir, tiny_llama, tiny_experts):
    config = write_config(tmp_path, tiny_llama, tiny_experts[:2], extra="experts_per_token: 3\n")
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert str(config) in error_text(result)
    assert "experts_per_token is 3 but only 2 experts" in error_text(result)
    assert "line 8" in error_text(result)


def test_yaml_syntax_error(tmp_path, out_dir, tiny_llama, tiny_experts):
    config = write_config(tmp_path, tiny_llama, tiny_experts[:2], extra="dtype: [bfloat16\n")
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert str(config) in error_text(result)
    assert "YAML syntax error at line 9" in error_text(result)


def test_unknown_yaml_key(tmp_path, out_dir, tiny_llama, tiny_experts):
    config = write_config(tmp_path, tiny_llama, tiny_experts[:2], extra="experts_per_tokens: 1\n")
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert "unknown key 'experts_per_tokens'" in error_text(result)
    assert "Did you mean 'experts_per_token'?" in error_text(result)
    assert "line 8, column 1" in error_text(result)


# Source config fields that Mixtral cannot express.


def test_attention_bias_rejected(tmp_path, out_dir, tiny_llama, tiny_experts):
    base = copy_model(tiny_llama, tmp_path / "base")
    edit_json(base / "config.json", attention_bias=True)
    config = write_config(tmp_path, base, tiny_experts[:2])
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert "attention_bias=True" in error_text(result)
    assert "no bias" in error_text(result)


def test_unknown_config_field_rejected(tmp_path, out_dir, tiny_llama, tiny_experts):
    base = copy_model(tiny_llama, tmp_path / "base")
    edit_json(base / "config.json", foo_scaling=3)
    config = write_config(tmp_path, base, tiny_experts[:2])
    result = run_merge(tmp_path, config, out_dir)
    assert_clean_failure(result, out_dir)
    assert str(base / "config.json") in error_text(result)
    assert "'foo_scaling'" in error_text(result)
    assert "--drop-config-field foo_scaling" in error_text(result)


def test_unknown_config_field_dropped(tmp_path, out_dir, tiny_llama, tiny_experts):
    base = copy_model(tiny_llama, tmp_path / "base")
    edit_json(base / "config.json", foo_scaling=3)
    config = write_config(tmp_path, base, tiny_experts[:2], gate_mode="cheap_embed")
    result = run_merge(tmp_path, config, out_dir, "--drop-config-field", "foo_scaling")
    assert result.returncode == 0, result.stderr
    output_config = json.loads((out_dir / "config.json").read_text())
    assert "foo_scaling" not in output_config
    assert output_config["model_type"] == "mixtral"
    assert output_config["num_local_experts"] == 2
    assert not (tmp_path / f".out{STAGING_SUFFIX}").exists()


# The output folder.


def test_non_empty_out_dir_without_overwrite(tmp_path, out_dir, tiny_llama, tiny_experts):
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    config = write_config(tmp_path, tiny_llama, tiny_experts[:2])
    result = run_merge(tmp_path, config, out_dir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "is not empty" in error_text(result)
    assert "--overwrite" in error_text(result)
    assert sorted(path.name for path in out_dir.iterdir()) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / f".out{STAGING_SUFFIX}").exists()


def test_overwrite_replaces_out_dir(tmp_path, out_dir, tiny_llama, tiny_experts):
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("old")
    config = write_config(tmp_path, tiny_llama, tiny_experts[:2])
    result = run_merge(tmp_path, config, out_dir, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out_dir / "notes.txt").exists()
    assert (out_dir / "config.json").is_file()
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert not (tmp_path / f".out{STAGING_SUFFIX}").exists()
    assert not (tmp_path / f".out{RETIRED_SUFFIX}").exists()


def test_failed_overwrite_keeps_old_out_dir(tmp_path, out_dir, tiny_llama, tiny_experts):
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("old")
    expert = copy_model(tiny_experts[1], tmp_path / "expert")
    shard = expert / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])

    config = write_config(tmp_path, tiny_llama, [tiny_experts[0], expert])
    result = run_merge(tmp_path, config, out_dir, "--overwrite")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(shard) in error_text(result)
    assert sorted(path.name for path in out_dir.iterdir()) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "old"
    assert not (tmp_path / f".out{STAGING_SUFFIX}").exists()
    assert not (tmp_path / f".out{RETIRED_SUFFIX}").exists()


@pytest.fixture(scope="module")
def base_failing_late(tmp_path_factory, tiny_llama) -> Path:
    """A base whose special_tokens_map.json cannot be read, which fails the merge after the shards are written.

    Reading /proc/self/mem from its start fails with EIO, even as root.
    """
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/self/mem")
    base = copy_model(tiny_llama, tmp_path_factory.mktemp("late") / "base")
    (base / "special_tokens_map.json").unlink(missing_ok=True)
    os.symlink("/proc/self/mem", base / "special_tokens_map.json")
    return base


@pytest.fixture(scope="module")
def late_failure(tmp_path_factory, base_failing_late, tiny_experts) -> tuple[subprocess.CompletedProcess, Path]:
    """One merge into a fresh OUT_DIR that fails while copying base files, shared by the tests below."""
    folder = tmp_path_factory.mktemp("late_run")
    config = write_config(folder, base_failing_late, tiny_experts[:2])
    out_dir = folder / "out"
    return run_merge(folder, config, out_dir), out_dir


def test_late_failure_leaves_no_output(late_failure):
    result, out_dir = late_failure
    assert_clean_failure(result, out_dir)
    assert "into the output failed" in result.stderr
    assert "is unchanged" in result.stderr


def test_late_failure_names_file(late_failure):
    result, _ = late_failure
    assert "special_tokens_map.json" in error_text(result)


def test_late_failure_keeps_old_out_dir(tmp_path, out_dir, base_failing_late, tiny_experts):
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("old")
    config = write_config(tmp_path, base_failing_late, tiny_experts[:2])
    result = run_merge(tmp_path, config, out_dir, "--overwrite")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "special_tokens_map.json" in result.stderr
    assert sorted(path.name for path in out_dir.iterdir()) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "old"
    assert not (tmp_path / f".out{STAGING_SUFFIX}").exists()
    assert not (tmp_path / f".out{RETIRED_SUFFIX}").exists()


def test_stale_staging_folder_replaced(tmp_path, out_dir, tiny_llama, tiny_experts):
    # What a merge killed mid-write leaves behind: a marked staging folder
    # with partial shards, next to an OUT_DIR that does not exist yet.
    staging = tmp_path / f".out{STAGING_SUFFIX}"
    staging.mkdir()
    (staging / ".lowmem-moe-staging").touch()
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)

    config = write_config(tmp_path, tiny_llama, tiny_experts[:2])
    result = run_merge(tmp_path, config, out_dir)
    assert result.returncode == 0, result.stderr
    assert not staging.exists()
    assert (out_dir / "config.json").is_file()
    assert not (out_dir / "model-00001-of-00002.safetensors").exists()


# Base configs whose values do not fit their tensors, or that transformers rejects.


def test_config_sizes_not_matching_tensors(tmp_path, out_dir, tiny_llama, tiny_experts):
    models = [copy_model(model, tmp_path / f"model{index}") for index, model in enumerate([tiny_llama, *tiny_experts[:2]])]
    for model in models:
        edit_json(model / "config.json", intermediate_size=256)
    config = write_config(tmp_path, models[0], models[1:])

    result = run_merge(tmp_path, config, out_dir)

    assert_clean_failure(result, out_dir)
    assert "do not fit the model that the merged config.json describes" in error_text(result)
    assert f"{models[0] / 'config.json'}; check that they match its tensors" in error_text(result)
    assert "bug in lowmem-moe" not in result.stderr


def test_config_value_transformers_rejects(tmp_path, out_dir, tiny_llama, tiny_experts):
    base = copy_model(tiny_llama, tmp_path / "base")
    edit_json(base / "config.json", hidden_act="no_such_activation")
    config = write_config(tmp_path, base, tiny_experts[:2])

    result = run_merge(tmp_path, config, out_dir)

    assert_clean_failure(result, out_dir)
    assert "transformers cannot build the merged model from its config.json" in error_text(result)
    assert "no_such_activation" in error_text(result)


def test_config_value_rejected_in_gate_pass(tmp_path, out_dir, tiny_llama, tiny_experts):
    base = copy_model(tiny_llama, tmp_path / "base")
    edit_json(base / "config.json", hidden_act="no_such_activation")
    config = write_config(tmp_path, base, tiny_experts[:2], gate_mode="hidden")

    result = run_merge(tmp_path, config, out_dir)

    assert_clean_failure(result, out_dir)
    assert "no_such_activation" in error_text(result)
    assert str(base / "config.json") in error_text(result)


def test_plan_rejects_config_sizes(tmp_path, tiny_llama, tiny_experts):
    models = [copy_model(model, tmp_path / f"model{index}") for index, model in enumerate([tiny_llama, *tiny_experts[:2]])]
    for model in models:
        edit_json(model / "config.json", intermediate_size=256)
    config = write_config(tmp_path, models[0], models[1:])

    result = subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", "plan", str(config), str(tmp_path / "out")], capture_output=True, text=True
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "do not fit the model that the merged config.json describes" in error_text(result)
