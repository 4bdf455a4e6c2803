"""Open the base and expert checkpoints named in a merge YAML."""

import logging
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint
from .config import MergeConfig
from .errors import SourceError
from .model_resolution import ResolvedModel, SourceResolution, resolve_sources
from .partial_checkpoint import open_partial_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSources:
    """The opened checkpoints: the base, and one entry per expert and shared expert in YAML order."""

    base: Checkpoint
    experts: tuple[Checkpoint, ...]
    shared_experts: tuple[Checkpoint, ...] = ()


def open_sources(config: MergeConfig, resolution: SourceResolution | None = None) -> MergeSources:
    """Open every model of the config once, reading headers only.

    Args:
        config: the merge YAML.
        resolution: where each model lies, from resolve_sources. When None,
            the models are resolved here, which reads the Hugging Face cache
            and may contact the Hub for metadata (see model_resolution.py).

    Raises:
        SourceError: a model is missing, invalid or not downloaded yet. The
            message names the YAML line that refers to it.
    """
    if resolution is None:
        resolution = resolve_sources(config)
    if resolution.pending_files:
        names = ", ".join(model.reference for model in resolution.models if model.pending)
        raise SourceError(
            f"{config.path}: {resolution.pending_files} files of {names} are not downloaded yet. "
            "`lowmem-moe merge` downloads them first."
        )

    # Keyed by folder and shard subset, because an expert opened from some
    # shards must not stand in for a base that needs all of them.
    opened: dict[tuple[Path, frozenset[str] | None], Checkpoint] = {}

    def open_once(model: ResolvedModel) -> Checkpoint:
        key = (model.folder.resolve(), model.shard_files)
        if key not in opened:
            try:
                if model.shard_files is None:
                    opened[key] = Checkpoint.open(model.folder)
                else:
                    opened[key] = open_partial_checkpoint(model.folder, model.shard_files)
            except SourceError as error:
                raise SourceError(f"{error} (referenced by {model.label} in {config.path})") from error
            logger.info("Opened %s: %d tensors", model.folder, len(opened[key].tensor_names))
        return opened[key]

    return MergeSources(
        base=open_once(resolution.base),
        experts=tuple(open_once(model) for model in resolution.experts),
        shared_experts=tuple(open_once(model) for model in resolution.shared_experts),
    )
