"""The files of a Hub model repository that a merge needs.

Decisions on file and tensor names only, with no I/O, so that ``plan`` can
show them before anything is fetched.
"""

import re
from collections.abc import Collection, Mapping
from enum import Enum

from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .output_files import GENERATION_CONFIG, TOKENIZER_FILES

CONFIG_FILE = "config.json"

# Files that describe a checkpoint's weights, in the order Checkpoint.open
# prefers them. An index maps tensor names to shard files.
SAFETENSORS_WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE)
PYTORCH_WEIGHT_FILES = ("pytorch_model.bin.index.json", "pytorch_model.bin")
INDEX_FILES = frozenset({SAFETENSORS_INDEX, PYTORCH_WEIGHT_FILES[0]})

# The tensors an expert or shared expert contributes: its dense MLP, which
# becomes the expert weights. Attention, norms and embeddings all come from
# the base, so an expert's shards that hold only those are never read.
EXPERT_TENSOR_PATTERN = re.compile(r"^model\.layers\.\d+\.mlp\.")


class ModelRole(Enum):
    """The part of a model that the merge reads."""

    BASE = "base"  # every tensor, the tokenizer and generation_config.json
    EXPERT = "expert"  # the MLP tensors only


def needs_tensor(role: ModelRole, name: str) -> bool:
    """Return whether the merge reads tensor ``name`` from a model in ``role``."""
    return role is ModelRole.BASE or EXPERT_TENSOR_PATTERN.match(name) is not None


def needed_shards(weight_map: Mapping[str, str], role: ModelRole) -> tuple[str, ...]:
    """Return the shard files, sorted, that hold at least one tensor the merge reads.

    ``weight_map`` is the ``weight_map`` of model.safetensors.index.json:
    tensor name to shard file name. A shard that mixes MLP and attention
    tensors is needed whole, because a file is the unit of download.
    """
    return tuple(sorted({shard for name, shard in weight_map.items() if needs_tensor(role, name)}))


def choose_weights_file(available: Collection[str]) -> str | None:
    """Return the index or single weights file that the checkpoint is read from, or None when ``available`` has none."""
    for name in (*SAFETENSORS_WEIGHT_FILES, *PYTORCH_WEIGHT_FILES):
        if name in available:
            return name
    return None


def select_files(
    available: Collection[str], weights_file: str, weight_map: Mapping[str, str] | None, role: ModelRole
) -> tuple[str, ...]:
    """Return the repository files the merge needs from a model.

    Args:
        available: file names known to exist in the repository, from the
            Hub's file listing or from the cached snapshot. Optional files
            (tokenizer, generation config) are chosen from these.
        weights_file: the file from choose_weights_file.
        weight_map: the weight map of ``weights_file`` when it is an index.
        role: what the merge reads from the model.

    Returns:
        config.json, then the weight files, then for the base the
        generation config and tokenizer files that ``available`` contains.
        Shards are skipped for experts only in a safetensors index, because
        only safetensors checkpoints can be opened from some of their shards.
    """
    files = [CONFIG_FILE, weights_file]
    if weight_map is not None:
        shard_role = role if weights_file == SAFETENSORS_INDEX else ModelRole.BASE
        files.extend(needed_shards(weight_map, shard_role))
    if role is ModelRole.BASE:
        files.extend(name for name in (GENERATION_CONFIG, *TOKENIZER_FILES) if name in available)
    return tuple(files)
