"""Streamed linear weights and packed prompts give the states of fully loaded layers and prompts run alone."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from lowmem_moe.checkpoint import Checkpoint
from lowmem_moe.gates.prompt_packs import pack_prompts
from lowmem_moe.gates.state_store import StateStore
from lowmem_moe.layer_stream import LayerStream
from lowmem_moe.plan import Segment, Transform
from lowmem_moe.safetensors_header import read_header
from lowmem_moe.streamed_linear import BlockBuffers, StreamedLinear
from model_factory import TinyModelSpec, make_model

MODEL_CASES = {
    "llama": TinyModelSpec(model_type="llama"),
    "qwen2_bias": TinyModelSpec(model_type="qwen2"),
    "mistral_window": TinyModelSpec(model_type="mistral", extra_config={"sliding_window": 4}),
    "qwen3_norms": TinyModelSpec(model_type="qwen3", extra_config={"head_dim": 16}),
}
# 1,000 bytes hold 3 float32 rows of 64 inputs, so every weight of the tiny
# models spans many blocks, and 64 output rows end in a partial block.
SMALL_BLOCK_BYTES = 1000
# Prompt lengths of a pack: longer and shorter than the sliding window of 4, and a single token.
PACK_LENGTHS = [7, 1, 12, 3, 5]


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


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_packed_prompts_match_alone(tmp_path, case):
    folder = make_model(tmp_path / "model", MODEL_CASES[case])
    with LayerStream(Checkpoint.open(folder)) as stream:
        prompts = random_states(PACK_LENGTHS, stream.config.hidden_size)
        layer = stream.load_layer(0)
        alone = [stream.forward_layer(layer, 0, states) for states in prompts]
        packed = stream.forward_layer(layer, 0, torch.cat(prompts), PACK_LENGTHS)

    for length, expected, actual in zip(PACK_LENGTHS, alone, packed.split(PACK_LENGTHS)):
        assert actual.shape == (length, 64)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_packed_prompts_see_window(tmp_path):
    # Without the window inside each prompt, the sliding-window model would
    # give the states of the plain causal mask.
    folder = make_model(tmp_path / "model", MODEL_CASES["mistral_window"])
    with LayerStream(Checkpoint.open(folder)) as stream:
        prompts = random_states(PACK_LENGTHS, stream.config.hidden_size)
        layer = stream.load_layer(0)
        packed = stream.forward_layer(layer, 0, torch.cat(prompts), PACK_LENGTHS)
        stream.config.sliding_window = None
        unwindowed = stream.forward_layer(layer, 0, torch.cat(prompts), PACK_LENGTHS)

    for length, windowed, plain in zip(PACK_LENGTHS, packed.split(PACK_LENGTHS), unwindowed.split(PACK_LENGTHS)):
        if length <= 4:
            torch.testing.assert_close(windowed, plain, rtol=0, atol=0)
        else:
            assert (windowed[4:] - plain[4:]).abs().max() > 1e-3


def test_packed_lengths_must_add_up(tmp_path):
    folder = make_model(tmp_path / "model", TinyModelSpec())
    with LayerStream(Checkpoint.open(folder)) as stream:
        layer = stream.load_layer(0)
        with pytest.raises(ValueError, match="do not add up"):
            stream.forward_layer(layer, 0, torch.zeros(5, 64), [2, 2])


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


def test_streamed_linear_row_over_block(tmp_path):
    # A row larger than the shared buffers is read into a buffer of its own.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 6, generator=generator)
    path = tmp_path / "weights.safetensors"
    save_file({"w": weight}, path)
    entry = read_header(path).tensors["w"]
    segments = [Segment(path, entry.offset, entry.nbytes, "F32", Transform(out_dtype="F32"))]
    buffers = BlockBuffers(torch.float32, block_bytes=8)  # a row is 24 bytes
    linear = StreamedLinear(6, 3, segments, "F32", buffers, bias=False, weight_name="w")
    inputs = torch.randn(4, 6, generator=generator)

    actual = linear(inputs)

    assert linear.block_rows == 1
    torch.testing.assert_close(actual, F.linear(inputs, weight), rtol=1e-6, atol=1e-6)


def test_pack_prompts_bounded():
    lengths = [5, 30, 1, 12, 8, 8, 19, 2, 40, 3]

    packs = pack_prompts(lengths, 20)

    assert sorted(index for pack in packs for index in pack) == list(range(len(lengths)))
    assert all(pack == sorted(pack) for pack in packs)
    for pack in packs:
        total = sum(lengths[index] for index in pack)
        assert total <= 20 or len(pack) == 1
    assert [1] in packs  # 30 tokens, alone
    assert [8] in packs  # 40 tokens, alone
    # The 58 tokens of the other prompts need at least 3 packs of 20, and
    # best-fit decreasing uses no more.
    assert len(packs) == 5


def test_state_store_packs_round_trip(tmp_path):
    lengths = [3, 1, 4]
    prompts = random_states(lengths, 8)
    with StateStore(tmp_path, lengths, 8, torch.float32) as store:
        for slot, states in enumerate(prompts):
            store.write(slot, states)
        packed = store.read_pack([2, 0])
        store.write_pack([2, 0], packed * 2)

        assert torch.equal(packed, torch.cat([prompts[2], prompts[0]]))
        assert torch.equal(store.read(0), prompts[0] * 2)
        assert torch.equal(store.read(1), prompts[1])
        assert torch.equal(store.read(2), prompts[2] * 2)
