"""Write the demo's merge YAML and run ``lowmem-moe merge`` on it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

from lowmem_moe.errors import UserError
from lowmem_moe.resource_monitor import RunMeasurement, run_measured

logger = logging.getLogger(__name__)


def write_merge_config(config_path: Path) -> Path:
    """Copy the packaged demo.yml to ``config_path``, next to the cached models."""
    template = resources.files("lowmem_moe.demo").joinpath("demo.yml").read_text(encoding="utf-8")

    # Written under a temporary name and renamed, so the file is never half-written.
    partial = config_path.with_name(config_path.name + ".partial")
    partial.write_text(template, encoding="utf-8")
    os.replace(partial, config_path)
    return config_path


def expert_labels(config_path: Path) -> list[str]:
    """Return one short name per expert of the merge YAML: its source folder's name."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    return [Path(expert["source_model"]).name for expert in config["experts"]]


# Prompts of each expert's domain that are not among its positive_prompts,
# so the routing report shows whether routing generalises beyond them.
ROUTE_PROMPTS = (
    "Compute the derivative of x^3 + 2x",
    "Write a Python class for a stack with push and pop",
    "Good morning! Any fun plans for the weekend?",
    "Why is the sky blue?",
)


def run_routes_cli(output_dir: Path, labels: list[str]) -> None:
    """Print which experts the merged model's routers pick for ROUTE_PROMPTS, with ``lowmem-moe routes``.

    Raises:
        UserError: The command exited with a non-zero code.
    """
    command = [sys.executable, "-m", "lowmem_moe.cli", "routes", str(output_dir), *ROUTE_PROMPTS, "-q"]
    logger.info("Routing report: %s", " ".join(command))
    print("\nRouting of new prompts, share of router picks per expert over all layers:")
    print("  " + ", ".join(f"expert {index} = {label}" for index, label in enumerate(labels)))
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    print(completed.stdout)
    if completed.returncode != 0:
        raise UserError(f"lowmem-moe routes failed with exit code {completed.returncode}, see its messages above.")


def run_merge_cli(config_path: Path, output_dir: Path) -> RunMeasurement:
    """Run ``lowmem-moe merge`` in a subprocess and measure its wall time and peak memory.

    Raises:
        UserError: The merge exited with a non-zero code.
    """
    # lowmem-moe creates OUT_DIR itself but expects its parent to exist.
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    command = [sys.executable, "-m", "lowmem_moe.cli", "merge", str(config_path), str(output_dir), "--overwrite"]
    logger.info("Merging: %s", " ".join(command))

    measurement = run_measured(command)
    if measurement.returncode != 0:
        raise UserError(
            f"lowmem-moe merge failed with exit code {measurement.returncode}, see its messages above. "
            f"To rerun it alone: {' '.join(command)}"
        )
    return measurement
