"""Execute a MergePlan: stream every tensor from its sources into the output shards."""

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from .chunk_transform import transform_chunk
from .dtypes import ITEM_SIZES
from .errors import SourceError
from .plan import GateSource, MergePlan, PlannedTensor, Segment, Transform
from .shard_writer import ShardWriter
from .progress import progress_bar

logger = logging.getLogger(__name__)


class SourceFiles:
    """Read-only handles on source files, opened on first use and closed together."""

    def __init__(self, stack: ExitStack):
        self._stack = stack
        self._descriptors: dict[Path, int] = {}

    def read_into(self, path: Path, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes of ``path`` starting at ``offset``."""
        descriptor = self._descriptor(path)
        filled = 0
        while filled < len(buffer):
            count = os.preadv(descriptor, [buffer[filled:]], offset + filled)
            if count == 0:
                raise SourceError(f"{path}: file ended at byte {offset + filled}. It changed or was truncated after its header was read.")
            filled += count

    def prefetch(self, path: Path, offset: int, count: int) -> None:
        """Ask the kernel to start reading these bytes into the page cache, without waiting for them."""
        if count > 0:
            os.posix_fadvise(self._descriptor(path), offset, count, os.POSIX_FADV_WILLNEED)

    def descriptor(self, path: Path) -> int:
        """Return a read-only descriptor of ``path``, opening it on first use."""
        return self._descriptor(path)

    def _descriptor(self, path: Path) -> int:
        if path not in self._descriptors:
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise SourceError(f"Cannot open {path}: {error.strerror}.") from error
            self._stack.callback(os.close, descriptor)
            # Each source range is read once, front to back.
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._descriptors[path] = descriptor
        return self._descriptors[path]


def write_shards(
    plan: MergePlan,
    folder: Path,
    router_weights: Callable[[], dict[str, torch.Tensor]],
    between_tensors: Callable[[], None] = lambda: None,
) -> list[Path]:
    """Write every shard of the plan into ``folder`` and return their paths.

    ``router_weights`` returns a dict that maps each GateSource router name
    to float32 weights of shape (layers, experts, hidden). It is called when
    the first router is written, so it may wait for a gate pass that runs
    meanwhile. ``between_tensors`` is called before each tensor, and may
    raise to stop the merge, for example with the error of a background
    step. A failure removes the shard in progress; shards finished before
    it stay.
    """
    # The one reusable read buffer of the copy phase; see memory_budget.
    buffer = bytearray(plan.chunk_size)
    written = []
    progress = progress_bar(total=plan.bytes_written, unit="B", unit_scale=True, desc="Writing shards")
    with ExitStack() as stack, progress:
        sources = SourceFiles(stack)
        for shard in plan.shards:
            writer = ShardWriter(folder, shard)
            try:
                writer.begin()
                for tensor in shard.tensors:
                    between_tensors()
                    _write_tensor(writer, tensor, sources, buffer, router_weights, progress)
                    writer.end_tensor()
                written.append(writer.finish())
            except BaseException:
                writer.abort()
                raise
            logger.debug("Wrote %s", writer.final_path)
    return written


def output_chunks(
    tensor: PlannedTensor, sources: SourceFiles, buffer: bytearray, router_weights: dict[str, torch.Tensor]
) -> Iterator[memoryview]:
    """Yield the output bytes of ``tensor`` in order, as the merge writes them.

    Source bytes are read into ``buffer``, so a chunk is valid only until the
    next one is requested. A chunk of a segment contains at most ``len(buffer)``
    source bytes, which a dtype conversion may widen, and a router is yielded
    as one chunk of (experts, hidden) values.
    """
    source = tensor.source
    if isinstance(source, GateSource):
        yield _router_bytes(tensor, source, router_weights)
        return
    for segment in source.segments:
        yield from _segment_chunks(segment, sources, buffer)


def _write_tensor(writer: ShardWriter, tensor: PlannedTensor, sources: SourceFiles, buffer: bytearray, router_weights, progress) -> None:
    source = tensor.source
    if isinstance(source, GateSource):
        chunk = _router_bytes(tensor, source, router_weights())
        writer.write(chunk)
        progress.update(len(chunk))
        return

    for segment in source.segments:
        if segment.transform.is_copy_of(segment.dtype):
            _copy_segment(writer, segment, sources, buffer, progress)
        else:
            for chunk in _segment_chunks(segment, sources, buffer):
                writer.write(chunk)
                progress.update(len(chunk))


def _router_bytes(tensor: PlannedTensor, source: GateSource, router_weights: dict[str, torch.Tensor]) -> memoryview:
    rows = router_weights[source.router][source.layer].to(torch.float32).contiguous()  # (experts, hidden)
    raw = memoryview(rows.view(torch.uint8).numpy()).cast("B")
    return transform_chunk(raw, "F32", Transform(out_dtype=tensor.dtype), 0)


def _copy_segment(writer: ShardWriter, segment: Segment, sources: SourceFiles, buffer: bytearray, progress) -> None:
    # Unchanged bytes go through copy_file_range in steps of one chunk, so
    # that progress and page cache writeback advance steadily.
    descriptor = sources.descriptor(segment.path)
    position = 0
    while position < segment.nbytes:
        count = min(len(buffer), segment.nbytes - position)
        # The next chunk is read from disk while this one is written.
        sources.prefetch(segment.path, segment.offset + position + count, min(count, segment.nbytes - position - count))
        writer.copy_from(descriptor, segment.path, segment.offset + position, count, buffer)
        progress.update(count)
        position += count


def _segment_chunks(segment: Segment, sources: SourceFiles, buffer: bytearray) -> Iterator[memoryview]:
    # A segment whose transform is a copy yields views of ``buffer`` itself.
    item_size = ITEM_SIZES[segment.dtype]
    # Chunks hold whole elements so that each converts on its own.
    chunk_capacity = max(item_size, len(buffer) // item_size * item_size)
    first_element = 0
    position = 0
    while position < segment.nbytes:
        count = min(chunk_capacity, segment.nbytes - position)
        view = memoryview(buffer)[:count]
        # The next chunk is read from disk while this one is converted and written.
        sources.prefetch(segment.path, segment.offset + position + count, min(count, segment.nbytes - position - count))
        sources.read_into(segment.path, segment.offset + position, view)
        yield transform_chunk(view, segment.dtype, segment.transform, first_element)
        first_element += count // item_size
        position += count
