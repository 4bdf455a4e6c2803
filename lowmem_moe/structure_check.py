"""Check a written output against the model that transformers builds from its config.json.

The model is built on the meta device, so the check allocates no weights.
Building it takes a few seconds, mostly importing transformers' model code,
so a merge builds it in the background while it copies (see merge.py).
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import OutputError, PlanError
from .shard_format import INDEX_NAME

logger = logging.getLogger(__name__)

# Per-expert checkpoint names, which transformers 5 fuses on load into
# mlp.experts.gate_up_proj (experts, 2 * intermediate, hidden) and
# mlp.experts.down_proj (experts, hidden, intermediate).
PER_EXPERT_PATTERN = re.compile(
    r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
GATE_UP_PROJECTIONS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}


@dataclass(frozen=True)
class ModelParameters:
    """The parameter shapes of the model that transformers builds from a config.json."""

    shapes: dict[str, tuple[int, ...]]
    model_class: str


def model_parameters(folder: Path) -> ModelParameters:
    """Build the model of ``folder``'s config.json on the meta device and return its parameter shapes.

    Tied output embeddings are left out, as checkpoints do not store them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return ModelParameters(shapes=shapes, model_class=type(model).__name__)


def check_structure(folder: Path, expected: ModelParameters | None = None) -> None:
    """Raise OutputError unless every parameter of the model built from config.json has a tensor of its shape.

    Tensor names and shapes come from the index and shard headers. Per-expert
    tensors are compared in the fused form where the installed transformers
    builds fused expert parameters. ``expected`` is ``model_parameters(folder)``
    when the caller built it already, from the same config.json.
    """
    checkpoint = Checkpoint.open(folder)
    written = {name: tuple(checkpoint.locate(name).entry.shape) for name in checkpoint.tensor_names}
    index_names = set(json.loads((Path(folder) / INDEX_NAME).read_text())["weight_map"])
    if index_names != set(written):
        raise OutputError(f"{folder}: the index and the shard headers list different tensors.")

    if expected is None:
        expected = model_parameters(folder)
    if not set(written) <= set(expected.shapes):
        written = _fused_form(written)
    _compare(folder, expected.shapes, written)
    logger.info("Structure check passed: %d parameters match %s", len(expected.shapes), expected.model_class)


def _fused_form(written: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    result: dict[str, tuple[int, ...]] = {}
    # layer prefix -> expert -> kind -> shape
    experts: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    for name, shape in written.items():
        match = PER_EXPERT_PATTERN.match(name)
        if match is None:
            result[name.replace(".block_sparse_moe.", ".mlp.")] = shape
            continue
        prefix, index, projection = match.group(1), int(match.group(2)), match.group(3)
        kind = GATE_UP_PROJECTIONS.get(projection, "down")
        experts.setdefault(prefix, {}).setdefault(index, {})[kind] = shape

    for prefix, by_index in experts.items():
        count = len(by_index)
        if sorted(by_index) != list(range(count)):
            continue  # leaves the gap to show up as missing parameters
        first = by_index[0]
        if all(set(parts) == {"gate", "up", "down"} for parts in by_index.values()) and all(
            parts == first for parts in by_index.values()
        ):
            intermediate, hidden = first["gate"]
            result[f"{prefix}.mlp.experts.gate_up_proj"] = (count, 2 * intermediate, hidden)
            result[f"{prefix}.mlp.experts.down_proj"] = (count, *first["down"])
    return result


def check_planned_structure(folder: Path, planned: dict[str, tuple[int, ...]], base_config: Path) -> ModelParameters:
    """Raise PlanError unless the planned tensors fit the model of ``folder``'s config.json, and return its parameters.

    A merge runs this in the background before its shards are written, so
    that a config whose sizes do not match the tensors fails early. The
    output config takes its values from the base's config.json, which
    ``base_config`` names in the messages.
    """
    try:
        expected = model_parameters(folder)
    except Exception as error:  # transformers raises KeyError, ValueError and its own validation errors here
        raise PlanError(
            f"transformers cannot build the merged model from its config.json ({type(error).__name__}: {error}). "
            f"That config takes its values from the base model's {base_config}; check them there."
        ) from error

    if not set(planned) <= set(expected.shapes):
        planned = _fused_form(planned)
    problems = _problems(expected.shapes, planned)
    if problems:
        raise PlanError(
            "The source tensors do not fit the model that the merged config.json describes: "
            + "; ".join(problems)
            + f". The config's sizes come from the base model's {base_config}; check that they match its tensors."
        )
    return expected


def _compare(folder: Path, expected: dict[str, tuple[int, ...]], written: dict[str, tuple[int, ...]]) -> None:
    problems = _problems(expected, written)
    if problems:
        raise OutputError(
            f"{folder}: the written tensors do not match the model that config.json describes: "
            + "; ".join(problems)
            + ". This is a bug in lowmem-moe; please report it with the merge YAML."
        )


def _problems(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters have no tensor, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors have no parameter, e.g. {unexpected[0]!r}")
    if mismatched:
        name = mismatched[0]
        problems.append(
            f"{len(mismatched)} shapes differ, e.g. {name!r}: config gives {list(expected[name])}, "
            f"tensor has {list(found[name])}"
        )
    return problems
