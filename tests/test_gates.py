"""Router weights of every supported gate mode, checked against hand computations."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from lowmem_moe.errors import UserError
from merge_helpers import merge, read_tensors
from model_factory import TinyModelSpec, make_model


def gate(tensors: dict, layer: int) -> torch.Tensor:
    return tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]


def write_config(path, base, experts, gate_mode, prompts, negatives=None):
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "experts:"]
    for index, expert in enumerate(experts):
        lines.append(f"  - source_model: {expert}")
        lines.append(f"    positive_prompts: {prompts[index]!r}".replace("'", '"'))
        if negatives and negatives[index]:
            lines.append(f"    negative_prompts: {negatives[index]!r}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("gate_mode", ["random", "uniform_random"])
def test_random_gates_follow_seed(tmp_path, tiny_llama, tiny_experts, gate_mode):
    config = write_config(tmp_path / "m.yml", tiny_llama, tiny_experts, gate_mode, [["a"], ["b"], ["c"]])
    first = read_tensors(merge(config, tmp_path / "first", seed=7))
    again = read_tensors(merge(config, tmp_path / "again", seed=7))
    other = read_tensors(merge(config, tmp_path / "other", seed=8))

    assert torch.equal(gate(first, 0), gate(again, 0))
    assert torch.equal(gate(first, 1), gate(again, 1))
    assert not torch.equal(gate(first, 0), gate(other, 0))
    assert not torch.equal(gate(first, 0), gate(first, 1))


def test_uniform_random_within_linear_bound(tmp_path, tiny_llama, tiny_experts):
    config = write_config(tmp_path / "m.yml", tiny_llama, tiny_experts, "uniform_random", [["a"], ["b"], ["c"]])
    weights = gate(read_tensors(merge(config, tmp_path / "out")), 0)
    bound = 1 / math.sqrt(64)

    assert weights.abs().max().item() <= bound
    assert weights.abs().max().item() > bound * 0.8


def test_random_gates_standard_normal(tmp_path, tiny_llama, tiny_experts):
    config = write_config(tmp_path / "m.yml", tiny_llama, tiny_experts, "random", [["a"], ["b"], ["c"]])
    tensors = read_tensors(merge(config, tmp_path / "out"))
    weights = torch.stack([gate(tensors, layer) for layer in range(2)])

    assert 0.8 < weights.std().item() < 1.2


def expected_cheap_embed(folder, prompts, negatives=()):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    table = read_tensors(folder)["model.embed_tokens.weight"].float()

    def normalised_sum(texts):
        total = torch.zeros(table.shape[1], dtype=torch.float64)
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            total += table[ids].double().sum(dim=0)
        total = total.float()
        return total / total.norm()

    vector = normalised_sum(prompts)
    if negatives:
        vector = vector - normalised_sum(negatives)
        vector = vector / vector.norm()
    return vector


@pytest.mark.parametrize("bos_token", ["<s>", None])
def test_cheap_embed_matches_hand_sum(tmp_path, bos_token):
    spec = TinyModelSpec(bos_token=bos_token)
    base = make_model(tmp_path / "base", spec)
    experts = [make_model(tmp_path / f"e{i}", spec, mlp_seed=i) for i in range(2)]
    prompts = [["solve the equation", "numbers and algebra"], ["def add(a, b)", "python code"]]
    negatives = [["python code"], None]
    config = write_config(tmp_path / "m.yml", base, experts, "cheap_embed", prompts, negatives)

    tensors = read_tensors(merge(config, tmp_path / "out"))
    expected = [
        expected_cheap_embed(base, prompts[0], negatives[0]),
        expected_cheap_embed(base, prompts[1]),
    ]

    for layer in range(2):
        weights = gate(tensors, layer)
        assert torch.allclose(weights[0], expected[0], atol=1e-6)
        assert torch.allclose(weights[1], expected[1], atol=1e-6)


def test_cheap_embed_bos_changes_vector(tmp_path):
    with_bos = make_model(tmp_path / "bos", TinyModelSpec(bos_token="<s>"))
    tokenizer = AutoTokenizer.from_pretrained(with_bos)
    with_bos_vector = expected_cheap_embed(with_bos, ["hello"])
    table = read_tensors(with_bos)["model.embed_tokens.weight"].float()
    text_only = table[tokenizer("hello", add_special_tokens=False)["input_ids"]].sum(dim=0)

    # A guard on the hand computation above: it must include the BOS row.
    assert tokenizer.bos_token_id is not None
    assert not torch.allclose(with_bos_vector, text_only / text_only.norm())


def test_empty_prompt_uses_bos_alone(tmp_path):
    base = make_model(tmp_path / "base", TinyModelSpec(bos_token="<s>"))
    experts = [make_model(tmp_path / f"e{i}", TinyModelSpec(bos_token="<s>"), mlp_seed=i) for i in range(2)]
    config = write_config(tmp_path / "m.yml", base, experts, "cheap_embed", [[""], ["python code"]])

    tensors = read_tensors(merge(config, tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    bos_row = read_tensors(base)["model.embed_tokens.weight"][tokenizer.bos_token_id].float()

    assert torch.allclose(gate(tensors, 0)[0], bos_row / bos_row.norm(), atol=1e-6)


def test_empty_prompt_without_bos_rejected(tmp_path):
    spec = TinyModelSpec(bos_token=None)
    base = make_model(tmp_path / "base", spec)
    experts = [make_model(tmp_path / f"e{i}", spec, mlp_seed=i) for i in range(2)]
    config = write_config(tmp_path / "m.yml", base, experts, "cheap_embed", [["python"], [""]])

    with pytest.raises(UserError) as caught:
        merge(config, tmp_path / "out")

    assert "expert 1" in str(caught.value)
    assert "no BOS token" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_token_beyond_embedding_rejected(tmp_path):
    # A tokenizer with 128 tokens over an embedding of 100 rows, as when
    # tokens are added to a tokenizer without resizing the model.
    base = make_model(tmp_path / "base", TinyModelSpec(vocab_size=128))
    small = make_model(tmp_path / "small", TinyModelSpec(vocab_size=100))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small / name).write_bytes((base / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(small)
    high_token = tokenizer.convert_ids_to_tokens(120)
    prompt = tokenizer.convert_tokens_to_string([high_token])
    assert 120 in tokenizer(prompt, add_special_tokens=False)["input_ids"]
    experts = [make_model(tmp_path / f"e{i}", TinyModelSpec(vocab_size=100), mlp_seed=i) for i in range(2)]
    config = write_config(tmp_path / "m.yml", small, experts, "cheap_embed", [[prompt], ["the"]])

    with pytest.raises(UserError) as caught:
        merge(config, tmp_path / "out")

    assert "beyond the 100 rows" in str(caught.value)
    assert "id 120" in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_cheap_embed_same_negatives_rejected(tmp_path, tiny_llama, tiny_experts):
    prompts = [["python code", "numbers"], ["hello"], ["solve the equation"]]
    negatives = [["python code", "numbers"], None, None]
    config = write_config(tmp_path / "m.yml", tiny_llama, tiny_experts, "cheap_embed", prompts, negatives)

    with pytest.raises(UserError) as caught:
        merge(config, tmp_path / "out")

    assert "expert 0 (line " in str(caught.value)
    assert "router vector is zero" in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
