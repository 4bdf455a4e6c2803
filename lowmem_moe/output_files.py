"""The small files of the output folder besides the shards: index, configs and tokenizer."""

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import OutputError
from .plan import MergePlan
from .shard_format import INDEX_NAME

logger = logging.getLogger(__name__)

# Tokenizer files that transformers may need, whichever tokenizer class the
# base uses. Those the base has are copied; the rest are skipped.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Files from which transformers can build a tokenizer on their own.
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
GENERATION_CONFIG = "generation_config.json"


def tokenizer_files(base: Checkpoint) -> list[Path]:
    """Return the base's tokenizer files that are copied to the output."""
    return [base.folder / name for name in TOKENIZER_FILES if (base.folder / name).is_file()]


def has_tokenizer(base: Checkpoint) -> bool:
    """Return whether the base folder contains a vocabulary file that transformers can load."""
    return any((base.folder / name).is_file() for name in TOKENIZER_VOCABULARY_FILES)


def base_files(base: Checkpoint) -> list[Path]:
    """Return the base's files that the output gets a copy of: its tokenizer files and generation config."""
    paths = tokenizer_files(base)
    if (base.folder / GENERATION_CONFIG).is_file():
        paths.append(base.folder / GENERATION_CONFIG)
    return paths


def metadata_file_sizes(base: Checkpoint) -> int:
    """Return the bytes of the files copied from the base, for the disk space check."""
    return sum(path.stat().st_size for path in base_files(base))


def write_index(plan: MergePlan, folder: Path) -> None:
    """Write model.safetensors.index.json, whose total_size counts tensor data bytes only, as transformers expects."""
    weight_map = {tensor.name: shard.file_name for shard in plan.shards for tensor in shard.tensors}
    index = {
        "metadata": {"total_size": sum(shard.data_size for shard in plan.shards)},
        "weight_map": weight_map,
    }
    _write_json(folder / INDEX_NAME, index)


def write_config(output_config: dict[str, Any], folder: Path) -> None:
    """Write config.json."""
    _write_json(folder / "config.json", output_config)


def copy_base_files(base: Checkpoint, folder: Path) -> list[str]:
    """Copy generation_config.json and tokenizer files from the base, returning the names copied."""
    copied = []
    for source in base_files(base):
        try:
            shutil.copyfile(source, folder / source.name)
        except OSError as error:
            raise OutputError(f"Copying {source} into the output failed: {error.strerror or error}.") from error
        copied.append(source.name)
    logger.info("Copied from the base model: %s", ", ".join(copied) or "nothing")
    return copied


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
