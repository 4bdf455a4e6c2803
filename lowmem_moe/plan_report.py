"""Human-readable text for a MergePlan."""

from .model_resolution import SourceResolution
from .plan import FileSource, GateSource, MergePlan, PlannedTensor, Segment


def format_bytes(count: int) -> str:
    """Return a byte count in binary units, such as ``1.5 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plan_summary(plan: MergePlan, free_disk: int, disk_needed: int, bytes_to_download: int = 0) -> str:
    """Return the plan's totals as aligned lines of text.

    ``bytes_to_download`` is what the merge would download into the Hugging
    Face cache first.
    """
    tensors = plan.tensors
    converted = sum(1 for t in tensors if isinstance(t.source, FileSource) and not t.is_plain_copy)
    rows = [
        ("architecture", plan.architecture),
        ("output tensors", f"{len(tensors)} ({converted} converted or transformed, {_gate_count(tensors)} routers)"),
        ("shards", str(len(plan.shards))),
        ("to download", f"{format_bytes(bytes_to_download)} ({bytes_to_download:,})"),
        ("bytes read", f"{format_bytes(plan.bytes_read)} ({plan.bytes_read:,})"),
        ("bytes written", f"{format_bytes(plan.bytes_written)} ({plan.bytes_written:,}) in shards"),
        ("disk needed", f"{format_bytes(disk_needed)} including tokenizer, configs and model card"),
        ("free disk", f"{format_bytes(free_disk)}" + ("" if free_disk >= disk_needed else "  (NOT ENOUGH)")),
        ("chunk size", format_bytes(plan.chunk_size)),
        ("expected peak memory", f"{format_bytes(plan.expected_peak_memory)} (estimate)"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def download_report(resolution: SourceResolution) -> str:
    """Return what a merge would download into the Hugging Face cache: the total, then one line per model."""
    total = resolution.bytes_to_download
    headline = f"to download  {format_bytes(total)} ({total:,}) in {resolution.pending_files} files"
    if resolution.unknown_sizes:
        headline += f", {resolution.unknown_sizes} of them of unknown size"
    lines = [f"{headline}, into {resolution.cache_dir}"]
    for model in resolution.models:
        if not model.pending:
            continue
        line = (
            f"  {model.reference} ({model.label}): commit {model.commit}, {len(model.pending)} files, "
            f"{format_bytes(model.bytes_to_download)}"
        )
        if model.skipped_shards:
            line += f"; {model.skipped_shards} shards without MLP tensors are skipped"
        lines.append(line)
    lines.append(
        "The tensor plan needs the headers of these files. `lowmem-moe merge` downloads them before it merges; "
        "run `lowmem-moe plan` again afterwards to see the full plan."
    )
    return "\n".join(lines)


def plan_tensor_lines(plan: MergePlan) -> list[str]:
    """Return one line per output tensor: shard, name, dtype, shape and where its bytes come from."""
    lines = []
    for shard in plan.shards:
        for tensor in shard.tensors:
            lines.append(f"{shard.file_name}  {tensor.name}  {tensor.dtype}{list(tensor.shape)}  <- {_describe_source(tensor)}")
    return lines


def _describe_source(tensor: PlannedTensor) -> str:
    source = tensor.source
    if isinstance(source, GateSource):
        text = f"{source.router} router weights of layer {source.layer} (float32)"
        return text + (f" (to {tensor.dtype})" if tensor.dtype != "F32" else "")
    return " + ".join(_describe_segment(segment) for segment in source.segments)


def _describe_segment(segment: Segment) -> str:
    steps = []
    if segment.transform.noise_scale:
        steps.append(f"noise {segment.transform.noise_scale:g}")
    if segment.transform.residual_scale not in (None, 1.0):
        steps.append(f"scale {segment.transform.residual_scale:g}")
    if segment.dtype != segment.transform.out_dtype:
        steps.append(f"to {segment.transform.out_dtype}")
    text = f"{segment.dtype} {segment.path}[{segment.offset}:{segment.offset + segment.nbytes}]"
    return text + (f" ({', '.join(steps)})" if steps else "")


def _gate_count(tensors: list[PlannedTensor]) -> int:
    return sum(1 for tensor in tensors if isinstance(tensor.source, GateSource))
