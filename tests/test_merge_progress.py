"""Saved progress of a merge: the resume fingerprint and the saved router weights, on real files."""

import errno
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowmem_moe.merge import PreparedMerge, prepare_merge
from lowmem_moe.merge_progress import (
    ROUTERS_NAME,
    load_router_weights,
    merge_fingerprint,
    mismatch_reason,
    router_shapes,
    save_router_weights,
)
from lowmem_moe.planner import PlanOptions
from model_factory import TinyModelSpec, make_model, write_yaml
from tmpfs import mounted_tmpfs

NUM_LAYERS = 2
HIDDEN = 64


@pytest.fixture
def prepared(tmp_path) -> PreparedMerge:
    """The prepared merge of a private base, whose files the tests may change."""
    base = make_model(tmp_path / "base", TinyModelSpec())
    experts = [make_model(tmp_path / f"e{i}", TinyModelSpec(), mlp_seed=i) for i in range(2)]
    lines = [f"base_model: {base}", "gate_mode: cheap_embed", "experts:"]
    for index, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f'    positive_prompts: ["topic {index}"]']
    config = write_yaml(tmp_path / "m.yml", "\n".join(lines) + "\n")
    return prepare_merge(config, PlanOptions())


def fingerprint(prepared: PreparedMerge) -> dict:
    return merge_fingerprint(prepared.config.text, {}, prepared.plan, base=prepared.sources.base)


def test_fingerprint_tokenizer_changed(prepared):
    saved = fingerprint(prepared)
    tokenizer = prepared.sources.base.folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + "\n")

    reason = mismatch_reason(saved, fingerprint(prepared))

    assert reason == f"base file {tokenizer} changed since (size or modification time differ)"


def test_fingerprint_generation_config_added(prepared):
    generation_config = prepared.sources.base.folder / "generation_config.json"
    generation_config.unlink(missing_ok=True)
    saved = fingerprint(prepared)
    generation_config.write_text('{"do_sample": true}\n')

    reason = mismatch_reason(saved, fingerprint(prepared))

    assert reason == f"base file {generation_config} was added since"


def test_fingerprint_tokenizer_file_removed(prepared):
    saved = fingerprint(prepared)
    tokenizer_config = prepared.sources.base.folder / "tokenizer_config.json"
    assert tokenizer_config.is_file()
    tokenizer_config.unlink()

    reason = mismatch_reason(saved, fingerprint(prepared))

    assert reason == f"base file {tokenizer_config} was removed since"


def test_fingerprint_unchanged_base(prepared):
    assert mismatch_reason(fingerprint(prepared), fingerprint(prepared)) is None


def test_fingerprint_without_base_files_restarts(prepared):
    saved = fingerprint(prepared)
    del saved["base_files"]

    assert mismatch_reason(saved, fingerprint(prepared)) == "it was written by an older lowmem-moe"


def test_router_shapes_from_plan(prepared):
    assert router_shapes(prepared.plan) == {"experts": (NUM_LAYERS, 2, HIDDEN)}


def test_saved_routers_reloaded(prepared, tmp_path):
    weights = {"experts": torch.randn(NUM_LAYERS, 2, HIDDEN)}
    save_router_weights(tmp_path, weights)

    loaded = load_router_weights(tmp_path, prepared.plan)

    assert loaded is not None
    assert torch.equal(loaded["experts"], weights["experts"])
    assert not (tmp_path / (ROUTERS_NAME + ".tmp")).exists()


@pytest.mark.parametrize(
    "weights, problem",
    [
        ({"shared_expert": torch.randn(NUM_LAYERS, 2, HIDDEN)}, "tensors ['shared_expert'], expected ['experts']"),
        ({"experts": torch.randn(NUM_LAYERS, 3, HIDDEN)}, "has shape (2, 3, 64), expected (2, 2, 64)"),
        ({"experts": torch.randn(NUM_LAYERS + 1, 2, HIDDEN)}, "has shape (3, 2, 64), expected (2, 2, 64)"),
        ({"experts": torch.randn(NUM_LAYERS, 2, HIDDEN).half()}, "has dtype torch.float16"),
    ],
    ids=["wrong_name", "wrong_experts", "wrong_layers", "wrong_dtype"],
)
def test_edited_routers_recomputed(prepared, tmp_path, caplog, weights, problem):
    save_file(weights, str(tmp_path / ROUTERS_NAME))

    with caplog.at_level(logging.INFO, logger="lowmem_moe"):
        loaded = load_router_weights(tmp_path, prepared.plan)

    assert loaded is None
    assert "do not fit the plan" in caplog.text
    assert problem in caplog.text


def test_damaged_routers_recomputed(prepared, tmp_path, caplog):
    (tmp_path / ROUTERS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    with caplog.at_level(logging.INFO, logger="lowmem_moe"):
        loaded = load_router_weights(tmp_path, prepared.plan)

    assert loaded is None
    assert "unreadable" in caplog.text


def test_routers_into_missing_folder(tmp_path):
    staging = tmp_path / "vanished"

    with pytest.raises(OSError) as caught:
        save_router_weights(staging, {"experts": torch.zeros(NUM_LAYERS, 2, HIDDEN)})

    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == str(staging / (ROUTERS_NAME + ".tmp"))


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs, which needs root. Skipped where mounting is not allowed."""
    yield from mounted_tmpfs(tmp_path / "tiny", 1)


def test_routers_on_full_disk(tiny_filesystem):
    # 4 MiB of float32 weights on a 1 MiB filesystem.
    weights = {"experts": torch.zeros(16, 64, 1024)}

    with pytest.raises(OSError) as caught:
        save_router_weights(tiny_filesystem, weights)

    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tiny_filesystem) == []
