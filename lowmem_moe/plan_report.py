"""Human-readable text for a MergePlan."""

from .plan import FileSource, GateSource, MergePlan, PlannedTensor


def format_bytes(count: int) -> str:
    """Return a byte count in binary units, such as ``1.5 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plan_summary(plan: MergePlan, free_disk: int, disk_needed: int) -> str:
    """Return the plan's totals as aligned lines of text."""
    tensors = plan.tensors
    converted = sum(1 for t in tensors if isinstance(t.source, FileSource) and not t.transform.is_copy_of(t.source.dtype))
    rows = [
        ("architecture", plan.architecture),
        ("output tensors", f"{len(tensors)} ({converted} converted or transformed, {_gate_count(tensors)} routers)"),
        ("shards", str(len(plan.shards))),
        ("bytes read", f"{format_bytes(plan.bytes_read)} ({plan.bytes_read:,})"),
        ("bytes written", f"{format_bytes(plan.bytes_written)} ({plan.bytes_written:,}) in shards"),
        ("disk needed", f"{format_bytes(disk_needed)} including tokenizer, configs and model card"),
        ("free disk", f"{format_bytes(free_disk)}" + ("" if free_disk >= disk_needed else "  (NOT ENOUGH)")),
        ("chunk size", format_bytes(plan.chunk_size)),
        ("expected peak memory", f"{format_bytes(plan.expected_peak_memory)} (estimate)"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


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
        text = f"router weights of layer {source.layer} (float32)"
    else:
        ranges = ", ".join(f"{segment.path}[{segment.offset}:{segment.offset + segment.nbytes}]" for segment in source.segments)
        text = f"{source.dtype} {ranges}"

    steps = []
    if tensor.transform.noise_scale:
        steps.append(f"noise {tensor.transform.noise_scale:g}")
    if tensor.transform.residual_scale not in (None, 1.0):
        steps.append(f"scale {tensor.transform.residual_scale:g}")
    source_dtype = "F32" if isinstance(source, GateSource) else source.dtype
    if source_dtype != tensor.transform.out_dtype:
        steps.append(f"to {tensor.transform.out_dtype}")
    return text + (f" ({', '.join(steps)})" if steps else "")


def _gate_count(tensors: list[PlannedTensor]) -> int:
    return sum(1 for tensor in tensors if isinstance(tensor.source, GateSource))
