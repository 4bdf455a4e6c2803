"""The output README.md: what was merged, from what, and how to reproduce it."""

import re
from pathlib import Path

from . import __version__
from .config import ExpertConfig, MergeConfig
from .model_resolution import ResolvedModel, SourceResolution
from .plan import MergePlan

MAX_PROMPTS_LISTED = 8


def model_card(config: MergeConfig, plan: MergePlan, seed: int, resolution: SourceResolution) -> str:
    """Return the model card text in Markdown, with Hugging Face front matter.

    Each source appears as the YAML names it and with the Hub commit it
    resolved to, or "local folder", so that the merge can be repeated.
    """
    lines = [
        "---",
        "tags:",
        "- moe",
        "- frankenmoe",
        "- lowmem-moe",
        "---",
        "",
        f"# {Path(config.path).stem}",
        "",
        f"A {plan.architecture} Mixture-of-Experts model with {len(config.experts)} experts, "
        f"{config.experts_per_token} active per token, built by lowmem-moe {__version__}.",
        "",
        "## Settings",
        "",
        f"- base model: `{config.base_reference}` ({_revision(resolution.base)})",
        f"- architecture: {plan.architecture}",
        f"- gate_mode: {config.gate_mode}",
        f"- dtype: {plan.output_config.get('dtype')}",
        f"- experts_per_token: {config.experts_per_token}",
        f"- seed: {seed}",
        "",
        "## Experts",
        "",
        "| # | source model | revision | positive prompts | negative prompts | noise_scale | residual_scale |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        _expert_row(index, expert, model)
        for index, (expert, model) in enumerate(zip(config.experts, resolution.experts))
    ]
    lines += [
        "",
        "## Merge config",
        "",
        f"{_fence(config.text)}yaml",
        config.text.rstrip("\n"),
        _fence(config.text),
        "",
    ]
    return "\n".join(lines)


def _expert_row(index: int, expert: ExpertConfig, model: ResolvedModel) -> str:
    return (
        f"| {index} | `{expert.source_reference}` | {_revision(model)} | {_prompt_list(expert.positive_prompts)} | "
        f"{_prompt_list(expert.negative_prompts)} | {_number(expert.noise_scale)} | {_number(expert.residual_scale)} |"
    )


def _revision(model: ResolvedModel) -> str:
    return "local folder" if model.commit is None else f"Hub commit `{model.commit}`"


def _prompt_list(prompts: tuple[str, ...]) -> str:
    if not prompts:
        return "-"
    shown = ", ".join(_escape(repr(prompt)) for prompt in prompts[:MAX_PROMPTS_LISTED])
    hidden = len(prompts) - MAX_PROMPTS_LISTED
    return shown + (f" and {hidden} more" if hidden > 0 else "")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    # A code fence longer than any run of backticks in the text, so that
    # the YAML cannot close it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
