"""Building an output config.json from the base's, with no field dropped silently."""

from typing import Any

from ..errors import PlanError
from ..model_config import ModelConfig
from .config_fields import IGNORABLE_FIELDS

# Llama, Mistral and Qwen configs default rope_theta to 10000 when it is
# absent, while MoE classes such as Mixtral default to 1e6, so the value is
# always written out.
DEFAULT_ROPE_THETA = 10000.0
ROPE_FIELDS = frozenset({"rope_theta", "rope_scaling", "rope_parameters"})


def carried_fields(
    base: ModelConfig,
    carried: tuple[str, ...],
    handled: frozenset[str],
    dropped: frozenset[str],
    architecture_name: str,
) -> dict[str, Any]:
    """Return the base fields listed in ``carried``, after checking that every other field is accounted for.

    A field is accounted for when it is carried, handled by the caller,
    known to carry no model computation, or dropped by the user.

    Raises:
        PlanError: the base has a field that the output cannot express. The
            message names the field and how to drop it.
    """
    accounted = set(carried) | handled | ROPE_FIELDS | IGNORABLE_FIELDS | dropped
    unknown = sorted(key for key in base.raw if key not in accounted)
    if unknown:
        others = f" (nor do {', '.join(repr(key) for key in unknown[1:])})" if len(unknown) > 1 else ""
        raise PlanError(
            f"{base.path}: field {unknown[0]!r} has no equivalent in a {architecture_name} config{others}. "
            f"If it does not change the model's outputs, pass --drop-config-field {unknown[0]} to leave it out."
        )
    return {key: base.raw[key] for key in carried if key in base.raw}


def rope_fields(base: ModelConfig) -> dict[str, Any]:
    """Return the rotary settings in both spellings.

    transformers 4.x reads rope_theta and rope_scaling, and 5.x reads
    rope_parameters, so both are written with the same settings.
    """
    rope = base.rope
    theta = rope.theta if rope.theta is not None else DEFAULT_ROPE_THETA
    return {
        "rope_theta": theta,
        "rope_scaling": dict(rope.scaling) if rope.scaling else None,
        "rope_parameters": {"rope_type": "default", **(rope.scaling or {}), "rope_theta": theta},
    }


def fixed_field_reasons(base: ModelConfig, fixed: dict[str, tuple[object, str]]) -> list[str]:
    """Return a reason for each field whose value the output cannot express."""
    reasons = []
    for field_name, (allowed, why) in fixed.items():
        value = base.raw.get(field_name, allowed)
        if value != allowed:
            reasons.append(f"the base config has {field_name}={value!r}, but {why}")
    return reasons
