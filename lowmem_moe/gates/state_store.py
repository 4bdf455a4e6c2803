"""Per-prompt hidden states kept in a scratch file between decoder layers.

All prompts must pass through layer i before layer i + 1 is loaded, so every
prompt's states must be kept somewhere in between. A file on disk keeps
memory flat however many prompts there are: only one prompt's states are
in memory at a time.
"""

import os
import tempfile
from pathlib import Path

import torch


class StateStore:
    """Fixed slots of (tokens, hidden) tensors in an unlinked scratch file."""

    def __init__(self, folder: Path, lengths: list[int], hidden_size: int, dtype: torch.dtype):
        self.hidden_size = hidden_size
        self.dtype = dtype
        item_size = torch.empty(0, dtype=dtype).element_size()
        self._row_bytes = hidden_size * item_size
        self._offsets = []
        offset = 0
        for length in lengths:
            self._offsets.append(offset)
            offset += length * self._row_bytes
        self._lengths = lengths
        self.size = offset

        # Unlinked at once, so the file vanishes with the process even if it
        # is killed, and nothing is left next to the output.
        descriptor, name = tempfile.mkstemp(prefix=".lowmem-moe-states-", dir=folder)
        os.unlink(name)
        self._descriptor = descriptor

    def close(self) -> None:
        os.close(self._descriptor)

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write(self, slot: int, states: torch.Tensor) -> None:
        """Store the (tokens, hidden) states of one prompt."""
        expected = (self._lengths[slot], self.hidden_size)
        if tuple(states.shape) != expected:
            raise ValueError(f"slot {slot} has shape {expected}, got {tuple(states.shape)}")
        data = memoryview(states.to(self.dtype).contiguous().view(torch.uint8).numpy()).cast("B")
        written = 0
        while written < len(data):
            written += os.pwrite(self._descriptor, data[written:], self._offsets[slot] + written)

    def read(self, slot: int) -> torch.Tensor:
        """Return the (tokens, hidden) states of one prompt."""
        size = self._lengths[slot] * self._row_bytes
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            count = os.preadv(self._descriptor, [view[filled:]], self._offsets[slot] + filled)
            if count == 0:
                raise OSError(f"state scratch file ended early at slot {slot}")
            filled += count
        return torch.frombuffer(buffer, dtype=self.dtype).view(self._lengths[slot], self.hidden_size)
