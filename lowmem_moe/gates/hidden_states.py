"""The hidden gate modes: router vectors from the base model's hidden states, one layer at a time."""

import logging
from pathlib import Path

import torch

from ..config import ExpertConfig
from ..errors import UserError
from ..layer_stream import LayerStream
from ..memory_budget import STATE_BATCH_BYTES
from .prompt_set import NEGATIVE, POSITIVE, PromptUse, expert_label
from .state_store import StateStore
from ..progress import progress_bar

logger = logging.getLogger(__name__)

# gate_mode values and whether each takes the last token (True) or the mean over tokens.
HIDDEN_MODES = {"hidden": True, "hidden_last": True, "hidden_avg": False}


def length_batches(lengths: list[int], row_bytes: int, max_batch_bytes: int) -> list[list[int]]:
    """Group prompt indices into batches of equal token count, each at most ``max_batch_bytes`` of states.

    Prompts of equal length run together without padding, so batching does
    not change their states. A prompt longer than the limit gets a batch of
    its own.
    """
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)

    batches = []
    for length, indices in sorted(by_length.items()):
        per_batch = max(1, max_batch_bytes // (length * row_bytes))
        batches += [indices[start : start + per_batch] for start in range(0, len(indices), per_batch)]
    return batches


def hidden_router_weights(
    experts: tuple[ExpertConfig, ...],
    prompts: list[PromptUse],
    stream: LayerStream,
    last_token: bool,
    scratch_folder: Path,
) -> torch.Tensor:
    """Return float32 router weights of shape (layers, experts, hidden).

    The vector of layer i is the hidden state entering decoder layer i,
    which is index i of transformers' ``output_hidden_states``: the last
    token's state, or the mean over the prompt's tokens. Each prompt runs
    alone, without padding, from position 0. An expert's vector is the mean
    over its positive prompts minus the mean over its negative prompts,
    L2-normalised per layer, as mergekit-moe computes it.
    """
    num_layers = stream.num_layers
    hidden_size = stream.config.hidden_size
    # (layers, experts, sign, hidden) sums of prompt vectors, and (experts, sign) counts.
    sums = torch.zeros(num_layers, len(experts), 2, hidden_size, dtype=torch.float64)
    counts = torch.zeros(len(experts), 2, dtype=torch.float64)
    for prompt in prompts:
        for expert_index, sign in prompt.uses:
            counts[expert_index, sign] += 1

    lengths = [len(prompt.token_ids) for prompt in prompts]
    item_size = torch.empty(0, dtype=stream.compute_dtype).element_size()
    batches = length_batches(lengths, hidden_size * item_size, STATE_BATCH_BYTES)
    with StateStore(scratch_folder, lengths, hidden_size, stream.compute_dtype) as store:
        for slot, prompt in enumerate(prompts):
            store.write(slot, stream.embed(prompt.token_ids))

        for layer_index in progress_bar(range(num_layers), desc="Gate pass", unit="layer"):
            # The last layer's output is never used: no router reads it.
            layer = stream.load_layer(layer_index) if layer_index < num_layers - 1 else None
            try:
                for batch in batches:
                    states = torch.stack([store.read(slot) for slot in batch])  # (prompts, tokens, hidden)
                    vectors = states[:, -1] if last_token else states.mean(dim=1, dtype=torch.float32)
                    for row, slot in enumerate(batch):
                        for expert_index, sign in prompts[slot].uses:
                            sums[layer_index, expert_index, sign] += vectors[row].double()
                    if layer is not None:
                        outputs = stream.forward_layer(layer, layer_index, states)
                        for row, slot in enumerate(batch):
                            store.write(slot, outputs[row])
            finally:
                stream.free_layer(layer)

    means = sums / counts.clamp(min=1)[None, :, :, None]
    vectors = means[:, :, POSITIVE]
    has_negatives = counts[:, NEGATIVE] > 0
    vectors[:, has_negatives] -= means[:, has_negatives, NEGATIVE]
    vectors = vectors.float()
    norms = vectors.norm(dim=-1, keepdim=True)

    for expert_index, expert in enumerate(experts):
        if (norms[:, expert_index] < 1e-8).any():
            raise UserError(
                f"{expert_label(expert_index, expert)}: the router vector is zero, because its negative prompts "
                "give the same hidden states as its positive prompts. Change one of the two lists."
            )
    return vectors / norms
