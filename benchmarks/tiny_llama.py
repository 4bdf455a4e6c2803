"""Tiny real Llama checkpoints written with transformers, for checks that need a loadable model."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .llama_tokenizer import write_llama_tokenizer


@dataclass(frozen=True)
class TinyLlamaShape:
    """Dimensions of a tiny Llama model. The vocabulary is the tokenizer's, at most ``max_vocab_size``."""

    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_vocab_size: int = 320


def write_tiny_llama(folder: Path, shape: TinyLlamaShape, seed: int) -> Path:
    """Save a float32 LlamaForCausalLM with random weights and its tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_llama_tokenizer(folder, shape.max_vocab_size)
    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
