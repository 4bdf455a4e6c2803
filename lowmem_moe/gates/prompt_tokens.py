"""Tokenize router prompts one at a time, the same way for every gate mode."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SourceError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    """Load the base model's tokenizer from its folder, never from the network.

    Raises:
        SourceError: the folder has no usable tokenizer files.
    """
    from transformers import AutoTokenizer  # imported here, as random gates do not need it

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise SourceError(
            f"{folder}: cannot load the tokenizer ({error}). The base model folder needs its tokenizer files, "
            "such as tokenizer.json and tokenizer_config.json."
        ) from error


def prompt_token_ids(tokenizer: "PreTrainedTokenizerBase", prompt: str) -> list[int]:
    """Return the token ids of one prompt: the BOS token if the tokenizer has one, then the text.

    No other special tokens are added, and prompts are never padded, so the
    result does not depend on the other prompts or on a pad token.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return list(ids)
