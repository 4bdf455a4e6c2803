"""Read byte ranges of a tensor whose data is the concatenation of segments of source files."""

import os
from pathlib import Path

from .errors import SourceError
from .plan import Segment


class SegmentReader:
    """Random access to the bytes of one tensor, addressed from the start of its first segment.

    A tensor usually has one segment. A fused expert parameter has one per
    expert, and a read may then span several of them.
    """

    def __init__(self, segments: list[Segment] | tuple[Segment, ...], tensor_name: str):
        self.segments = tuple(segments)
        self.tensor_name = tensor_name
        self.nbytes = sum(segment.nbytes for segment in self.segments)
        self._descriptors: dict[Path, int] = {}

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()

    def __enter__(self) -> "SegmentReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read_into(self, start: int, target: memoryview) -> None:
        """Fill ``target`` with the tensor's bytes from byte ``start`` on.

        Raises:
            SourceError: a source file ends before the bytes that its header lists.
        """
        if start < 0 or start + len(target) > self.nbytes:
            raise ValueError(f"bytes {start}..{start + len(target)} are outside the {self.nbytes} bytes of {self.tensor_name!r}")
        filled = 0
        segment_start = 0
        for segment in self.segments:
            segment_stop = segment_start + segment.nbytes
            position = start + filled
            if filled < len(target) and position < segment_stop:
                count = min(len(target) - filled, segment_stop - position)
                self._pread(segment, position - segment_start, target[filled : filled + count])
                filled += count
            segment_start = segment_stop

    def _pread(self, segment: Segment, offset: int, target: memoryview) -> None:
        descriptor = self._descriptors.get(segment.path)
        if descriptor is None:
            descriptor = os.open(segment.path, os.O_RDONLY)
            self._descriptors[segment.path] = descriptor
        filled = 0
        while filled < len(target):
            count = os.preadv(descriptor, [target[filled:]], segment.offset + offset + filled)
            if count == 0:
                raise SourceError(f"{segment.path}: file ended early while reading tensor {self.tensor_name!r}.")
            filled += count
