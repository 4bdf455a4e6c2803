"""Write one output safetensors shard: header first, then tensor data in order.

The shard is written under a temporary name and renamed only when complete,
so a file with the final name is always a whole shard.
"""

import enum
import os
from pathlib import Path

from .errors import OutputError
from .plan import PlannedShard, PlannedTensor
from .shard_format import shard_header_bytes

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
        self.state = ShardState.WRITING

    def write(self, data: memoryview) -> None:
        """Append bytes of the current tensor."""
        tensor = self.current_tensor
        if self._tensor_written + len(data) > tensor.nbytes:
            raise RuntimeError(
                f"{self.shard.file_name}: tensor {tensor.name!r} would get more than its {tensor.nbytes} bytes"
            )
        try:
            _write_all(self._file, data)
        except OSError as error:
            raise _output_error(self.partial_path, error) from error
        self._tensor_written += len(data)

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
    return OutputError(f"Cannot write {path}: {error.strerror or error}.")
