"""Open the base and expert checkpoints named in a merge YAML."""

import logging
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint
from .config import MergeConfig
from .errors import SourceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSources:
    """The opened checkpoints: the base, and one entry per expert in YAML order."""

    base: Checkpoint
    experts: tuple[Checkpoint, ...]


def open_sources(config: MergeConfig) -> MergeSources:
    """Open every model folder of the config once, reading headers only.

    Raises:
        SourceError: a folder is missing or invalid. The message names the
            YAML line of the expert that refers to it.
    """
    opened: dict[Path, Checkpoint] = {}

    def open_once(folder: Path, where: str) -> Checkpoint:
        key = folder.resolve()
        if key not in opened:
            try:
                opened[key] = Checkpoint.open(folder)
            except SourceError as error:
                raise SourceError(f"{error} (referenced by {where} in {config.path})") from error
            logger.info("Opened %s: %d tensors", folder, len(opened[key].tensor_names))
        return opened[key]

    base = open_once(config.base_model, "base_model")
    experts = tuple(
        open_once(expert.source_model, f"the expert on line {expert.line}") for expert in config.experts
    )
    return MergeSources(base=base, experts=experts)
