"""Per-chunk data transforms: dtype conversion, noise and residual scaling."""

import torch

from .dtypes import ITEM_SIZES, TORCH_DTYPES
from .memory_budget import NOISE_BLOCK_ELEMENTS
from .plan import Transform


def transform_chunk(raw: memoryview, source_dtype: str, transform: Transform, first_element: int) -> memoryview:
    """Return the output bytes for one chunk of source bytes.

    ``first_element`` is the index within the tensor of the chunk's first
    element, so that noise depends on element positions and not on chunk
    boundaries. The chunk must hold whole elements.
    """
    if transform.is_copy_of(source_dtype):
        return raw

    if not len(raw):
        return raw
    source = torch.frombuffer(raw, dtype=TORCH_DTYPES[source_dtype])
    needs_math = bool(transform.noise_scale) or transform.residual_scale not in (None, 1.0)
    if not needs_math:
        # torch's own rounding, so that output matches Tensor.to bit for bit.
        result = source.to(TORCH_DTYPES[transform.out_dtype])
        return _as_bytes(result)

    values = source.to(torch.float32, copy=True)  # (elements,)
    if transform.noise_scale:
        _add_noise(values, transform.noise_seed, transform.noise_scale, first_element)
    if transform.residual_scale not in (None, 1.0):
        values.mul_(transform.residual_scale)
    return _as_bytes(values.to(TORCH_DTYPES[transform.out_dtype]))


def _add_noise(values: torch.Tensor, seed: int, scale: float, first_element: int) -> None:
    # Noise for element k comes from block k // NOISE_BLOCK_ELEMENTS, and each
    # block has its own generator, so any chunking yields the same noise.
    generator = torch.Generator()
    block_noise = torch.empty(NOISE_BLOCK_ELEMENTS, dtype=torch.float32)
    position = 0
    while position < values.numel():
        element = first_element + position
        block, start = divmod(element, NOISE_BLOCK_ELEMENTS)
        count = min(NOISE_BLOCK_ELEMENTS - start, values.numel() - position)

        generator.manual_seed((seed + block * 0x9E3779B97F4A7C15) & ((1 << 63) - 1))
        torch.randn(NOISE_BLOCK_ELEMENTS, generator=generator, out=block_noise)
        values[position : position + count].add_(block_noise[start : start + count], alpha=scale)
        position += count


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def element_size(dtype: str) -> int:
    """Return bytes per element of a safetensors dtype code."""
    return ITEM_SIZES[dtype]
