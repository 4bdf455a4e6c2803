"""Put the page cache in the same state before every measured run: written back, inputs not cached.

The kernel-wide drop needs root. Without it, each input file's pages are
dropped with posix_fadvise(POSIX_FADV_DONTNEED), which any process that can
open the file may call. The kernel drops clean pages only, so dirty pages
are written back first.
"""

import logging
import os
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# Values of the "page_cache" field in the results.
KERNEL_DROP = "drop_caches"
FILE_DROP = "fadvise"

_kernel_drop_failed = False


def drop_page_cache(input_files: Iterable[Path]) -> str:
    """Write dirty pages back, then evict cached pages, and return the method used.

    Returns ``"drop_caches"`` when the whole page cache was dropped through
    /proc/sys/vm/drop_caches, or ``"fadvise"`` when only the pages of
    ``input_files`` were, because writing drop_caches is not permitted here.
    """
    global _kernel_drop_failed
    os.sync()
    if not _kernel_drop_failed:
        try:
            DROP_CACHES.write_text("3\n")
            return KERNEL_DROP
        except OSError as error:
            _kernel_drop_failed = True
            logger.warning(
                "Cannot write %s (%s); dropping the input files' pages with posix_fadvise instead",
                DROP_CACHES,
                error.strerror or error,
            )

    for path in input_files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return FILE_DROP
