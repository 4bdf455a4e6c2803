"""Peak memory of a merge stays bounded by the chunk size, not by the size of the tensors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_moe.memory_budget import MemoryBudget, cheap_embed_bytes, router_bytes
from model_factory import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_checkpoint import ModelShape, write_synthetic_model  # noqa: E402

# A float32 embedding of 70000 x 1152 is 322 MB, and so is lm_head: each is
# larger than 256 MB, so loading either whole would break the bound below.
SHAPE = ModelShape(
    hidden_size=1152,
    intermediate_size=2048,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=70000,
    num_hidden_layers=1,
    dtype="F32",
)
CHUNK_SIZE = 8 * 1024**2
# Slack for allocator fragmentation, the tokenizer and tqdm. It is a fraction
# of one large tensor, so it cannot hide a whole-tensor load.
MARGIN_BYTES = 64 * 1024**2

# ru_maxrss of the only child of a fresh interpreter is that child's peak,
# in KiB on Linux, and includes mapped file pages that were touched.
MEASURE = """
import resource, subprocess, sys
completed = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(completed.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.stderr.write(completed.stderr)
"""


def peak_rss(command: list[str]) -> int:
    completed = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    returncode, peak = completed.stdout.split()
    assert returncode == "0", completed.stderr
    return int(peak)


@pytest.fixture(scope="module")
def large_sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("large")
    base = write_synthetic_model(root / "base", SHAPE, seed=0)
    make_tokenizer(base, vocab_size=128, bos_token="<s>")
    for index in range(2):
        write_synthetic_model(root / f"expert{index}", SHAPE, seed=1 + index, mlp_only=True)
    (root / "merge.yml").write_text(
        "base_model: base\n"
        "gate_mode: cheap_embed\n"
        "dtype: bfloat16\n"
        "experts:\n"
        "  - source_model: expert0\n"
        "    positive_prompts: [\"solve the equation\"]\n"
        "    noise_scale: 0.01\n"
        "  - source_model: expert1\n"
        "    positive_prompts: [\"python code\"]\n"
        "    residual_scale: 0.5\n"
    )
    return root


# The interpreter baseline: the merge's imports, its tokenizer and torch's
# first dtype conversion, which together take about 60 MB beyond the imports.
BASELINE_SCRIPT = """
import sys
import torch
import lowmem_moe.cli, lowmem_moe.merge
from lowmem_moe.gates.prompt_tokens import load_tokenizer
load_tokenizer(sys.argv[1])
torch.zeros(16).to(torch.bfloat16)
"""


def test_merge_peak_rss_bounded(large_sources, tmp_path):
    baseline = peak_rss([sys.executable, "-c", BASELINE_SCRIPT, str(large_sources / "base")])
    merge_peak = peak_rss(
        [
            sys.executable, "-m", "lowmem_moe.cli", "merge", str(large_sources / "merge.yml"), str(tmp_path / "out"),
            "--chunk-size", str(CHUNK_SIZE),
        ]
    )
    budget = MemoryBudget(
        chunk_size=CHUNK_SIZE,
        router_bytes=router_bytes(SHAPE.num_hidden_layers, 2, SHAPE.hidden_size),
        gate_pass_bytes=cheap_embed_bytes(2, SHAPE.hidden_size, CHUNK_SIZE),
    )
    bound = baseline + budget.total_bytes + MARGIN_BYTES
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    largest_output_tensor = SHAPE.vocab_size * SHAPE.hidden_size * 2  # bfloat16 bytes

    assert index["metadata"]["total_size"] > 2 * largest_output_tensor
    assert largest_output_tensor > 128 * 1024**2
    assert merge_peak < bound, f"peak {merge_peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


# A float32 decoder layer of this shape has 44 M parameters, 176 MB, and the
# whole model about 1.2 GB, so holding two layers passes and holding the
# model fails.
GATE_SHAPE = ModelShape(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    num_hidden_layers=4,
    dtype="F32",
)


def layer_bytes(shape: ModelShape) -> int:
    kv = shape.num_key_value_heads * shape.head_dim
    parameters = 2 * shape.hidden_size**2 + 2 * kv * shape.hidden_size + 3 * shape.hidden_size * shape.intermediate_size
    return 4 * parameters


def test_hidden_gate_pass_holds_one_layer(tmp_path):
    base = write_synthetic_model(tmp_path / "base", GATE_SHAPE, seed=0)
    make_tokenizer(base, vocab_size=128, bos_token="<s>")
    experts = [write_synthetic_model(tmp_path / f"e{i}", GATE_SHAPE, seed=1 + i, mlp_only=True) for i in range(2)]
    config = tmp_path / "merge.yml"
    config.write_text(
        "base_model: base\ngate_mode: hidden\nexperts:\n"
        f"  - source_model: {experts[0].name}\n    positive_prompts: [\"solve the equation\", \"numbers\"]\n"
        f"  - source_model: {experts[1].name}\n    positive_prompts: [\"python code\"]\n"
    )

    baseline = peak_rss([sys.executable, "-c", BASELINE_SCRIPT, str(base)])
    merge_peak = peak_rss(
        [sys.executable, "-m", "lowmem_moe.cli", "merge", str(config), str(tmp_path / "out"), "--chunk-size", str(CHUNK_SIZE)]
    )
    one_layer = layer_bytes(GATE_SHAPE)
    bound = baseline + 2 * one_layer + MARGIN_BYTES
    model_bytes = (base / "model.safetensors").stat().st_size

    # Loading the whole base model would break the bound.
    assert model_bytes > 2 * one_layer + MARGIN_BYTES
    assert merge_peak < bound, f"peak {merge_peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
