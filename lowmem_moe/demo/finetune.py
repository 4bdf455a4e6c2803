"""Derive domain experts from the base model by short MLP-only fine-tunes.

Only ``mlp.gate_proj``, ``mlp.up_proj`` and ``mlp.down_proj`` train, so the
attention, norm and embedding tensors of every expert stay byte-identical to
the base model's. That is the situation a frankenMoE merge assumes: the
experts differ only in the tensors that become the MoE experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lowmem_moe.demo.fetch import BASE_MODEL_FILES, has_files
from lowmem_moe.demo.staging import staged_folder

logger = logging.getLogger(__name__)

TRAINABLE_SUFFIXES = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")

# Stored next to the weights; a cached expert is reused only if this file
# matches the current recipe and training text.
RECIPE_FILE = "lowmem_moe_demo_recipe.json"

# Copied byte for byte from the base, so every expert has the base's
# tokenizer and config. save_pretrained would rewrite them from the loaded
# objects, which can differ in formatting or defaults.
_FILES_FROM_BASE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class ExpertRecipe:
    """Training settings for one expert.

    Each step is one forward and backward pass over ``batch_size *
    sequence_length`` tokens. With the defaults that took about 3 s on 2
    otherwise idle cores of an AMD EPYC VM with torch 2.13 (CPU build), so
    an expert takes about 2 minutes. On the same VM with a load average of
    3 to 5 from other processes, a step took 6 to 12 s.
    """

    name: str
    text_file: str
    seed: int
    steps: int = 36
    batch_size: int = 4
    sequence_length: int = 128  # tokens per training window
    # With 36 steps this moved the MLP weights by about 0.5 % (relative L2
    # norm) and the training loss from about 2.0 to 0.2-0.3. The replies of
    # each expert then echo its text but stay coherent.
    # NOTE: the texts are a few KB, so the experts partly memorize them.
    # They show that the merge keeps the experts apart, not domain skill.
    learning_rate: float = 1e-4


EXPERT_RECIPES = (
    ExpertRecipe(name="math", text_file="math.txt", seed=1),
    ExpertRecipe(name="code", text_file="code.txt", seed=2),
    ExpertRecipe(name="chat", text_file="chat.txt", seed=3),
)


def ensure_expert(base_dir: Path, recipe: ExpertRecipe, out_dir: Path) -> Path:
    """Fine-tune an expert into ``out_dir`` unless a matching one is cached there.

    Returns:
        ``out_dir``, a checkpoint folder in the base model's format.
    """
    text = read_training_text(recipe.text_file)
    recipe_record = _recipe_record(recipe, text)

    if has_files(out_dir, BASE_MODEL_FILES) and _read_recipe(out_dir) == recipe_record:
        logger.info("Expert %s: using cached %s", recipe.name, out_dir)
        return out_dir

    logger.info("Expert %s: fine-tuning the MLP weights on %s", recipe.name, recipe.text_file)
    model = finetune_mlp(base_dir, recipe, text)

    with staged_folder(out_dir) as partial:
        _save_expert(model, base_dir, partial)
        (partial / RECIPE_FILE).write_text(json.dumps(recipe_record, indent=2) + "\n", encoding="utf-8")

    return out_dir


def read_training_text(file_name: str) -> str:
    """Return the text of ``lowmem_moe/demo/texts/<file_name>``."""
    return resources.files("lowmem_moe.demo").joinpath("texts").joinpath(file_name).read_text(encoding="utf-8")


def finetune_mlp(base_dir: Path, recipe: ExpertRecipe, text: str) -> PreTrainedModel:
    """Load the base model and train its MLP weights on random windows of ``text``.

    Raises:
        ValueError: ``text`` is shorter than one training window.
    """
    torch.manual_seed(recipe.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    token_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # (text_tokens,)
    if len(token_ids) < recipe.sequence_length:
        raise ValueError(
            f"{recipe.text_file} has {len(token_ids)} tokens, fewer than one window of "
            f"{recipe.sequence_length}. Lengthen the text or lower sequence_length."
        )

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trainable = _freeze_all_but_mlp(model)
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed)

    model.train()
    losses = []
    progress = tqdm(range(recipe.steps), desc=f"expert {recipe.name}", unit="step")
    for _ in progress:
        batch = _sample_windows(token_ids, recipe.batch_size, recipe.sequence_length, generator)  # (batch, seq)

        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")

    model.eval()
    logger.info(
        "Expert %s: training loss %.3f at the first step, %.3f at the last",
        recipe.name,
        losses[0],
        losses[-1],
    )
    return model


def _freeze_all_but_mlp(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith(TRAINABLE_SUFFIXES))
        if parameter.requires_grad:
            trainable.append(parameter)

    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameters ending in {TRAINABLE_SUFFIXES}")
    return trainable


def _sample_windows(
    token_ids: torch.Tensor, batch_size: int, sequence_length: int, generator: torch.Generator
) -> torch.Tensor:
    """Return ``batch_size`` windows of ``sequence_length`` tokens at random offsets, shape (batch, seq)."""
    max_start = len(token_ids) - sequence_length
    starts = torch.randint(0, max_start + 1, (batch_size,), generator=generator)
    return torch.stack([token_ids[start : start + sequence_length] for start in starts.tolist()])


def _save_expert(model: PreTrainedModel, base_dir: Path, out_dir: Path) -> None:
    # float32 keeps the frozen tensors byte-identical to the float32 base.
    # It also keeps weight changes smaller than one bfloat16 step (0.4 % to
    # 0.8 % of the weight) that a bfloat16 file would round away. The merge
    # converts to the YAML's dtype anyway.
    model.save_pretrained(out_dir)

    for name in _FILES_FROM_BASE:
        source = base_dir / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)


def _recipe_record(recipe: ExpertRecipe, text: str) -> dict[str, object]:
    record: dict[str, object] = dataclasses.asdict(recipe)
    record["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return record


def _read_recipe(folder: Path) -> dict[str, object] | None:
    try:
        return json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
