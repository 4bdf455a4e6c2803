"""Progress bars that follow the package's log level."""

import logging

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """Return a tqdm bar on stderr, hidden when the ``lowmem_moe`` logger does not show INFO messages."""
    hidden = not logging.getLogger("lowmem_moe").isEnabledFor(logging.INFO)
    return tqdm(iterable, disable=hidden, **kwargs)
