"""Load the merged MoE checkpoint and generate replies with greedy decoding."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowmem_moe.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 30

# One prompt per fine-tuned domain, as (domain, prompt).
DEMO_PROMPTS = (
    ("math", "What is 15% of 240? Explain step by step."),
    ("code", "Write a Python function that checks whether a number is prime."),
    ("chat", "I had a rough day at work. Any advice?"),
)


@dataclass(frozen=True)
class Reply:
    """A prompt, the model's greedy continuation and how the router spread it."""

    domain: str
    prompt: str
    text: str
    # Fraction of all top-k expert slots, over the user prompt's tokens and
    # all layers, that went to each expert, in the order of the merge YAML.
    expert_shares: tuple[float, ...]


def load_merged_model(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the merged checkpoint and its tokenizer in float32 for CPU inference.

    Raises:
        UserError: The folder has no loadable tokenizer or model files.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise UserError(f"Loading the merged model from {model_dir} failed: {error}") from error

    model.eval()
    logger.info("Loaded %s with %d experts", type(model).__name__, model.config.num_local_experts)
    return model, tokenizer


@torch.inference_mode()
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: str,
    prompt: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Reply:
    """Apply the chat template to ``prompt`` and decode greedily up to ``max_new_tokens`` tokens."""
    chat_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    # The template already contains the special tokens, so none are added here.
    inputs = tokenizer(chat_text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    offsets = inputs.pop("offset_mapping")[0]  # (tokens, 2), character span of each token

    # Routing is counted over the user's words only, because the system
    # prompt and role markers that the template adds are the same for every
    # prompt and would even out the shares.
    prompt_start = chat_text.rindex(prompt)
    prompt_mask = (offsets[:, 0] >= prompt_start) & (offsets[:, 1] <= prompt_start + len(prompt))  # (tokens,)

    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # (1, prompt + new)
    text = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)

    return Reply(
        domain=domain,
        prompt=prompt,
        text=text.strip(),
        expert_shares=_expert_shares(model, inputs, prompt_mask),
    )


def _expert_shares(
    model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], token_mask: torch.Tensor
) -> tuple[float, ...]:
    num_experts = model.config.num_local_experts
    top_k = model.config.num_experts_per_tok

    outputs = model(**inputs, output_router_logits=True)
    picks = torch.zeros(num_experts)
    for layer_logits in outputs.router_logits:  # (tokens, experts) per layer, batch of one
        chosen = layer_logits[token_mask].topk(top_k, dim=-1).indices.flatten()
        picks += torch.bincount(chosen, minlength=num_experts).float()

    return tuple((picks / picks.sum()).tolist())
