"""Cached synthetic source models, stored as one safetensors file per layer.

A model of N layers is a folder with config.json, model.safetensors.index.json
and hard links to the files of its head and of layers 0 to N-1. Models of 1, 2
and 4 layers made from the same seed therefore share the files of the layers
they have in common, and the disk stores each layer once. To the merge, such a
folder is an ordinary sharded checkpoint. Hard links, unlike symbolic links,
resolve inside the model folder, which lowmem-moe requires of shard files
outside a Hugging Face cache.

Files are cached under a folder named after the shape, and a file with its
final name is always complete, because it is written under a temporary name
and renamed.
"""

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from .llama_tokenizer import write_llama_tokenizer
from .synthetic_checkpoint import ModelShape, llama_config, llama_tensor_shapes, write_random_safetensors

logger = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"  # embeddings, final norm and lm_head
LAYER_FILE = "layer-{layer:03d}.safetensors"  # every tensor of one decoder layer
MLP_LAYER_FILE = "layer-{layer:03d}-mlp.safetensors"  # only the MLP weights of one decoder layer
PARTIAL_SUFFIX = ".partial"
# File seeds are model_seed * SEED_STRIDE + layer, and the head uses the last
# slot, so models with different seeds never share random data.
SEED_STRIDE = 1000
HEAD_SEED_OFFSET = SEED_STRIDE - 1
TOKENIZER_VOCAB_SIZE = 512
ITEM_SIZES = {"BF16": 2, "F32": 4}


@dataclass(frozen=True)
class SourceModel:
    """A synthetic model: its name, its seed and how many of its layers hold every tensor.

    Layers from ``full_layers`` on hold only MLP weights, which is all that a
    merge reads from an expert that is not the base. A model with
    ``full_layers`` 0 has no head file either.
    """

    name: str
    seed: int
    full_layers: int


@dataclass(frozen=True)
class StoreFile:
    """One cached safetensors file: its path, tensors (name to shape) and seed."""

    path: Path
    tensors: dict[str, tuple[int, ...]]
    seed: int

    def data_bytes(self, dtype: str) -> int:
        total = 0
        for shape in self.tensors.values():
            count = 1
            for size in shape:
                count *= size
            total += count * ITEM_SIZES[dtype]
        return total


def shape_key(shape: ModelShape) -> str:
    """Return the cache folder name of a shape. The layer count is left out, because files hold one layer each."""
    return (
        f"h{shape.hidden_size}-i{shape.intermediate_size}-a{shape.num_attention_heads}"
        f"-kv{shape.num_key_value_heads}-v{shape.vocab_size}-{shape.dtype.lower()}"
    )


class ModelStore:
    """Synthetic models of one shape, cached under ``root`` and linked into model folders."""

    def __init__(self, root: Path, shape: ModelShape):
        self.shape = shape
        self.folder = Path(root) / shape_key(shape)
        self.files_folder = self.folder / "files"
        self.models_folder = self.folder / "models"

    def files(self, model: SourceModel, num_layers: int) -> list[StoreFile]:
        """Return the files of ``model`` with ``num_layers`` layers, head first."""
        folder = self.files_folder / model.name
        files = []
        if model.full_layers > 0:
            head = {name: shape for name, shape in self._tensors(0, mlp_only=False).items() if not name.startswith("model.layers.")}
            files.append(StoreFile(folder / HEAD_FILE, head, model.seed * SEED_STRIDE + HEAD_SEED_OFFSET))
        for layer in range(num_layers):
            if layer >= HEAD_SEED_OFFSET:
                raise ValueError(f"layer {layer} exceeds the seed stride; at most {HEAD_SEED_OFFSET} layers are supported")
            mlp_only = layer >= model.full_layers
            prefix = f"model.layers.{layer}."
            tensors = {name: shape for name, shape in self._tensors(layer, mlp_only).items() if name.startswith(prefix)}
            name = (MLP_LAYER_FILE if mlp_only else LAYER_FILE).format(layer=layer)
            files.append(StoreFile(folder / name, tensors, model.seed * SEED_STRIDE + layer))
        return files

    def missing_files(self, requests: list[tuple[SourceModel, int]]) -> list[StoreFile]:
        """Return the files that the (model, layer count) requests need and the cache lacks."""
        missing: dict[Path, StoreFile] = {}
        for model, num_layers in requests:
            for file in self.files(model, num_layers):
                if not file.path.is_file():
                    missing[file.path] = file
        return list(missing.values())

    def generate(self, files: list[StoreFile], workers: int) -> None:
        """Write ``files`` with ``workers`` processes, each file under a temporary name first."""
        if not files:
            return
        total = sum(file.data_bytes(self.shape.dtype) for file in files)
        logger.info("Generating %d synthetic files, %.1f GB, with %d processes", len(files), total / 1e9, workers)
        with ProcessPoolExecutor(max_workers=workers) as pool, tqdm(
            total=total, unit="B", unit_scale=True, desc="Synthetic models"
        ) as progress:
            futures = {pool.submit(_write_file, file, self.shape.dtype): file for file in files}
            for future in as_completed(futures):
                future.result()
                progress.update(futures[future].data_bytes(self.shape.dtype))

    def model_folder(self, model: SourceModel, num_layers: int, tokenizer: bool) -> Path:
        """Create (or recreate) the folder of ``model`` with ``num_layers`` layers and return it.

        The cached files must exist; see ``missing_files`` and ``generate``.
        ``tokenizer`` adds a small Llama-style tokenizer, which a base model needs.
        """
        folder = self.models_folder / f"{model.name}-{num_layers}l"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

        shape = replace(self.shape, num_hidden_layers=num_layers)
        weight_map: dict[str, str] = {}
        total = 0
        for file in self.files(model, num_layers):
            if not file.path.is_file():
                raise FileNotFoundError(f"{file.path}: cached file missing; generate it before linking the model")
            os.link(file.path, folder / file.path.name)
            weight_map.update({name: file.path.name for name in file.tensors})
            total += file.data_bytes(self.shape.dtype)

        (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer:
            write_llama_tokenizer(folder, TOKENIZER_VOCAB_SIZE)
        return folder

    def _tensors(self, layer: int, mlp_only: bool) -> dict[str, tuple[int, ...]]:
        return llama_tensor_shapes(replace(self.shape, num_hidden_layers=layer + 1), mlp_only=mlp_only)


def _write_file(file: StoreFile, dtype: str) -> None:
    file.path.parent.mkdir(parents=True, exist_ok=True)
    partial = file.path.with_name(file.path.name + PARTIAL_SUFFIX)
    write_random_safetensors(partial, file.tensors, dtype, file.seed)
    os.replace(partial, file.path)
