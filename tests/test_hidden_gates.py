"""Hidden-state router vectors from the layer-by-layer pass, checked against full-model forward runs."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowmem_moe.config import load_merge_config
from lowmem_moe.errors import UserError
from lowmem_moe.gates import check_prompts, compute_router_weights
from lowmem_moe.sources import open_sources
from merge_helpers import merge, read_tensors
from model_factory import TinyModelSpec, make_model

# Prompts of different lengths, one of them empty, which stands for the
# BOS state alone where the tokenizer has a BOS token.
POSITIVE = [
    ["solve the equation x plus two", "numbers", "integrals derivatives algebra geometry numbers and more numbers"],
    ["def add(a, b): return a + b", "python code function"],
    ["hello, how are you today?", "thank you"],
]
NEGATIVE = [["python code function"], [], ["numbers"]]

MODEL_CASES = {
    "llama": TinyModelSpec(model_type="llama"),
    "llama_no_bos": TinyModelSpec(model_type="llama", bos_token=None),
    "mistral_window": TinyModelSpec(model_type="mistral", extra_config={"sliding_window": 4}),
    "qwen2_bias": TinyModelSpec(model_type="qwen2"),
    "qwen3_norms": TinyModelSpec(model_type="qwen3", extra_config={"head_dim": 16}),
    "llama_attention_bias": TinyModelSpec(model_type="llama", extra_config={"attention_bias": True}),
}


def write_config(path: Path, base: Path, gate_mode: str, positive=POSITIVE, negative=NEGATIVE) -> Path:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "experts:"]
    for prompts, negatives in zip(positive, negative):
        lines.append(f"  - source_model: {base}")
        lines.append("    positive_prompts:")
        lines += [f"      - {prompt!r}" for prompt in prompts]
        if negatives:
            lines.append("    negative_prompts:")
            lines += [f"      - {prompt!r}" for prompt in negatives]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_vectors(folder: Path, last_token: bool, positive=POSITIVE, negative=NEGATIVE) -> torch.Tensor:
    """Router vectors from transformers' full-model forward, one prompt at a time: (layers, experts, hidden)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def prompt_vectors(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        with torch.no_grad():
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1]
        return torch.stack([s[0, -1] if last_token else s[0].mean(dim=0) for s in states])  # (layers, hidden)

    experts = []
    for prompts, negatives in zip(positive, negative):
        vector = torch.stack([prompt_vectors(p) for p in prompts]).mean(dim=0)
        if negatives:
            vector = vector - torch.stack([prompt_vectors(p) for p in negatives]).mean(dim=0)
        experts.append(vector / vector.norm(dim=-1, keepdim=True))
    return torch.stack(experts, dim=1)


@pytest.mark.parametrize("case", list(MODEL_CASES))
@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg"])
def test_hidden_matches_full_forward(tmp_path, case, gate_mode):
    base = make_model(tmp_path / "base", MODEL_CASES[case])
    config = load_merge_config(write_config(tmp_path / "merge.yml", base, gate_mode))

    weights = compute_router_weights(config, open_sources(config), seed=0, scratch_folder=tmp_path)["experts"]
    expected = reference_vectors(base, last_token=gate_mode == "hidden")
    relative = (weights - expected).norm(dim=-1) / expected.norm(dim=-1)

    assert weights.shape == (2, 3, 64)
    assert relative.max().item() < 1e-5


def test_hidden_last_equals_hidden(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec())
    sources = None
    results = []
    for mode in ("hidden", "hidden_last"):
        config = load_merge_config(write_config(tmp_path / f"{mode}.yml", base, mode))
        sources = sources or open_sources(config)
        results.append(compute_router_weights(config, sources, seed=0, scratch_folder=tmp_path)["experts"])

    assert torch.equal(results[0], results[1])


def test_empty_prompt_is_bos_state(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec())
    positive = [[""], ["python code"]]
    config = load_merge_config(write_config(tmp_path / "m.yml", base, "hidden", positive, [[], []]))

    weights = compute_router_weights(config, open_sources(config), seed=0, scratch_folder=tmp_path)["experts"]
    expected = reference_vectors(base, True, positive, [[], []])

    assert (weights - expected).abs().max().item() < 1e-5


def test_empty_prompt_without_bos_names_expert(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec(bos_token=None))
    config = load_merge_config(write_config(tmp_path / "m.yml", base, "hidden", [["numbers"], [""]], [[], []]))

    with pytest.raises(UserError) as caught:
        compute_router_weights(config, open_sources(config), seed=0, scratch_folder=tmp_path)

    assert "expert 1" in str(caught.value)
    assert "no BOS token" in str(caught.value)


def test_bfloat16_gate_pass_close(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec())
    config = load_merge_config(write_config(tmp_path / "m.yml", base, "hidden"))
    sources = open_sources(config)

    full = compute_router_weights(config, sources, seed=0, scratch_folder=tmp_path)["experts"]
    half = compute_router_weights(config, sources, seed=0, scratch_folder=tmp_path, compute_dtype=torch.bfloat16)["experts"]
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=-1)

    assert not torch.equal(full, half)
    assert cosine.min().item() > 0.98


def test_parallel_vectors_warned(tmp_path, caplog):
    base = make_model(tmp_path / "base", TinyModelSpec())
    # Layer 0 receives only each prompt's last token embedding, which is the
    # same here, so the two router vectors of layer 0 are equal.
    positive = [["integrals and numbers"], ["python numbers"]]
    config = load_merge_config(write_config(tmp_path / "m.yml", base, "hidden", positive, [[], []]))

    with caplog.at_level("WARNING", logger="lowmem_moe"):
        compute_router_weights(config, open_sources(config), seed=0, scratch_folder=tmp_path)

    assert "nearly parallel" in caplog.text
    assert "in layers 0" in caplog.text
    assert "expert 0" in caplog.text
    assert "expert 1" in caplog.text


def test_nan_weight_named(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec())
    tensors = read_tensors(base)
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = load_merge_config(write_config(tmp_path / "m.yml", base, "hidden"))

    with pytest.raises(UserError) as caught:
        compute_router_weights(config, open_sources(config), seed=0, scratch_folder=tmp_path)

    assert "model.layers.0.self_attn.q_proj.weight" in str(caught.value)
    assert "NaN" in str(caught.value)


def test_hidden_merge_end_to_end(tmp_path, tiny_llama, tiny_experts):
    config = write_config(tmp_path / "m.yml", tiny_llama, "hidden")
    text = config.read_text()
    for index, expert in enumerate(tiny_experts):
        text = text.replace(f"source_model: {tiny_llama}", f"source_model: {expert}", 1)
    config.write_text(text)

    merged = read_tensors(merge(config, tmp_path / "out"))
    expected = reference_vectors(tiny_llama, last_token=True)

    for layer in range(2):
        gate = merged[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert (gate - expected[layer]).abs().max().item() < 1e-5


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_infinite_embedding_row_named(tmp_path, gate_mode):
    base = make_model(tmp_path / "base", TinyModelSpec())
    tokenizer = AutoTokenizer.from_pretrained(base)
    token_id = tokenizer("numbers", add_special_tokens=False)["input_ids"][0]
    tensors = read_tensors(base)
    tensors["model.embed_tokens.weight"][token_id, 3] = float("inf")
    from safetensors.torch import save_file

    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = load_merge_config(write_config(tmp_path / "m.yml", base, gate_mode))

    with pytest.raises(UserError) as caught:
        compute_router_weights(config, open_sources(config), seed=0, scratch_folder=tmp_path)

    assert f"row {token_id}" in str(caught.value)
    assert "model.embed_tokens.weight" in str(caught.value)


def test_prompt_longer_than_positions_rejected(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec())  # max_position_embeddings 256
    long_prompt = " ".join(["numbers"] * 400)
    config = load_merge_config(write_config(tmp_path / "m.yml", base, "hidden", [[long_prompt], ["python"]], [[], []]))

    with pytest.raises(UserError) as caught:
        check_prompts(config, open_sources(config))

    assert "expert 0" in str(caught.value)
    assert "more than the base model's 256 positions" in str(caught.value)
