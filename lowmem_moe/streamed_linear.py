"""A linear layer that reads its weight from the checkpoint, in blocks of output rows, on every call.

The projection weights are nearly all of a decoder layer: 2.2 GB in float32
for a Yi-34B layer. This module stores only the byte ranges of its weight,
so its memory is one block of rows, whatever the size of the weight. The
cost is that every forward call reads the weight again, from the page cache
once the file has been read.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import ITEM_SIZES, TORCH_DTYPES
from .memory_budget import WEIGHT_BLOCK_BYTES
from .plan import Segment
from .segment_reader import SegmentReader


class BlockBuffers:
    """The read buffer and the converted weight block that the StreamedLinear modules of one stream share.

    They are allocated once, because allocating and freeing 16 MiB blocks on
    every call let glibc's heap grow by about 90 MiB beyond the blocks in a
    loop of such calls (torch 2.13, Linux x86-64). Only one block is in use
    at a time.
    """

    def __init__(self, compute_dtype: torch.dtype, block_bytes: int = WEIGHT_BLOCK_BYTES):
        self.compute_dtype = compute_dtype
        self.block_bytes = block_bytes
        self.compute_item_size = torch.empty(0, dtype=compute_dtype).element_size()
        # torch.empty leaves pages untouched, so a stream that never runs a
        # layer does not pay for them.
        self.raw = torch.empty(block_bytes, dtype=torch.uint8)  # source bytes of one block
        self.converted = torch.empty(block_bytes // self.compute_item_size, dtype=compute_dtype)
        self._raw_view = memoryview(self.raw.numpy()).cast("B")

    def block_rows(self, in_features: int, source_dtype: str) -> int:
        """Return how many weight rows of ``in_features`` fit both buffers, at least 1."""
        row_bytes = in_features * max(ITEM_SIZES[source_dtype], self.compute_item_size)
        return max(1, self.block_bytes // row_bytes)

    def read_block(self, reader: SegmentReader, start_row: int, rows: int, in_features: int, source_dtype: str) -> torch.Tensor:
        """Return rows ``start_row`` onwards of a weight, shape (rows, in_features), in the compute dtype.

        The result is a view of the shared buffers, valid until the next call.
        """
        row_bytes = in_features * ITEM_SIZES[source_dtype]
        nbytes = rows * row_bytes
        if nbytes > self.block_bytes:
            # A single row larger than a block.
            raw = torch.empty(nbytes, dtype=torch.uint8)
            reader.read_into(start_row * row_bytes, memoryview(raw.numpy()).cast("B"))
            return raw.view(TORCH_DTYPES[source_dtype]).view(rows, in_features).to(self.compute_dtype)
        reader.read_into(start_row * row_bytes, self._raw_view[:nbytes])
        source = self.raw[:nbytes].view(TORCH_DTYPES[source_dtype]).view(rows, in_features)
        if source.dtype == self.compute_dtype:
            return source
        converted = self.converted[: rows * in_features].view(rows, in_features)
        converted.copy_(source)
        return converted


class StreamedLinear(nn.Module):
    """``nn.Linear`` whose weight stays in the checkpoint and is applied one block of output rows at a time.

    The weight of shape (out_features, in_features) is read from
    ``segments``, stored in ``source_dtype`` (a safetensors code), and
    converted block by block in ``buffers``. The bias, when present, is an
    ordinary parameter in the compute dtype that the caller fills.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        segments: list[Segment],
        source_dtype: str,
        buffers: BlockBuffers,
        bias: bool,
        weight_name: str,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.segments = tuple(segments)
        self.source_dtype = source_dtype
        self.buffers = buffers
        self.weight_name = weight_name  # the checkpoint tensor, for error messages
        self.block_rows = min(out_features, buffers.block_rows(in_features, source_dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=buffers.compute_dtype))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_rows={self.block_rows}"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # (..., in_features) -> (..., out_features), filled block by block.
        output = input.new_empty(*input.shape[:-1], self.out_features)
        for start, block in self.weight_blocks():
            stop = start + block.shape[0]
            bias = None if self.bias is None else self.bias[start:stop]
            output[..., start:stop] = F.linear(input, block, bias)
        return output

    def weight_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, block) pairs that cover the weight, each block of shape (rows, in_features).

        Blocks are in the compute dtype and share the stream's buffers, so
        each is valid only until the next one is yielded.
        """
        with SegmentReader(self.segments, self.weight_name) as reader:
            for start in range(0, self.out_features, self.block_rows):
                rows = min(self.block_rows, self.out_features - start)
                yield start, self.buffers.read_block(reader, start, rows, self.in_features, self.source_dtype)
