"""Parse and validate the header of one safetensors file without reading tensor data.

The format is an 8-byte little-endian header length N, then N bytes of JSON
that give each tensor's dtype, shape and ``data_offsets`` relative to the
start of the data section, then the data section itself.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import ITEM_SIZES
from .errors import SourceError

# The reference implementation rejects headers above 100 MB, and so do we, so
# that a corrupt length field cannot make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, located by absolute byte offset."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    data_start: int  # bytes from the start of the file to the data section
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Checks that every tensor's byte range lies inside the file, that no two
    ranges overlap and that each range's length equals dtype size times
    element count.

    Raises:
        SourceError: the file is missing, truncated or inconsistent. The
            message names the file and, where one is at fault, the tensor.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path}: file is {file_size} bytes, too short for a safetensors header.")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
                raise SourceError(
                    f"{path}: header length {header_size} is invalid for a file of {file_size} bytes. "
                    "The file is truncated or not a safetensors file."
                )
            raw_header = handle.read(header_size)
    except OSError as error:
        raise SourceError(f"{path}: cannot read safetensors file: {error.strerror or error}.") from error

    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and integers above Python's
        # digit limit. RecursionError covers deeply nested arrays.
        raise SourceError(f"{path}: header is not valid UTF-8 JSON ({error}).") from error
    if not isinstance(header, dict):
        raise SourceError(f"{path}: header must be a JSON object, got {type(header).__name__}.")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise SourceError(f"{path}: __metadata__ must be a JSON object of strings.")

    data_start = 8 + header_size
    data_size = file_size - data_start
    tensors = {name: _parse_entry(path, name, fields, data_start, data_size) for name, fields in header.items()}
    _check_no_overlap(path, tensors.values())
    return SafetensorsHeader(path=path, data_start=data_start, metadata=metadata, tensors=tensors)


def _parse_entry(path: Path, name: str, fields: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(fields, dict):
        raise SourceError(f"{where}: header entry must be a JSON object.")

    dtype = fields.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise SourceError(f"{where}: unknown dtype {dtype!r}.")

    shape = fields.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(f"{where}: shape must be a list of non-negative integers, got {shape!r}.")

    offsets = fields.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SourceError(f"{where}: data_offsets must be two integers, got {offsets!r}.")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise SourceError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data section of {data_size} bytes. "
            "The file is truncated or damaged; download or copy it again."
        )

    # Python integers do not overflow, so a huge shape shows up as a size
    # mismatch here rather than as a wrapped-around small number.
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if end - begin != expected:
        raise SourceError(
            f"{where}: data is {end - begin} bytes, but dtype {dtype} and shape {shape} need {expected}."
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=end - begin)


def _check_no_overlap(path: Path, entries) -> None:
    previous = None
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: e.offset):
        if previous is not None and entry.offset < previous.offset + previous.nbytes:
            raise SourceError(
                f"{path}: tensors {previous.name!r} and {entry.name!r} overlap in the data section."
            )
        previous = entry
