"""The safetensors header parser, on files written by safetensors itself and on hand-corrupted ones."""

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lowmem_moe.dtypes import ITEM_SIZES
from lowmem_moe.errors import SourceError
from lowmem_moe.safetensors_header import MAX_HEADER_BYTES, SafetensorsHeader, read_header


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Return a tensor's raw little-endian bytes, as safetensors stores them."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_size: int | None = None) -> Path:
    """Write a safetensors-like file from a header object or raw header bytes, then data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if header_size is None else header_size
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return path


def read_error(path: Path) -> str:
    with pytest.raises(SourceError) as caught:
        read_header(path)
    return str(caught.value)


def one_tensor(dtype: object = "F32", shape: object = (2, 3), offsets: object = (0, 24)) -> dict:
    """Return a header with one tensor named "weight". Values go into the JSON as given."""
    return {"weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


# Files written by safetensors.


@pytest.fixture
def real_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(16, 8, generator=generator),
        "norm.weight": torch.randn(8, generator=generator).to(torch.bfloat16),
        "half.weight": torch.randn(3, 5, generator=generator).to(torch.float16),
        "positions": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_real_file_entries(real_file):
    path, tensors = real_file
    header = read_header(path)
    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt"}
    assert header.path == path


@pytest.mark.parametrize(
    "name, dtype, shape",
    [
        ("embed.weight", "F32", (16, 8)),
        ("norm.weight", "BF16", (8,)),
        ("half.weight", "F16", (3, 5)),
        ("positions", "I64", (7,)),
        ("mask", "BOOL", (3,)),
        ("scalar", "F32", ()),
        ("empty", "F32", (0, 4)),
    ],
)
def test_real_file_dtype_and_shape(real_file, name, dtype, shape):
    path, _ = real_file
    entry = read_header(path).tensors[name]
    assert entry.dtype == dtype
    assert entry.shape == shape
    assert entry.numel == math.prod(shape)
    assert entry.nbytes == math.prod(shape) * ITEM_SIZES[dtype]


def test_real_file_offsets_point_at_tensor_bytes(real_file):
    path, tensors = real_file
    header = read_header(path)
    content = path.read_bytes()
    for name, tensor in tensors.items():
        entry = header.tensors[name]
        assert content[entry.offset : entry.offset + entry.nbytes] == tensor_bytes(tensor), name


def test_real_file_data_start(real_file):
    path, _ = real_file
    content = path.read_bytes()
    (header_size,) = struct.unpack("<Q", content[:8])
    header = read_header(path)
    assert header.data_start == 8 + header_size
    assert min(entry.offset for entry in header.tensors.values()) == header.data_start


def test_empty_header_object(tmp_path):
    header = read_header(write_raw(tmp_path / "empty.safetensors", {}))
    assert header.tensors == {}
    assert header.metadata == {}


def test_zero_size_tensors_may_share_offset(tmp_path):
    entries = {
        "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "b": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "c": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    header = read_header(write_raw(tmp_path / "zero.safetensors", entries, b"\0" * 4))
    assert header.tensors["c"].nbytes == 4
    assert header.tensors["a"].nbytes == 0


# Corrupt files: the length prefix.


def test_header_length_beyond_file(tmp_path):
    path = write_raw(tmp_path / "long.safetensors", b"{}", header_size=1000)
    message = read_error(path)
    assert str(path) in message
    assert "header length 1000" in message
    assert "truncated" in message


def test_absurd_header_length(tmp_path):
    path = write_raw(tmp_path / "absurd.safetensors", b"{}" + b" " * 64, header_size=2**63 + 5)
    message = read_error(path)
    assert str(path) in message
    assert f"header length {2**63 + 5}" in message


def test_header_length_above_limit(tmp_path):
    # Longer than the limit but shorter than a sparse file that claims to hold it.
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        handle.truncate(8 + MAX_HEADER_BYTES + 10)
    message = read_error(path)
    assert f"header length {MAX_HEADER_BYTES + 1}" in message


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x02\x00\x00\x00\x00\x00\x00"])
def test_file_shorter_than_prefix(tmp_path, content):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    message = read_error(path)
    assert str(path) in message
    assert f"file is {len(content)} bytes" in message


def test_missing_file(tmp_path):
    message = read_error(tmp_path / "absent.safetensors")
    assert str(tmp_path / "absent.safetensors") in message
    assert "cannot read" in message


def test_folder_instead_of_file(tmp_path):
    message = read_error(tmp_path)
    assert str(tmp_path) in message


# Corrupt files: the JSON header.


def test_header_not_json(tmp_path):
    path = write_raw(tmp_path / "text.safetensors", b"this is not json")
    message = read_error(path)
    assert str(path) in message
    assert "not valid UTF-8 JSON" in message


def test_header_not_utf8(tmp_path):
    path = write_raw(tmp_path / "latin1.safetensors", b'{"caf\xe9": 1}')
    message = read_error(path)
    assert "not valid UTF-8 JSON" in message


def test_header_json_array(tmp_path):
    path = write_raw(tmp_path / "array.safetensors", b"[1, 2]")
    message = read_error(path)
    assert "must be a JSON object, got list" in message


def test_header_deeply_nested(tmp_path):
    path = write_raw(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    message = read_error(path)
    assert str(path) in message


def test_header_integer_too_long(tmp_path):
    digits = b"9" * 5000
    path = write_raw(tmp_path / "digits.safetensors", b'{"t": {"dtype": "U8", "shape": [' + digits + b'], "data_offsets": [0, 1]}}')
    message = read_error(path)
    assert str(path) in message


def test_metadata_not_object(tmp_path):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": ["format", "pt"]})
    message = read_error(path)
    assert "__metadata__ must be a JSON object of strings" in message


def test_metadata_falsy_non_object(tmp_path):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": 0})
    message = read_error(path)
    assert "__metadata__" in message


def test_metadata_value_not_string(tmp_path):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"format": 1}})
    message = read_error(path)
    assert "__metadata__ must be a JSON object of strings" in message


def test_entry_not_object(tmp_path):
    path = write_raw(tmp_path / "entry.safetensors", {"weight": [0, 4]}, b"\0" * 4)
    message = read_error(path)
    assert "tensor 'weight'" in message
    assert "must be a JSON object" in message


# Corrupt files: tensor entries.


def test_offsets_past_data_section(tmp_path):
    path = write_raw(tmp_path / "past.safetensors", one_tensor(offsets=[0, 24]), b"\0" * 20)
    message = read_error(path)
    assert str(path) in message
    assert "tensor 'weight'" in message
    assert "[0, 24] lie outside the data section of 20 bytes" in message


def test_offsets_negative(tmp_path):
    path = write_raw(tmp_path / "negative.safetensors", one_tensor(offsets=[-4, 20]), b"\0" * 24)
    message = read_error(path)
    assert "tensor 'weight'" in message
    assert "outside the data section" in message


def test_offsets_reversed(tmp_path):
    path = write_raw(tmp_path / "reversed.safetensors", one_tensor(offsets=[24, 0]), b"\0" * 24)
    message = read_error(path)
    assert "tensor 'weight'" in message
    assert "outside the data section" in message


@pytest.mark.parametrize("offsets", [[0], [0, 8, 24], [0.0, 24], ["0", "24"], [False, 24], None])
def test_offsets_malformed(tmp_path, offsets):
    entries = {"weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": offsets}}
    path = write_raw(tmp_path / "offsets.safetensors", entries, b"\0" * 24)
    message = read_error(path)
    assert "tensor 'weight'" in message
    assert "data_offsets must be two integers" in message


def test_overlapping_tensors(tmp_path):
    entries = {
        "first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "second": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]},
    }
    path = write_raw(tmp_path / "overlap.safetensors", entries, b"\0" * 28)
    message = read_error(path)
    assert str(path) in message
    assert "'first' and 'second' overlap" in message


def test_identical_ranges_overlap(tmp_path):
    entries = {
        "first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "alias": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]},
    }
    path = write_raw(tmp_path / "alias.safetensors", entries, b"\0" * 16)
    message = read_error(path)
    assert "overlap" in message


def test_adjacent_tensors_do_not_overlap(tmp_path):
    entries = {
        "first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "second": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }
    header = read_header(write_raw(tmp_path / "adjacent.safetensors", entries, b"\0" * 32))
    assert header.tensors["second"].offset == header.data_start + 16


def test_byte_size_not_matching_shape(tmp_path):
    path = write_raw(tmp_path / "size.safetensors", one_tensor(dtype="BF16", shape=[2, 3], offsets=[0, 24]), b"\0" * 24)
    message = read_error(path)
    assert "tensor 'weight'" in message
    assert "data is 24 bytes, but dtype BF16 and shape [2, 3] need 12" in message


@pytest.mark.parametrize("dtype", ["F128", "float32", "", None, ["F32"], {"F32": 1}, 4])
def test_unknown_dtype(tmp_path, dtype):
    path = write_raw(tmp_path / "dtype.safetensors", one_tensor(dtype=dtype), b"\0" * 24)
    message = read_error(path)
    assert str(path) in message
    assert "tensor 'weight'" in message
    assert "unknown dtype" in message


@pytest.mark.parametrize("shape", [[-2, -3], [2, -3], [2.0, 3], ["2", 3], [True, 3], "2x3", None, {"0": 2}])
def test_invalid_shape(tmp_path, shape):
    path = write_raw(tmp_path / "shape.safetensors", one_tensor(shape=shape), b"\0" * 24)
    message = read_error(path)
    assert "tensor 'weight'" in message
    assert "shape must be a list of non-negative integers" in message


def test_huge_shape_rejected(tmp_path):
    entries = one_tensor(dtype="F32", shape=[2**40, 2**40], offsets=[0, 24])
    message = read_error(write_raw(tmp_path / "huge.safetensors", entries, b"\0" * 24))
    assert "tensor 'weight'" in message
    assert f"need {2**80 * 4}" in message


def test_shape_product_wrapping_to_data_size_rejected(tmp_path):
    # (2**62 + 1) * 4 is 4 modulo 2**64, so a parser that multiplies in
    # 64-bit integers would take this shape for the 4 bytes present.
    entries = one_tensor(dtype="U8", shape=[2**62 + 1, 4], offsets=[0, 4])
    message = read_error(write_raw(tmp_path / "wrap.safetensors", entries, b"\0" * 4))
    assert "tensor 'weight'" in message
    assert "data is 4 bytes" in message


def test_truncated_real_file(real_file):
    path, _ = real_file
    content = path.read_bytes()
    path.write_bytes(content[:-10])
    message = read_error(path)
    assert str(path) in message
    assert "outside the data section" in message


def test_truncated_inside_header(real_file):
    path, _ = real_file
    path.write_bytes(path.read_bytes()[:40])
    message = read_error(path)
    assert "truncated" in message


# Fuzzing: any input gives a valid header or SourceError.


def check_header_invariants(header: SafetensorsHeader, file_size: int) -> None:
    assert all(isinstance(value, str) for value in header.metadata.values())
    ranges = []
    for entry in header.tensors.values():
        assert entry.dtype in ITEM_SIZES
        assert all(isinstance(d, int) and d >= 0 for d in entry.shape)
        assert entry.nbytes == math.prod(entry.shape) * ITEM_SIZES[entry.dtype]
        assert header.data_start <= entry.offset
        assert entry.offset + entry.nbytes <= file_size
        if entry.nbytes:
            ranges.append((entry.offset, entry.offset + entry.nbytes))
    ranges.sort()
    for (_, end), (begin, _) in zip(ranges, ranges[1:]):
        assert end <= begin


def parse_or_reject(content: bytes) -> None:
    # A fresh folder per example, since hypothesis reuses one test invocation.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(content)
        try:
            header = read_header(path)
        except SourceError as error:
            assert str(path) in str(error)
            return
        check_header_invariants(header, len(content))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

small_int = st.integers(min_value=-4, max_value=80) | st.sampled_from([2**31, 2**62 + 1, 2**64 - 1, 2**64])

tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(ITEM_SIZES)) | json_values,
        "shape": st.lists(small_int, max_size=3) | json_values,
        "data_offsets": st.lists(small_int, min_size=2, max_size=2) | json_values,
    }
) | json_values

headers = st.dictionaries(
    st.sampled_from(["a", "b", "c", "__metadata__"]) | st.text(max_size=6),
    tensor_entries,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(content=st.binary(max_size=64))
def test_fuzz_random_bytes(content):
    parse_or_reject(content)


@settings(max_examples=300, deadline=None)
@given(content=st.binary(max_size=48), header_size=st.integers(min_value=0, max_value=2**64 - 1))
def test_fuzz_length_prefix(content, header_size):
    parse_or_reject(struct.pack("<Q", header_size) + content)


@settings(max_examples=500, deadline=None)
@given(header=headers, data_size=st.integers(min_value=0, max_value=96), padding=st.integers(min_value=0, max_value=8))
def test_fuzz_header_json(header, data_size, padding):
    raw = json.dumps(header).encode() + b" " * padding
    parse_or_reject(struct.pack("<Q", len(raw)) + raw + b"\x5a" * data_size)


@settings(max_examples=300, deadline=None)
@given(header=headers, cut=st.integers(min_value=0, max_value=200))
def test_fuzz_header_bytes_cut(header, cut):
    raw = json.dumps(header).encode()
    content = struct.pack("<Q", len(raw)) + raw + b"\0" * 64
    parse_or_reject(content[: len(content) - cut])


torch_dtypes = st.sampled_from(
    [(torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.int64, "I64"), (torch.uint8, "U8"), (torch.bool, "BOOL")]
)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(
        st.tuples(torch_dtypes, st.lists(st.integers(min_value=0, max_value=5), max_size=3)),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_fuzz_real_files_round_trip(specs, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, ((dtype, _), shape) in enumerate(specs):
        values = torch.randint(0, 2, tuple(shape), generator=generator) if dtype == torch.bool else torch.randn(tuple(shape), generator=generator) * 50
        tensors[f"t{index}"] = values.to(dtype)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_file(tensors, str(path))
        header = read_header(path)
        content = path.read_bytes()

    assert set(header.tensors) == set(tensors)
    for index, ((_, code), shape) in enumerate(specs):
        entry = header.tensors[f"t{index}"]
        assert entry.dtype == code
        assert entry.shape == tuple(shape)
        assert content[entry.offset : entry.offset + entry.nbytes] == tensor_bytes(tensors[f"t{index}"])
