"""Per-prompt hidden states kept in a scratch file between decoder layers.

All prompts must pass through layer i before layer i + 1 is loaded, so every
prompt's states must be kept somewhere in between. A file on disk keeps
memory flat however many prompts there are: only the states of one pack of
prompts are in memory at a time.
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
        return self.read_pack([slot])

    def read_pack(self, slots: list[int]) -> torch.Tensor:
        """Return the states of several prompts one after another, shape (total tokens, hidden)."""
        total = sum(self._lengths[slot] for slot in slots)
        states = torch.empty(total, self.hidden_size, dtype=self.dtype)
        data = memoryview(states.view(torch.uint8).numpy()).cast("B")
        start = 0
        for slot in slots:
            size = self._lengths[slot] * self._row_bytes
            self._read_into(slot, data[start : start + size])
            start += size
        return states

    def write_pack(self, slots: list[int], states: torch.Tensor) -> None:
        """Store the states of several prompts that follow each other in ``states``, as read_pack returns them."""
        lengths = [self._lengths[slot] for slot in slots]
        if states.shape[0] != sum(lengths):
            raise ValueError(f"slots {slots} have {sum(lengths)} tokens, got states of shape {tuple(states.shape)}")
        for slot, prompt_states in zip(slots, states.split(lengths)):
            self.write(slot, prompt_states)

    def _read_into(self, slot: int, target: memoryview) -> None:
        filled = 0
        while filled < len(target):
            count = os.preadv(self._descriptor, [target[filled:]], self._offsets[slot] + filled)
            if count == 0:
                raise OSError(f"state scratch file ended early at slot {slot}")
            filled += count
