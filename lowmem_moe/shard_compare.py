"""Compare one output shard file with its planned shard: file size, header bytes and every tensor's data."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import OutputError
from .plan import PlannedShard
from .plan_executor import SourceFiles, output_chunks
from .shard_format import shard_header_bytes

# Bytes compared per numpy call. It bounds the temporary bool array that
# locating the first differing byte allocates.
COMPARE_BLOCK_BYTES = 1024**2
# Bytes of header text shown on each side of a header difference.
HEADER_CONTEXT_BYTES = 24


@dataclass(frozen=True)
class Mismatch:
    """The first difference between an output folder and the plan rebuilt from its record."""

    file_name: str
    message: str  # the whole description, file name included
    tensor: str | None = None
    tensor_offset: int | None = None  # bytes from the start of the tensor's data
    file_offset: int | None = None  # bytes from the start of the shard file
    expected_byte: int | None = None
    found_byte: int | None = None


def compare_shard_layout(path: Path, shard: PlannedShard) -> Mismatch | None:
    """Return the first difference in the file size or header bytes of a shard, or None when both match the plan."""
    header = shard_header_bytes(shard)
    expected_size = len(header) + shard.data_size
    size = path.stat().st_size
    if size != expected_size:
        problem = "truncated" if size < expected_size else "longer than planned"
        return Mismatch(
            shard.file_name,
            f"{shard.file_name}: file is {size:,} bytes, but the plan has {expected_size:,} "
            f"({len(header):,} of header and {shard.data_size:,} of tensor data), so it is {problem}.",
        )

    found = _read_head(path, len(header))  # the size check above guarantees the whole header is there
    index = _first_difference(memoryview(header), memoryview(found))
    if index is None:
        return None
    start = max(0, index - HEADER_CONTEXT_BYTES)
    end = index + HEADER_CONTEXT_BYTES
    return Mismatch(
        shard.file_name,
        f"{shard.file_name}: the safetensors header differs from the plan at byte {index}: "
        f"expected {header[start:end]!r}, found {found[start:end]!r}.",
        file_offset=index,
        expected_byte=header[index],
        found_byte=found[index],
    )


def compare_shard_data(
    path: Path,
    shard: PlannedShard,
    sources: SourceFiles,
    buffer: bytearray,
    router_weights: dict[str, torch.Tensor],
    progress: tqdm,
) -> Mismatch | None:
    """Stream every tensor of a shard from its sources and return the first byte that differs in the file.

    The file must already have the planned size and header
    (compare_shard_layout). Expected bytes come from ``output_chunks``, the
    same code path the merge writes with, and the file is read in pieces of
    at most ``len(buffer)`` bytes.

    Raises:
        OutputError: the file cannot be read, or it got shorter during the check.
    """
    header_size = len(shard_header_bytes(shard))
    found = bytearray(len(buffer))  # the output bytes of one piece
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise OutputError(f"Cannot open {path}: {error.strerror}.") from error
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for tensor in shard.tensors:
            position = 0  # bytes of the tensor compared so far
            for chunk in output_chunks(tensor, sources, buffer, router_weights):
                for start in range(0, len(chunk), len(found)):
                    expected = chunk[start : start + len(found)]
                    file_offset = header_size + tensor.data_offset + position
                    piece = memoryview(found)[: len(expected)]
                    _read_output(descriptor, path, file_offset, piece)

                    index = _first_difference(expected, piece)
                    if index is not None:
                        return _data_mismatch(shard, tensor.name, position + index, file_offset + index, expected, piece, index)
                    position += len(expected)
                    progress.update(len(expected))
            if position != tensor.nbytes:
                raise RuntimeError(f"{tensor.name}: the sources yielded {position} bytes, the plan has {tensor.nbytes}")
    finally:
        os.close(descriptor)
    return None


def _data_mismatch(
    shard: PlannedShard,
    tensor_name: str,
    tensor_offset: int,
    file_offset: int,
    expected: memoryview,
    found: memoryview,
    index: int,
) -> Mismatch:
    return Mismatch(
        shard.file_name,
        f"{shard.file_name}: tensor {tensor_name} differs at byte {tensor_offset:,} of its data "
        f"(byte {file_offset:,} of the file): expected 0x{expected[index]:02x}, found 0x{found[index]:02x}.",
        tensor=tensor_name,
        tensor_offset=tensor_offset,
        file_offset=file_offset,
        expected_byte=expected[index],
        found_byte=found[index],
    )


def _read_head(path: Path, count: int) -> bytes:
    with open(path, "rb") as file:
        return file.read(count)


def _read_output(descriptor: int, path: Path, offset: int, view: memoryview) -> None:
    filled = 0
    while filled < len(view):
        try:
            count = os.preadv(descriptor, [view[filled:]], offset + filled)
        except OSError as error:
            raise OutputError(f"Reading {path} failed at byte {offset + filled}: {error.strerror}.") from error
        if count == 0:
            raise OutputError(f"{path}: file ended at byte {offset + filled}. It changed while it was being verified.")
        filled += count


def _first_difference(expected: memoryview, found: memoryview) -> int | None:
    """Return the index of the first byte where the two views differ, or None when they are equal."""
    for start in range(0, len(expected), COMPARE_BLOCK_BYTES):
        left = np.frombuffer(expected[start : start + COMPARE_BLOCK_BYTES], dtype=np.uint8)
        right = np.frombuffer(found[start : start + COMPARE_BLOCK_BYTES], dtype=np.uint8)
        if not np.array_equal(left, right):
            return start + int(np.flatnonzero(left != right)[0])
    return None
