"""Read a source model's config.json in either transformers style.

transformers 5 writes ``rope_parameters`` and ``dtype``. Older checkpoints
write ``rope_theta``, ``rope_scaling`` and ``torch_dtype``. Both read here
into one normalised form.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError


@dataclass(frozen=True)
class RopeSettings:
    """Rotary embedding settings in a style-independent form."""

    theta: float | None
    # The scaling dict without rope_theta, with "rope_type" as its type key,
    # or None for plain rotary embeddings.
    scaling: dict[str, Any] | None


@dataclass
class ModelConfig:
    """A source model's config.json, as read from disk."""

    path: Path
    raw: dict[str, Any] = field(repr=False)

    @property
    def model_type(self) -> str:
        return str(self.raw.get("model_type", ""))

    @property
    def num_hidden_layers(self) -> int:
        return self.require_int("num_hidden_layers")

    @property
    def hidden_size(self) -> int:
        return self.require_int("hidden_size")

    @property
    def intermediate_size(self) -> int:
        return self.require_int("intermediate_size")

    @property
    def vocab_size(self) -> int:
        return self.require_int("vocab_size")

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers' PreTrainedConfig defaults this to True when absent.
        return bool(self.raw.get("tie_word_embeddings", True))

    @property
    def dtype_name(self) -> str | None:
        value = self.raw.get("dtype", self.raw.get("torch_dtype"))
        return None if value is None else str(value)

    @property
    def rope(self) -> RopeSettings:
        return read_rope_settings(self.raw)

    def require_int(self, key: str) -> int:
        """Return an integer field, raising SourceError when it is absent or not an integer."""
        value = self.raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SourceError(f"{self.path}: field {key!r} must be an integer, got {value!r}.")
        return value


def read_model_config(folder: Path) -> ModelConfig:
    """Read ``config.json`` from a model folder.

    Raises:
        SourceError: the file is missing or is not a JSON object.
    """
    path = Path(folder) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"{folder}: no config.json. A source model must be a Hugging Face checkpoint folder.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: cannot read: {error}.") from error

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}.") from error
    except (ValueError, RecursionError) as error:
        # Integers above Python's digit limit, or nesting deeper than the recursion limit.
        raise SourceError(f"{path}: invalid JSON: {error}.") from error
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: must contain a JSON object.")
    return ModelConfig(path=path, raw=raw)


def read_rope_settings(raw: dict[str, Any]) -> RopeSettings:
    """Return the rotary settings of a config dict in either style."""
    parameters = raw.get("rope_parameters")
    legacy_scaling = raw.get("rope_scaling")

    if isinstance(parameters, dict) and parameters:
        theta = parameters.get("rope_theta", raw.get("rope_theta"))
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta")
        scaling = dict(legacy_scaling) if isinstance(legacy_scaling, dict) else None

    if scaling is not None:
        # Configs before transformers 4.45 name the type "type".
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling["type"]
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None

    return RopeSettings(theta=None if theta is None else float(theta), scaling=scaling)
