"""The interface that every output architecture implements, and the tensor specs it returns."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint
from ..config import ExpertConfig, MergeConfig
from ..sources import MergeSources


@dataclass(frozen=True)
class SpecPart:
    """One source tensor that makes up all or part of an output tensor."""

    checkpoint: Checkpoint
    source_name: str
    expert: ExpertConfig | None = None  # set for expert weights, which get noise
    is_residual: bool = False  # an expert's down projection, which gets residual_scale
    # Name that seeds the part's noise. It is the per-expert tensor name in
    # every layout, so fused and per-expert outputs get the same noise.
    noise_key: str = ""


@dataclass(frozen=True)
class TensorSpec:
    """The sources of one output tensor, before byte ranges are known.

    Either ``parts``, concatenated in order along the first dimension, or
    ``gate`` = (router, layer): a row block of the computed router weights.
    """

    name: str
    shape: tuple[int, ...]
    parts: tuple[SpecPart, ...] = ()
    gate: tuple[str, int] | None = None


class OutputArchitecture(ABC):
    """A MoE model family that dense sources can be merged into."""

    name: str
    # Names accepted for `architecture:` in the YAML, including mergekit-moe's.
    aliases: tuple[str, ...] = ()

    @abstractmethod
    def rejection_reasons(self, config: MergeConfig, sources: MergeSources) -> list[str]:
        """Return why these sources cannot become this architecture, in plain words, or an empty list."""

    @abstractmethod
    def output_config(
        self, config: MergeConfig, sources: MergeSources, dtype_name: str, dropped_fields: frozenset[str]
    ) -> dict[str, Any]:
        """Return the output config.json as a dict."""

    @abstractmethod
    def tensor_specs(self, config: MergeConfig, sources: MergeSources, layout: str) -> list[TensorSpec]:
        """Return every output tensor in file order, in the "per_expert" or "fused" layout."""

    @abstractmethod
    def model_class_name(self) -> str:
        """Return the transformers class that loads the output, such as "MixtralForCausalLM"."""
