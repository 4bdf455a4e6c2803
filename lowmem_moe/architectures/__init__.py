"""Output architectures and the choice among them."""

from ..checkpoint import Checkpoint
from ..config import MergeConfig
from ..errors import PlanError
from .base import OutputArchitecture, TensorSpec
from .mixtral import MixtralArchitecture

ARCHITECTURES: dict[str, OutputArchitecture] = {
    architecture.name: architecture for architecture in (MixtralArchitecture(),)
}

__all__ = ["ARCHITECTURES", "OutputArchitecture", "TensorSpec", "select_architecture"]


def select_architecture(config: MergeConfig, base: Checkpoint, experts: list[Checkpoint]) -> OutputArchitecture:
    """Return the architecture named in the YAML, or the first one that accepts the sources.

    Raises:
        PlanError: the named architecture is unknown or rejects the sources,
            or no architecture accepts them. The message gives each reason.
    """
    if config.architecture is not None:
        architecture = ARCHITECTURES.get(config.architecture)
        if architecture is None:
            raise PlanError(
                f"{config.path}: unknown architecture {config.architecture!r}. "
                f"Supported: {', '.join(ARCHITECTURES)}."
            )
        reasons = architecture.rejection_reasons(config, base, experts)
        if reasons:
            raise PlanError(f"Cannot build {architecture.name}: " + "; ".join(reasons) + ".")
        return architecture

    all_reasons = []
    for architecture in ARCHITECTURES.values():
        reasons = architecture.rejection_reasons(config, base, experts)
        if not reasons:
            return architecture
        all_reasons.append(f"{architecture.name}: " + "; ".join(reasons))
    raise PlanError("No output architecture accepts these sources. " + " | ".join(all_reasons) + ".")
