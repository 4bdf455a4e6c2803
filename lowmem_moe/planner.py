"""Turn a merge config and opened sources into a MergePlan, without moving any data."""

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace

import psutil

from .architectures import LAYOUTS, SpecPart, TensorSpec, select_architecture
from .config import MergeConfig
from .dtypes import CODE_TO_NAME, ITEM_SIZES, TORCH_DTYPES, dtype_code_from_name
from .errors import ConfigError, PlanError
from .memory_budget import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SHARD_SIZE,
    LIBRARY_WARMUP_BYTES,
    MODEL_CODE_BYTES,
    LayerShape,
    MemoryBudget,
    cheap_embed_bytes,
    hidden_pass_bytes,
    router_bytes,
)
from .plan import FileSource, GateSource, MergePlan, PlannedShard, PlannedTensor, Segment, Transform
from .shard_format import SHARD_NAME, shard_file_size
from .sources import MergeSources

logger = logging.getLogger(__name__)

ROUTER_DTYPE = "F32"  # the gate pass computes router weights in float32


@dataclass(frozen=True)
class PlanOptions:
    """Settings of a merge that are not part of the YAML."""

    shard_size: int = DEFAULT_SHARD_SIZE  # bytes of tensor data per output file
    chunk_size: int = DEFAULT_CHUNK_SIZE  # bytes
    seed: int = 0
    dropped_config_fields: frozenset[str] = field(default_factory=frozenset)
    allow_identical_experts: bool = False
    gate_dtype: str = "F32"  # safetensors code of the dtype the hidden gate pass computes in
    layout: str = "per_expert"  # or "fused": transformers 5's gate_up_proj and down_proj per layer


def build_plan(config: MergeConfig, sources: MergeSources, options: PlanOptions) -> MergePlan:
    """Build the plan: every output tensor with its shard, offset, source bytes and transform.

    Raises:
        PlanError: the sources cannot be merged as configured.
    """
    if options.layout not in LAYOUTS:
        raise PlanError(f"Unknown layout {options.layout!r}. Use one of: {', '.join(LAYOUTS)}.")
    _check_experts_distinct(config, sources, options)
    architecture = select_architecture(config, sources)
    _check_expert_configs(sources)

    out_dtype = _output_dtype(config, sources)
    output_config = architecture.output_config(config, sources, CODE_TO_NAME[out_dtype], options.dropped_config_fields)
    specs = architecture.tensor_specs(config, sources, options.layout)
    _check_expert_shapes(specs, sources)

    tensors = [_plan_tensor(spec, out_dtype, options.seed) for spec in specs]
    # Routers go last, into the last shard, so that every other tensor can
    # be copied while the gate pass computes them.
    tensors.sort(key=lambda tensor: isinstance(tensor.source, GateSource))
    shards = _assign_shards(tensors, options.shard_size)

    base = sources.base.config
    budget = MemoryBudget(
        chunk_size=options.chunk_size,
        router_bytes=router_bytes(
            base.num_hidden_layers, len(config.experts) + len(config.shared_experts), base.hidden_size
        ),
        gate_pass_bytes=_gate_pass_bytes(config, sources, options),
    )
    # The estimate starts from this process's current RSS, which already
    # includes the imported libraries that the merge uses.
    baseline = psutil.Process().memory_info().rss

    bytes_read = sum(t.source.nbytes for t in tensors if isinstance(t.source, FileSource))
    bytes_written = sum(shard_file_size(shard) for shard in shards)
    return MergePlan(
        architecture=architecture.name,
        model_class=architecture.model_class_name(),
        shards=tuple(shards),
        output_config=output_config,
        chunk_size=options.chunk_size,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        expected_peak_memory=baseline + LIBRARY_WARMUP_BYTES + budget.total_bytes,
    )


def _gate_pass_bytes(config: MergeConfig, sources: MergeSources, options: PlanOptions) -> int:
    base = sources.base
    if not config.gate_mode.startswith("hidden"):
        return cheap_embed_bytes(len(config.experts), base.config.hidden_size, options.chunk_size)

    # Layer 0 stands for every layer: decoder layers of one model share
    # shapes. The 2-D tensors of a dense layer are the nn.Linear weights,
    # which the pass streams in blocks. The rest, norms and biases, are
    # filled whole.
    filled_parameters = 0
    for name in base.tensor_names:
        tensor_shape = base.locate(name).entry.shape
        if name.startswith("model.layers.0.") and len(tensor_shape) != 2:
            filled_parameters += math.prod(tensor_shape)
    raw = base.config.raw
    heads = base.config.require_int("num_attention_heads")
    head_dim = raw.get("head_dim") if isinstance(raw.get("head_dim"), int) else base.config.hidden_size // heads
    shape = LayerShape(base.config.hidden_size, base.config.intermediate_size, heads, head_dim)
    # Tokens are not counted before the tokenizer runs, so assume 512 per prompt.
    working_memory = hidden_pass_bytes(shape, filled_parameters, ITEM_SIZES[options.gate_dtype], 512)
    return MODEL_CODE_BYTES + working_memory


def _check_experts_distinct(config: MergeConfig, sources: MergeSources, options: PlanOptions) -> None:
    # mergekit-moe rejects this too: identical experts cost memory and compute
    # and behave like the dense model until the merged model is trained.
    folders = {checkpoint.folder.resolve() for checkpoint in sources.experts}
    if len(sources.experts) > 1 and len(folders) == 1 and not options.allow_identical_experts:
        raise PlanError(
            f"{config.path}: every expert uses the same source model {sources.experts[0].folder}, so the merged "
            "model computes the same as that model. Pass --allow-identical-experts if you plan to train it."
        )


def _check_expert_configs(sources: MergeSources) -> None:
    base = sources.base.config
    for checkpoint in [*sources.experts, *sources.shared_experts]:
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            base_value, expert_value = base.raw.get(key), checkpoint.config.raw.get(key)
            if base_value != expert_value:
                raise PlanError(
                    f"{checkpoint.config.path}: {key} is {expert_value}, but the base model has {base_value}. "
                    "Every expert must have the base model's shapes."
                )


def _check_expert_shapes(specs: list[TensorSpec], sources: MergeSources) -> None:
    # Each expert tensor must have the shape of the same tensor in the base,
    # or, where the base lacks it, the shape of the first expert's.
    expected_shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        for part in spec.parts:
            if part.expert is None:
                continue
            shape = part.checkpoint.locate(part.source_name).entry.shape
            if part.source_name not in expected_shapes and sources.base.has(part.source_name):
                expected_shapes[part.source_name] = sources.base.locate(part.source_name).entry.shape
            expected = expected_shapes.setdefault(part.source_name, shape)
            if shape != expected:
                raise PlanError(
                    f"{part.checkpoint.folder}: tensor {part.source_name!r} has shape {list(shape)}, but the base "
                    f"model's has {list(expected)}. Every expert must have the base model's shapes."
                )


def _output_dtype(config: MergeConfig, sources: MergeSources) -> str:
    if config.dtype is not None:
        return config.dtype

    # mergekit-moe falls back to the base config's dtype, and so do we.
    name = sources.base.config.dtype_name
    if name is not None:
        try:
            return dtype_code_from_name(name)
        except ConfigError:
            logger.warning("%s: dtype %r is not a float dtype; using the embedding's dtype", sources.base.config.path, name)

    embed_dtype = sources.base.locate("model.embed_tokens.weight").entry.dtype
    if embed_dtype not in TORCH_DTYPES:
        raise PlanError(f"{sources.base.folder}: embedding dtype {embed_dtype} is not a float dtype; set dtype in the YAML.")
    return embed_dtype


def _plan_tensor(spec: TensorSpec, out_dtype: str, seed: int) -> PlannedTensor:
    if spec.gate is not None:
        router, layer = spec.gate
        return PlannedTensor(
            name=spec.name,
            dtype=out_dtype,
            shape=spec.shape,
            source=GateSource(layer=layer, router=router),
            data_offset=0,  # set when the tensor is placed in a shard
            nbytes=math.prod(spec.shape) * ITEM_SIZES[out_dtype],
        )

    segments = tuple(_plan_segment(part, out_dtype, seed) for part in spec.parts)
    # Non-float tensors, which only ever copy, keep their dtype.
    dtype = segments[0].transform.out_dtype
    if any(segment.transform.out_dtype != dtype for segment in segments):
        raise PlanError(f"tensor {spec.name!r} would mix dtypes; its sources must all be float tensors.")
    nbytes = sum(segment.output_nbytes for segment in segments)
    if nbytes != math.prod(spec.shape) * ITEM_SIZES[dtype]:
        raise PlanError(f"tensor {spec.name!r}: its sources hold {nbytes} bytes, which does not fit shape {list(spec.shape)}.")
    return PlannedTensor(
        name=spec.name, dtype=dtype, shape=spec.shape, source=FileSource(segments), data_offset=0, nbytes=nbytes
    )


def _plan_segment(part: SpecPart, out_dtype: str, seed: int) -> Segment:
    location = part.checkpoint.locate(part.source_name)
    source_dtype = location.entry.dtype
    noise_scale = part.expert.noise_scale if part.expert else None
    residual_scale = part.expert.residual_scale if part.expert and part.is_residual else None
    transform = Transform(
        out_dtype=out_dtype if source_dtype in TORCH_DTYPES else source_dtype,
        noise_scale=noise_scale or None,
        noise_seed=_noise_seed(seed, part.noise_key) if noise_scale else None,
        residual_scale=residual_scale,
    )
    if not transform.is_copy_of(source_dtype) and source_dtype not in TORCH_DTYPES:
        raise PlanError(
            f"{location.path}: tensor {part.source_name!r} has dtype {source_dtype}, which lowmem-moe cannot convert "
            "or transform. Only float32, float16 and bfloat16 tensors can take a dtype, noise_scale or residual_scale."
        )
    return Segment(
        path=location.path,
        offset=location.entry.offset,
        nbytes=location.entry.nbytes,
        dtype=source_dtype,
        transform=transform,
    )


def _noise_seed(seed: int, tensor_name: str) -> int:
    # A per-tensor seed from the run seed and the tensor's name, so that the
    # noise of one tensor does not depend on which other tensors exist.
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _assign_shards(tensors: list[PlannedTensor], shard_size: int) -> list[PlannedShard]:
    # Fill shards in order. A tensor larger than shard_size gets a shard of
    # its own, as transformers' save_pretrained does.
    groups: list[list[PlannedTensor]] = [[]]
    group_bytes = 0
    for tensor in tensors:
        if groups[-1] and group_bytes + tensor.nbytes > shard_size:
            groups.append([])
            group_bytes = 0
        groups[-1].append(tensor)
        group_bytes += tensor.nbytes

    shards = []
    for index, group in enumerate(groups):
        offset = 0
        placed = []
        for tensor in group:
            placed.append(_with_offset(tensor, offset))
            offset += tensor.nbytes
        shards.append(PlannedShard(file_name=SHARD_NAME.format(index=index + 1, count=len(groups)), tensors=tuple(placed)))
    return shards


def _with_offset(tensor: PlannedTensor, offset: int) -> PlannedTensor:
    return replace(tensor, data_offset=offset)
