"""Compare two merged Mixtral checkpoints tensor by tensor, in bounded memory.

lowmem-moe writes per-expert tensors
(``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight``).
mergekit-moe 0.1.5 writes the transformers 5 layout: one
``model.layers.{i}.mlp.experts.gate_up_proj`` of shape
(experts, 2 * intermediate, hidden) and one ``...experts.down_proj`` of shape
(experts, hidden, intermediate) per layer. transformers' Mixtral conversion
mapping (transformers 5.25.0, used by mergekit-moe) builds gate_up_proj: it
stacks the experts' w1 and w3, then concatenates the two on dimension 1.
Rows [0, intermediate) of expert e are therefore its w1 (gate_proj), and
rows [intermediate, 2 * intermediate) its w3 (up_proj). Routers are
reported apart and do not count as differences, because the tools need not
draw the same random gates, and hidden gates differ by design (see the
results page).

Tensors are read in blocks of rows through ``safe_open(...).get_slice``, so
memory stays at two blocks, whatever the tensor size.
"""

import json
import logging
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

BLOCK_BYTES = 16 * 1024**2  # bytes of one side read per comparison step

ROUTER_PATTERN = re.compile(r"^model\.layers\.\d+\.(block_sparse_moe|mlp)\.gate\.weight$")
EXPERT_PATTERN = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"


@dataclass(frozen=True)
class TensorView:
    """A tensor of one file, or the rows of one expert in a fused tensor."""

    file: Path
    name: str
    expert: int | None = None  # index into dimension 0 of a fused tensor
    rows: tuple[int, int] | None = None  # row range of that expert's matrix


@dataclass
class ComparisonReport:
    """Tensor names sorted into equal, different, missing and excluded."""

    equal: list[str] = field(default_factory=list)
    different: list[dict[str, Any]] = field(default_factory=list)  # name and reason
    only_in_first: list[str] = field(default_factory=list)
    only_in_second: list[str] = field(default_factory=list)
    excluded_routers: list[str] = field(default_factory=list)
    # Routers are reported apart: how many are bit for bit equal, and the
    # lowest cosine similarity between matching rows (one per expert and layer).
    routers_compared: int = 0
    routers_equal: int = 0
    router_min_cosine: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "equal_count": len(self.equal),
            "different_count": len(self.different),
            "different": self.different,
            "only_in_lowmem_moe": self.only_in_first,
            "only_in_mergekit_moe": self.only_in_second,
            "excluded_routers": self.excluded_routers,
            "routers_compared": self.routers_compared,
            "routers_equal": self.routers_equal,
            "router_min_cosine": self.router_min_cosine,
        }


def tensor_files(folder: Path) -> dict[str, Path]:
    """Return every tensor name of a checkpoint folder with the file that contains it."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file_name for name, file_name in weight_map.items()}
    single = folder / "model.safetensors"
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def compare_outputs(lowmem_dir: Path, mergekit_dir: Path) -> ComparisonReport:
    """Compare every non-router tensor of a lowmem-moe output with the same tensor of a mergekit-moe output."""
    first = tensor_files(lowmem_dir)
    second = tensor_files(mergekit_dir)
    report = ComparisonReport()
    used_second: set[str] = set()

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(path: Path):
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            return handles[path]

        for name in sorted(first):
            if ROUTER_PATTERN.match(name):
                report.excluded_routers.append(name)
                similarity = _router_similarity(name, first, second, handle)
                if similarity is not None:
                    equal, cosine = similarity
                    report.routers_compared += 1
                    report.routers_equal += int(equal)
                    report.router_min_cosine = min(cosine, report.router_min_cosine or cosine)
                continue
            counterpart = _counterpart(name, second, handle)
            if counterpart is None:
                report.only_in_first.append(name)
                continue
            used_second.add(counterpart.name)
            reason = _difference(TensorView(first[name], name), counterpart, handle)
            if reason is None:
                report.equal.append(name)
            else:
                report.different.append({"name": name, "reason": reason})
                logger.warning("%s differs: %s", name, reason)

    for name in sorted(second):
        if ROUTER_PATTERN.match(name):
            report.excluded_routers.append(name)
        elif name not in used_second:
            report.only_in_second.append(name)
    return report


def _router_similarity(name: str, first: dict[str, Path], second: dict[str, Path], handle) -> tuple[bool, float] | None:
    # Routers are (experts, hidden) and small, so they are read whole.
    other = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    if other not in second:
        return None
    left = handle(first[name]).get_tensor(name)
    right = handle(second[other]).get_tensor(other)
    if left.shape != right.shape:
        return None
    equal = left.dtype == right.dtype and torch.equal(_bits(left), _bits(right))
    cosine = torch.nn.functional.cosine_similarity(left.double(), right.double(), dim=1).min().item()
    return equal, cosine


def _counterpart(name: str, second: dict[str, Path], handle) -> TensorView | None:
    if name in second:
        return TensorView(second[name], name)
    match = EXPERT_PATTERN.match(name)
    if not match:
        return None
    layer, expert, projection = int(match.group(1)), int(match.group(2)), match.group(3)
    if projection == "w2":
        fused = FUSED_DOWN.format(layer=layer)
        return TensorView(second[fused], fused, expert=expert) if fused in second else None

    fused = FUSED_GATE_UP.format(layer=layer)
    if fused not in second:
        return None
    # (experts, 2 * intermediate, hidden): gate rows first, then up rows.
    intermediate = handle(second[fused]).get_slice(fused).get_shape()[1] // 2
    rows = (0, intermediate) if projection == "w1" else (intermediate, 2 * intermediate)
    return TensorView(second[fused], fused, expert=expert, rows=rows)


def _difference(left: TensorView, right: TensorView, handle) -> str | None:
    left_slice = handle(left.file).get_slice(left.name)
    right_slice = handle(right.file).get_slice(right.name)
    left_shape = list(left_slice.get_shape())
    right_shape = _view_shape(right, list(right_slice.get_shape()))
    if left_shape != right_shape:
        return f"shape {left_shape} against {right_shape}"
    if left_slice.get_dtype() != right_slice.get_dtype():
        return f"dtype {left_slice.get_dtype()} against {right_slice.get_dtype()}"

    if not left_shape:
        scalars_equal = torch.equal(_bits(handle(left.file).get_tensor(left.name)), _bits(handle(right.file).get_tensor(right.name)))
        return None if scalars_equal else "values differ"

    total_rows = left_shape[0]
    row_bytes = max(1, _element_count(left_shape[1:]) * _item_size(left_slice.get_dtype()))
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, total_rows, step):
        stop = min(total_rows, start + step)
        left_block = left_slice[start:stop]
        right_block = _read_rows(right, right_slice, start, stop)
        if not torch.equal(_bits(left_block), _bits(right_block)):
            return f"values differ in rows {start}-{stop - 1}"
    return None


def _view_shape(view: TensorView, shape: list[int]) -> list[int]:
    if view.expert is None:
        return shape
    inner = shape[1:]
    if view.rows is not None:
        inner[0] = view.rows[1] - view.rows[0]
    return inner


def _read_rows(view: TensorView, tensor_slice, start: int, stop: int) -> torch.Tensor:
    if view.expert is None:
        return tensor_slice[start:stop]
    offset = view.rows[0] if view.rows else 0
    return tensor_slice[view.expert : view.expert + 1, offset + start : offset + stop][0]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # Bitwise comparison, so that equal NaN payloads count as equal.
    return tensor.contiguous().view(torch.uint8)


def _element_count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _item_size(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]
