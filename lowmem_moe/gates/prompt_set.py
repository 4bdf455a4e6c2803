"""The router prompts of a merge, tokenized once and checked before any model weights are read."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import ExpertConfig
from ..errors import UserError
from .prompt_tokens import prompt_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

POSITIVE = 0
NEGATIVE = 1


@dataclass
class PromptUse:
    """One unique prompt text, its token ids, and every (expert, sign) that lists it."""

    text: str
    token_ids: list[int]
    uses: list[tuple[int, int]] = field(default_factory=list)  # (expert index, POSITIVE or NEGATIVE)


def expert_label(index: int, expert: ExpertConfig) -> str:
    """Return how messages name an expert: its index and YAML line."""
    return f"expert {index} (line {expert.line}, {expert.source_reference})"


def collect_prompts(
    experts: tuple[ExpertConfig, ...],
    tokenizer: "PreTrainedTokenizerBase",
    num_embedding_rows: int,
    max_tokens: int | None = None,
) -> list[PromptUse]:
    """Tokenize every distinct prompt once and record which experts use it.

    Raises:
        UserError: a prompt has no tokens (empty, with no BOS token), or has
            token ids beyond the embedding rows. The message names the
            expert, the prompt and the tokens.
    """
    by_text: dict[str, PromptUse] = {}
    for index, expert in enumerate(experts):
        for sign, prompts in ((POSITIVE, expert.positive_prompts), (NEGATIVE, expert.negative_prompts)):
            for prompt in prompts:
                use = by_text.get(prompt)
                if use is None:
                    token_ids = prompt_token_ids(tokenizer, prompt)
                    label = expert_label(index, expert)
                    _check_tokens(token_ids, tokenizer, num_embedding_rows, label, prompt)
                    if max_tokens is not None and len(token_ids) > max_tokens:
                        raise UserError(
                            f"{label}: prompt {prompt[:60]!r}... has {len(token_ids)} tokens, more than the base "
                            f"model's {max_tokens} positions (max_position_embeddings). Shorten it."
                        )
                    use = by_text[prompt] = PromptUse(text=prompt, token_ids=token_ids)
                use.uses.append((index, sign))
    return list(by_text.values())


def _check_tokens(
    token_ids: list[int], tokenizer: "PreTrainedTokenizerBase", num_rows: int, label: str, prompt: str
) -> None:
    if not token_ids:
        raise UserError(
            f"{label}: prompt {prompt!r} has no tokens, because it is empty and the tokenizer has no BOS token. "
            "Remove it or give it text."
        )
    outside = sorted({token_id for token_id in token_ids if token_id >= num_rows})
    if outside:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})" for token_id in outside)
        raise UserError(
            f"{label}: prompt {prompt!r} has tokens beyond the {num_rows} rows of the base's embedding: {names}. "
            "They were probably added to the tokenizer without embedding rows. Remove them from the prompt."
        )
