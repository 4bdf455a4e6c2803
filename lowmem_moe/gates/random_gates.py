"""Router weights that do not depend on prompts."""

import math

import torch


def random_router_weights(num_layers: int, num_experts: int, hidden_size: int, seed: int) -> torch.Tensor:
    """Return standard-normal router weights of shape (layers, experts, hidden), as mergekit-moe's ``random`` mode."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_layers, num_experts, hidden_size), generator=generator, dtype=torch.float32)


def uniform_random_router_weights(num_layers: int, num_experts: int, hidden_size: int, seed: int) -> torch.Tensor:
    """Return router weights drawn like torch.nn.Linear's default initialisation.

    nn.Linear draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with fan_in the
    hidden size here, which is what mergekit-moe's ``uniform_random`` matches.
    """
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden_size)
    weights = torch.empty((num_layers, num_experts, hidden_size), dtype=torch.float32)
    return weights.uniform_(-bound, bound, generator=generator)
