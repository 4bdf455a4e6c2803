"""Downstream check: llama.cpp's convert_hf_to_gguf.py turns a lowmem-moe output into a GGUF with its experts.

The converter is taken at run time from the llama-cpp-python source
distribution, which vendors llama.cpp, and is never committed. It needs the
``gguf-py`` package vendored next to it: the ``gguf`` release on the package
index (0.19.0 here) lacks ``LazyChunkedTensor``, which the converter of
llama-cpp-python 0.3.36 calls. It also imports ``sentencepiece`` before it
looks for a tokenizer.model, so that package must be installed even for a
tokenizer.json vocabulary.

A tiny float32 merge is converted with ``--outtype f32``, so every expert
tensor in the GGUF can be compared exactly with the source models.
"""

import importlib.metadata
import logging
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import safe_open

from .compare_outputs import tensor_files
from .measure import OFFLINE_ENV
from .tiny_llama import TinyLlamaShape, write_tiny_llama

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_SPEC = "llama-cpp-python==0.3.36"
VENDOR_PREFIX = "vendor/llama.cpp/"
# Paths, relative to the vendored llama.cpp folder, of the converter and the packages it imports.
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
NUM_EXPERTS = 4
SHAPE = TinyLlamaShape()
# GGUF tensor names of the experts, and the source projection each one stacks.
EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


@dataclass(frozen=True)
class Converter:
    """An extracted convert_hf_to_gguf.py and the llama-cpp-python version it came from."""

    script: Path
    version: str


def fetch_converter(folder: Path, spec: str = LLAMA_CPP_PYTHON_SPEC) -> Converter:
    """Download the llama-cpp-python source distribution once and extract the converter from it.

    Raises:
        subprocess.CalledProcessError: pip could not download the distribution.
    """
    folder.mkdir(parents=True, exist_ok=True)
    archives = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    wanted_version = spec.partition("==")[2]
    archives = [path for path in archives if not wanted_version or _archive_version(path) == wanted_version]
    if not archives:
        logger.info("Downloading the %s source distribution", spec)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(folder)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        archives = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    archive = archives[-1]
    version = _archive_version(archive)

    target = folder / f"llama.cpp-{version}"
    script = target / "convert_hf_to_gguf.py"
    if not script.is_file():
        prefix = f"llama_cpp_python-{version}/{VENDOR_PREFIX}"
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(prefix):
                    continue
                relative = member.name[len(prefix):]
                if any(relative == wanted or relative.startswith(wanted) for wanted in CONVERTER_MEMBERS):
                    member.name = relative
                    members.append(member)
            tar.extractall(target, members=members, filter="data")
    return Converter(script=script, version=version)


def build_tiny_merge(folder: Path) -> tuple[Path, list[Path]]:
    """Write a tiny base and experts, merge them with lowmem-moe in float32, and return the output and the experts."""
    sources = folder / "sources"
    base = write_tiny_llama(sources / "base", SHAPE, seed=0)
    experts = [write_tiny_llama(sources / f"expert{index}", SHAPE, seed=index + 1) for index in range(NUM_EXPERTS)]
    config = folder / "merge.yml"
    lines = ["base_model: sources/base", "gate_mode: random", "dtype: float32", "experts:"]
    lines += [f"  - source_model: sources/{expert.name}" for expert in experts]
    config.write_text("\n".join(lines) + "\n")

    output = folder / "merged"
    with open(folder / "merge.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "lowmem_moe.cli", "merge", str(config), str(output), "--overwrite"],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return output, experts


def convert_to_gguf(converter: Converter, model: Path, output: Path, log_path: Path) -> int:
    """Run the converter on ``model`` with float32 output and return its exit code."""
    with open(log_path, "w") as log:
        completed = subprocess.run(
            [sys.executable, str(converter.script), str(model), "--outtype", "f32", "--outfile", str(output)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **OFFLINE_ENV},
        )
    return completed.returncode


def check_gguf(path: Path, merged: Path, experts: list[Path]) -> list[dict[str, Any]]:
    """Return one check per expected fact about the GGUF: metadata, expert tensor shapes and values."""
    reader = gguf.GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    checks = [
        _check("architecture is llama", reader.fields["general.architecture"].contents() == "llama"),
        _check(f"expert_count is {NUM_EXPERTS}", reader.fields["llama.expert_count"].contents() == NUM_EXPERTS),
    ]

    merged_files = tensor_files(merged)
    for layer in range(SHAPE.num_hidden_layers):
        for gguf_name, projection in EXPERT_TENSORS.items():
            name = f"blk.{layer}.{gguf_name}.weight"
            if name not in tensors:
                checks.append(_check(f"{name} present", False))
                continue
            data = np.asarray(tensors[name].data)  # (experts, rows, columns)
            source_name = f"model.layers.{layer}.mlp.{projection}.weight"
            sources = [_read(expert / "model.safetensors", source_name) for expert in experts]
            expected_shape = (NUM_EXPERTS, *sources[0].shape)
            checks.append(_check(f"{name} shape {list(expected_shape)}", data.shape == expected_shape, str(list(data.shape))))
            if data.shape == expected_shape:
                same = all(np.array_equal(data[index], source) for index, source in enumerate(sources))
                checks.append(_check(f"{name} equals the experts' {projection}, in expert order", same))

        router_name = f"blk.{layer}.ffn_gate_inp.weight"
        merged_router = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        router = _read(merged_files[merged_router], merged_router)
        present = router_name in tensors
        checks.append(_check(f"{router_name} present", present))
        if present:
            checks.append(_check(f"{router_name} equals the merged router", np.array_equal(np.asarray(tensors[router_name].data), router)))
    return checks


def run_gguf_check(folder: Path) -> dict[str, Any]:
    """Fetch the converter, convert a tiny merge and check the GGUF; return the result for the results page."""
    converter = fetch_converter(folder / "llama-cpp-python")
    merged, experts = build_tiny_merge(folder / "tiny")
    gguf_path = folder / "tiny" / "merged.gguf"
    log_path = folder / "tiny" / "convert.log"
    logger.info("Converting %s with llama.cpp's convert_hf_to_gguf.py from llama-cpp-python %s", merged, converter.version)
    returncode = convert_to_gguf(converter, merged, gguf_path, log_path)
    result: dict[str, Any] = {
        "llama_cpp_python": converter.version,
        "gguf_reader": importlib.metadata.version("gguf"),
        "model": f"{NUM_EXPERTS} experts, {SHAPE.num_hidden_layers} layers, hidden {SHAPE.hidden_size}, float32",
        "converter_exit_code": returncode,
        "checks": [],
    }
    if returncode == 0:
        result["checks"] = check_gguf(gguf_path, merged, experts)
    else:
        logger.error("convert_hf_to_gguf.py failed with exit code %d; see %s", returncode, log_path)
    result["passed"] = returncode == 0 and all(check["ok"] for check in result["checks"])
    return result


def _check(description: str, ok: bool, detail: str | None = None) -> dict[str, Any]:
    if not ok:
        logger.error("GGUF check failed: %s%s", description, f" ({detail})" if detail else "")
    return {"check": description, "ok": bool(ok)}


def _read(path: Path, name: str) -> np.ndarray:
    with safe_open(path, framework="numpy") as handle:
        return handle.get_tensor(name)


def _archive_version(path: Path) -> str:
    match = re.fullmatch(r"llama_cpp_python-(.+)\.tar\.gz", path.name)
    return match.group(1) if match else ""
