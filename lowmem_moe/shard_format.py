"""The byte layout of an output safetensors shard, computed before writing."""

import json

from .plan import PlannedShard

# Header JSON is padded with spaces to a multiple of 8 bytes, as the
# safetensors reference writer does, so that tensor data stays aligned.
HEADER_ALIGNMENT = 8
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def shard_header_bytes(shard: PlannedShard, metadata: dict[str, str] | None = None) -> bytes:
    """Return the 8-byte length prefix and the padded JSON header of a shard."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    for tensor in shard.tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [tensor.data_offset, tensor.data_offset + tensor.nbytes],
        }
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % HEADER_ALIGNMENT)
    return len(body).to_bytes(8, "little") + body


def shard_file_size(shard: PlannedShard) -> int:
    """Return the size in bytes of the finished shard file."""
    return len(shard_header_bytes(shard)) + shard.data_size
