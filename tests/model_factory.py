"""Tiny real checkpoints for the tests: transformers models with random weights, saved to disk."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "solve the equation x plus two equals five",
    "def add(a, b): return a + b",
    "hello, how are you today? I am fine, thank you",
    "integrals derivatives algebra geometry numbers",
    "python code function class variable loop",
]


@dataclass
class TinyModelSpec:
    """Shape and options of a tiny Llama or Mistral checkpoint."""

    model_type: str = "llama"  # any transformers model_type with a causal LM class
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 128
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32
    rope_scaling: dict[str, Any] | None = None
    max_shard_size: str | None = None  # e.g. "100KB" for a sharded checkpoint
    bos_token: str | None = "<s>"
    legacy_config: bool = False  # write rope_theta/rope_scaling/torch_dtype as transformers 4.x did
    extra_config: dict[str, Any] = field(default_factory=dict)


def make_tokenizer(folder: Path, vocab_size: int, bos_token: str | None) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer offline and save it into ``folder``. It has no pad token."""
    special = ["<unk>", "</s>"] + ([bos_token] if bos_token else [])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", bos_token=bos_token)
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, spec: TinyModelSpec, seed: int = 0, mlp_seed: int | None = None) -> Path:
    """Save a randomly initialised model and tokenizer to ``folder`` and return it.

    ``mlp_seed``, when given, re-draws only the MLP weights, which makes an
    expert that shares the attention and embeddings of the model with the
    same ``seed``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder, spec.vocab_size, spec.bos_token)

    config_kwargs = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        max_position_embeddings=256,
    )
    if spec.rope_scaling:
        config_kwargs["rope_parameters"] = {"rope_theta": 50000.0, **spec.rope_scaling}
    config = AutoConfig.for_model(spec.model_type, **config_kwargs, **spec.extra_config)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(spec.dtype)
    with torch.no_grad():
        # Norms start at one and biases at zero; random values make a
        # mix-up or a dropped tensor visible.
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
        if mlp_seed is not None:
            generator = torch.Generator().manual_seed(mlp_seed)
            for name, parameter in model.named_parameters():
                if ".mlp." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)

    save_kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    if spec.legacy_config:
        rewrite_config_legacy(folder)
    return folder


def rewrite_config_legacy(folder: Path) -> None:
    """Rewrite config.json in the transformers 4.x style: rope_theta, rope_scaling and torch_dtype."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    parameters = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = parameters.pop("rope_theta", 10000.0)
    rope_type = parameters.get("rope_type", "default")
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **{k: v for k, v in parameters.items() if k != "rope_type"}}
    config["torch_dtype"] = config.pop("dtype", "float32")
    path.write_text(json.dumps(config, indent=2))


def edit_json(path: Path, **changes: Any) -> None:
    """Set or, with value None passed as ``...``, remove keys of a JSON file."""
    data = json.loads(Path(path).read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    Path(path).write_text(json.dumps(data, indent=2))


def write_yaml(path: Path, text: str) -> Path:
    """Write a merge YAML and return its path."""
    path = Path(path)
    path.write_text(text)
    return path
