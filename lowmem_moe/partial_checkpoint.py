"""A checkpoint opened from some shards of its safetensors index, for experts fetched from the Hub.

The merge reads only an expert's MLP tensors, so the shards that hold none of
them are not downloaded, and a cached snapshot may lack them.
"""

import json
from pathlib import Path, PurePosixPath

from .checkpoint import SAFETENSORS_INDEX, Checkpoint, resolve_shard_path
from .errors import SourceError
from .model_config import read_model_config
from .safetensors_header import read_header


def read_weight_map(index_path: Path) -> dict[str, str]:
    """Return the ``weight_map`` of a model.safetensors.index.json: tensor name to shard file name.

    Raises:
        SourceError: the index is unreadable, has no weight map, or names a
            shard by a path that could lead outside the model folder.
    """
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise SourceError(f"{index_path}: cannot read the index: {error}.") from error

    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: missing or empty 'weight_map'.")
    for tensor_name, file_name in weight_map.items():
        if not _is_plain_relative_name(file_name):
            raise SourceError(f"{index_path}: tensor {tensor_name!r} maps to an invalid file name {file_name!r}.")
    return weight_map


def open_partial_checkpoint(folder: Path, shard_files: frozenset[str]) -> Checkpoint:
    """Open ``folder`` with only the tensors that lie in ``shard_files``, shards of its safetensors index.

    Raises:
        SourceError: the config, index or one of ``shard_files`` is missing
            or invalid.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    index_path = folder / SAFETENSORS_INDEX
    weight_map = read_weight_map(index_path)

    # resolve_shard_path applies Checkpoint.open's checks: the shard must exist and
    # must not lead outside the folder, except into the cache's blobs/.
    resolved_folder = folder.resolve()
    shard_paths: dict[str, Path] = {}
    tensor_paths: dict[str, Path] = {}
    for tensor_name, file_name in weight_map.items():
        if file_name not in shard_files:
            continue
        if file_name not in shard_paths:
            shard_paths[file_name] = resolve_shard_path(index_path, resolved_folder, tensor_name, file_name)
        tensor_paths[tensor_name] = shard_paths[file_name]

    headers = [read_header(path) for path in sorted(set(shard_paths.values()))]
    return Checkpoint(folder, config, headers, tensor_paths)


def _is_plain_relative_name(name: object) -> bool:
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts
