"""Run token sequences through a checkpoint one decoder layer at a time.

The layers are transformers' own decoder-layer and rotary-embedding classes
for the checkpoint's model_type, built on the meta device, so the numbers
match the library's full-model forward. Their linear layers become
StreamedLinear modules, which read their weights from the safetensors
bytes in blocks on every call, so a layer in memory holds one weight block
at a time. Other parameters, such as norms, biases and the fused 3-D expert
weights of transformers 5 MoE layers, are filled whole from the file.
"""

import importlib
import logging
import math

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .checkpoint import Checkpoint
from .dtypes import ITEM_SIZES, TORCH_DTYPES
from .embedding_rows import EmbeddingRows
from .errors import SourceError
from .memory_budget import WEIGHT_BLOCK_BYTES, LayerShape, pack_token_limit
from .plan import Segment, Transform
from .segment_reader import SegmentReader
from .streamed_linear import BlockBuffers, StreamedLinear

logger = logging.getLogger(__name__)

EMBEDDING_TENSOR = "model.embed_tokens.weight"
# Bytes read from disk per step while filling a parameter.
LOAD_CHUNK_BYTES = 16 * 1024**2


class LayerStream:
    """Embeds token ids and applies decoder layers of one checkpoint, loading each layer on demand."""

    def __init__(
        self, checkpoint: Checkpoint, compute_dtype: torch.dtype = torch.float32, weight_block_bytes: int = WEIGHT_BLOCK_BYTES
    ):
        self.checkpoint = checkpoint
        self.compute_dtype = compute_dtype
        self.config = _load_config(checkpoint)
        self.num_layers = self.config.num_hidden_layers
        self._layer_class, rotary_class = _layer_classes(self.config)
        self.rotary = rotary_class(config=self.config)
        self.embeddings = EmbeddingRows(checkpoint, EMBEDDING_TENSOR)
        # Maximum tokens per forward call when callers pack prompts together.
        self.pack_tokens = pack_token_limit(_layer_shape(self.config))
        self._block_buffers = BlockBuffers(compute_dtype, weight_block_bytes)

    def close(self) -> None:
        self.embeddings.close()

    def __enter__(self) -> "LayerStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Return the embeddings of a token sequence, shape (tokens, hidden), in the compute dtype."""
        rows = torch.stack([self.embeddings.row(token_id) for token_id in token_ids])  # (tokens, hidden)
        finite = torch.isfinite(rows).all(dim=-1)
        if not finite.all():
            token_id = token_ids[int((~finite).nonzero()[0])]
            raise SourceError(f"{self.embeddings.path}: row {token_id} of {EMBEDDING_TENSOR!r} contains NaN or Inf.")
        return rows.to(self.compute_dtype)

    def load_layer(self, index: int) -> nn.Module:
        """Build decoder layer ``index``, with streamed linear layers and every other parameter filled."""
        # Built on the meta device and converted there, so that the only
        # allocation is the uninitialised storage that the checkpoint fills.
        with torch.device("meta"):
            try:
                layer = self._layer_class(self.config, index)
            except Exception as error:  # transformers raises KeyError, ValueError and more for bad values
                raise SourceError(
                    f"{self.checkpoint.config.path}: transformers cannot build decoder layer {index} from this config "
                    f"({type(error).__name__}: {error}). Check the values in it."
                ) from error
            prefix = f"model.layers.{index}."
            self._stream_linear_layers(layer, prefix)
        layer = layer.to(self.compute_dtype).to_empty(device="cpu")
        layer.eval()

        persistent = layer.state_dict(keep_vars=True)
        for name, parameter in persistent.items():
            segments, source_dtype = _parameter_segments(self.checkpoint, prefix, name, tuple(parameter.shape))
            _fill_parameter(parameter.data, segments, source_dtype, prefix + name)
        return layer

    def _stream_linear_layers(self, layer: nn.Module, prefix: str) -> None:
        # Only exact nn.Linear modules are replaced: a subclass may compute
        # something else in its forward.
        linear_names = [name for name, module in layer.named_modules() if type(module) is nn.Linear]
        for name in linear_names:
            linear = layer.get_submodule(name)
            shape = (linear.out_features, linear.in_features)
            segments, source_dtype = _parameter_segments(self.checkpoint, prefix, f"{name}.weight", shape)
            streamed = StreamedLinear(
                linear.in_features,
                linear.out_features,
                segments,
                source_dtype,
                self._block_buffers,
                bias=linear.bias is not None,
                weight_name=f"{prefix}{name}.weight",
            )
            layer.set_submodule(name, streamed)

    def forward_layer(
        self, layer: nn.Module, index: int, hidden: torch.Tensor, lengths: list[int] | None = None
    ) -> torch.Tensor:
        """Apply a loaded layer to one sequence or to several packed into one, and return states of the same shape.

        ``hidden`` is (tokens, hidden). ``lengths``, when given, splits it
        into sequences that follow each other. Each sequence gets positions
        from 0 and a causal mask within itself only, with the model's
        sliding window where this layer uses one, so it gets the states it
        has when run alone, with no padding.
        """
        lengths = [hidden.shape[0]] if lengths is None else lengths
        if sum(lengths) != hidden.shape[0]:
            raise ValueError(f"lengths {lengths} do not add up to the {hidden.shape[0]} tokens of the states")
        states = hidden.unsqueeze(0)  # (1, tokens, hidden)
        position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)  # (1, tokens)
        position_embeddings = self.rotary(states, position_ids)
        mask = _packed_causal_mask(lengths, self._sliding_window(index), states.dtype)
        with torch.no_grad():
            output = layer(
                states, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings
            )
        if isinstance(output, tuple):  # transformers 4.x layers return a tuple
            output = output[0]
        if not torch.isfinite(output).all():
            self._raise_non_finite(layer, index)
        return output[0]

    def _raise_non_finite(self, layer: nn.Module, index: int) -> None:
        # Scanning every weight costs time, so it happens only once the
        # output shows that something is wrong.
        for name, parameter in layer.state_dict().items():
            if parameter.is_floating_point() and not torch.isfinite(parameter).all():
                self._raise_non_finite_tensor(f"model.layers.{index}.{name}")
        for module in layer.modules():
            if isinstance(module, StreamedLinear):
                for _, block in module.weight_blocks():
                    if not torch.isfinite(block).all():
                        self._raise_non_finite_tensor(module.weight_name)
        raise SourceError(
            f"{self.checkpoint.folder}: decoder layer {index} produced NaN or Inf from finite weights. "
            "Try --gate-dtype float32 if you used bfloat16."
        )

    def _raise_non_finite_tensor(self, name: str) -> None:
        raise SourceError(
            f"{self.checkpoint.folder}: tensor {name!r} contains NaN or Inf. The gate pass cannot use this base model."
        )

    @staticmethod
    def free_layer(layer: nn.Module | None) -> None:
        """Release a layer's filled parameters now, even while references to the module remain."""
        if layer is not None:
            for parameter in layer.parameters():
                parameter.data = torch.empty(0)

    def _sliding_window(self, index: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return window if layer_types[index] == "sliding_attention" else None
        return window


def _load_config(checkpoint: Checkpoint) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(str(checkpoint.folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise SourceError(f"{checkpoint.config.path}: transformers cannot read this config ({error}).") from error
    # The eager attention adds our explicit mask, so no implementation
    # detail decides about causality.
    config._attn_implementation = "eager"
    # MoE layers built alone, as routes does, would otherwise warn that no
    # experts implementation was chosen. transformers 4.x has no such setting.
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    return config


def _layer_classes(config: PretrainedConfig) -> tuple[type, type]:
    model_type = config.model_type
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as error:
        raise SourceError(f"transformers has no model code for model_type {model_type!r} ({error}).") from error
    prefixes = {name[: -len("DecoderLayer")] for name in dir(module) if name.endswith("DecoderLayer")}
    for prefix in sorted(prefixes):
        layer_class = getattr(module, f"{prefix}DecoderLayer")
        rotary_class = getattr(module, f"{prefix}RotaryEmbedding", None)
        if rotary_class is not None:
            return layer_class, rotary_class
    raise SourceError(f"transformers' {model_type} code has no decoder layer with rotary embeddings.")


def _layer_shape(config: PretrainedConfig) -> LayerShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return LayerShape(config.hidden_size, config.intermediate_size, heads, head_dim)


def _packed_causal_mask(lengths: list[int], window: int | None, dtype: torch.dtype) -> torch.Tensor:
    # Additive mask of shape (1, 1, query, key): 0 where the query may attend
    # to the key, the dtype's minimum elsewhere, as transformers builds it.
    # A query attends only to keys of its own sequence, so the mask is block
    # diagonal, with each block causal and windowed as for a sequence alone.
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (tokens,)
    position = torch.cat([torch.arange(length) for length in lengths])  # (tokens,)
    query, key = position.unsqueeze(1), position.unsqueeze(0)
    allowed = sequence.unsqueeze(1) == sequence.unsqueeze(0)
    allowed &= key <= query
    if window is not None:
        allowed &= key > query - window
    mask = torch.zeros(len(position), len(position), dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _parameter_segments(
    checkpoint: Checkpoint, prefix: str, name: str, shape: tuple[int, ...]
) -> tuple[list[Segment], str]:
    """Return the byte ranges that, concatenated, hold a layer parameter, and their dtype.

    Besides names that exist in the checkpoint as they are, this maps the
    fused expert parameters of transformers 5 Mixtral layers onto the
    per-expert tensors that the checkpoint stores.
    """
    candidates = _source_names(prefix, name, shape)
    for source_names in candidates:
        if all(checkpoint.has(source) for source in source_names):
            locations = [checkpoint.locate(source) for source in source_names]
            dtypes = {location.entry.dtype for location in locations}
            if len(dtypes) != 1 or next(iter(dtypes)) not in TORCH_DTYPES:
                raise SourceError(f"{checkpoint.folder}: tensors {source_names} must share one float dtype, got {dtypes}.")
            dtype = next(iter(dtypes))
            total = sum(location.entry.nbytes for location in locations)
            expected = math.prod(shape) * ITEM_SIZES[dtype]
            if total != expected:
                raise SourceError(
                    f"{checkpoint.folder}: tensor {source_names[0]!r} does not fit parameter {prefix + name} of shape "
                    f"{list(shape)}."
                )
            segments = [
                Segment(location.path, location.entry.offset, location.entry.nbytes, dtype, Transform(out_dtype=dtype))
                for location in locations
            ]
            return segments, dtype
    raise SourceError(f"{checkpoint.folder}: tensor {prefix + name!r} not found in the checkpoint's weights.")


def _source_names(prefix: str, name: str, shape: tuple[int, ...]) -> list[list[str]]:
    names = [[prefix + name]]
    moe_name = name.replace("mlp.", "block_sparse_moe.", 1)
    if moe_name != name:
        names.append([prefix + moe_name])
    if name == "mlp.experts.gate_up_proj":  # (experts, 2 * intermediate, hidden)
        names.append(
            [f"{prefix}block_sparse_moe.experts.{e}.{w}.weight" for e in range(shape[0]) for w in ("w1", "w3")]
        )
    if name == "mlp.experts.down_proj":  # (experts, hidden, intermediate)
        names.append([f"{prefix}block_sparse_moe.experts.{e}.w2.weight" for e in range(shape[0])])
    return names


def _fill_parameter(target: torch.Tensor, segments: list[Segment], source_dtype: str, name: str) -> None:
    flat = target.view(-1)
    item_size = ITEM_SIZES[source_dtype]
    with SegmentReader(segments, name) as reader:
        # Norms and biases are far smaller than a chunk.
        buffer = bytearray(max(item_size, min(reader.nbytes, LOAD_CHUNK_BYTES // item_size * item_size)))
        for start in range(0, reader.nbytes, len(buffer)):
            count = min(len(buffer), reader.nbytes - start)
            view = memoryview(buffer)[:count]
            reader.read_into(start, view)
            values = torch.frombuffer(view, dtype=TORCH_DTYPES[source_dtype])
            element = start // item_size
            flat[element : element + values.numel()].copy_(values)
