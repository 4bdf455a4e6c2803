"""Saved progress of an interrupted merge, so that a rerun of the same merge resumes.

The staging folder keeps finished shards under their final names. Next to
them, a journal records what the merge was, and the router weights are
saved once the gate pass has finished. A rerun resumes only when the
config, the options and every source file are unchanged.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .plan import FileSource, MergePlan

logger = logging.getLogger(__name__)

JOURNAL_NAME = ".lowmem-moe-staging"  # also the marker of a staging folder
ROUTERS_NAME = ".lowmem-moe-routers.safetensors"


def merge_fingerprint(config_text: str, options: dict[str, Any], plan: MergePlan) -> dict[str, Any]:
    """Return what identifies a merge: a hash of its config and plan, and the size and mtime of every source file.

    The chunk size and the memory estimate do not change the output, so
    they are left out.
    """
    plan_data = plan.to_json_dict()
    for key in ("chunk_size", "expected_peak_memory"):
        plan_data.pop(key, None)
    options = {key: value for key, value in options.items() if key != "chunk_size"}
    config_hash = hashlib.sha256(
        json.dumps([__version__, config_text, options, plan_data], sort_keys=True, default=str).encode()
    ).hexdigest()

    paths = sorted({str(segment.path) for tensor in plan.tensors if isinstance(tensor.source, FileSource)
                    for segment in tensor.source.segments})
    sources = {}
    for path in paths:
        stat = os.stat(path)
        sources[path] = [stat.st_size, stat.st_mtime_ns]
    return {"config": config_hash, "sources": sources}


def write_journal(staging: Path, fingerprint: dict[str, Any]) -> None:
    """Write the journal atomically."""
    temporary = staging / (JOURNAL_NAME + ".tmp")
    temporary.write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")
    os.replace(temporary, staging / JOURNAL_NAME)


def read_journal(staging: Path) -> dict[str, Any] | None:
    """Return the journal of a staging folder, or None when it is missing or unreadable."""
    try:
        data = json.loads((staging / JOURNAL_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def mismatch_reason(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Return why saved progress does not belong to the current merge, or None when it does."""
    if saved is None or "config" not in saved:
        return "it was written by an older lowmem-moe or is damaged"
    if saved["config"] != current["config"]:
        return "the merge YAML, the options or the lowmem-moe version changed"
    saved_sources = saved.get("sources", {})
    for path, stat in current["sources"].items():
        if saved_sources.get(path) != stat:
            return f"source file {path} changed since (size or modification time differ)"
    return None


def save_router_weights(staging: Path, router_weights: dict[str, torch.Tensor]) -> None:
    """Save the gate pass' result atomically, so that a resumed merge skips the pass."""
    temporary = staging / (ROUTERS_NAME + ".tmp")
    save_file({name: weights.contiguous() for name, weights in router_weights.items()}, str(temporary))
    os.replace(temporary, staging / ROUTERS_NAME)


def load_router_weights(staging: Path) -> dict[str, torch.Tensor] | None:
    """Return router weights saved by an interrupted run of the same merge, or None."""
    path = staging / ROUTERS_NAME
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any damage means recomputing, which is always safe
        logger.info("Saved router weights in %s are unreadable (%s); computing them again", path, error)
        return None


def remove_progress_files(folder: Path) -> None:
    """Remove the journal and saved routers from a finished output folder."""
    for name in (JOURNAL_NAME, ROUTERS_NAME):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
