"""Warnings about router weights that cannot tell experts apart."""

import logging

import torch

from ..config import ExpertConfig
from .prompt_set import expert_label

logger = logging.getLogger(__name__)

# mergekit-moe warns above this condition number of a layer's
# (experts, hidden) router matrix, and so do we.
CONDITION_NUMBER_LIMIT = 5.0


def warn_similar_experts(router_weights: torch.Tensor, experts: tuple[ExpertConfig, ...]) -> list[int]:
    """Log a warning naming the layers whose router vectors are nearly parallel, and return those layers.

    ``router_weights`` has shape (layers, experts, hidden). For each such
    layer the warning names the pair of experts with the most similar vectors.
    """
    if len(experts) < 2:
        return []
    flagged = []
    worst_pairs: dict[tuple[int, int], list[int]] = {}
    for layer in range(router_weights.shape[0]):
        matrix = router_weights[layer].double()  # (experts, hidden)
        if torch.linalg.cond(matrix).item() <= CONDITION_NUMBER_LIMIT:
            continue
        flagged.append(layer)
        unit = matrix / matrix.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)
        first, second = divmod(int(similarity.argmax()), len(experts))
        worst_pairs.setdefault((min(first, second), max(first, second)), []).append(layer)

    if flagged:
        pairs = "; ".join(
            f"{expert_label(a, experts[a])} and {expert_label(b, experts[b])} in layers {_ranges(layers)}"
            for (a, b), layers in worst_pairs.items()
        )
        logger.warning(
            "Router vectors are nearly parallel (condition number above %g) in layers %s, so routing will barely "
            "tell those experts apart. Most similar: %s. Make their prompts more distinct.",
            CONDITION_NUMBER_LIMIT,
            _ranges(flagged),
            pairs,
        )
    return flagged


def _ranges(numbers: list[int]) -> str:
    # [0, 1, 2, 5] -> "0-2, 5"
    parts = []
    start = previous = numbers[0]
    for number in numbers[1:] + [None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(parts)
