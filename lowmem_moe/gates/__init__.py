"""The gate pass: router weights for every layer, computed before any shard is written."""

import logging

import torch

from ..config import MergeConfig
from ..embedding_rows import EmbeddingRows
from ..sources import MergeSources
from .cheap_embed import cheap_embed_router_weights
from .prompt_tokens import load_tokenizer
from .random_gates import random_router_weights, uniform_random_router_weights

logger = logging.getLogger(__name__)

EMBEDDING_TENSOR = "model.embed_tokens.weight"


def compute_router_weights(config: MergeConfig, sources: MergeSources, seed: int) -> torch.Tensor:
    """Return float32 router weights of shape (layers, experts, hidden) for the config's gate mode."""
    base = sources.base.config
    shape = (base.num_hidden_layers, len(config.experts), base.hidden_size)
    logger.info("Computing router weights with gate_mode %s", config.gate_mode)

    if config.gate_mode == "random":
        return random_router_weights(*shape, seed=seed)
    if config.gate_mode == "uniform_random":
        return uniform_random_router_weights(*shape, seed=seed)
    if config.gate_mode == "cheap_embed":
        tokenizer = load_tokenizer(sources.base.folder)
        with EmbeddingRows(sources.base, EMBEDDING_TENSOR) as embeddings:
            return cheap_embed_router_weights(config.experts, tokenizer, embeddings, base.num_hidden_layers)
    # Config loading rejects the hidden modes until the layer-by-layer pass exists.
    raise NotImplementedError(f"gate_mode {config.gate_mode!r}")
