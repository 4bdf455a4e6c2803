"""Write a folder under a temporary name and rename it when it is complete.

A run killed halfway leaves only a ``*.partial`` folder, which the next run
deletes, so a folder under its final name is always complete.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_REPLACED_SUFFIX = ".replaced"


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of ``final`` and rename it to ``final`` on success.

    An existing ``final`` is replaced. If the body raises, the partial folder
    is deleted and ``final`` is left as it was.
    """
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if partial.exists():
        logger.info("Deleting %s left by an interrupted run", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    # Move the old folder aside first because rename cannot replace a
    # non-empty directory.
    replaced = final.with_name(final.name + _REPLACED_SUFFIX)
    if replaced.exists():
        shutil.rmtree(replaced)
    if final.exists():
        final.rename(replaced)
    partial.rename(final)
    if replaced.exists():
        shutil.rmtree(replaced)

