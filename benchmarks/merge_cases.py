"""The merges that the benchmarks run, and the mergekit-moe style YAML of each.

To measure another merge, add one MergeCase line to a tuple below.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

# Gate modes that need no prompts, as in mergekit-moe.
PROMPTLESS_GATE_MODES = ("random", "uniform_random")

# Distinct prompts per expert, because prompt-based gate modes reject experts
# whose prompts are all identical.
EXPERT_PROMPTS = (
    ("Solve the equation", "What is the derivative of"),
    ("Write a Python function", "def add(a, b):"),
    ("Hello, how are you today?", "Tell me a story"),
    ("Translate into French", "What does this word mean"),
    ("Summarize this article", "The main point is"),
    ("Write a poem about the sea", "Roses are red"),
    ("List the prime numbers below", "integrals and algebra"),
    ("Explain the SQL query", "SELECT name FROM users"),
)


@dataclass(frozen=True)
class MergeCase:
    """One merge: gate mode, output dtype, and the number of layers and experts of the sources."""

    name: str
    gate_mode: str = "random"
    dtype: str = "bfloat16"  # output dtype; the synthetic sources are bfloat16
    layers: int = 2
    experts: int = 4

    @property
    def key(self) -> tuple[str, str, int, int]:
        """Identity of the merge apart from its name; cases with the same key give the same output."""
        return (self.gate_mode, self.dtype, self.layers, self.experts)


# Merges compared with cp of the same bytes: a plain copy (bfloat16 in and
# out), a dtype conversion, and the hidden gate mode. A merge that
# `lowmem-moe plan` rejects as not supported yet is recorded as such.
HEADLINE_CASES = (
    MergeCase("random-bf16", gate_mode="random", dtype="bfloat16"),
    MergeCase("random-f16", gate_mode="random", dtype="float16"),
    MergeCase("hidden-bf16", gate_mode="hidden", dtype="bfloat16"),
)

# Peak memory against model size. The 2-layer, 4-expert point is the same
# merge as random-bf16 above, whose measurement is reused.
SCALING_CASES = (
    MergeCase("layers-1", layers=1),
    MergeCase("layers-2", layers=2),
    MergeCase("layers-4", layers=4),
    MergeCase("experts-2", experts=2),
    MergeCase("experts-4", experts=4),
    MergeCase("experts-8", experts=8),
)

# Merges run with both lowmem-moe and mergekit-moe.
PEER_CASES = (
    MergeCase("random-bf16", gate_mode="random", dtype="bfloat16"),
    MergeCase("hidden-bf16", gate_mode="hidden", dtype="bfloat16"),
)


def merge_yaml(case: MergeCase, base: Path, experts: list[Path]) -> str:
    """Return the merge YAML of ``case``, with absolute model paths.

    Absolute paths make one file work for both tools: lowmem-moe resolves
    relative paths against the YAML's folder, mergekit-moe against the
    working directory.
    """
    if len(experts) != case.experts:
        raise ValueError(f"{case.name}: {case.experts} experts expected, {len(experts)} given")
    entries = []
    for index, folder in enumerate(experts):
        entry: dict[str, object] = {"source_model": str(Path(folder).absolute())}
        if case.gate_mode not in PROMPTLESS_GATE_MODES:
            entry["positive_prompts"] = list(EXPERT_PROMPTS[index % len(EXPERT_PROMPTS)])
        entries.append(entry)
    config = {
        "base_model": str(Path(base).absolute()),
        "gate_mode": case.gate_mode,
        "dtype": case.dtype,
        "experts_per_token": 2,
        "experts": entries,
    }
    return yaml.safe_dump(config, sort_keys=False)
