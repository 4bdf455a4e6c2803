"""Qwen2-MoE, Qwen3-MoE and the fused layout: merged models checked against dense models and hand formulas."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowmem_moe.errors import OutputError, PlanError
from lowmem_moe.structure_check import check_structure
from merge_helpers import merge, read_tensors, token_batch
from model_factory import TinyModelSpec, make_model

QWEN2 = TinyModelSpec(model_type="qwen2")
QWEN3 = TinyModelSpec(model_type="qwen3", extra_config={"head_dim": 16})


def write_yaml(path, base, experts, shared=None, **top_level):
    lines = [f"base_model: {base}", "gate_mode: random"]
    lines += [f"{key}: {value}" for key, value in top_level.items()]
    lines.append("experts:")
    for index, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f'    positive_prompts: ["topic {index}"]']
    if shared is not None:
        lines += ["shared_experts:", f"  - source_model: {shared}", '    positive_prompts: ["anything"]']
    path.write_text("\n".join(lines) + "\n")
    return path


def load(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def qwen2_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    base = make_model(root / "base", QWEN2)
    experts = [make_model(root / f"expert{i}", QWEN2, mlp_seed=20 + i) for i in range(3)]
    return base, experts


def test_qwen2_moe_block_matches_formula(tmp_path, qwen2_models):
    base, experts = qwen2_models
    config = write_yaml(tmp_path / "m.yml", base, experts[:2], shared=experts[2])
    out = merge(config, tmp_path / "out")

    model, info = load(out)
    dense = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32).eval() for e in experts]
    hidden = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3))

    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    for layer in range(2):
        block = model.model.layers[layer].mlp
        with torch.no_grad():
            merged = block(hidden)[0]  # (tokens, hidden)
            probs = torch.softmax(hidden[0] @ block.gate.weight.T, dim=-1)  # (tokens, experts)
            top_values, top_indices = probs.topk(2, dim=-1)
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
            outputs = torch.stack([d.model.layers[layer].mlp(hidden[0]) for d in dense[:2]], dim=1)
            routed = (outputs.gather(1, top_indices[..., None].expand(-1, -1, 64)) * top_values[..., None]).sum(dim=1)
            shared_gate = torch.sigmoid(hidden[0] @ block.shared_expert_gate.weight.T)  # (tokens, 1)
            expected = routed + shared_gate * dense[2].model.layers[layer].mlp(hidden[0])

        assert (merged - expected).abs().max().item() < 1e-5


def test_qwen2_moe_config_and_biases(tmp_path, qwen2_models):
    base, experts = qwen2_models
    config = write_yaml(tmp_path / "m.yml", base, experts[:2], shared=experts[2])
    out = merge(config, tmp_path / "out")

    written = json.loads((out / "config.json").read_text())
    merged = read_tensors(out)
    source = read_tensors(base)

    assert written["architectures"] == ["Qwen2MoeForCausalLM"]
    assert written["norm_topk_prob"] is True
    assert written["moe_intermediate_size"] == 96
    assert written["shared_expert_intermediate_size"] == 96
    assert written["decoder_sparse_step"] == 1
    assert written["mlp_only_layers"] == []
    assert written["num_experts"] == 2
    for name in ("q_proj", "k_proj", "v_proj"):
        bias = f"model.layers.1.self_attn.{name}.bias"
        assert torch.equal(merged[bias], source[bias])
        assert source[bias].abs().sum() > 0
    assert torch.equal(
        merged["model.layers.0.mlp.shared_expert.down_proj.weight"],
        read_tensors(experts[2])["model.layers.0.mlp.down_proj.weight"],
    )
    assert merged["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)


def test_qwen2_without_shared_expert_rejected(tmp_path, qwen2_models):
    base, experts = qwen2_models
    config = write_yaml(tmp_path / "m.yml", base, experts[:2])

    with pytest.raises(PlanError) as caught:
        merge(config, tmp_path / "out")

    message = str(caught.value)
    assert "qwen2_moe" in message
    assert "shared expert" in message
    assert "attention has biases" in message
    assert not (tmp_path / "out").exists()


def test_qwen3_identical_experts_match_dense(tmp_path):
    base = make_model(tmp_path / "base", QWEN3)
    config = write_yaml(tmp_path / "m.yml", base, [base, base])
    out = merge(config, tmp_path / "out", allow_identical_experts=True)

    model, info = load(out)
    merged = read_tensors(out)
    ids = token_batch(128)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"]
    assert torch.equal(merged["model.layers.0.self_attn.q_norm.weight"], read_tensors(base)["model.layers.0.self_attn.q_norm.weight"])
    assert (logits(model, ids) - logits(dense, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "spec",
    [TinyModelSpec(), QWEN3],
    ids=["mixtral", "qwen3_moe"],
)
def test_fused_identical_experts_match_dense(tmp_path, spec):
    base = make_model(tmp_path / "base", spec)
    config = write_yaml(tmp_path / "m.yml", base, [base, base])
    out = merge(config, tmp_path / "out", allow_identical_experts=True, layout="fused")

    model, info = load(out)
    ids = token_batch(128)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert (logits(model, ids) - logits(dense, ids)).abs().max().item() < 1e-4


def test_fused_layout_bytes(tmp_path, tiny_llama, tiny_experts):
    config = write_yaml(tmp_path / "m.yml", tiny_llama, tiny_experts)
    text = config.read_text().replace('["topic 1"]', '["topic 1"]\n    noise_scale: 0.01\n    residual_scale: 0.5')
    config.write_text(text)
    fused = read_tensors(merge(config, tmp_path / "fused", layout="fused", seed=4))
    per_expert = read_tensors(merge(config, tmp_path / "per_expert", seed=4))

    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]
    down = fused["model.layers.1.mlp.experts.down_proj"]

    assert gate_up.shape == (3, 2 * 96, 64)
    assert down.shape == (3, 64, 96)
    assert "model.layers.1.mlp.gate.weight" in fused
    for expert in range(3):
        prefix = f"model.layers.1.block_sparse_moe.experts.{expert}"
        assert torch.equal(gate_up[expert, :96], per_expert[f"{prefix}.w1.weight"])
        assert torch.equal(gate_up[expert, 96:], per_expert[f"{prefix}.w3.weight"])
        assert torch.equal(down[expert], per_expert[f"{prefix}.w2.weight"])


def test_llama_as_qwen2_moe_rejected(tmp_path, tiny_llama, tiny_experts):
    config = write_yaml(tmp_path / "m.yml", tiny_llama, tiny_experts[:2], shared=tiny_experts[2], architecture="qwen2_moe")

    with pytest.raises(PlanError) as caught:
        merge(config, tmp_path / "out")

    assert "use architecture: mixtral" in str(caught.value)


def test_mergekit_architecture_alias(tmp_path, qwen2_models):
    base, experts = qwen2_models
    config = write_yaml(tmp_path / "m.yml", base, experts[:2], shared=experts[2], architecture="qwen")
    out = merge(config, tmp_path / "out")

    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"


@pytest.mark.parametrize("model_type", ["gemma", "phi3"])
def test_unsupported_model_type_rejected(tmp_path, model_type):
    spec = TinyModelSpec(model_type=model_type)
    base = make_model(tmp_path / "base", spec)
    config = write_yaml(tmp_path / "m.yml", base, [base, base])

    result = subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", "merge", str(config), str(tmp_path / "out"), "--allow-identical-experts"],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert f"model_type {model_type!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out*")) == []


def test_structure_check_catches_config_mismatch(tmp_path, tiny_llama, tiny_experts):
    config = write_yaml(tmp_path / "m.yml", tiny_llama, tiny_experts)
    out = merge(config, tmp_path / "out")
    config_path = out / "config.json"
    written = json.loads(config_path.read_text())
    written["num_local_experts"] = 4
    config_path.write_text(json.dumps(written))

    with pytest.raises(OutputError) as caught:
        check_structure(out)

    assert "do not match" in str(caught.value)
