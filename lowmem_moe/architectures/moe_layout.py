"""Tensor specs shared by every output architecture: base tensors, routers and experts.

An architecture describes its tensor names with a MoeNaming, and this module
builds the ordered list of output tensors from it.
"""

import re
from dataclasses import dataclass

from ..checkpoint import Checkpoint
from ..config import ExpertConfig, MergeConfig
from ..errors import PlanError
from ..sources import MergeSources
from .base import SpecPart, TensorSpec

LAYOUTS = ("per_expert", "fused")

# The dense MLP of source layer i, which becomes one expert.
DENSE_MLP = "model.layers.{layer}.mlp.{projection}.weight"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MLP_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.")
# Buffers that older checkpoints saved and that the model recomputes.
SKIPPED_PATTERN = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

# transformers 5 fuses experts into these parameters, (experts, 2 * intermediate,
# hidden) with each expert's gate rows before its up rows, and (experts,
# hidden, intermediate).
FUSED_ROUTER = "model.layers.{layer}.mlp.gate.weight"
FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"


@dataclass(frozen=True)
class MoeNaming:
    """Output tensor names of an architecture, as templates with {layer}, {expert} and {projection}."""

    router: str  # per-expert layout
    expert: dict[str, str]  # dense projection name -> per-expert output name
    shared_expert: str | None = None  # with {projection}, for architectures with a shared expert
    shared_expert_gate: str | None = None


def build_tensor_specs(
    config: MergeConfig,
    sources: MergeSources,
    layout: str,
    naming: MoeNaming,
    layer_tensors: tuple[str, ...],
    architecture_name: str,
) -> list[TensorSpec]:
    """Return every output tensor in file order: embeddings, each layer's tensors, final norm and head.

    Raises:
        PlanError: the base has a tensor with no place in the output, or
            lacks one that the output needs.
    """
    base = sources.base
    num_layers = base.config.num_hidden_layers
    head, layer_specs, tail = _base_tensor_specs(base, num_layers, layer_tensors, architecture_name)

    hidden = base.config.hidden_size
    specs = list(head)
    for layer in range(num_layers):
        for suffix in layer_tensors:
            base.locate(f"model.layers.{layer}.{suffix}")
        specs.extend(layer_specs[layer])

        router_name = naming.router if layout == "per_expert" else FUSED_ROUTER
        specs.append(
            TensorSpec(name=router_name.format(layer=layer), shape=(len(config.experts), hidden), gate=("experts", layer))
        )
        experts = list(zip(config.experts, sources.experts))
        if layout == "per_expert":
            specs.extend(_per_expert_specs(experts, layer, naming))
        else:
            specs.extend(_fused_specs(experts, layer, naming))

        if naming.shared_expert is not None:
            for expert_config, checkpoint in zip(config.shared_experts, sources.shared_experts):
                for projection in PROJECTIONS:
                    name = naming.shared_expert.format(layer=layer, projection=projection)
                    specs.append(_single_part_spec(checkpoint, layer, projection, name, expert_config))
            specs.append(
                TensorSpec(
                    name=naming.shared_expert_gate.format(layer=layer), shape=(1, hidden), gate=("shared_expert", layer)
                )
            )
    specs.extend(tail)
    return specs


def _base_tensor_specs(
    base: Checkpoint, num_layers: int, layer_tensors: tuple[str, ...], architecture_name: str
) -> tuple[list[TensorSpec], list[list[TensorSpec]], list[TensorSpec]]:
    head: list[TensorSpec] = []
    layers: list[list[TensorSpec]] = [[] for _ in range(num_layers)]
    tail: list[TensorSpec] = []
    for name in base.tensor_names:
        if MLP_PATTERN.match(name) or SKIPPED_PATTERN.match(name):
            continue
        spec = TensorSpec(name=name, shape=base.locate(name).entry.shape, parts=(SpecPart(base, name),))
        layer_match = LAYER_PATTERN.match(name)
        if layer_match and int(layer_match.group(1)) < num_layers and name[layer_match.end():] in layer_tensors:
            layers[int(layer_match.group(1))].append(spec)
        elif name == "model.embed_tokens.weight":
            head.append(spec)
        elif name in ("model.norm.weight", "lm_head.weight"):
            tail.append(spec)
        else:
            raise PlanError(
                f"{base.folder}: tensor {name!r} has no place in a {architecture_name} model, so it would be lost. "
                "Check that the base model's architecture matches the output architecture."
            )

    base.locate("model.embed_tokens.weight")
    base.locate("model.norm.weight")
    if not base.config.tie_word_embeddings:
        base.locate("lm_head.weight")
    return head, layers, tail


def _per_expert_specs(experts: list[tuple[ExpertConfig, Checkpoint]], layer: int, naming: MoeNaming) -> list[TensorSpec]:
    specs = []
    for index, (expert_config, checkpoint) in enumerate(experts):
        for projection, template in naming.expert.items():
            name = template.format(layer=layer, expert=index)
            specs.append(_single_part_spec(checkpoint, layer, projection, name, expert_config))
    return specs


def _fused_specs(experts: list[tuple[ExpertConfig, Checkpoint]], layer: int, naming: MoeNaming) -> list[TensorSpec]:
    gate_up_parts = []
    down_parts = []
    for index, (expert_config, checkpoint) in enumerate(experts):
        for projection in ("gate_proj", "up_proj"):
            gate_up_parts.append(_part(checkpoint, layer, projection, expert_config, naming, index))
        down_parts.append(_part(checkpoint, layer, "down_proj", expert_config, naming, index))

    intermediate, hidden = gate_up_parts[0].checkpoint.locate(gate_up_parts[0].source_name).entry.shape
    count = len(experts)
    return [
        TensorSpec(FUSED_GATE_UP.format(layer=layer), (count, 2 * intermediate, hidden), parts=tuple(gate_up_parts)),
        TensorSpec(FUSED_DOWN.format(layer=layer), (count, hidden, intermediate), parts=tuple(down_parts)),
    ]


def _part(
    checkpoint: Checkpoint, layer: int, projection: str, expert: ExpertConfig, naming: MoeNaming, index: int
) -> SpecPart:
    return SpecPart(
        checkpoint=checkpoint,
        source_name=DENSE_MLP.format(layer=layer, projection=projection),
        expert=expert,
        is_residual=projection == "down_proj",
        noise_key=naming.expert[projection].format(layer=layer, expert=index),
    )


def _single_part_spec(
    checkpoint: Checkpoint, layer: int, projection: str, name: str, expert: ExpertConfig
) -> TensorSpec:
    source_name = DENSE_MLP.format(layer=layer, projection=projection)
    part = SpecPart(checkpoint, source_name, expert=expert, is_residual=projection == "down_proj", noise_key=name)
    return TensorSpec(name=name, shape=checkpoint.locate(source_name).entry.shape, parts=(part,))
