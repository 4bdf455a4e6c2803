"""Streamed linear weights give the states of fully loaded layers."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from lowmem_moe.checkpoint import Checkpoint
from lowmem_moe.layer_stream import LayerStream
from lowmem_moe.plan import Segment, Transform
from lowmem_moe.safetensors_header import read_header
from lowmem_moe.streamed_linear import BlockBuffers, StreamedLinear
from model_factory import TinyModelSpec, make_model

MODEL_CASES = {
    "llama": TinyModelSpec(model_type="llama"),
    "qwen2_bias": TinyModelSpec(model_type="qwen2"),
}
# 1,000 bytes hold 3 float32 rows of 64 inputs, so every weight of the tiny
# models spans many blocks, and 64 output rows end in a partial block.
SMALL_BLOCK_BYTES = 1000


def random_states(lengths: list[int], hidden_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(length, hidden_size, generator=generator) for length in lengths]


@pytest.mark.parametrize("case", ["llama", "qwen2_bias"])
def test_streamed_layer_matches_loaded(tmp_path, case):
    folder = make_model(tmp_path / "model", MODEL_CASES[case])
    full_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    with LayerStream(Checkpoint.open(folder), weight_block_bytes=SMALL_BLOCK_BYTES) as stream:
        (states,) = random_states([9], stream.config.hidden_size)
        for index in range(stream.num_layers):
            layer = stream.load_layer(index)
            streamed = [module for module in layer.modules() if isinstance(module, StreamedLinear)]
            loaded = full_model.model.layers[index]
            expected = stream.forward_layer(loaded, index, states)
            actual = stream.forward_layer(layer, index, states)

            assert len(streamed) == 7
            assert not any(type(module) is nn.Linear for module in layer.modules())
            assert all(module.block_rows < module.out_features for module in streamed)
            assert (case == "qwen2_bias") == (layer.self_attn.q_proj.bias is not None)
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_streamed_linear_spans_segments(tmp_path):
    # A weight stored as two tensors, read as one, as fused expert
    # parameters are, with blocks that cross from one tensor to the next.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 6, generator=generator).to(torch.bfloat16)
    path = tmp_path / "weights.safetensors"
    save_file({"a": weight[:7].clone(), "b": weight[7:].clone()}, path)
    entries = read_header(path).tensors
    segments = [
        Segment(path, entries[name].offset, entries[name].nbytes, "BF16", Transform(out_dtype="BF16")) for name in "ab"
    ]
    buffers = BlockBuffers(torch.float32, block_bytes=4 * 6 * 4)  # 4 rows per block
    linear = StreamedLinear(6, 10, segments, "BF16", buffers, bias=True, weight_name="w")
    with torch.no_grad():
        linear.bias.copy_(torch.arange(10, dtype=torch.float32))
    inputs = torch.randn(2, 3, 6, generator=generator)

    expected = F.linear(inputs, weight.float(), linear.bias)
    actual = linear(inputs)

    assert linear.block_rows == 4
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
