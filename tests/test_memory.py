"""Peak memory of a merge stays bounded by the chunk size, not by the size of the tensors."""

import json
import sys
from pathlib import Path

import pytest

from lowmem_moe.memory_budget import (
    LayerShape,
    MemoryBudget,
    cheap_embed_bytes,
    hidden_pass_bytes,
    pack_token_limit,
    router_bytes,
)
from model_factory import make_tokenizer
from peak_memory import peak_rss

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


# A decoder layer of this shape has 111 M parameters, 424 MiB in float32,
# the gate pass's compute dtype. The pass's bound, two 16 MiB weight blocks
# and one pack's activations with heap slack, is 224 MiB, so holding the
# layer whole breaks it.
STREAM_SHAPE = ModelShape(
    hidden_size=2048,
    intermediate_size=16384,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=4096,
    num_hidden_layers=3,
    dtype="BF16",
)
STREAM_WORDS = ["numbers", "python", "equation", "code", "hello", "function", "algebra", "thank", "you", "loop"]

# The gate pass's libraries: the merge's imports and tokenizer, plus
# transformers' Llama code and torch's first matrix product, which the pass
# loads when it starts, whatever the model's size.
GATE_BASELINE_SCRIPT = BASELINE_SCRIPT + """
import transformers.models.llama.modeling_llama
torch.nn.functional.linear(torch.ones(4, 64), torch.ones(64, 64))
"""

# The hidden gate pass alone, as a merge runs it.
GATE_PASS_SCRIPT = """
import sys
from pathlib import Path
from lowmem_moe.config import load_merge_config
from lowmem_moe.gates import compute_router_weights
from lowmem_moe.sources import open_sources
config = load_merge_config(sys.argv[1])
compute_router_weights(config, open_sources(config), seed=0, scratch_folder=Path(sys.argv[2]))
"""


def stream_layer_parameters(shape: ModelShape) -> tuple[int, int]:
    """Return a layer's linear weight parameters and its other (norm) parameters."""
    kv = shape.num_key_value_heads * shape.head_dim
    linear = 2 * shape.hidden_size**2 + 2 * kv * shape.hidden_size + 3 * shape.hidden_size * shape.intermediate_size
    return linear, 2 * shape.hidden_size


def stream_prompt(index: int) -> str:
    # Distinct prompts of 3 to 12 words.
    return " ".join(STREAM_WORDS[(index * 7 + k * 3) % len(STREAM_WORDS)] for k in range(3 + index % 10)) + f" {index}"


def test_hidden_gate_pass_streams_weights(tmp_path):
    base = write_synthetic_model(tmp_path / "base", STREAM_SHAPE, seed=0)
    tokenizer = make_tokenizer(base, vocab_size=128, bos_token="<s>")
    prompts = [stream_prompt(index) for index in range(40)]
    lines = ["base_model: base", "gate_mode: hidden", "experts:"]
    for expert in range(2):
        lines += ["  - source_model: base", "    positive_prompts:"]
        lines += [f"      - \"{prompt}\"" for prompt in prompts[expert::2]]
    config = tmp_path / "merge.yml"
    config.write_text("\n".join(lines) + "\n")

    baseline = peak_rss([sys.executable, "-c", GATE_BASELINE_SCRIPT, str(base)])
    gate_peak = peak_rss([sys.executable, "-c", GATE_PASS_SCRIPT, str(config), str(tmp_path)])

    layer_shape = LayerShape(
        STREAM_SHAPE.hidden_size, STREAM_SHAPE.intermediate_size, STREAM_SHAPE.num_attention_heads, STREAM_SHAPE.head_dim
    )
    token_counts = [1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]
    linear_parameters, norm_parameters = stream_layer_parameters(STREAM_SHAPE)
    one_layer = 4 * (linear_parameters + norm_parameters)  # float32 bytes
    working_memory = hidden_pass_bytes(layer_shape, norm_parameters, 4, max(token_counts))

    # The prompts fill more than one pack, so the bound covers a full pack,
    # and a pass that held one layer whole would break the bound.
    assert sum(token_counts) > pack_token_limit(layer_shape)
    assert working_memory + MARGIN_BYTES < one_layer
    assert gate_peak - baseline < working_memory + MARGIN_BYTES, (
        f"the gate pass added {(gate_peak - baseline) / 2**20:.0f} MiB to the libraries' "
        f"{baseline / 2**20:.0f} MiB, bound {(working_memory + MARGIN_BYTES) / 2**20:.0f} MiB"
    )
