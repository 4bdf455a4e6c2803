"""The interface that every output architecture implements."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint
from ..config import ExpertConfig, MergeConfig


@dataclass(frozen=True)
class TensorSpec:
    """Where one output tensor comes from, before byte ranges are known.

    Exactly one of ``source_name`` (a tensor of ``checkpoint``) and
    ``gate_layer`` (a row block of the computed router weights) is set.
    """

    name: str
    shape: tuple[int, ...]
    checkpoint: Checkpoint | None = None
    source_name: str | None = None
    gate_layer: int | None = None
    expert: ExpertConfig | None = None  # set for expert weights, which get noise
    is_residual: bool = False  # the expert's down projection, which gets residual_scale


class OutputArchitecture(ABC):
    """A MoE model family that dense sources can be merged into."""

    name: str

    @abstractmethod
    def rejection_reasons(self, config: MergeConfig, base: Checkpoint, experts: list[Checkpoint]) -> list[str]:
        """Return why these sources cannot become this architecture, or an empty list."""

    @abstractmethod
    def output_config(
        self, config: MergeConfig, base: Checkpoint, dtype_name: str, dropped_fields: frozenset[str]
    ) -> dict[str, Any]:
        """Return the output config.json as a dict."""

    @abstractmethod
    def tensor_specs(self, config: MergeConfig, base: Checkpoint, experts: list[Checkpoint]) -> list[TensorSpec]:
        """Return every output tensor in file order."""
