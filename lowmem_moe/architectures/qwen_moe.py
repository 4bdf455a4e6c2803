"""Qwen MoE outputs: Qwen2 sources become Qwen2MoeForCausalLM and Qwen3 sources Qwen3MoeForCausalLM."""

from typing import Any

from ..config import MergeConfig
from ..sources import MergeSources
from .base import OutputArchitecture, TensorSpec
from .config_builder import carried_fields, fixed_field_reasons, rope_fields
from .config_fields import DECODER_FIELDS
from .moe_layout import MoeNaming, build_tensor_specs


ATTENTION_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
ATTENTION_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")

NAMING = MoeNaming(
    router="model.layers.{layer}.mlp.gate.weight",
    expert={
        "gate_proj": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
        "up_proj": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
        "down_proj": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
    },
    shared_expert="model.layers.{layer}.mlp.shared_expert.{projection}.weight",
    shared_expert_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
)
NAMING_WITHOUT_SHARED = MoeNaming(router=NAMING.router, expert=NAMING.expert)


class _QwenMoeArchitecture(OutputArchitecture):
    source_model_type: str
    class_name: str
    display_name: str

    def model_class_name(self) -> str:
        return self.class_name

    def _source_type_reasons(self, sources: MergeSources) -> list[str]:
        reasons = []
        for checkpoint in [sources.base, *sources.experts, *sources.shared_experts]:
            model_type = checkpoint.config.model_type
            if model_type != self.source_model_type:
                hint = "; use architecture: mixtral for llama or mistral sources" if model_type in ("llama", "mistral") else ""
                reasons.append(
                    f"{checkpoint.folder} has model_type {model_type!r}, but {self.display_name} output needs "
                    f"{self.source_model_type} sources{hint}"
                )
        return list(dict.fromkeys(reasons))

    def _moe_fields(self, config: MergeConfig, sources: MergeSources, dtype_name: str) -> dict[str, Any]:
        intermediate = sources.base.config.intermediate_size
        return {
            "moe_intermediate_size": intermediate,
            "num_experts": len(config.experts),
            "num_experts_per_tok": config.experts_per_token,
            # Top-k weights sum to one, as in Mixtral and in mergekit-moe's Qwen output.
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "use_cache": True,
            "dtype": dtype_name,
            "torch_dtype": dtype_name,
        }


class Qwen2MoeArchitecture(_QwenMoeArchitecture):
    name = "qwen2_moe"
    aliases = ("qwen2_moe", "qwen")  # "qwen" is mergekit-moe's name
    source_model_type = "qwen2"
    class_name = "Qwen2MoeForCausalLM"
    display_name = "Qwen2-MoE"

    def rejection_reasons(self, config: MergeConfig, sources: MergeSources) -> list[str]:
        reasons = []
        if len(config.shared_experts) != 1:
            reasons.append(
                f"Qwen2-MoE needs exactly one shared expert (shared_experts: in the YAML), got {len(config.shared_experts)}"
            )
        return reasons + self._source_type_reasons(sources)

    def output_config(
        self, config: MergeConfig, sources: MergeSources, dtype_name: str, dropped_fields: frozenset[str]
    ) -> dict[str, Any]:
        base = sources.base.config
        carried = DECODER_FIELDS + ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
        output: dict[str, Any] = {"architectures": [self.class_name], "model_type": "qwen2_moe"}
        output.update(carried_fields(base, carried, frozenset(), dropped_fields, self.display_name))
        output["tie_word_embeddings"] = base.tie_word_embeddings
        output.update(rope_fields(base))
        output.update(self._moe_fields(config, sources, dtype_name))
        output["shared_expert_intermediate_size"] = base.intermediate_size
        # Qwen2 attention has q, k and v biases, which the output keeps.
        output["qkv_bias"] = True
        return output

    def tensor_specs(self, config: MergeConfig, sources: MergeSources, layout: str) -> list[TensorSpec]:
        layer_tensors = ATTENTION_TENSORS + ATTENTION_BIASES
        return build_tensor_specs(config, sources, layout, NAMING, layer_tensors, self.display_name)


# Qwen3 configs carry these for sliding-window attention, which Qwen3-MoE
# expresses only without max_window_layers and layer_types, so they must be
# off for the output to compute the same.
QWEN3_FIXED_FIELDS: dict[str, tuple[object, str]] = {
    "use_sliding_window": (False, "lowmem-moe writes Qwen3-MoE only for sources without sliding-window attention"),
}


class Qwen3MoeArchitecture(_QwenMoeArchitecture):
    name = "qwen3_moe"
    aliases = ("qwen3_moe", "qwen3")  # "qwen3" is mergekit-moe's name
    source_model_type = "qwen3"
    class_name = "Qwen3MoeForCausalLM"
    display_name = "Qwen3-MoE"

    def rejection_reasons(self, config: MergeConfig, sources: MergeSources) -> list[str]:
        reasons = []
        if config.shared_experts:
            reasons.append("Qwen3-MoE has no shared experts; remove shared_experts from the YAML")
        reasons += self._source_type_reasons(sources)
        if not reasons:
            reasons += fixed_field_reasons(sources.base.config, QWEN3_FIXED_FIELDS)
        return reasons

    def output_config(
        self, config: MergeConfig, sources: MergeSources, dtype_name: str, dropped_fields: frozenset[str]
    ) -> dict[str, Any]:
        base = sources.base.config
        carried = DECODER_FIELDS + ("head_dim", "attention_bias", "use_sliding_window", "sliding_window")
        # Without sliding windows these describe nothing, so they are dropped.
        handled = frozenset({"max_window_layers", "layer_types"})
        output: dict[str, Any] = {"architectures": [self.class_name], "model_type": "qwen3_moe"}
        output.update(carried_fields(base, carried, handled, dropped_fields, self.display_name))
        output["tie_word_embeddings"] = base.tie_word_embeddings
        output.update(rope_fields(base))
        output.update(self._moe_fields(config, sources, dtype_name))
        return output

    def tensor_specs(self, config: MergeConfig, sources: MergeSources, layout: str) -> list[TensorSpec]:
        layer_tensors = ATTENTION_TENSORS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
        if sources.base.config.raw.get("attention_bias"):
            layer_tensors += ATTENTION_BIASES + ("self_attn.o_proj.bias",)
        return build_tensor_specs(config, sources, layout, NAMING_WITHOUT_SHARED, layer_tensors, self.display_name)
