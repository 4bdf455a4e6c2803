"""Merged outputs checked against their sources with real transformers models."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, MixtralForCausalLM

from merge_helpers import merge, merge_yaml, read_tensors, token_batch
from model_factory import TinyModelSpec, make_model

EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def load_with_info(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def dense_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("experts_per_token", [1, 2])
def test_identical_experts_match_dense(tmp_path, tiny_llama, experts_per_token):
    config = merge_yaml(
        tmp_path / "merge.yml", tiny_llama, [tiny_llama] * 3, experts_per_token=experts_per_token
    )
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    model, info = load_with_info(out)
    ids = token_batch(128)
    with torch.no_grad():
        merged = model(ids).logits
    difference = (merged - dense_logits(tiny_llama, ids)).abs().max().item()

    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_experts_per_tok == experts_per_token
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert difference < 1e-4


def test_tensors_equal_sources(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts)
    out = merge(config, tmp_path / "out")

    merged = read_tensors(out)
    base = read_tensors(tiny_llama)
    experts = [read_tensors(expert) for expert in tiny_experts]
    expected_names = {name for name in base if ".mlp." not in name}

    for name in expected_names:
        assert torch.equal(merged[name], base[name]), name
    for layer in range(2):
        for index, expert in enumerate(experts):
            for out_name, dense_name in EXPERT_NAMES.items():
                merged_name = f"model.layers.{layer}.block_sparse_moe.experts.{index}.{out_name}.weight"
                assert torch.equal(merged[merged_name], expert[f"model.layers.{layer}.mlp.{dense_name}.weight"])
        assert merged[f"model.layers.{layer}.block_sparse_moe.gate.weight"].shape == (3, 64)
    assert len(merged) == len(expected_names) + 2 * (1 + 3 * 3)


def test_moe_block_matches_hand_formula(tmp_path, tiny_llama, tiny_experts):
    # The block output must be the top-k softmax mixture of the dense
    # experts' own MLPs, which checks that w1, w2 and w3 are wired right.
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts, experts_per_token=2)
    out = merge(config, tmp_path / "out")
    model, _ = load_with_info(out)
    dense = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32).eval() for e in tiny_experts]
    hidden = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(1))

    for layer in range(2):
        block = model.model.layers[layer].mlp
        with torch.no_grad():
            merged = block(hidden)[0]  # (tokens, hidden)
            probs = torch.softmax(hidden[0] @ block.gate.weight.T, dim=-1)  # (tokens, experts)
            top_values, top_indices = probs.topk(2, dim=-1)
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
            outputs = torch.stack([d.model.layers[layer].mlp(hidden[0]) for d in dense], dim=1)  # (tokens, experts, hidden)
            expected = (outputs.gather(1, top_indices[..., None].expand(-1, -1, 64)) * top_values[..., None]).sum(dim=1)

        assert (merged - expected).abs().max().item() < 1e-5


def test_tied_embeddings_copied(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec(tie_word_embeddings=True))
    expert = make_model(tmp_path / "expert", TinyModelSpec(tie_word_embeddings=True), mlp_seed=5)
    config = merge_yaml(tmp_path / "merge.yml", base, [base, expert], experts_per_token=1)
    out = merge(config, tmp_path / "out")

    model, info = load_with_info(out)
    merged = read_tensors(out)

    assert "lm_head.weight" not in merged
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_embeddings_match_dense(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec(tie_word_embeddings=True))
    config = merge_yaml(tmp_path / "merge.yml", base, [base, base])
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    model, _ = load_with_info(out)
    ids = token_batch(128)
    with torch.no_grad():
        merged = model(ids).logits

    assert (merged - dense_logits(base, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("legacy", [False, True])
def test_rope_scaling_kept(tmp_path, legacy):
    spec = TinyModelSpec(rope_scaling={"rope_type": "linear", "factor": 2.0}, legacy_config=legacy)
    base = make_model(tmp_path / "base", spec)
    config = merge_yaml(tmp_path / "merge.yml", base, [base, base])
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    written = json.loads((out / "config.json").read_text())
    loaded = AutoConfig.from_pretrained(out)
    model, _ = load_with_info(out)
    ids = token_batch(128, length=64)
    with torch.no_grad():
        merged = model(ids).logits

    assert written["rope_theta"] == 50000.0
    assert written["rope_scaling"]["rope_type"] == "linear"
    assert written["rope_scaling"]["factor"] == 2.0
    assert loaded.rope_parameters["rope_type"] == "linear"
    assert loaded.rope_parameters["factor"] == 2.0
    assert loaded.rope_parameters["rope_theta"] == 50000.0
    assert (merged - dense_logits(base, ids)).abs().max().item() < 1e-4


def test_legacy_config_read(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec(legacy_config=True, dtype=torch.bfloat16))
    config = merge_yaml(tmp_path / "merge.yml", base, [base, base])
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    written = json.loads((out / "config.json").read_text())

    assert written["rope_theta"] == 10000.0
    assert written["rope_scaling"] is None
    assert written["dtype"] == "bfloat16"
    assert written["sliding_window"] is None
    assert read_tensors(out)["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_config_fields_carried(tmp_path, tiny_llama):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, [tiny_llama] * 2, experts_per_token=1)
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    source = json.loads((tiny_llama / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())

    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "bos_token_id", "eos_token_id", "tie_word_embeddings",
    ):
        assert written[key] == source[key], key
    assert written["architectures"] == ["MixtralForCausalLM"]
    assert written["num_local_experts"] == 2
    assert written["num_experts_per_tok"] == 1
    assert written["sliding_window"] is None


def test_mistral_sliding_window_kept(tmp_path):
    spec = TinyModelSpec(model_type="mistral", extra_config={"sliding_window": 16})
    base = make_model(tmp_path / "base", spec)
    config = merge_yaml(tmp_path / "merge.yml", base, [base, base])
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    model, _ = load_with_info(out)
    ids = token_batch(128, length=40)
    with torch.no_grad():
        merged = model(ids).logits

    assert json.loads((out / "config.json").read_text())["sliding_window"] == 16
    assert (merged - dense_logits(base, ids)).abs().max().item() < 1e-4


def test_float32_to_bfloat16(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2], dtype="bfloat16")
    out = merge(config, tmp_path / "out")

    merged = read_tensors(out)
    base = read_tensors(tiny_llama)
    expert = read_tensors(tiny_experts[1])

    assert all(tensor.dtype == torch.bfloat16 for tensor in merged.values())
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(
        merged["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
        expert["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16),
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bfloat16_to_float16(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec(dtype=torch.bfloat16))
    config = merge_yaml(tmp_path / "merge.yml", base, [base, base], dtype="float16")
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    merged = read_tensors(out)
    source = read_tensors(base)

    assert torch.equal(merged["model.norm.weight"], source["model.norm.weight"].to(torch.float16))
    assert torch.equal(
        merged["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
        source["model.layers.0.mlp.gate_proj.weight"].to(torch.float16),
    )


def test_sharded_sources_and_output(tmp_path):
    spec = TinyModelSpec(max_shard_size="40KB")
    base = make_model(tmp_path / "base", spec)
    experts = [make_model(tmp_path / f"expert{i}", spec, mlp_seed=10 + i) for i in range(2)]
    config = merge_yaml(tmp_path / "merge.yml", base, experts)
    out = merge(config, tmp_path / "out", shard_size=30_000, chunk_size=64 * 1024)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    merged = read_tensors(out)
    expert = read_tensors(experts[1])
    model, info = load_with_info(out)

    assert len(list(base.glob("*.safetensors"))) > 1
    assert len(shard_files) > 5
    assert shard_files == sorted(path.name for path in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert torch.equal(
        merged["model.layers.0.block_sparse_moe.experts.1.w3.weight"], expert["model.layers.0.mlp.up_proj.weight"]
    )
    assert not info["missing_keys"]


def test_chunk_size_does_not_change_bytes(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2], dtype="bfloat16")
    text = config.read_text().replace(
        '"prompt number 1"]', '"prompt number 1"]\n    noise_scale: 0.01\n    residual_scale: 0.5'
    )
    config.write_text(text)
    small = read_tensors(merge(config, tmp_path / "small", chunk_size=64 * 1024, seed=3))
    large = read_tensors(merge(config, tmp_path / "large", chunk_size=16 * 1024**2, seed=3))

    assert small.keys() == large.keys()
    for name in small:
        assert torch.equal(small[name], large[name]), name


def test_noise_and_residual_scale(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts[:2])
    text = config.read_text().replace(
        '"prompt number 1"]', '"prompt number 1"]\n    noise_scale: 0.01\n    residual_scale: 0.5'
    )
    config.write_text(text)
    first = read_tensors(merge(config, tmp_path / "first", seed=1))
    again = read_tensors(merge(config, tmp_path / "again", seed=1))
    other_seed = read_tensors(merge(config, tmp_path / "other", seed=2))
    expert0 = read_tensors(tiny_experts[0])
    expert1 = read_tensors(tiny_experts[1])

    w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    w2 = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    noise_w1 = first[w1] - expert1["model.layers.0.mlp.gate_proj.weight"]
    noise_w2 = first[w2] / 0.5 - expert1["model.layers.0.mlp.down_proj.weight"]

    assert torch.equal(first[w1], again[w1])
    assert not torch.equal(first[w1], other_seed[w1])
    assert 0.005 < noise_w1.std().item() < 0.02
    assert 0.005 < noise_w2.std().item() < 0.02
    # Expert 0 has neither noise nor scale, so it is a plain copy.
    assert torch.equal(
        first["model.layers.0.block_sparse_moe.experts.0.w2.weight"], expert0["model.layers.0.mlp.down_proj.weight"]
    )
    # Attention weights come from the base and get no noise.
    assert torch.equal(first["model.layers.0.self_attn.q_proj.weight"], read_tensors(tiny_llama)["model.layers.0.self_attn.q_proj.weight"])


def test_sources_left_unchanged(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts, gate_mode="hidden")
    folders = [tiny_llama, *tiny_experts]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for folder in folders for path in folder.iterdir()}

    merge(config, tmp_path / "out")
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for folder in folders for path in folder.iterdir()}

    assert after == before
