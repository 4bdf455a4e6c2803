"""The routes command: router choices of a merged model, checked against transformers' own router logits."""

import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowmem_moe.routing_report import format_routes, route_prompts
from merge_helpers import merge, merge_yaml

PROMPTS = ["solve the equation x plus two", "def add(a, b): return a + b", "hello"]


def reference_shares(folder, prompt):
    """Top-k pick shares per layer from a full-model forward with output_router_logits."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # per layer (tokens, experts)
    shares = []
    for layer_logits in logits:
        chosen = layer_logits[1:].topk(model.config.num_experts_per_tok, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=model.config.num_local_experts).float()
        shares.append(counts / counts.sum())
    return torch.stack(shares)


def test_routes_match_full_model(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts, experts_per_token=2)
    out = merge(config, tmp_path / "out")

    routes = route_prompts(out, PROMPTS)

    for route, prompt in zip(routes, PROMPTS):
        assert route.prompt == prompt
        assert torch.equal(route.shares, reference_shares(out, prompt))
    assert torch.allclose(routes[0].shares.sum(dim=-1), torch.ones(2))


def test_routes_command_prints_table(tmp_path, tiny_llama, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, tiny_experts, experts_per_token=1)
    out = merge(config, tmp_path / "out")

    result = subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", "routes", str(out), *PROMPTS, "--layers"], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == format_routes(route_prompts(out, PROMPTS), per_layer=True) + "\n"
    assert "expert 2" in result.stdout
    assert result.stdout.count("all ") == len(PROMPTS)


def test_routes_rejects_dense_model(tmp_path, tiny_llama):
    result = subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", "routes", str(tiny_llama), "hello"], capture_output=True, text=True
    )

    assert result.returncode == 1
    assert "not a MoE config" in result.stderr
    assert "Traceback" not in result.stderr
