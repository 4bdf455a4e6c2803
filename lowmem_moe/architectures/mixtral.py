"""Mixtral output: Llama- and Mistral-family sources become MixtralForCausalLM.

In the default per-expert layout, expert weights are named
``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight``, which
transformers 4.x and 5.x, llama.cpp's convert_hf_to_gguf.py and vLLM all read.
"""

from typing import Any

from ..config import MergeConfig
from ..sources import MergeSources
from .base import OutputArchitecture, TensorSpec
from .config_builder import carried_fields, fixed_field_reasons, rope_fields
from .config_fields import DECODER_FIELDS
from .moe_layout import MoeNaming, build_tensor_specs

CARRIED_FIELDS = DECODER_FIELDS + ("head_dim",)

# Source fields that Mixtral can express only at one value, with the reason.
FIXED_FIELDS: dict[str, tuple[object, str]] = {
    "attention_bias": (False, "Mixtral attention has no bias tensors"),
    "mlp_bias": (False, "Mixtral experts have no bias tensors"),
}

LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)

NAMING = MoeNaming(
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
    expert={
        "gate_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "down_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
        "up_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    },
)

# Suggestions for sources of another model family, by model_type.
OTHER_FAMILIES = {
    "qwen2": "the sources are Qwen2 models, whose attention has biases and Mixtral's has none, so use "
    "architecture: qwen2_moe, which also needs one shared expert (shared_experts: in the YAML)",
    "qwen3": "the sources are Qwen3 models, whose attention has q_norm and k_norm and Mixtral's has none, so use "
    "architecture: qwen3_moe",
}


class MixtralArchitecture(OutputArchitecture):
    name = "mixtral"
    aliases = ("mixtral",)
    source_model_types = ("llama", "mistral")

    def model_class_name(self) -> str:
        return "MixtralForCausalLM"

    def rejection_reasons(self, config: MergeConfig, sources: MergeSources) -> list[str]:
        reasons = []
        if config.shared_experts:
            reasons.append(
                "Mixtral has no shared experts; remove shared_experts from the YAML, or use architecture: qwen2_moe "
                "with Qwen2 sources"
            )
        for checkpoint in _all_checkpoints(sources):
            model_type = checkpoint.config.model_type
            if model_type in OTHER_FAMILIES:
                reasons.append(f"{OTHER_FAMILIES[model_type]} ({checkpoint.folder})")
            elif model_type not in self.source_model_types:
                reasons.append(
                    f"{checkpoint.folder} has model_type {model_type!r}, but Mixtral output needs llama or mistral sources"
                )
        reasons += fixed_field_reasons(sources.base.config, FIXED_FIELDS)
        return _unique(reasons)

    def output_config(
        self, config: MergeConfig, sources: MergeSources, dtype_name: str, dropped_fields: frozenset[str]
    ) -> dict[str, Any]:
        base = sources.base.config
        handled = frozenset(FIXED_FIELDS) | {"sliding_window", "use_sliding_window"}
        output: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
        output.update(carried_fields(base, CARRIED_FIELDS, handled, dropped_fields, "Mixtral"))
        output["tie_word_embeddings"] = base.tie_word_embeddings
        if output.get("num_key_value_heads") is None:
            output["num_key_value_heads"] = base.raw.get("num_attention_heads")
        output.update(rope_fields(base))

        # Mistral's sliding window carries over. Llama has none, and Mixtral's
        # class default would otherwise apply, so null is written explicitly.
        sliding_window = base.raw.get("sliding_window")
        if base.raw.get("use_sliding_window") is False:
            sliding_window = None
        output["sliding_window"] = sliding_window

        output["num_local_experts"] = len(config.experts)
        output["num_experts_per_tok"] = config.experts_per_token
        output["output_router_logits"] = False
        output["router_aux_loss_coef"] = 0.001
        output["router_jitter_noise"] = 0.0
        output["use_cache"] = True
        output["dtype"] = dtype_name
        output["torch_dtype"] = dtype_name
        return output

    def tensor_specs(self, config: MergeConfig, sources: MergeSources, layout: str) -> list[TensorSpec]:
        return build_tensor_specs(config, sources, layout, NAMING, LAYER_TENSORS, "Mixtral")


def _all_checkpoints(sources: MergeSources):
    return [sources.base, *sources.experts, *sources.shared_experts]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
