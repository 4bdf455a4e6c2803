"""The merge pipeline: config, sources, plan, gate pass, shards, metadata, publish."""

import errno
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .background import BackgroundCall
from .config import MergeConfig, load_merge_config
from .dtypes import torch_dtype
from .errors import DiskFullError, OutputError, PlanError, UserError
from .gates import check_prompts, compute_router_weights
from .merge_progress import load_router_weights, merge_fingerprint, save_router_weights
from .merge_record import make_record, record_block
from .model_card import model_card
from .model_resolution import SourceResolution, download_pending, resolve_sources
from .output_files import copy_base_files, has_tokenizer, metadata_file_sizes, write_config, write_index
from .output_folder import OutputFolder
from .plan import MergePlan
from .plan_executor import write_shards
from .shard_format import shard_file_size
from .shard_writer import shard_is_complete
from .planner import PlanOptions, build_plan
from .sources import MergeSources, open_sources
from .structure_check import check_planned_structure, check_structure

logger = logging.getLogger(__name__)

# Room left free on the output disk beyond the planned bytes, for the
# filesystem's own metadata and for whatever else writes there meanwhile.
DISK_MARGIN_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class PreparedMerge:
    """A loaded config, where its models lie, its opened sources and the plan built from them."""

    config: MergeConfig
    sources: MergeSources
    plan: MergePlan
    options: PlanOptions
    resolution: SourceResolution


def prepare_merge(config_path: Path, options: PlanOptions, download: bool = False) -> PreparedMerge:
    """Load the YAML, resolve and open every source and build the plan. Reads headers only.

    Hub models missing from the Hugging Face cache are downloaded first when
    ``download`` is set, and are an error otherwise.

    Raises:
        UserError: the config, a source or the combination is invalid.
    """
    config = load_merge_config(config_path)
    resolution = resolve_sources(config)
    if download:
        resolution = download_pending(resolution)
    return prepare_resolved(config, resolution, options)


def prepare_resolved(config: MergeConfig, resolution: SourceResolution, options: PlanOptions) -> PreparedMerge:
    """Open the resolved sources and build the plan. Reads headers only.

    Raises:
        UserError: a source is invalid or not downloaded yet, or the
            combination is invalid.
    """
    sources = open_sources(config, resolution)
    if not has_tokenizer(sources.base):
        raise PlanError(
            f"{sources.base.folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json). "
            "The merged model needs the base model's tokenizer; copy its files into the base folder."
        )
    plan = build_plan(config, sources, options)
    return PreparedMerge(config=config, sources=sources, plan=plan, options=options, resolution=resolution)


def disk_bytes_needed(prepared: PreparedMerge) -> int:
    """Return the bytes the output folder will take, including copied files and the model card."""
    return prepared.plan.bytes_written + metadata_file_sizes(prepared.sources.base) + 1024**2


def free_disk_bytes(out_dir: Path) -> int:
    """Return the free bytes on the filesystem that will hold ``out_dir``."""
    probe = Path(out_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def run_merge(config_path: Path, out_dir: Path, options: PlanOptions, overwrite: bool = False) -> Path:
    """Merge the models of a YAML into a MoE checkpoint at ``out_dir`` and return its path.

    The output appears at ``out_dir`` only when complete. A merge that is
    killed, interrupted or stopped by a full disk keeps its progress in a
    hidden staging folder next to ``out_dir``. Rerunning the same merge
    resumes it, keeping the finished shards that pass a check and reusing
    the router weights. Bad input discovered late removes the staging
    folder. Files of Hub models that the merge needs and the Hugging Face
    cache lacks are downloaded into the cache first, and stay there.

    Raises:
        UserError: bad input, too little disk space, or an output folder
            that cannot be written.
    """
    output = OutputFolder(out_dir, overwrite=overwrite)
    output.check_target()

    prepared = prepare_merge(config_path, options, download=True)
    check_prompts(prepared.config, prepared.sources)
    plan = prepared.plan
    fingerprint = merge_fingerprint(prepared.config.text, asdict(options), plan, prepared.sources.base)
    resumed = output.open_staging(fingerprint)
    staging = output.staging
    pending = [shard for shard in plan.shards if not (resumed and shard_is_complete(staging, shard))]
    if resumed:
        logger.info("%d of %d shards are already complete", len(plan.shards) - len(pending), len(plan.shards))
    try:
        _check_disk_space(prepared, pending, staging)
    except OutputError:
        # A fresh staging folder is empty and goes; resumed progress stays.
        if resumed:
            output.keep()
        else:
            output.discard()
        raise

    try:
        published = _write_output(prepared, output, pending, resumed, config_path)
    except (DiskFullError, OSError) as error:
        # Metadata files and the saved routers fail with a plain OSError.
        if not isinstance(error, DiskFullError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
            output.discard()
            raise OutputError(f"Writing the output failed: {error}. {out_dir} is unchanged.") from error
        output.keep()
        remaining = sum(shard_file_size(shard) for shard in plan.shards if not shard_is_complete(staging, shard))
        raise DiskFullError(
            f"{error} The disk at {output.target.parent} is full. The merge still needs {remaining:,} bytes there. "
            f"Free that much and rerun the same command to resume; {out_dir} is unchanged."
        ) from error
    except KeyboardInterrupt:
        output.keep()
        raise
    except UserError as error:
        output.discard()
        raise type(error)(f"{error} {out_dir} is unchanged.") from error
    except BaseException:
        output.discard()
        raise
    logger.info("Merged model written to %s", published)
    return published


def _write_output(
    prepared: PreparedMerge, output: OutputFolder, pending: list, resumed: bool, config_path: Path
) -> Path:
    """Write the pending shards and the metadata into the staging folder, check them and publish the folder.

    The copy runs in this thread. Two CPU-bound steps run beside it: the
    gate pass, whose routers are the last tensors of the plan (see
    planner.py), and the structure check, which builds transformers' model
    from the output config and compares it with the plan. Their errors are
    raised between tensors. Any error stops both steps before it propagates,
    because an interpreter that exits while torch runs in another thread
    can abort.
    """
    plan, options, staging = prepared.plan, prepared.options, output.staging
    write_config(plan.output_config, staging)
    steps: list[BackgroundCall] = []

    def raise_step_errors() -> None:
        for step in steps:
            step.raise_if_failed()

    try:
        planned_shapes = {tensor.name: tensor.shape for tensor in plan.tensors}
        structure = BackgroundCall(
            "structure check", check_planned_structure, staging, planned_shapes, prepared.sources.base.config.path
        )
        steps.append(structure)
        routers = _start_gate_pass(prepared, staging, resumed, output.target.parent, steps)

        write_shards(replace(plan, shards=tuple(pending)), staging, routers, raise_step_errors)
        routers()  # a resumed merge may have no router left to write, but a gate pass error still counts
        write_index(plan, staging)
        copy_base_files(prepared.sources.base, staging)
        record = make_record(config_path, prepared.config.text, options)
        card = model_card(prepared.config, plan, options.seed, prepared.resolution) + "\n" + record_block(record)
        (staging / "README.md").write_text(card, encoding="utf-8")
        check_structure(staging, structure.result())
        return output.publish()
    except BaseException:
        for step in steps:
            step.stop()
        raise


def _start_gate_pass(
    prepared: PreparedMerge, staging: Path, resumed: bool, scratch_folder: Path, steps: list[BackgroundCall]
) -> Callable[[], dict[str, torch.Tensor]]:
    """Start the gate pass in the background, or reuse saved routers, and return a function that waits for them.

    The gate pass saves its routers into the staging folder as soon as it
    ends, so that a merge interrupted after that point resumes without it.
    Its BackgroundCall is appended to ``steps``.
    """
    saved = load_router_weights(staging, prepared.plan) if resumed else None
    if saved is not None:
        logger.info("Reusing the router weights of the interrupted run")
        return lambda: saved

    options = prepared.options
    cancel = threading.Event()

    def gate_pass() -> dict[str, torch.Tensor]:
        weights = compute_router_weights(
            prepared.config,
            prepared.sources,
            options.seed,
            scratch_folder,
            torch_dtype(options.gate_dtype),
            cancel=cancel,
        )
        save_router_weights(staging, weights)
        return weights

    call = BackgroundCall("gate pass", gate_pass, cancel=cancel)
    steps.append(call)
    return call.result


def _check_disk_space(prepared: PreparedMerge, pending: list, staging: Path) -> None:
    # Shards that a resumed merge keeps are already on the disk.
    done = sum(shard_file_size(shard) for shard in prepared.plan.shards if shard not in pending)
    needed = disk_bytes_needed(prepared) - done
    free = shutil.disk_usage(staging).free
    if needed + DISK_MARGIN_BYTES > free:
        raise OutputError(
            f"Not enough disk space at {staging.parent}: the merge writes {needed:,} more bytes and "
            f"{free:,} are free. Free at least {needed + DISK_MARGIN_BYTES - free:,} bytes or choose another OUT_DIR."
        )
