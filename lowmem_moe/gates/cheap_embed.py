"""The cheap_embed gate mode: router vectors from the base's token embeddings of the prompts."""

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..config import ExpertConfig
from ..embedding_rows import EmbeddingRows
from ..errors import SourceError, UserError
from .prompt_set import expert_label
from .prompt_tokens import prompt_token_ids

logger = logging.getLogger(__name__)

# Below this L2 norm a vector counts as zero, the same threshold as in hidden_states.py.
ZERO_NORM = 1e-8


def cheap_embed_router_weights(
    experts: Sequence[ExpertConfig], tokenizer: PreTrainedTokenizerBase, embeddings: EmbeddingRows, num_layers: int
) -> torch.Tensor:
    """Return router weights of shape (layers, experts, hidden), the same vector at every layer.

    As in mergekit-moe, an expert's vector is the L2-normalised sum of the
    embeddings of every token of its positive prompts. When it has negative
    prompts, their normalised sum is subtracted and the result normalised
    again. Only the embedding rows of prompt tokens are read.

    Raises:
        UserError: an expert's vector is zero, which would give it an
            all-zero router row. The message names the expert.
    """
    vectors = []
    for index, expert in enumerate(experts):
        label = expert_label(index, expert)
        vector = _normalised_sum(expert.positive_prompts, tokenizer, embeddings, label)
        if expert.negative_prompts:
            vector = vector - _normalised_sum(expert.negative_prompts, tokenizer, embeddings, label)
            if vector.norm() < ZERO_NORM:
                raise UserError(
                    f"{label}: the router vector is zero, because its negative prompts give the same embedding "
                    "sum as its positive prompts. Change one of the two lists."
                )
            vector = vector / vector.norm()
        vectors.append(vector)

    per_layer = torch.stack(vectors)  # (experts, hidden)
    return per_layer.unsqueeze(0).repeat(num_layers, 1, 1)  # (layers, experts, hidden)


def _normalised_sum(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, embeddings: EmbeddingRows, label: str
) -> torch.Tensor:
    total = torch.zeros(embeddings.hidden_size, dtype=torch.float64)  # float64 so long prompt lists sum exactly enough
    for prompt in prompts:
        # collect_prompts has checked that every prompt has tokens and that
        # each token has an embedding row.
        for token_id in prompt_token_ids(tokenizer, prompt):
            row = embeddings.row(token_id)
            if not torch.isfinite(row).all():
                raise SourceError(
                    f"{embeddings.path}: row {token_id} of {embeddings.tensor_name!r} contains NaN or Inf "
                    f"(token {tokenizer.convert_ids_to_tokens(token_id)!r} in a prompt of {label})."
                )
            total += row
    total = total.to(torch.float32)
    if total.norm() < ZERO_NORM:
        raise UserError(
            f"{label}: the router vector is zero, because the embedding rows of its prompts' tokens sum to zero. "
            "Use prompts with other tokens."
        )
    return total / total.norm()
