"""Expert choices of a merged model's routers for given prompts, measured one layer at a time."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint
from .gates.prompt_set import collect_prompts
from .gates.prompt_tokens import load_tokenizer
from .gates.state_store import StateStore
from .config import ExpertConfig
from .errors import SourceError
from .layer_stream import LayerStream
from .progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRoutes:
    """Router choices for one prompt: ``shares[layer, expert]`` is the fraction of top-k picks."""

    prompt: str
    num_tokens: int  # tokens counted, the BOS token excluded
    shares: torch.Tensor  # (layers, experts)


def route_prompts(model_folder: Path, prompts: list[str], compute_dtype: torch.dtype = torch.float32) -> list[PromptRoutes]:
    """Run prompts through a merged MoE model layer by layer and count the experts its routers pick.

    Every token of a prompt except the BOS token counts once per layer for
    each of its ``num_experts_per_tok`` picks.
    """
    checkpoint = Checkpoint.open(model_folder)
    num_experts = checkpoint.config.raw.get("num_local_experts")
    top_k = checkpoint.config.raw.get("num_experts_per_tok")
    if not isinstance(num_experts, int) or not isinstance(top_k, int):
        raise SourceError(f"{checkpoint.config.path}: not a MoE config (num_local_experts or num_experts_per_tok missing).")

    tokenizer = load_tokenizer(model_folder)
    # Prompts are tokenized and checked as the gate pass does: BOS, then text.
    placeholder = ExpertConfig(Path(model_folder), "routes", tuple(prompts), (), None, None, 0)
    uses = collect_prompts((placeholder,), tokenizer, checkpoint.locate("model.embed_tokens.weight").entry.shape[0])
    slots = {use.text: slot for slot, use in enumerate(uses)}
    skip = 1 if tokenizer.bos_token_id is not None else 0

    picks = torch.zeros(len(uses), checkpoint.config.num_hidden_layers, num_experts)
    with LayerStream(checkpoint, compute_dtype) as stream, StateStore(
        model_folder, [len(use.token_ids) for use in uses], stream.config.hidden_size, compute_dtype
    ) as store:
        for slot, use in enumerate(uses):
            store.write(slot, stream.embed(use.token_ids))
        for layer_index in progress_bar(range(stream.num_layers), desc="Routing", unit="layer"):
            layer = stream.load_layer(layer_index)
            captured: list[torch.Tensor] = []
            hook = _router(layer).register_forward_hook(
                lambda module, inputs, output: captured.append(output[0] if isinstance(output, tuple) else output)
            )
            try:
                for slot in range(len(uses)):
                    captured.clear()
                    store.write(slot, stream.forward_layer(layer, layer_index, store.read(slot)))
                    logits = captured[0].reshape(-1, num_experts)[skip:]  # (tokens, experts)
                    chosen = logits.float().topk(top_k, dim=-1).indices.flatten()
                    picks[slot, layer_index] += torch.bincount(chosen, minlength=num_experts).float()
            finally:
                hook.remove()
                stream.free_layer(layer)

    results = []
    for prompt in prompts:
        slot = slots[prompt]
        totals = picks[slot].sum(dim=-1, keepdim=True).clamp(min=1)
        results.append(PromptRoutes(prompt=prompt, num_tokens=len(uses[slot].token_ids) - skip, shares=picks[slot] / totals))
    return results


def format_routes(routes: list[PromptRoutes], per_layer: bool = False) -> str:
    """Return a text table per prompt: the share of picks per expert, over all layers and optionally per layer."""
    blocks = []
    for route in routes:
        num_experts = route.shares.shape[1]
        header = "layer" + "".join(f"{'expert ' + str(e):>12}" for e in range(num_experts))
        lines = [f"{route.prompt!r} ({route.num_tokens} tokens)", header]
        if per_layer:
            for layer, row in enumerate(route.shares):
                lines.append(f"{layer:<5d}" + "".join(f"{share * 100:11.1f}%" for share in row))
        overall = route.shares.mean(dim=0)
        lines.append("all  " + "".join(f"{share * 100:11.1f}%" for share in overall))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _router(layer: nn.Module) -> nn.Module:
    # transformers 5 names the MoE block "mlp", transformers 4 "block_sparse_moe".
    for block_name in ("mlp", "block_sparse_moe"):
        block = getattr(layer, block_name, None)
        router = getattr(block, "gate", None)
        if isinstance(router, nn.Module) and not isinstance(block, nn.Linear):
            return router
    raise SourceError("the model's decoder layers have no MoE router ('mlp.gate' or 'block_sparse_moe.gate').")
