"""Folders that the demo reads and writes, with their environment overrides."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "LOWMEM_MOE_DEMO_CACHE"
OUTPUT_ENV = "LOWMEM_MOE_DEMO_OUTPUT"

OUTPUT_NAME = "smollm2-4x135m"

# setup.cfg marks the repository root, which contains .cache/ and demo-output/.
_REPO_MARKER = "setup.cfg"


@dataclass(frozen=True)
class DemoPaths:
    """Cache layout of the demo and the folder the merge writes."""

    cache_dir: Path
    output_dir: Path

    @property
    def wheel_dir(self) -> Path:
        return self.cache_dir / "wheel"

    @property
    def base_dir(self) -> Path:
        return self.cache_dir / "base"

    @property
    def experts_dir(self) -> Path:
        return self.cache_dir / "experts"

    @property
    def config_path(self) -> Path:
        """Merge YAML, kept next to the models so its relative paths resolve."""
        return self.cache_dir / "demo.yml"


def find_repo_root() -> Path:
    """Return the folder holding setup.cfg above this file, else the working directory.

    An installed (not editable) copy of the package has no setup.cfg above
    it, so the demo then caches under the current directory.
    """
    for folder in Path(__file__).resolve().parents:
        if (folder / _REPO_MARKER).is_file():
            return folder

    cwd = Path.cwd()
    logger.info("No %s found above %s, so the demo uses %s as its root", _REPO_MARKER, __file__, cwd)
    return cwd


def resolve_paths() -> DemoPaths:
    """Return the demo's folders, honouring LOWMEM_MOE_DEMO_CACHE and LOWMEM_MOE_DEMO_OUTPUT.

    The merge runs with ``--overwrite``, so each run replaces whatever the
    output folder contains.
    """
    root = find_repo_root()

    cache_dir = Path(os.environ.get(CACHE_ENV) or root / ".cache" / "demo")
    output_dir = Path(os.environ.get(OUTPUT_ENV) or root / "demo-output" / OUTPUT_NAME)

    return DemoPaths(cache_dir=cache_dir.resolve(), output_dir=output_dir.resolve())
