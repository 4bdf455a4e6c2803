"""The hidden gate modes: router vectors from the base model's hidden states, one layer at a time."""

import logging
import threading
from pathlib import Path

import torch

from ..background import Cancelled
from ..config import ExpertConfig
from ..errors import UserError
from ..layer_stream import LayerStream
from .prompt_packs import pack_prompts
from .prompt_set import NEGATIVE, POSITIVE, PromptUse, expert_label
from .state_store import StateStore
from ..progress import progress_bar

logger = logging.getLogger(__name__)

# gate_mode values and whether each takes the last token (True) or the mean over tokens.
HIDDEN_MODES = {"hidden": True, "hidden_last": True, "hidden_avg": False}


def hidden_router_weights(
    experts: tuple[ExpertConfig, ...],
    prompts: list[PromptUse],
    stream: LayerStream,
    last_token: bool,
    scratch_folder: Path,
    cancel: threading.Event | None = None,
) -> torch.Tensor:
    """Return float32 router weights of shape (layers, experts, hidden).

    The vector of layer i is the hidden state entering decoder layer i,
    which is index i of transformers' ``output_hidden_states``: the last
    token's state, or the mean over the prompt's tokens. Several prompts
    share each forward call, but each starts at position 0 and attends only
    to its own tokens, without padding, as if it ran alone. An expert's
    vector is the mean over its positive prompts minus the mean over its
    negative prompts, L2-normalised per layer, as mergekit-moe computes it.
    Once ``cancel`` is set, the pass raises Cancelled before its next pack.
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
    # Every forward call reads the layer's linear weights again, so prompts
    # run in as few packs as the memory budget allows.
    packs = pack_prompts(lengths, stream.pack_tokens)
    with StateStore(scratch_folder, lengths, hidden_size, stream.compute_dtype) as store:
        for slot, prompt in enumerate(prompts):
            store.write(slot, stream.embed(prompt.token_ids))

        for layer_index in progress_bar(range(num_layers), desc="Gate pass", unit="layer"):
            # The last layer's output is never used: no router reads it.
            layer = stream.load_layer(layer_index) if layer_index < num_layers - 1 else None
            try:
                for pack in packs:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("the gate pass was stopped")
                    pack_lengths = [lengths[slot] for slot in pack]
                    states = store.read_pack(pack)  # (pack tokens, hidden)
                    for slot, prompt_states in zip(pack, states.split(pack_lengths)):
                        vector = prompt_states[-1] if last_token else prompt_states.mean(dim=0, dtype=torch.float32)
                        for expert_index, sign in prompts[slot].uses:
                            sums[layer_index, expert_index, sign] += vector.double()
                    if layer is not None:
                        store.write_pack(pack, stream.forward_layer(layer, layer_index, states, pack_lengths))
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
