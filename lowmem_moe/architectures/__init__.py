"""Output architectures and the choice among them."""

from ..config import MergeConfig
from ..errors import PlanError
from ..sources import MergeSources
from .base import OutputArchitecture, SpecPart, TensorSpec
from .mixtral import MixtralArchitecture
from .moe_layout import LAYOUTS
from .qwen_moe import Qwen2MoeArchitecture, Qwen3MoeArchitecture

ARCHITECTURES: tuple[OutputArchitecture, ...] = (
    MixtralArchitecture(),
    Qwen2MoeArchitecture(),
    Qwen3MoeArchitecture(),
)

__all__ = ["ARCHITECTURES", "LAYOUTS", "OutputArchitecture", "SpecPart", "TensorSpec", "select_architecture"]


def select_architecture(config: MergeConfig, sources: MergeSources) -> OutputArchitecture:
    """Return the architecture named in the YAML, or the first one that accepts the sources.

    Raises:
        PlanError: the named architecture is unknown or rejects the sources,
            or no architecture accepts them. The message gives each reason.
    """
    if config.architecture is not None:
        architecture = next((a for a in ARCHITECTURES if config.architecture in a.aliases), None)
        if architecture is None:
            names = ", ".join(alias for a in ARCHITECTURES for alias in a.aliases)
            raise PlanError(f"{config.path}: unknown architecture {config.architecture!r}. Supported: {names}.")
        reasons = architecture.rejection_reasons(config, sources)
        if reasons:
            raise PlanError(f"Cannot build {architecture.name}: " + "; ".join(reasons) + ".")
        return architecture

    all_reasons = []
    for architecture in ARCHITECTURES:
        reasons = architecture.rejection_reasons(config, sources)
        if not reasons:
            return architecture
        all_reasons.append(f"{architecture.name}: " + "; ".join(reasons))
    raise PlanError("No output architecture accepts these sources. " + " | ".join(all_reasons) + ".")
