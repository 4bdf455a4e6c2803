"""Write one output safetensors shard: header first, then tensor data in order.

The shard is written under a temporary name and renamed only when complete,
so a file with the final name is always a whole shard.
"""

import enum
import errno
import os
from pathlib import Path

from .byte_copy import copy_range
from .errors import DiskFullError, OutputError, SourceError
from .plan import PlannedShard, PlannedTensor
from .shard_format import shard_header_bytes
from .writeback import Writeback

PARTIAL_SUFFIX = ".partial"


class ShardState(enum.Enum):
    NEW = "new"
    WRITING = "writing"  # header written, tensor data in progress
    COMPLETE = "complete"
    ABORTED = "aborted"


class ShardWriter:
    """Writes the planned bytes of one shard and refuses out-of-order use.

    Call ``begin``, then ``write`` the data of each tensor in plan order,
    calling ``end_tensor`` after each, then ``finish``. ``abort`` removes the
    partial file.
    """

    def __init__(self, folder: Path, shard: PlannedShard):
        self.shard = shard
        self.final_path = Path(folder) / shard.file_name
        self.partial_path = self.final_path.with_name(shard.file_name + PARTIAL_SUFFIX)
        self.state = ShardState.NEW
        self._file = None
        self._header_size = 0
        self._tensor_index = 0
        self._tensor_written = 0  # bytes of the current tensor written so far
        self._file_written = 0  # bytes of the file written so far, header included
        # Keeps a 200 GB merge from filling memory with written pages. See writeback.py.
        self._writeback = None

    @property
    def current_tensor(self) -> PlannedTensor:
        self._expect(ShardState.WRITING, "current_tensor")
        if self._tensor_index >= len(self.shard.tensors):
            raise RuntimeError(f"{self.shard.file_name}: every tensor is already written")
        return self.shard.tensors[self._tensor_index]

    def begin(self) -> None:
        """Create the partial file and write the complete header."""
        self._expect(ShardState.NEW, "begin")
        header = shard_header_bytes(self.shard)
        try:
            self._file = open(self.partial_path, "wb", buffering=0)
            _write_all(self._file, memoryview(header))
        except OSError as error:
            self._close_quietly()
            raise _output_error(self.partial_path, error) from error
        self._header_size = len(header)
        self._file_written = len(header)
        self._writeback = Writeback(self._file.fileno())
        self.state = ShardState.WRITING

    def write(self, data: memoryview) -> None:
        """Append bytes of the current tensor."""
        self._check_room(len(data))
        try:
            _write_all(self._file, data)
        except OSError as error:
            raise _output_error(self.partial_path, error) from error
        self._advance(len(data))

    def copy_from(self, source: int, source_path: Path, offset: int, count: int, buffer: bytearray) -> None:
        """Append ``count`` bytes of the open file ``source`` from ``offset`` to the current tensor.

        The kernel copies the bytes where the filesystems allow it, so they
        need not pass through Python. ``buffer`` serves the fallback copy.
        """
        self._check_room(count)
        try:
            copy_range(source, offset, self._file.fileno(), count, buffer)
        except EOFError as error:
            raise SourceError(f"{source_path}: file is shorter than its header states, so it is truncated ({error}).") from error
        except OSError as error:
            raise _output_error(self.partial_path, error) from error
        self._advance(count)

    def end_tensor(self) -> None:
        """Check that the current tensor got exactly its planned bytes and move to the next."""
        tensor = self.current_tensor
        if self._tensor_written != tensor.nbytes:
            raise RuntimeError(
                f"{self.shard.file_name}: tensor {tensor.name!r} got {self._tensor_written} of {tensor.nbytes} bytes"
            )
        self._tensor_index += 1
        self._tensor_written = 0

    def finish(self) -> Path:
        """Flush the file to disk and rename it to its final name."""
        self._expect(ShardState.WRITING, "finish")
        if self._tensor_index != len(self.shard.tensors):
            raise RuntimeError(
                f"{self.shard.file_name}: finish called after {self._tensor_index} of {len(self.shard.tensors)} tensors"
            )
        expected_size = self._header_size + self.shard.data_size
        try:
            os.fsync(self._file.fileno())
            size = os.fstat(self._file.fileno()).st_size
            self._file.close()
            if size != expected_size:
                raise RuntimeError(f"{self.partial_path}: file is {size} bytes, planned {expected_size}")
            os.replace(self.partial_path, self.final_path)
        except OSError as error:
            raise _output_error(self.partial_path, error) from error
        self.state = ShardState.COMPLETE
        return self.final_path

    def abort(self) -> None:
        """Close and delete the partial file. Safe to call in any state."""
        if self.state is ShardState.COMPLETE:
            return
        self._close_quietly()
        try:
            self.partial_path.unlink()
        except FileNotFoundError:
            pass
        self.state = ShardState.ABORTED

    def _check_room(self, count: int) -> None:
        tensor = self.current_tensor
        if self._tensor_written + count > tensor.nbytes:
            raise RuntimeError(
                f"{self.shard.file_name}: tensor {tensor.name!r} would get more than its {tensor.nbytes} bytes"
            )

    def _advance(self, count: int) -> None:
        self._tensor_written += count
        self._file_written += count
        try:
            self._writeback.advance(self._file_written)
        except OSError as error:
            raise _output_error(self.partial_path, error) from error

    def _expect(self, state: ShardState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{self.shard.file_name}: {action} called in state {self.state.value}, expected {state.value}")

    def _close_quietly(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


def _write_all(file, data: memoryview) -> None:
    # FileIO.write may write fewer bytes than given, for example on signals.
    view = data.cast("B") if data.format != "B" else data
    while len(view):
        written = file.write(view)
        view = view[written:]


def _output_error(path: Path, error: OSError) -> OutputError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"Cannot write {path}: {error.strerror}.")
    return OutputError(f"Cannot write {path}: {error.strerror or error}.")


def shard_is_complete(folder: Path, shard: PlannedShard) -> bool:
    """Return whether ``folder`` contains this shard under its final name, with the planned size and header.

    A shard gets its final name only after it was written in full and
    flushed, so this check is what a resumed merge relies on to skip it.
    """
    path = Path(folder) / shard.file_name
    header = shard_header_bytes(shard)
    try:
        if path.stat().st_size != len(header) + shard.data_size:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(header)) == header
    except OSError:
        return False
