"""Mixtral output: Llama- and Mistral-family sources become MixtralForCausalLM.

Expert weights use the per-expert layout
``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight``, which
transformers 4.x and 5.x, llama.cpp's convert_hf_to_gguf.py and vLLM all read.
"""

import re
from typing import Any

from ..checkpoint import Checkpoint
from ..config import MergeConfig
from ..errors import PlanError
from .base import OutputArchitecture, TensorSpec
from .config_fields import IGNORABLE_FIELDS

SOURCE_MODEL_TYPES = ("llama", "mistral")

# Source fields copied into the Mixtral config unchanged.
CARRIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "initializer_range",
)

# Source fields that Mixtral can express only at one value, with the reason.
FIXED_FIELDS: dict[str, tuple[object, str]] = {
    "attention_bias": (False, "Mixtral attention has no bias tensors"),
    "mlp_bias": (False, "Mixtral experts have no bias tensors"),
}

# Fields rewritten below from their normalised form.
ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters")

# Llama and Mistral configs default rope_theta to 10000 when it is absent,
# while Mixtral defaults to 1e6, so the value is always written out.
DEFAULT_ROPE_THETA = 10000.0

# The MLP of dense layer i, split into the three expert projections.
MLP_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.")
# Buffers that older checkpoints saved and that the model recomputes.
SKIPPED_PATTERN = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
EXPERT_PROJECTIONS = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))


class MixtralArchitecture(OutputArchitecture):
    name = "mixtral"

    def rejection_reasons(self, config: MergeConfig, base: Checkpoint, experts: list[Checkpoint]) -> list[str]:
        reasons = []
        if config.shared_experts:
            reasons.append("Mixtral has no shared experts; remove shared_experts from the YAML")

        for checkpoint in [base, *experts]:
            model_type = checkpoint.config.model_type
            if model_type not in SOURCE_MODEL_TYPES:
                reasons.append(
                    f"{checkpoint.folder} has model_type {model_type!r}, but Mixtral output needs "
                    f"{' or '.join(SOURCE_MODEL_TYPES)} sources"
                )

        for field_name, (allowed, why) in FIXED_FIELDS.items():
            value = base.config.raw.get(field_name, allowed)
            if value != allowed:
                reasons.append(f"base config has {field_name}={value!r}, but {why}")
        return reasons

    def output_config(
        self, config: MergeConfig, base: Checkpoint, dtype_name: str, dropped_fields: frozenset[str]
    ) -> dict[str, Any]:

        raw = base.config.raw
        handled = set(CARRIED_FIELDS) | set(FIXED_FIELDS) | set(ROPE_FIELDS) | {"sliding_window", "use_sliding_window"}
        unknown = sorted(key for key in raw if key not in handled and key not in IGNORABLE_FIELDS and key not in dropped_fields)
        if unknown:
            raise PlanError(
                f"{base.config.path}: field {unknown[0]!r} has no equivalent in a Mixtral config"
                + (f" (nor do {', '.join(repr(k) for k in unknown[1:])})" if len(unknown) > 1 else "")
                + ". If it does not change the model's outputs, pass --drop-config-field "
                + unknown[0]
                + " to leave it out."
            )

        output: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
        for field_name in CARRIED_FIELDS:
            if field_name in raw:
                output[field_name] = raw[field_name]
        output["tie_word_embeddings"] = base.config.tie_word_embeddings
        if output.get("num_key_value_heads") is None:
            output["num_key_value_heads"] = raw.get("num_attention_heads")

        rope = base.config.rope
        theta = rope.theta if rope.theta is not None else DEFAULT_ROPE_THETA
        # Both spellings, so that transformers 4.x (rope_theta, rope_scaling)
        # and 5.x (rope_parameters) read the same settings.
        output["rope_theta"] = theta
        output["rope_scaling"] = dict(rope.scaling) if rope.scaling else None
        output["rope_parameters"] = {"rope_type": "default", **(rope.scaling or {}), "rope_theta": theta}

        # Mistral's sliding window carries over. Llama has none, and Mixtral's
        # default would otherwise be taken from the class, so null is explicit.
        sliding_window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:
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

    def tensor_specs(self, config: MergeConfig, base: Checkpoint, experts: list[Checkpoint]) -> list[TensorSpec]:

        num_layers = base.config.num_hidden_layers
        layer_specs: list[list[TensorSpec]] = [[] for _ in range(num_layers)]
        head: list[TensorSpec] = []
        tail: list[TensorSpec] = []

        for name in base.tensor_names:
            if MLP_PATTERN.match(name) or SKIPPED_PATTERN.match(name):
                continue
            spec = _copy_spec(base, name, name)
            layer_match = LAYER_PATTERN.match(name)
            if layer_match:
                layer = int(layer_match.group(1))
                suffix = name[layer_match.end():]
                if layer >= num_layers or suffix not in LAYER_TENSORS:
                    raise PlanError(
                        f"{base.folder}: tensor {name!r} has no place in a Mixtral model. "
                        "The base may not be a plain Llama or Mistral model."
                    )
                layer_specs[layer].append(spec)
            elif name == "model.embed_tokens.weight":
                head.append(spec)
            elif name in ("model.norm.weight", "lm_head.weight"):
                tail.append(spec)
            else:
                raise PlanError(
                    f"{base.folder}: tensor {name!r} has no place in a Mixtral model. "
                    "The base may not be a plain Llama or Mistral model."
                )

        _require(base, "model.embed_tokens.weight")
        _require(base, "model.norm.weight")
        if not base.config.tie_word_embeddings:
            _require(base, "lm_head.weight")

        hidden = base.config.hidden_size
        specs = list(head)
        for layer in range(num_layers):
            for suffix in LAYER_TENSORS:
                _require(base, f"model.layers.{layer}.{suffix}")
            specs.extend(layer_specs[layer])
            specs.append(
                TensorSpec(
                    name=f"model.layers.{layer}.block_sparse_moe.gate.weight",
                    shape=(len(experts), hidden),
                    gate_layer=layer,
                )
            )
            for index, (expert_config, checkpoint) in enumerate(zip(config.experts, experts)):
                for out_name, dense_name in EXPERT_PROJECTIONS:
                    specs.append(
                        _copy_spec(
                            checkpoint,
                            f"model.layers.{layer}.mlp.{dense_name}.weight",
                            f"model.layers.{layer}.block_sparse_moe.experts.{index}.{out_name}.weight",
                            expert=expert_config,
                            is_residual=dense_name == "down_proj",
                        )
                    )
        specs.extend(tail)
        return specs


def _copy_spec(checkpoint: Checkpoint, source_name: str, name: str, **kwargs) -> TensorSpec:
    entry = checkpoint.locate(source_name).entry
    return TensorSpec(name=name, shape=entry.shape, checkpoint=checkpoint, source_name=source_name, **kwargs)


def _require(checkpoint: Checkpoint, name: str) -> None:
    checkpoint.locate(name)
