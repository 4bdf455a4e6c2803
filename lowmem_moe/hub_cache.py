"""The local Hugging Face cache: where it is, whether the Hub may be contacted, and what it contains.

The cache has huggingface_hub's layout: ``<cache>/models--<org>--<name>/``
contains ``refs/<branch or tag>`` (a commit hash), ``snapshots/<commit>/``
(the files of that commit, each a symlink) and ``blobs/`` (the file data).
Nothing here contacts the network.
"""

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from .model_reference import ModelReference

# Spellings of a true environment flag, as huggingface_hub.constants reads them.
TRUE_FLAG_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class CachedFile:
    """A file of a cached snapshot."""

    path: Path  # snapshots/<commit>/<name>, usually a symlink into blobs/
    commit: str


def hub_cache_dir() -> Path:
    """Return the cache folder that huggingface_hub uses, from the environment as it is now.

    huggingface_hub 2.4 reads these variables once, at import, so a process
    that sets them later would otherwise see a stale folder. The order is
    huggingface_hub's: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, then ~/.cache/huggingface/hub.
    """
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    folder = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def hub_offline() -> bool:
    """Return whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE forbids contacting the Hub.

    Either the variables as they are now or as huggingface_hub read them at
    import can set offline mode. In the second case huggingface_hub's own
    requests would fail anyway.
    """
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.strip().upper() in TRUE_FLAG_VALUES for flag in flags)


def find_cached_file(cache_dir: Path, reference: ModelReference, name: str) -> CachedFile | None:
    """Return a file of the reference's revision from the cache, or None when it is not cached.

    A branch or tag resolves through ``refs/`` to the commit that was cached
    last, and a commit hash names its snapshot directly. A file that the
    cache records as absent from the repository also returns None.
    """
    path = try_to_load_from_cache(reference.repo_id, name, cache_dir=cache_dir, revision=reference.revision_or_default)
    if not isinstance(path, str):
        return None
    # The path is snapshots/<commit>/<name>, where <name> may contain folders.
    snapshot = Path(path).parents[len(Path(name).parts) - 1]
    return CachedFile(path=Path(path), commit=snapshot.name)


def snapshot_folder(cache_dir: Path, reference: ModelReference, commit: str) -> Path:
    """Return the folder that holds, or will hold, the cached files of ``commit``."""
    return cache_dir / repo_folder_name(repo_id=reference.repo_id, repo_type="model") / "snapshots" / commit


def record_ref(cache_dir: Path, reference: ModelReference, commit: str) -> None:
    """Point ``refs/<revision>`` at ``commit``, so that a later offline run finds the files by branch or tag.

    huggingface_hub writes this file when it downloads by branch or tag.
    lowmem-moe downloads by commit, so that every file comes from the commit
    it listed, and therefore writes the ref itself, atomically. A revision
    that is a commit hash needs no ref.
    """
    revision = reference.revision_or_default
    if COMMIT_PATTERN.fullmatch(revision):
        return
    ref_path = cache_dir / repo_folder_name(repo_id=reference.repo_id, repo_type="model") / "refs" / revision
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=ref_path.parent, delete=False, encoding="utf-8") as handle:
        handle.write(commit)  # no newline, as huggingface_hub writes it
    os.replace(handle.name, ref_path)
