"""The machine-readable record of a merge, kept in the output's model card.

It contains what is needed to rebuild the plan later: the YAML text, where the
YAML was (relative model paths resolve against that folder) and the options.
"""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError
from .planner import PlanOptions

RECORD_START = "<!-- lowmem-moe-record"
RECORD_END = "-->"
RECORD_PATTERN = re.compile(re.escape(RECORD_START) + r"\n(.*?)\n" + re.escape(RECORD_END), re.DOTALL)


@dataclass(frozen=True)
class MergeRecord:
    """The inputs and options of one merge."""

    tool_version: str
    config_path: str  # absolute path of the YAML when the merge ran
    config_text: str
    options: dict[str, Any]

    def plan_options(self) -> PlanOptions:
        """Return the recorded options, with dropped_config_fields as a frozenset again."""
        values = dict(self.options)
        values["dropped_config_fields"] = frozenset(values.get("dropped_config_fields", ()))
        return PlanOptions(**values)


def make_record(config_path: Path, config_text: str, options: PlanOptions) -> MergeRecord:
    """Return the record of a merge about to run."""
    values = asdict(options)
    values["dropped_config_fields"] = sorted(options.dropped_config_fields)
    return MergeRecord(__version__, str(Path(config_path).absolute()), config_text, values)


def record_block(record: MergeRecord) -> str:
    """Return the record as an HTML comment, invisible when the card is rendered."""
    # "--" cannot appear inside an HTML comment; JSON escapes keep it out.
    text = json.dumps(asdict(record), indent=1).replace("--", "-\\u002d")
    return f"{RECORD_START}\n{text}\n{RECORD_END}\n"


def read_record(model_folder: Path) -> MergeRecord:
    """Read the record from a merged model's README.md.

    Raises:
        UserError: the folder has no model card, or no lowmem-moe record in it.
    """
    if not Path(model_folder).is_dir():
        raise UserError(f"Model folder not found: {model_folder}.")
    card = Path(model_folder) / "README.md"
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{card}: cannot read the model card ({error}). Is this a lowmem-moe output folder?") from error
    match = RECORD_PATTERN.search(text)
    if match is None:
        raise UserError(f"{card}: no lowmem-moe record found. Only folders written by lowmem-moe 0.1 or later can be verified.")
    try:
        data = json.loads(match.group(1))
        return MergeRecord(**data)
    except (json.JSONDecodeError, TypeError) as error:
        raise UserError(f"{card}: the lowmem-moe record is damaged ({error}).") from error
