"""Saved progress of an interrupted merge, so that a rerun of the same merge resumes.

The staging folder keeps finished shards under their final names. Next to
them, a journal records what the merge was, and the router weights are
saved once the gate pass has finished. A rerun resumes only when the
config, the options, every source file and the base's tokenizer and
generation config files are unchanged.
"""

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .checkpoint import Checkpoint
from .errors import OutputError
from .output_files import GENERATION_CONFIG, TOKENIZER_FILES
from .plan import FileSource, GateSource, MergePlan

logger = logging.getLogger(__name__)

JOURNAL_NAME = ".lowmem-moe-staging"  # also the marker of a staging folder
ROUTERS_NAME = ".lowmem-moe-routers.safetensors"
# Rust's io::Error as Display ("... (os error 28)") and as Debug ("Os { code: 28, ... }").
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")


def merge_fingerprint(
    config_text: str, options: dict[str, Any], plan: MergePlan, base: Checkpoint
) -> dict[str, Any]:
    """Return what identifies a merge: a hash of its config and plan, and the size and mtime of its input files.

    The input files are the plan's source files and every
    tokenizer and generation config file that the output copies from the
    base, with None for each that is absent. The gate pass reads the
    tokenizer too, so a changed tokenizer makes the saved routers stale.
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
    return {"config": config_hash, "sources": sources, "base_files": _base_file_stats(base.folder)}


def _base_file_stats(folder: Path) -> dict[str, list[int] | None]:
    # Absent files are recorded too, so that adding or removing one counts as a change.
    stats: dict[str, list[int] | None] = {}
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        path = folder / name
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            stats[str(path)] = None
        else:
            stats[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return stats


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
    if "base_files" in current:
        if "base_files" not in saved:
            return "it was written by an older lowmem-moe"
        for path, stat in current["base_files"].items():
            saved_stat = saved["base_files"].get(path)
            if saved_stat == stat:
                continue
            if saved_stat is None:
                return f"base file {path} was added since"
            if stat is None:
                return f"base file {path} was removed since"
            return f"base file {path} changed since (size or modification time differ)"
    return None


def save_router_weights(staging: Path, router_weights: dict[str, torch.Tensor]) -> None:
    """Save the gate pass' result atomically, so that a resumed merge skips the pass.

    Raises:
        OSError: the file cannot be written, with the errno (ENOSPC for a
            full disk) when safetensors reports one.
        OutputError: safetensors failed without an errno. The message
            names the file.
    """
    temporary = staging / (ROUTERS_NAME + ".tmp")
    tensors = {name: weights.contiguous() for name, weights in router_weights.items()}
    try:
        save_file(tensors, str(temporary))
    except SafetensorError as error:
        # safetensors reports I/O failures only as text, such as "I/O error:
        # No space left on device (os error 28)" in version 0.8.
        temporary.unlink(missing_ok=True)
        match = _OS_ERROR_CODE.search(str(error))
        if match is not None:
            code = int(match.group(1) or match.group(2))
            raise OSError(code, os.strerror(code), str(temporary)) from error
        raise OutputError(
            f"Writing the router weights to {temporary} failed: {error}. Check that the folder exists and is "
            "writable, then rerun the same command."
        ) from error
    os.replace(temporary, staging / ROUTERS_NAME)


def router_shapes(plan: MergePlan) -> dict[str, tuple[int, ...]]:
    """Return the shape of each router matrix that the plan reads: (layers, experts, hidden), by router name."""
    layers: dict[str, int] = {}
    rows: dict[str, tuple[int, ...]] = {}
    for tensor in plan.tensors:
        if isinstance(tensor.source, GateSource):
            router = tensor.source.router
            layers[router] = max(layers.get(router, 0), tensor.source.layer + 1)
            rows[router] = tensor.shape
    return {router: (layers[router], *rows[router]) for router in rows}


def load_router_weights(staging: Path, plan: MergePlan) -> dict[str, torch.Tensor] | None:
    """Return router weights saved by an interrupted run of the same merge, or None.

    Weights that are unreadable, or whose names, dtypes or shapes differ from
    the routers of ``plan``, give None, so that the caller computes them again.
    """
    path = staging / ROUTERS_NAME
    if not path.is_file():
        return None
    try:
        weights = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any damage means recomputing, which is always safe
        logger.info("Saved router weights in %s are unreadable (%s); computing them again", path, error)
        return None
    problem = _router_mismatch(weights, router_shapes(plan))
    if problem is not None:
        logger.info("Saved router weights in %s do not fit the plan (%s); computing them again", path, problem)
        return None
    return weights


def _router_mismatch(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    if set(weights) != set(expected):
        return f"tensors {sorted(weights)}, expected {sorted(expected)}"
    for name, shape in expected.items():
        if weights[name].dtype != torch.float32:
            return f"{name!r} has dtype {weights[name].dtype}, expected torch.float32"
        if tuple(weights[name].shape) != shape:
            return f"{name!r} has shape {tuple(weights[name].shape)}, expected {shape}"
    return None


def remove_progress_files(folder: Path) -> None:
    """Remove the journal and saved routers from a finished output folder."""
    for name in (JOURNAL_NAME, ROUTERS_NAME):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
