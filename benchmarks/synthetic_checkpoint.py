"""Write synthetic Llama checkpoints with real model shapes, in bounded memory.

Tensor data is random and written straight into a safetensors file chunk by
chunk, so a 4 GB checkpoint needs a few MB of memory to generate.
"""

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_moe.shard_format import HEADER_ALIGNMENT

logger = logging.getLogger(__name__)

GENERATION_CHUNK_ELEMENTS = 1 << 22  # elements drawn per step; 16 MiB of float32


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a Llama-family decoder. The default is Yi-34B's."""

    hidden_size: int = 7168
    intermediate_size: int = 20480
    num_attention_heads: int = 56
    num_key_value_heads: int = 8
    vocab_size: int = 64000
    num_hidden_layers: int = 2
    dtype: str = "BF16"  # safetensors code: BF16 or F32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def llama_tensor_shapes(shape: ModelShape, mlp_only: bool = False) -> dict[str, tuple[int, ...]]:
    """Return every tensor name and shape of a Llama checkpoint with untied embeddings."""
    hidden, inter = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * shape.head_dim
    tensors: dict[str, tuple[int, ...]] = {}
    if not mlp_only:
        tensors["model.embed_tokens.weight"] = (shape.vocab_size, hidden)
    for layer in range(shape.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        if not mlp_only:
            tensors[prefix + "input_layernorm.weight"] = (hidden,)
            tensors[prefix + "post_attention_layernorm.weight"] = (hidden,)
            tensors[prefix + "self_attn.q_proj.weight"] = (hidden, hidden)
            tensors[prefix + "self_attn.k_proj.weight"] = (kv, hidden)
            tensors[prefix + "self_attn.v_proj.weight"] = (kv, hidden)
            tensors[prefix + "self_attn.o_proj.weight"] = (hidden, hidden)
        tensors[prefix + "mlp.gate_proj.weight"] = (inter, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = (inter, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = (hidden, inter)
    if not mlp_only:
        tensors["model.norm.weight"] = (hidden,)
        tensors["lm_head.weight"] = (shape.vocab_size, hidden)
    return tensors


def llama_config(shape: ModelShape) -> dict:
    """Return a transformers-style config.json for the shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "vocab_size": shape.vocab_size,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": {"BF16": "bfloat16", "F32": "float32"}[shape.dtype],
    }


def write_random_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str, seed: int) -> int:
    """Write a safetensors file of normal random values with standard deviation 0.02 and return its size."""
    item_size = {"BF16": 2, "F32": 4}[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor_shape in tensors.items():
        nbytes = math.prod(tensor_shape) * item_size
        header[name] = {"dtype": dtype, "shape": list(tensor_shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % HEADER_ALIGNMENT)

    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        handle.write(len(body).to_bytes(8, "little") + body)
        for tensor_shape in tensors.values():
            remaining = math.prod(tensor_shape)
            while remaining:
                count = min(remaining, GENERATION_CHUNK_ELEMENTS)
                values = rng.standard_normal(count, dtype=np.float32) * np.float32(0.02)
                if dtype == "BF16":
                    # bfloat16 is the high half of float32, truncated here.
                    values = (values.view(np.uint32) >> 16).astype(np.uint16)
                handle.write(values.tobytes())
                remaining -= count
    return 8 + len(body) + offset


def write_synthetic_model(folder: Path, shape: ModelShape, seed: int, mlp_only: bool = False) -> Path:
    """Write config.json and model.safetensors for one synthetic model and return the folder.

    ``mlp_only`` leaves out everything but the MLP weights, which is all that
    a merge reads from an expert that is not the base.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
    size = write_random_safetensors(folder / "model.safetensors", llama_tensor_shapes(shape, mlp_only), shape.dtype, seed)
    logger.info("Wrote %s (%.2f GB)", folder, size / 1e9)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic base model and experts with real model shapes.")
    parser.add_argument("folder", type=Path, help="folder that receives base/ and expert0/ ... expertN/")
    parser.add_argument("--experts", type=int, default=4, help="number of expert models (default: 4)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    parser.add_argument("--hidden-size", type=int, default=ModelShape.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=ModelShape.intermediate_size)
    parser.add_argument("--heads", type=int, default=ModelShape.num_attention_heads)
    parser.add_argument("--kv-heads", type=int, default=ModelShape.num_key_value_heads)
    parser.add_argument("--vocab-size", type=int, default=ModelShape.vocab_size)
    parser.add_argument("--dtype", choices=("BF16", "F32"), default="BF16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    shape = ModelShape(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        num_hidden_layers=args.layers,
        dtype=args.dtype,
    )
    write_synthetic_model(args.folder / "base", shape, seed=0)
    for index in range(args.experts):
        write_synthetic_model(args.folder / f"expert{index}", shape, seed=1 + index)


if __name__ == "__main__":
    main()
