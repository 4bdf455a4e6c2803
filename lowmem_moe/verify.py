"""Check a merged model folder byte for byte against the plan rebuilt from its recorded config.

The model card's record gives the YAML text, where the YAML was and the
options of the merge. From them the plan is built again against the same
sources. The comparison covers shard names and the index, config.json, the
tokenizer files and generation_config.json copied from the base, each
shard's size and header, and then every tensor's data, streamed from the
sources chunk by chunk. The model card itself is not compared.
"""

import filecmp
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import Checkpoint
from .config import parse_merge_config
from .dtypes import torch_dtype
from .errors import SourceError, UserError
from .gates import compute_router_weights
from .merge import PreparedMerge, prepare_resolved
from .merge_record import MergeRecord, read_record
from .model_resolution import resolve_sources
from .plan import MergePlan
from .output_files import base_files
from .plan_executor import SourceFiles
from .plan_report import format_bytes
from .progress import progress_bar
from .shard_compare import Mismatch, compare_shard_data, compare_shard_layout
from .shard_format import INDEX_NAME

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"


class RecordError(UserError):
    """The record in a model card cannot rebuild the merge's plan."""


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying an output folder: counts of what was compared and the first difference, if any."""

    folder: Path
    shards: int
    tensors: int  # tensors in the plan
    bytes_compared: int  # tensor data bytes found equal, up to the first difference
    mismatch: Mismatch | None

    @property
    def ok(self) -> bool:
        return self.mismatch is None

    def summary(self) -> str:
        """Return one line that states the outcome."""
        if self.mismatch is not None:
            return f"{self.folder} differs from its sources. {self.mismatch.message}"
        shards = "1 shard" if self.shards == 1 else f"{self.shards} shards"
        return (
            f"{self.folder} matches its sources: {self.tensors} tensors in {shards}, "
            f"{format_bytes(self.bytes_compared)} of tensor data, config.json and the index."
        )


def verify_output(folder: Path, chunk_size: int | None = None) -> VerifyReport:
    """Rebuild the plan of a merged model from its record and compare every output byte with it.

    Nothing is downloaded: Hub models must still be in the Hugging Face
    cache and local models where the recorded YAML named them. Random
    gates are drawn again with the recorded seed and hidden gates are
    computed again in the recorded dtype, which reproduces them on the same
    sources. The comparison stops at the first difference.

    Args:
        folder: the merged model folder.
        chunk_size: bytes read per step, the recorded chunk size when None.
            Memory use grows with it, as in the merge.

    Returns:
        The report. ``report.mismatch`` is None when every compared file
        matches the plan.

    Raises:
        UserError: the folder has no usable record, or a source is missing
            or invalid.
    """
    folder = Path(folder)
    record = read_record(folder)
    prepared = rebuild_merge(record, chunk_size)
    plan = prepared.plan
    report = _report_for(folder, plan)

    mismatch = (
        _compare_files(folder, plan)
        or _compare_config(folder, plan.output_config)
        or _compare_base_files(folder, prepared.sources.base)
    )
    if mismatch is None:
        mismatch = _first(compare_shard_layout(folder / shard.file_name, shard) for shard in plan.shards)
    if mismatch is not None:
        return replace(report, bytes_compared=0, mismatch=mismatch)

    logger.info("Shard names, index, config.json and shard headers match the plan. Comparing tensor data.")
    options = prepared.options
    router_weights = compute_router_weights(
        prepared.config,
        prepared.sources,
        options.seed,
        scratch_folder=folder.absolute().parent,
        compute_dtype=torch_dtype(options.gate_dtype),
    )

    # One read buffer for the sources and one for the output, as in the merge's copy phase.
    buffer = bytearray(plan.chunk_size)
    progress = progress_bar(total=report.bytes_compared, unit="B", unit_scale=True, desc="Verifying shards")
    with ExitStack() as stack, progress:
        sources = SourceFiles(stack)
        for shard in plan.shards:
            mismatch = compare_shard_data(folder / shard.file_name, shard, sources, buffer, router_weights, progress)
            if mismatch is not None:
                return replace(report, bytes_compared=progress.n, mismatch=mismatch)
            logger.debug("Verified %s", shard.file_name)
    return report


def rebuild_merge(record: MergeRecord, chunk_size: int | None = None) -> PreparedMerge:
    """Parse the recorded YAML, resolve its models without downloading and build the plan again.

    Raises:
        RecordError: the record's YAML or options are invalid for this version.
        SourceError: a model is missing, or a Hub model is not in the cache.
    """
    if record.tool_version != __version__:
        logger.warning(
            "The output was written by lowmem-moe %s and is verified with %s. A change in planning between "
            "the versions shows up as a difference.",
            record.tool_version,
            __version__,
        )
    try:
        options = record.plan_options()
    except TypeError as error:
        raise RecordError(f"The recorded merge options are not valid for lowmem-moe {__version__}: {error}.") from error
    if chunk_size is not None:
        options = replace(options, chunk_size=chunk_size)

    config_path = Path(record.config_path)
    logger.info("Rebuilding the plan from the YAML recorded in the model card (written at %s)", config_path)
    try:
        config = parse_merge_config(record.config_text, config_path)
    except UserError as error:
        raise RecordError(f"The YAML recorded in the model card is invalid: {error}") from error

    # NOTE: a Hub model named by branch resolves to the commit that the cache
    # records for that branch now, which may differ from the commit the
    # merge read. The model card lists the merge's commits.
    try:
        # Verify never downloads: it reads the sources from disk or the cache only.
        resolution = resolve_sources(config, cache_only=True)
        return prepare_resolved(config, resolution, options)
    except SourceError as error:
        raise SourceError(
            f"{error} Verify reads the sources that the merge read, as the record names them "
            f"(YAML at {config_path}), so they must still exist."
        ) from error


def _report_for(folder: Path, plan: MergePlan) -> VerifyReport:
    return VerifyReport(
        folder=folder,
        shards=len(plan.shards),
        tensors=len(plan.tensors),
        bytes_compared=sum(shard.data_size for shard in plan.shards),
        mismatch=None,
    )


def _first(mismatches: Iterator[Mismatch | None]) -> Mismatch | None:
    return next((mismatch for mismatch in mismatches if mismatch is not None), None)


def _compare_files(folder: Path, plan: MergePlan) -> Mismatch | None:
    """Return the first difference in shard file names or the index, or None."""
    planned_names = [shard.file_name for shard in plan.shards]
    for name in planned_names:
        if not (folder / name).is_file():
            return Mismatch(name, f"{name}: missing, but the plan has it.")
    extra = sorted(path.name for path in folder.glob("*.safetensors") if path.name not in planned_names)
    if extra:
        return Mismatch(extra[0], f"{extra[0]}: not in the plan, which has {', '.join(planned_names)}.")

    index = _load_json(folder / INDEX_NAME)
    if isinstance(index, Mismatch):
        return index
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return Mismatch(INDEX_NAME, f"{INDEX_NAME}: no weight_map object.")
    for shard in plan.shards:
        for tensor in shard.tensors:
            if weight_map.get(tensor.name) != shard.file_name:
                found = weight_map.get(tensor.name, "nothing")
                return Mismatch(
                    INDEX_NAME, f"{INDEX_NAME}: tensor {tensor.name} maps to {found}, but the plan puts it in {shard.file_name}."
                )
    planned_tensors = {tensor.name for tensor in plan.tensors}
    extra = [name for name in weight_map if name not in planned_tensors]
    if extra:
        return Mismatch(INDEX_NAME, f"{INDEX_NAME}: tensor {extra[0]} is not in the plan.")

    total_size = sum(shard.data_size for shard in plan.shards)
    found_total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if found_total != total_size:
        return Mismatch(INDEX_NAME, f"{INDEX_NAME}: metadata.total_size is {found_total}, but the plan has {total_size}.")
    return None


def _compare_config(folder: Path, output_config: dict[str, Any]) -> Mismatch | None:
    """Return the first key of config.json that differs from the plan's output config, or None."""
    found = _load_json(folder / CONFIG_NAME)
    if isinstance(found, Mismatch):
        return found
    if not isinstance(found, dict):
        return Mismatch(CONFIG_NAME, f"{CONFIG_NAME}: not a JSON object.")

    # Canonical JSON text compares types too, so 1 and 1.0 or true and 1 differ.
    def canonical(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    expected = json.loads(json.dumps(output_config))  # tuples become lists, as written
    for key, value in expected.items():
        if key not in found:
            return Mismatch(CONFIG_NAME, f"{CONFIG_NAME}: key {key!r} is missing; the plan has {canonical(value)}.")
        if canonical(found[key]) != canonical(value):
            return Mismatch(
                CONFIG_NAME,
                f"{CONFIG_NAME}: key {key!r} is {canonical(found[key])}, but the plan has {canonical(value)}.",
            )
    for key in found:
        if key not in expected:
            return Mismatch(CONFIG_NAME, f"{CONFIG_NAME}: key {key!r} is not in the plan's config.")
    return None


def _compare_base_files(folder: Path, base: Checkpoint) -> Mismatch | None:
    """Return the first tokenizer or generation config file whose copy in the output differs from the base's, or None."""
    for source in base_files(base):
        copy = folder / source.name
        if not copy.is_file():
            return Mismatch(source.name, f"{source.name}: missing, but the base model has it ({source}).")
        if not filecmp.cmp(source, copy, shallow=False):
            return Mismatch(source.name, f"{source.name}: differs from the base model's {source}.")
    return None


def _load_json(path: Path) -> Any:
    """Return the parsed JSON of ``path``, or a Mismatch when it is missing or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Mismatch(path.name, f"{path.name}: missing.")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return Mismatch(path.name, f"{path.name}: cannot be read as JSON ({error}).")
