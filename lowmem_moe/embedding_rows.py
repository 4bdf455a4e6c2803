"""Read single rows of an embedding matrix straight from a safetensors file."""

import os
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .dtypes import ITEM_SIZES, TORCH_DTYPES
from .errors import SourceError


class EmbeddingRows:
    """Random access to rows of a (vocab, hidden) tensor without loading the table."""

    def __init__(self, checkpoint: Checkpoint, tensor_name: str):
        location = checkpoint.locate(tensor_name)
        entry = location.entry
        if len(entry.shape) != 2 or entry.dtype not in TORCH_DTYPES:
            raise SourceError(
                f"{location.path}: tensor {tensor_name!r} must be a 2-D float tensor, "
                f"got dtype {entry.dtype} and shape {list(entry.shape)}."
            )
        self.path = location.path
        self.tensor_name = tensor_name
        self.num_rows, self.hidden_size = entry.shape
        self._dtype = TORCH_DTYPES[entry.dtype]
        self._offset = entry.offset
        self._row_bytes = self.hidden_size * ITEM_SIZES[entry.dtype]
        self._buffer = bytearray(self._row_bytes)
        self._descriptor = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._descriptor)

    def __enter__(self) -> "EmbeddingRows":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def row(self, token_id: int) -> torch.Tensor:
        """Return one row as a float32 tensor of shape (hidden,)."""
        if not 0 <= token_id < self.num_rows:
            raise SourceError(
                f"{self.path}: token id {token_id} is outside the {self.num_rows} rows of {self.tensor_name!r}."
            )
        view = memoryview(self._buffer)
        filled = 0
        while filled < self._row_bytes:
            count = os.preadv(self._descriptor, [view[filled:]], self._offset + token_id * self._row_bytes + filled)
            if count == 0:
                raise SourceError(f"{self.path}: file ended while reading row {token_id} of {self.tensor_name!r}.")
            filled += count
        return torch.frombuffer(self._buffer, dtype=self._dtype).to(torch.float32, copy=True)
