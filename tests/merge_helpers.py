"""Helpers for tests that merge tiny models and inspect the result."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lowmem_moe.merge import run_merge
from lowmem_moe.planner import PlanOptions


def merge_yaml(path: Path, base: Path, experts: list[Path], **top_level) -> Path:
    """Write a merge YAML with one distinct prompt per expert and return its path."""
    lines = [f"base_model: {base}"]
    settings = {"gate_mode": "random", **top_level}
    lines += [f"{key}: {value}" for key, value in settings.items()]
    lines.append("experts:")
    for index, expert in enumerate(experts):
        lines.append(f"  - source_model: {expert}")
        lines.append(f'    positive_prompts: ["prompt number {index}"]')
    path.write_text("\n".join(lines) + "\n")
    return path


def merge(config: Path, out_dir: Path, **options) -> Path:
    """Run a merge in this process."""
    return run_merge(config, out_dir, PlanOptions(**options))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint folder, through its index if it has one."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        if index_path.exists()
        else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def token_batch(vocab_size: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Return a (1, length) batch of random token ids."""
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
