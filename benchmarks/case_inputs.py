"""The synthetic source models of each merge case, and its YAML file.

The headline merges (2 layers, 4 experts) read complete models of about
4 GB each with the default Yi-34B shape. Scaling runs need more layers and
experts. The layers and experts that only they use contain MLP weights
alone, because a merge reads nothing else from an expert that is not the
base. Every merge therefore reads and writes the same bytes as it would
with complete models.
"""

from dataclasses import dataclass
from pathlib import Path

from .merge_cases import MergeCase, merge_yaml
from .model_store import ModelStore, SourceModel

# Experts 1 to 4 contain every tensor in layers 0 and 1, which the headline
# merges read. Their later layers, and experts 5 and up, contain MLP weights only.
COMPLETE_EXPERTS = 4
COMPLETE_EXPERT_LAYERS = 2
ALL_LAYERS = 999  # SourceModel.full_layers of the base: every layer complete

BASE_MODEL = SourceModel("base", seed=0, full_layers=ALL_LAYERS)


def expert_model(index: int) -> SourceModel:
    """Return the synthetic model of expert ``index`` (0-based)."""
    complete = index < COMPLETE_EXPERTS
    return SourceModel(f"expert{index + 1}", seed=index + 1, full_layers=COMPLETE_EXPERT_LAYERS if complete else 0)


def model_requests(cases: list[MergeCase]) -> list[tuple[SourceModel, int]]:
    """Return the (model, layer count) pairs that ``cases`` read."""
    requests = []
    for case in cases:
        requests.append((BASE_MODEL, case.layers))
        requests.extend((expert_model(index), case.layers) for index in range(case.experts))
    return requests


@dataclass(frozen=True)
class CaseInputs:
    """The model folders and YAML of one merge case."""

    config: Path
    base: Path
    experts: tuple[Path, ...]

    @property
    def source_files(self) -> list[Path]:
        """Return the resolved safetensors files that the merge may read."""
        files = []
        for folder in (self.base, *self.experts):
            files.extend(path.resolve() for path in sorted(folder.glob("*.safetensors")))
        return files


def prepare_case_inputs(store: ModelStore, case: MergeCase, config_folder: Path) -> CaseInputs:
    """Link the model folders of ``case`` and write its YAML. The cached files must exist."""
    base = store.model_folder(BASE_MODEL, case.layers, tokenizer=True)
    experts = tuple(store.model_folder(expert_model(index), case.layers, tokenizer=False) for index in range(case.experts))
    config_folder.mkdir(parents=True, exist_ok=True)
    config = config_folder / f"{case.name}.yml"
    config.write_text(merge_yaml(case, base, list(experts)))
    return CaseInputs(config=config, base=base, experts=experts)
