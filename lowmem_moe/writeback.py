"""Push written bytes to disk in the background while the copy goes on.

Without help, the kernel may keep gigabytes of written pages in memory (up to
vm.dirty_ratio of it) and then throttle the writer while it flushes them. Waiting for each window with
fdatasync keeps memory low but stops the copy on every flush. Here each
window is handed to the kernel with sync_file_range(SYNC_FILE_RANGE_WRITE),
which returns at once, and only the window before it is waited for, by which
time its writes have mostly finished. The pages of a waited window are then
dropped from the page cache, so that the output does not evict the sources.
"""

import ctypes
import ctypes.util
import errno
import logging
import os

logger = logging.getLogger(__name__)

# Bytes per window handed to the kernel at once.
WRITEBACK_INTERVAL = 256 * 1024**2

# Flags of sync_file_range(2), from <fcntl.h>.
_WAIT_BEFORE = 1
_WRITE = 2
_WAIT_AFTER = 4


def _load_sync_file_range():
    if not os.uname().sysname == "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()

# Errors with which sync_file_range reports that it does not support this file.
_UNSUPPORTED_ERRNOS = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE}


class Writeback:
    """Writeback state of one output file, which keeps the flushed bytes one window behind the written ones.

    Call ``advance`` after each write with the file's new size. Errors of
    the kernel calls are raised as OSError, as a write would raise them.
    """

    def __init__(self, descriptor: int, start: int = 0):
        self._descriptor = descriptor
        self._started = start  # bytes whose writeback was started
        self._done = start  # bytes written back and dropped from the page cache
        self._background = _sync_file_range is not None

    def advance(self, written: int) -> None:
        if written - self._started < WRITEBACK_INTERVAL:
            return
        if self._background:
            try:
                self._advance_in_background(written)
                return
            except OSError as error:
                if error.errno not in _UNSUPPORTED_ERRNOS:
                    raise
                logger.debug("sync_file_range is not supported here (%s), so each window is flushed with fdatasync", error)
                self._background = False
        # Without sync_file_range, each window is flushed and waited for. That
        # is slower, but memory stays bounded just the same.
        os.fdatasync(self._descriptor)
        self._drop(self._done, written)
        self._started = self._done = written

    def _advance_in_background(self, written: int) -> None:
        self._call(self._started, written - self._started, _WRITE)
        if self._started > self._done:
            self._call(self._done, self._started - self._done, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self._drop(self._done, self._started)
            self._done = self._started
        self._started = written

    def _call(self, offset: int, count: int, flags: int) -> None:
        if _sync_file_range(self._descriptor, offset, count, flags) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    def _drop(self, start: int, end: int) -> None:
        os.posix_fadvise(self._descriptor, start, end - start, os.POSIX_FADV_DONTNEED)
