"""The gate pass: router weights for every layer, computed before any shard is written."""

import logging
import threading
from pathlib import Path

import torch

from ..config import ExpertConfig, MergeConfig
from ..sources import MergeSources
from .diagnostics import warn_similar_experts
from .random_gates import random_router_weights, uniform_random_router_weights

# The modes that read prompts import transformers inside the functions below.
# A merge with random gates does not need it and skips its import, which
# took about 0.9 s on the benchmark machine.

logger = logging.getLogger(__name__)

EMBEDDING_TENSOR = "model.embed_tokens.weight"
# Above this estimate of one prompt's attention scores, the merge warns.
ATTENTION_WARNING_BYTES = 1024**3


def check_prompts(config: MergeConfig, sources: MergeSources) -> None:
    """Tokenize every prompt and raise UserError for prompts the gate pass cannot use.

    A merge calls this before it writes anything, so that an empty prompt
    without a BOS token, or a token without an embedding row, fails fast.
    """
    if config.gate_mode in ("random", "uniform_random"):
        return
    from .prompt_set import collect_prompts
    from .prompt_tokens import load_tokenizer

    tokenizer = load_tokenizer(sources.base.folder)
    num_rows = sources.base.locate(EMBEDDING_TENSOR).entry.shape[0]
    max_tokens = _max_prompt_tokens(config, sources)
    prompts = collect_prompts(config.experts + config.shared_experts, tokenizer, num_rows, max_tokens)
    longest = max((len(prompt.token_ids) for prompt in prompts), default=0)
    heads = sources.base.config.raw.get("num_attention_heads", 1)
    # The eager attention of one prompt keeps (heads, tokens, tokens) float32 scores.
    attention_bytes = 4 * heads * longest**2
    if max_tokens is not None and attention_bytes > ATTENTION_WARNING_BYTES:
        logger.warning(
            "The longest prompt has %d tokens; the gate pass will need about %.1f GB for its attention scores "
            "alone. Shorter prompts need far less memory.",
            longest,
            attention_bytes / 1e9,
        )


def _max_prompt_tokens(config: MergeConfig, sources: MergeSources) -> int | None:
    from .hidden_states import HIDDEN_MODES

    # cheap_embed reads one embedding row at a time, so only the hidden
    # modes, which run the model, are bounded by its positions.
    if config.gate_mode not in HIDDEN_MODES:
        return None
    value = sources.base.config.raw.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def compute_router_weights(
    config: MergeConfig,
    sources: MergeSources,
    seed: int,
    scratch_folder: Path,
    compute_dtype: torch.dtype = torch.float32,
    cancel: threading.Event | None = None,
) -> dict[str, torch.Tensor]:
    """Return float32 router weights of shape (layers, experts, hidden) for the config's gate mode.

    The result maps "experts" to the routed experts' router and, when the
    config has shared experts, "shared_expert" to their gates, both computed
    in one pass. ``scratch_folder`` receives an unlinked temporary file for
    the hidden modes' per-prompt states. ``compute_dtype`` is the dtype in
    which those modes run the base model's layers. Once ``cancel`` is set,
    the hidden modes raise Cancelled before their next forward call.
    """
    experts = config.experts + config.shared_experts
    weights = _router_weights(config, experts, sources, seed, scratch_folder, compute_dtype, cancel)

    routed = weights[:, : len(config.experts)]
    warn_similar_experts(routed, config.experts)
    result = {"experts": routed}
    if config.shared_experts:
        result["shared_expert"] = weights[:, len(config.experts) :]
    return result


def _router_weights(
    config: MergeConfig,
    experts: tuple[ExpertConfig, ...],
    sources: MergeSources,
    seed: int,
    scratch_folder: Path,
    compute_dtype: torch.dtype,
    cancel: threading.Event | None,
) -> torch.Tensor:
    base = sources.base.config
    shape = (base.num_hidden_layers, len(experts), base.hidden_size)
    logger.info("Computing router weights with gate_mode %s", config.gate_mode)

    if config.gate_mode == "random":
        return random_router_weights(*shape, seed=seed)
    if config.gate_mode == "uniform_random":
        return uniform_random_router_weights(*shape, seed=seed)

    from ..embedding_rows import EmbeddingRows
    from ..layer_stream import LayerStream
    from .cheap_embed import cheap_embed_router_weights
    from .hidden_states import HIDDEN_MODES, hidden_router_weights
    from .prompt_set import collect_prompts
    from .prompt_tokens import load_tokenizer

    tokenizer = load_tokenizer(sources.base.folder)
    if config.gate_mode == "cheap_embed":
        with EmbeddingRows(sources.base, EMBEDDING_TENSOR) as embeddings:
            collect_prompts(experts, tokenizer, embeddings.num_rows)
            return cheap_embed_router_weights(experts, tokenizer, embeddings, base.num_hidden_layers)
    if config.gate_mode in HIDDEN_MODES:
        with LayerStream(sources.base, compute_dtype) as stream:
            prompts = collect_prompts(experts, tokenizer, stream.embeddings.num_rows, _max_prompt_tokens(config, sources))
            logger.info("Running %d distinct prompts through %d layers", len(prompts), stream.num_layers)
            last_token = HIDDEN_MODES[config.gate_mode]
            return hidden_router_weights(experts, prompts, stream, last_token, scratch_folder, cancel)
    raise ValueError(f"unknown gate_mode {config.gate_mode!r}")
