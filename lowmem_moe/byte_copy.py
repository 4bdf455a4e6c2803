"""Copy byte ranges between files in the kernel where possible, through a buffer otherwise."""

import errno
import logging
import os

logger = logging.getLogger(__name__)

# Errors with which copy_file_range reports that this pair of files or this
# kernel cannot do an in-kernel copy. The buffered copy handles them.
_UNSUPPORTED_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}

_kernel_copy_available = hasattr(os, "copy_file_range")


def copy_range(source: int, source_offset: int, target: int, count: int, buffer: bytearray) -> None:
    """Append ``count`` bytes of ``source`` from ``source_offset`` at ``target``'s file position.

    Uses copy_file_range, so the data need not pass through Python, and
    falls back to pread and write through ``buffer`` when the filesystems do
    not support it.

    Raises:
        OSError: a real I/O error, such as a full disk.
        EOFError: the source file ends before ``source_offset + count``.
    """
    copied = _kernel_copy(source, source_offset, target, count) if _kernel_copy_available else 0
    if copied < count:
        _buffered_copy(source, source_offset + copied, target, count - copied, buffer)


def _kernel_copy(source: int, source_offset: int, target: int, count: int) -> int:
    global _kernel_copy_available
    copied = 0
    while copied < count:
        try:
            step = os.copy_file_range(source, target, count - copied, source_offset + copied)
        except OSError as error:
            if error.errno not in _UNSUPPORTED_ERRNOS:
                raise
            _kernel_copy_available = False
            logger.debug("copy_file_range is not supported here (%s); copying through a buffer", error)
            break
        if step == 0:
            # End of the source file; the buffered copy reports it.
            break
        copied += step
    return copied


def _buffered_copy(source: int, source_offset: int, target: int, count: int, buffer: bytearray) -> None:
    view = memoryview(buffer)
    done = 0
    while done < count:
        size = min(len(buffer), count - done)
        filled = 0
        while filled < size:
            step = os.preadv(source, [view[filled:size]], source_offset + done + filled)
            if step == 0:
                raise EOFError(f"source ended {count - done - filled} bytes early")
            filled += step
        written = 0
        while written < size:
            written += os.write(target, view[written:size])
        done += size
