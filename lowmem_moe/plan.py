"""The merge plan: plain data that maps every output byte to its source, made before any data moves.

A plan can be printed, serialised to JSON and checked in tests. The writer
executes it and makes no decisions of its own.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import ITEM_SIZES


@dataclass(frozen=True)
class Transform:
    """The conversion that each chunk of a segment goes through on its way from source to output.

    Values are computed in float32 when anything other than a plain copy is
    needed: noise is added first, then the residual scale is applied, then
    the result is rounded to the output dtype, as mergekit-moe orders them.
    """

    out_dtype: str  # safetensors code
    noise_scale: float | None = None
    noise_seed: int | None = None
    residual_scale: float | None = None

    def is_copy_of(self, source_dtype: str) -> bool:
        """Return whether the transform leaves source bytes unchanged."""
        return source_dtype == self.out_dtype and not self.noise_scale and self.residual_scale in (None, 1.0)


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range of a source file and how it becomes output bytes."""

    path: Path
    offset: int  # bytes from the start of the file
    nbytes: int  # source bytes
    dtype: str  # safetensors code of the source data
    transform: Transform

    @property
    def output_nbytes(self) -> int:
        return self.nbytes // ITEM_SIZES[self.dtype] * ITEM_SIZES[self.transform.out_dtype]


@dataclass(frozen=True)
class FileSource:
    """Tensor data that lies in source files, written in the order of the segments.

    Most tensors have one segment. A fused expert tensor has one per expert.
    """

    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(segment.nbytes for segment in self.segments)


@dataclass(frozen=True)
class GateSource:
    """Router weights from the gate pass: layer ``layer`` of a (layers, experts, hidden) float32 matrix.

    ``router`` names the matrix: "experts" for the routed experts' router,
    "shared_expert" for the gate of a shared expert.
    """

    layer: int
    router: str = "experts"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its place in the output shard and where its bytes come from."""

    name: str
    dtype: str  # safetensors code of the output
    shape: tuple[int, ...]
    source: FileSource | GateSource
    data_offset: int  # bytes from the start of the shard's data section
    nbytes: int

    @property
    def is_plain_copy(self) -> bool:
        """Return whether every byte is copied unchanged from the sources."""
        return isinstance(self.source, FileSource) and all(
            segment.transform.is_copy_of(segment.dtype) for segment in self.source.segments
        )


@dataclass(frozen=True)
class PlannedShard:
    """One output safetensors file and the tensors in it, in file order."""

    file_name: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def data_size(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    """Everything the writer needs, with totals for the user to check first."""

    architecture: str
    model_class: str  # transformers class that loads the output
    shards: tuple[PlannedShard, ...]
    output_config: dict[str, Any]
    chunk_size: int  # bytes
    bytes_read: int
    bytes_written: int  # tensor data, headers and metadata files
    expected_peak_memory: int  # bytes, an estimate
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [tensor for shard in self.shards for tensor in shard.tensors]

    def to_json_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-ready data, with paths as strings."""

        def convert(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {key: convert(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [convert(item) for item in value]
            return value

        return convert(asdict(self))
