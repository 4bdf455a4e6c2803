"""The merge YAML: the schema that everything else reads, and its loader.

The accepted keys are those of mergekit-moe's ``MoEMergeConfig``, so that
recipes written for mergekit-moe work unchanged. Unlike mergekit-moe, an
unknown key is an error, because a misspelt ``postive_prompts`` would
otherwise be ignored without a word.
"""

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .dtypes import dtype_code_from_name
from .errors import ConfigError
from .prompt_checks import find_prompt_slip

logger = logging.getLogger(__name__)

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
# Modes whose router vectors do not come from prompts.
PROMPTLESS_GATE_MODES = ("random", "uniform_random")

TOP_LEVEL_KEYS = (
    "base_model",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "experts",
    "shared_experts",
    "architecture",
)
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass(frozen=True)
class ExpertConfig:
    """One entry of ``experts:`` or ``shared_experts:``."""

    # The local folder that source_reference names, resolved against the
    # YAML's folder. When no such folder exists, the reference may name a
    # Hugging Face Hub model, which model_resolution.py finds.
    source_model: Path
    source_reference: str  # as written in the YAML
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    noise_scale: float | None
    residual_scale: float | None
    line: int  # 1-based line of the entry in the YAML


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge YAML."""

    path: Path
    text: str
    base_model: Path
    base_reference: str
    gate_mode: str
    dtype: str | None  # safetensors code such as "BF16", or None to keep the base's
    experts_per_token: int
    experts: tuple[ExpertConfig, ...]
    shared_experts: tuple[ExpertConfig, ...]
    architecture: str | None
    base_line: int = 0  # 1-based line of base_model in the YAML


def load_merge_config(path: Path) -> MergeConfig:
    """Read and validate a merge YAML.

    Relative model paths resolve against the folder that contains the YAML.
    Loading touches neither the network nor the Hugging Face cache: Hub
    references resolve when the sources are opened. Prompts that look like
    YAML slips, such as an unbalanced quote, are logged as warnings.

    Raises:
        ConfigError: the file is unreadable, not valid YAML or breaks the
            schema. The message gives the file, line and column.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"Cannot read merge config {path}: {error.strerror or error}.") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not valid UTF-8 (byte {error.start} is 0x{data[error.start]:02x}). Save the file as UTF-8."
        ) from error
    return parse_merge_config(text, path)


def parse_merge_config(text: str, path: Path) -> MergeConfig:
    """Validate merge YAML text as if it were read from ``path``, against whose folder relative paths resolve.

    Raises:
        ConfigError: the text is not valid YAML or breaks the schema.
    """
    path = Path(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {error.problem or error.context}.") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}.") from error

    return _Parser(path, text).parse(root)


class _Parser:
    """Walks the YAML node tree so that every error can name its line and column."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.text = text
        self.folder = path.resolve().parent
        self._constructor = yaml.SafeLoader("")

    def parse(self, root: yaml.Node | None) -> MergeConfig:
        if root is None:
            raise ConfigError(f"{self.path}: the file is empty. It needs at least base_model and experts.")
        fields = self._mapping(root, "the top level", TOP_LEVEL_KEYS)

        if "base_model" not in fields:
            raise self._error(root, "missing required key 'base_model'")
        base_reference = self._string(fields["base_model"], "base_model")

        gate_mode = "hidden"
        if "gate_mode" in fields:
            gate_mode = self._string(fields["gate_mode"], "gate_mode")
            if gate_mode not in GATE_MODES:
                raise self._error(
                    fields["gate_mode"],
                    f"unknown gate_mode {gate_mode!r}. Known modes: {', '.join(GATE_MODES)}"
                    f"{_suggestion(gate_mode, GATE_MODES)}",
                )
        dtype = None
        if "dtype" in fields and not self._is_null(fields["dtype"]):
            dtype_name = self._string(fields["dtype"], "dtype")
            try:
                dtype = dtype_code_from_name(dtype_name)
            except ConfigError as error:
                raise self._error(fields["dtype"], str(error).rstrip(".")) from None

        experts_per_token = 2
        if "experts_per_token" in fields:
            experts_per_token = self._integer(fields["experts_per_token"], "experts_per_token")
            if experts_per_token < 1:
                raise self._error(fields["experts_per_token"], "experts_per_token must be at least 1")

        if "experts" not in fields:
            raise self._error(root, "missing required key 'experts'")
        experts = self._experts(fields["experts"], "experts", gate_mode)
        if not experts:
            raise self._error(fields["experts"], "experts must list at least one expert")
        if experts_per_token > len(experts):
            raise self._error(
                fields.get("experts_per_token", root),
                f"experts_per_token is {experts_per_token} but only {len(experts)} experts are listed. "
                "Lower experts_per_token or add experts",
            )

        shared_experts: tuple[ExpertConfig, ...] = ()
        if "shared_experts" in fields and not self._is_null(fields["shared_experts"]):
            shared_experts = self._experts(fields["shared_experts"], "shared_experts", gate_mode)

        architecture = None
        if "architecture" in fields and not self._is_null(fields["architecture"]):
            architecture = self._string(fields["architecture"], "architecture").strip().lower()

        if gate_mode not in PROMPTLESS_GATE_MODES:
            self._check_prompts_differ(experts, fields["experts"])

        return MergeConfig(
            path=self.path,
            text=self.text,
            base_model=self._model_path(base_reference),
            base_reference=base_reference,
            gate_mode=gate_mode,
            dtype=dtype,
            experts_per_token=experts_per_token,
            experts=experts,
            shared_experts=shared_experts,
            architecture=architecture,
            base_line=fields["base_model"].start_mark.line + 1,
        )

    def _experts(self, node: yaml.Node, key: str, gate_mode: str) -> tuple[ExpertConfig, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self._error(node, f"{key} must be a list of experts, each starting with '- source_model:'")
        return tuple(
            self._expert(item, f"{key}[{index}]", gate_mode) for index, item in enumerate(node.value)
        )

    def _expert(self, node: yaml.Node, label: str, gate_mode: str) -> ExpertConfig:
        fields = self._mapping(node, label, EXPERT_KEYS)
        if "source_model" not in fields:
            raise self._error(node, f"{label} is missing required key 'source_model'")
        reference = self._string(fields["source_model"], f"{label}.source_model")

        positive = self._prompts(fields.get("positive_prompts"), f"{label}.positive_prompts", label)
        negative = self._prompts(fields.get("negative_prompts"), f"{label}.negative_prompts", label)
        if gate_mode not in PROMPTLESS_GATE_MODES and not positive:
            raise self._error(
                fields.get("positive_prompts", node),
                f"{label} has no positive_prompts, which gate_mode {gate_mode!r} needs. "
                "Add prompts that should be routed to this expert",
            )

        return ExpertConfig(
            source_model=self._model_path(reference),
            source_reference=reference,
            positive_prompts=positive,
            negative_prompts=negative,
            noise_scale=self._optional_float(fields.get("noise_scale"), f"{label}.noise_scale"),
            residual_scale=self._optional_float(fields.get("residual_scale"), f"{label}.residual_scale"),
            line=node.start_mark.line + 1,
        )

    def _prompts(self, node: yaml.Node | None, key: str, label: str) -> tuple[str, ...]:
        if node is None or self._is_null(node):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise self._error(node, f"{key} must be a list of strings, one '- prompt' per line")

        prompts = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode) or self._is_null(item):
                raise self._error(item, f"{key} entries must be strings. Write \"\" for an empty prompt")
            prompt = item.value  # the scalar's text, before YAML turns `yes` into True
            if item.tag != "tag:yaml.org,2002:str":
                self._warn(item, f"{label}: prompt {prompt!r} is not a string in YAML; it is used as text. Quote it")
            slip = find_prompt_slip(prompt)
            if slip:
                self._warn(item, f"{label}: prompt {prompt!r} {slip}")
            prompts.append(prompt)
        return tuple(prompts)

    def _check_prompts_differ(self, experts: tuple[ExpertConfig, ...], node: yaml.Node) -> None:
        # mergekit-moe rejects this too: routers built from identical prompts
        # are identical, so routing cannot prefer any expert.
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if len(experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
            raise self._error(
                node,
                "every expert has the same positive_prompts and negative_prompts, so their routers would be "
                "identical. Give each expert prompts that describe what it should receive",
            )

    def _model_path(self, reference: str) -> Path:
        path = Path(reference).expanduser()
        return path if path.is_absolute() else self.folder / path

    def _mapping(self, node: yaml.Node, label: str, known: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self._error(node, f"{label} must be a mapping of keys to values")
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in known:
                raise self._error(
                    key_node, f"unknown key {key!r} in {label}{_suggestion(str(key), known)}"
                )
            if key in fields:
                raise self._error(key_node, f"key {key!r} appears twice in {label}")
            fields[key] = value_node
        return fields

    def _value(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def _is_null(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def _string(self, node: yaml.Node, key: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str" or not node.value:
            raise self._error(node, f"{key} must be a non-empty string")
        return node.value

    def _integer(self, node: yaml.Node, key: str) -> int:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int":
            raise self._error(node, f"{key} must be an integer")
        return int(self._value(node))

    def _optional_float(self, node: yaml.Node | None, key: str) -> float | None:
        if node is None or self._is_null(node):
            return None
        if not isinstance(node, yaml.ScalarNode) or node.tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            raise self._error(node, f"{key} must be a number")
        value = float(self._value(node))
        if value != value or value in (float("inf"), float("-inf")):
            raise self._error(node, f"{key} must be a finite number")
        return value

    def _error(self, node: yaml.Node, message: str) -> ConfigError:
        mark = node.start_mark
        end = "" if message.endswith("?") else "."
        return ConfigError(f"{self.path}, line {mark.line + 1}, column {mark.column + 1}: {message}{end}")

    def _warn(self, node: yaml.Node, message: str) -> None:
        mark = node.start_mark
        logger.warning("%s, line %d, column %d: %s", self.path, mark.line + 1, mark.column + 1, message)


def _suggestion(word: str, known: tuple[str, ...]) -> str:
    matches = difflib.get_close_matches(word, known, n=1, cutoff=0.5)
    return f". Did you mean {matches[0]!r}?" if matches else ""
