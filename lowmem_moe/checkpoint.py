"""A source model folder: its config and where each tensor's bytes lie on disk."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import SourceError
from .model_config import ModelConfig, read_model_config
from .safetensors_header import SafetensorsHeader, TensorEntry, read_header
from .torch_zip_checkpoint import TorchZipIndex, read_torch_zip

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# A safetensors header or a PyTorch zip checkpoint's index: each has a
# ``path`` and a ``tensors`` dict of TensorEntry by name.
WeightsFile = SafetensorsHeader | TorchZipIndex


@dataclass(frozen=True)
class TensorLocation:
    """The file that contains a tensor, and the tensor's entry in that file's header."""

    path: Path
    entry: TensorEntry


class Checkpoint:
    """A Hugging Face checkpoint folder with safetensors or PyTorch zip weights, indexed by tensor name.

    Opening reads config.json and every shard's header (for PyTorch files,
    the zip directory and data.pkl), never tensor data.
    """

    def __init__(self, folder: Path, config: ModelConfig, headers: list[WeightsFile], weight_map: dict[str, Path]):
        self.folder = folder
        self.config = config
        self.headers = headers
        self._locations = {
            name: TensorLocation(path=path, entry=_entry_in(headers, path, name)) for name, path in weight_map.items()
        }

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        """Open a model folder and validate its config and the headers of its weight files.

        Safetensors weights are used when the folder has them. Otherwise
        pytorch_model.bin or pytorch_model.bin.index.json is read, without
        running code from the pickles.

        Raises:
            SourceError: the folder, config or weights are missing or invalid.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise SourceError(f"Model folder not found: {folder}. Check the path.")
        config = read_model_config(folder)

        weight_map, headers = _open_weights(folder)
        return cls(folder, config, headers, weight_map)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._locations)

    def has(self, name: str) -> bool:
        return name in self._locations

    def locate(self, name: str) -> TensorLocation:
        """Return where a tensor lies.

        Raises:
            SourceError: the checkpoint has no tensor of that name.
        """
        location = self._locations.get(name)
        if location is None:
            raise SourceError(f"{self.folder}: tensor {name!r} not found in the checkpoint's weights.")
        return location


def _open_weights(folder: Path) -> tuple[dict[str, Path], list[WeightsFile]]:
    """Return the weight map and the parsed header of every weights file, preferring safetensors."""
    resolved_folder = folder.resolve()
    for index_name, single_name, read in (
        (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, read_header),
        (BIN_INDEX, BIN_SINGLE, read_torch_zip),
    ):
        index_path = folder / index_name
        single_path = folder / single_name
        if index_path.is_file():
            logger.debug("%s: reading weights through %s", folder, index_name)
            weight_map = _read_index(folder, index_path)
            return weight_map, [read(path) for path in sorted(set(weight_map.values()))]
        if single_path.is_file():
            logger.debug("%s: reading weights from %s", folder, single_name)
            _check_link_target(single_path, resolved_folder, str(single_path))
            header = read(single_path)
            return {name: single_path for name in header.tensors}, [header]
    raise SourceError(
        f"{folder}: no weights found. Expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}."
    )


def _read_index(folder: Path, index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and integers
        # above Python's digit limit. RecursionError covers deep nesting.
        raise SourceError(f"{index_path}: cannot read the index: {error}.") from error

    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: missing or empty 'weight_map'.")

    resolved_folder = folder.resolve()
    shard_paths: dict[str, Path] = {}
    result = {}
    for tensor_name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise SourceError(f"{index_path}: tensor {tensor_name!r} maps to an invalid file name {file_name!r}.")
        if file_name not in shard_paths:
            shard_paths[file_name] = resolve_shard_path(index_path, resolved_folder, tensor_name, file_name)
        result[tensor_name] = shard_paths[file_name]
    return result


def resolve_shard_path(index_path: Path, resolved_folder: Path, tensor_name: str, file_name: object) -> Path:
    # A shard must be named by a path inside the model folder, so that a
    # downloaded index cannot make us read arbitrary files. Absolute names,
    # ".." parts and subfolders that are symlinks leading out are rejected,
    # and so is a shard symlink leading out, except into the blob store of a
    # Hugging Face cache snapshot (see _check_link_target).
    if not isinstance(file_name, str) or not file_name or "\0" in file_name or os.path.isabs(file_name):
        raise SourceError(f"{index_path}: tensor {tensor_name!r} maps to an invalid file name {file_name!r}.")
    path = resolved_folder / file_name
    parent = path.parent.resolve()
    if ".." in PurePosixPath(file_name).parts or (parent != resolved_folder and resolved_folder not in parent.parents):
        raise SourceError(
            f"{index_path}: tensor {tensor_name!r} maps to {file_name!r}, which lies outside the model folder."
        )
    if not path.is_file():
        raise SourceError(f"{index_path}: shard {file_name!r} (for tensor {tensor_name!r}) not found.")
    _check_link_target(path, resolved_folder, f"{index_path}: shard {file_name!r}")
    return path


def _check_link_target(path: Path, resolved_folder: Path, label: str) -> None:
    """Raise SourceError when ``path`` resolves outside the model folder.

    The one exception is the Hugging Face cache layout, where every file of
    ``<repo>/snapshots/<revision>/`` links to ``<repo>/blobs/<hash>``.
    """
    target = path.resolve()
    if resolved_folder in target.parents:
        return
    if resolved_folder.parent.name == "snapshots":
        blobs = resolved_folder.parent.parent / "blobs"
        if target.parent == blobs:
            return
    raise SourceError(f"{label} is a symlink to {target}, which lies outside the model folder.")


def _entry_in(headers: list[WeightsFile], path: Path, name: str) -> TensorEntry:
    for header in headers:
        if header.path == path:
            entry = header.tensors.get(name)
            if entry is None:
                raise SourceError(f"{path}: tensor {name!r} is listed in the index but missing from this shard.")
            return entry
    raise AssertionError(f"no header read for {path}")
