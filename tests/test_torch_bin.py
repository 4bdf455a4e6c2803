"""PyTorch zip checkpoints (pytorch_model.bin) as sources: layouts, merges and hostile files."""

import json
import os
import pickle
import shutil
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import lowmem_moe.torch_zip_checkpoint as torch_zip_checkpoint
from lowmem_moe.checkpoint import Checkpoint
from lowmem_moe.errors import SourceError
from lowmem_moe.torch_zip_checkpoint import read_torch_zip
from merge_helpers import merge, merge_yaml, read_tensors

BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


# Writing .bin checkpoints. transformers 5 saves only safetensors, so the
# tests call torch.save, as transformers 4.x did for safe_serialization=False.


def copy_without_weights(source: Path, target: Path) -> Path:
    """Copy a model folder's config and tokenizer, but not its safetensors weights."""
    ignore = shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json")
    return Path(shutil.copytree(source, target, ignore=ignore))


def write_bin(source: Path, target: Path, state_dict: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Write ``state_dict`` as pytorch_model.bin, or as ``shards`` files with an index, next to source's config."""
    folder = copy_without_weights(source, target)
    if shards == 1:
        torch.save(state_dict, folder / BIN)
        return folder
    names = list(state_dict)
    weight_map = {}
    for index in range(shards):
        file_name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = names[index::shards]
        torch.save({name: state_dict[name] for name in part}, folder / file_name)
        weight_map.update({name: file_name for name in part})
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
    (folder / BIN_INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}))
    return folder


def module_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Return model.state_dict() of a transformers model, with its _metadata attribute."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def as_parameters(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return OrderedDict((name, torch.nn.Parameter(tensor.clone(), requires_grad=True)) for name, tensor in tensors.items())


def with_attributes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every tensor extra Python attributes: plain tensors and nn.Parameters in turn."""
    result = OrderedDict()
    for position, (name, tensor) in enumerate(tensors.items()):
        value = tensor.clone() if position % 2 else torch.nn.Parameter(tensor.clone(), requires_grad=False)
        value.source_run = "fine-tune 7"
        value.step = position
        result[name] = value
    return result


def shared_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return views into one flat storage per dtype, so every tensor after the first has a storage offset."""
    result = OrderedDict()
    for dtype in {tensor.dtype for tensor in tensors.values()}:
        names = [name for name, tensor in tensors.items() if tensor.dtype == dtype]
        flat = torch.cat([tensors[name].reshape(-1) for name in names])
        start = 0
        for name in names:
            count = tensors[name].numel()
            result[name] = flat[start : start + count].view(tensors[name].shape)
            start += count
    return result


def entry_bytes(checkpoint: Checkpoint, name: str) -> bytes:
    location = checkpoint.locate(name)
    with open(location.path, "rb") as handle:
        handle.seek(location.entry.offset)
        return handle.read(location.entry.nbytes)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_state_dict() -> dict[str, torch.Tensor]:
    """One tensor of every supported kind, sharing storages where torch allows."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=generator)
    tied = torch.randn(5, 3, generator=generator)
    attributed = torch.randn(2, 3, generator=generator)
    attributed.note = {"origin": "test", "scale": 0.5}
    parameter_with_state = torch.nn.Parameter(torch.randn(4, generator=generator))
    parameter_with_state.tag = "expert"
    return OrderedDict(
        f32=base,
        rows_view=base[2:5],  # storage offset 8 elements
        column=base[:, 1:2].contiguous(),
        f16=torch.randn(3, 5, generator=generator).to(torch.float16),
        bf16=torch.randn(7, generator=generator).to(torch.bfloat16),
        bf16_view=torch.randn(4, 4, generator=generator).to(torch.bfloat16)[3],
        parameter=torch.nn.Parameter(torch.randn(2, 2, generator=generator)),
        parameter_with_state=parameter_with_state,
        attributed=attributed,
        tied_a=tied,
        tied_b=tied,
        i64=torch.arange(5),
        u16=torch.arange(4, dtype=torch.int32).to(torch.uint16),
        f8=torch.randn(6, generator=generator).to(torch.float8_e4m3fn),
        size_one_dims=torch.randn(1, 3, 1, generator=generator),
        empty=torch.zeros(0, 4),
        scalar=torch.tensor(2.5),
    )


@pytest.fixture
def sample_bin(tmp_path) -> Path:
    path = tmp_path / BIN
    torch.save(sample_state_dict(), path)
    return path


# Layouts read straight from the zip file.


def test_entries_match_torch_load(sample_bin):
    index = read_torch_zip(sample_bin)
    reference = torch.load(sample_bin, weights_only=True)
    data = sample_bin.read_bytes()

    assert list(index.tensors) == sorted(reference)
    for name, entry in index.tensors.items():
        expected = reference[name]
        assert entry.shape == tuple(expected.shape), name
        assert entry.nbytes == expected.numel() * expected.element_size(), name
        assert data[entry.offset : entry.offset + entry.nbytes] == tensor_bytes(expected), name


def test_dtype_codes(sample_bin):
    tensors = read_torch_zip(sample_bin).tensors
    expected = {"f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64", "u16": "U16", "f8": "F8_E4M3"}
    assert {name: tensors[name].dtype for name in expected} == expected


def test_view_offset_inside_storage(sample_bin):
    tensors = read_torch_zip(sample_bin).tensors
    assert tensors["rows_view"].offset == tensors["f32"].offset + 8 * 4


def test_tied_weights_share_bytes(sample_bin):
    tensors = read_torch_zip(sample_bin).tensors
    assert tensors["tied_a"].offset == tensors["tied_b"].offset
    assert tensors["tied_a"].nbytes == tensors["tied_b"].nbytes


def test_extra_attributes_logged(sample_bin, caplog):
    caplog.set_level("INFO", logger="lowmem_moe")
    read_torch_zip(sample_bin)
    messages = [record.getMessage() for record in caplog.records]
    assert any("2 tensors carry extra Python attributes (note, tag)" in message for message in messages), messages


def test_local_header_padding_used(sample_bin):
    # torch aligns storage data with padding in the local header's extra
    # field, which the central directory does not repeat.
    with zipfile.ZipFile(sample_bin) as archive, open(sample_bin, "rb") as handle:
        padded = 0
        for info in archive.infolist():
            handle.seek(info.header_offset + 28)
            (local_extra,) = struct.unpack("<H", handle.read(2))
            padded += local_extra != len(info.extra)
    assert padded > 0


def test_rezipped_archive_reads(tmp_path, sample_bin):
    # Python's zipfile writes no alignment padding and a different archive folder.
    path = tmp_path / "rezipped.bin"
    with zipfile.ZipFile(sample_bin) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr("renamed/" + info.filename.split("/", 1)[1], source.read(info))
    reference = torch.load(sample_bin, weights_only=True)
    data = path.read_bytes()
    for name, entry in read_torch_zip(path).tensors.items():
        assert data[entry.offset : entry.offset + entry.nbytes] == tensor_bytes(reference[name]), name


def test_checkpoint_single_bin(tmp_path, tiny_llama):
    folder = write_bin(tiny_llama, tmp_path / "model", read_tensors(tiny_llama))
    checkpoint = Checkpoint.open(folder)
    reference = torch.load(folder / BIN, weights_only=True)
    assert set(checkpoint.tensor_names) == set(reference)
    for name in checkpoint.tensor_names:
        assert checkpoint.locate(name).path == folder / BIN
        assert entry_bytes(checkpoint, name) == tensor_bytes(reference[name]), name


def test_checkpoint_sharded_bin(tmp_path, tiny_llama):
    folder = write_bin(tiny_llama, tmp_path / "model", read_tensors(tiny_llama), shards=3)
    checkpoint = Checkpoint.open(folder)
    weight_map = json.loads((folder / BIN_INDEX).read_text())["weight_map"]
    assert len(checkpoint.headers) == 3
    assert set(checkpoint.tensor_names) == set(weight_map)
    for name, file_name in weight_map.items():
        assert checkpoint.locate(name).path.name == file_name, name
        reference = torch.load(folder / file_name, weights_only=True)[name]
        assert entry_bytes(checkpoint, name) == tensor_bytes(reference), name


def test_safetensors_preferred_over_bin(tmp_path, tiny_llama):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / BIN).write_bytes(b"not read")
    checkpoint = Checkpoint.open(folder)
    assert {checkpoint.locate(name).path.name for name in checkpoint.tensor_names} == {"model.safetensors"}


def test_bin_index_outside_folder(tmp_path, tiny_llama):
    outside = write_bin(tiny_llama, tmp_path / "outside", read_tensors(tiny_llama))
    folder = copy_without_weights(tiny_llama, tmp_path / "model")
    index = {"weight_map": {"model.norm.weight": f"../{outside.name}/{BIN}"}}
    (folder / BIN_INDEX).write_text(json.dumps(index))
    with pytest.raises(SourceError) as caught:
        Checkpoint.open(folder)
    assert "lies outside the model folder" in str(caught.value)


def test_bin_symlink_outside_folder(tmp_path, tiny_llama):
    outside = write_bin(tiny_llama, tmp_path / "outside", read_tensors(tiny_llama))
    folder = copy_without_weights(tiny_llama, tmp_path / "model")
    os.symlink(outside / BIN, folder / BIN)
    with pytest.raises(SourceError) as caught:
        Checkpoint.open(folder)
    assert "is a symlink to" in str(caught.value)
    assert "outside the model folder" in str(caught.value)


# Merges: a .bin source gives the same output bytes as its safetensors copy.


def weight_file_bytes(folder: Path) -> dict[str, bytes]:
    """Return the shards and the index of a merged model, which must not depend on the source format."""
    names = sorted(path.name for path in folder.glob("*.safetensors")) + ["model.safetensors.index.json", "config.json"]
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def reference_merge(tmp_path_factory, tiny_llama, tiny_experts) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("reference")
    config = merge_yaml(root / "merge.yml", tiny_llama, tiny_experts)
    return weight_file_bytes(merge(config, root / "out"))


EXPERT_VARIANTS = {
    "module_state_dict": module_state_dict,
    "parameters": lambda folder: as_parameters(read_tensors(folder)),
    "attributes": lambda folder: with_attributes(read_tensors(folder)),
    "shared_storage": lambda folder: shared_storage(read_tensors(folder)),
}


@pytest.mark.parametrize("variant", sorted(EXPERT_VARIANTS))
def test_bin_experts_merge_identical(tmp_path, tiny_llama, tiny_experts, reference_merge, variant):
    experts = [
        write_bin(expert, tmp_path / f"expert{index}", EXPERT_VARIANTS[variant](expert))
        for index, expert in enumerate(tiny_experts)
    ]
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, experts)
    assert weight_file_bytes(merge(config, tmp_path / "out")) == reference_merge


def test_sharded_bin_expert_merge_identical(tmp_path, tiny_llama, tiny_experts, reference_merge):
    experts = [tiny_experts[0], write_bin(tiny_experts[1], tmp_path / "expert1", read_tensors(tiny_experts[1]), 3)]
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, [*experts, tiny_experts[2]])
    assert weight_file_bytes(merge(config, tmp_path / "out")) == reference_merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bin_dtype_merge_identical(tmp_path, tiny_llama, tiny_experts, dtype):
    outputs = {}
    for kind in ("safetensors", "bin"):
        experts = []
        for index, expert in enumerate(tiny_experts):
            tensors = {name: tensor.to(dtype) for name, tensor in read_tensors(expert).items()}
            target = tmp_path / kind / f"expert{index}"
            if kind == "bin":
                experts.append(write_bin(expert, target, tensors))
            else:
                copy_without_weights(expert, target)
                save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
                experts.append(target)
        config = merge_yaml(tmp_path / kind / "merge.yml", tiny_llama, experts, dtype="bfloat16")
        outputs[kind] = weight_file_bytes(merge(config, tmp_path / kind / "out"))
    assert outputs["bin"] == outputs["safetensors"]


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_bin_base_gates_equal(tmp_path, tiny_llama, tiny_experts, gate_mode):
    # The hidden modes run the base layer by layer from its file, and
    # cheap_embed reads single embedding rows. Both formats list tensors
    # sorted by name, so the output files are byte-identical.
    base_bin = write_bin(tiny_llama, tmp_path / "base", module_state_dict(tiny_llama))
    outputs = {}
    for kind, base in (("safetensors", tiny_llama), ("bin", base_bin)):
        config = merge_yaml(tmp_path / f"{kind}.yml", base, tiny_experts, gate_mode=gate_mode)
        outputs[kind] = merge(config, tmp_path / f"out-{kind}")

    assert weight_file_bytes(outputs["bin"]) == weight_file_bytes(outputs["safetensors"])


# Hand-made archives, for files that torch.save would never write.


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def tensor_ops(key: str, numel: int, offset: int, shape: list[int], stride: list[int]) -> bytes:
    """Opcodes that call _rebuild_tensor_v2 on a float32 storage, as torch.save writes them."""
    storage = op_tuple([op_str("storage"), op_global("torch", "FloatStorage"), op_str(key), op_str("cpu"), op_int(numel)])
    arguments = op_tuple(
        [storage + b"Q", op_int(offset), op_tuple([op_int(d) for d in shape]), op_tuple([op_int(d) for d in stride]), b"\x89", b"}"]
    )
    return op_global("torch._utils", "_rebuild_tensor_v2") + arguments + b"R"


def state_dict_ops(items: dict[str, bytes]) -> bytes:
    body = b"".join(op_str(name) + value for name, value in items.items())
    return b"\x80\x02}(" + body + b"u."


def write_archive(
    path: Path,
    pickle_data: bytes,
    storages: dict[str, bytes],
    byteorder: bytes | None = b"little",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_data, compress_type=zipfile.ZIP_STORED)
        if byteorder is not None:
            archive.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data, compress_type=compression)
    return path


FOUR_FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def read_error(path: Path) -> str:
    with pytest.raises(SourceError) as caught:
        read_torch_zip(path)
    return str(caught.value)


def test_handmade_archive_reads(tmp_path):
    path = write_archive(tmp_path / "w.bin", state_dict_ops({"w": tensor_ops("0", 4, 1, [3], [1])}), {"0": FOUR_FLOATS})
    entry = read_torch_zip(path).tensors["w"]
    data = path.read_bytes()
    assert entry.dtype == "F32"
    assert data[entry.offset : entry.offset + entry.nbytes] == FOUR_FLOATS[4:]


def test_missing_byteorder_read_as_little(tmp_path):
    pickle_data = state_dict_ops({"w": tensor_ops("0", 4, 0, [4], [1])})
    path = write_archive(tmp_path / "w.bin", pickle_data, {"0": FOUR_FLOATS}, byteorder=None)
    assert read_torch_zip(path).tensors["w"].nbytes == 16


def test_big_endian_rejected(tmp_path):
    pickle_data = state_dict_ops({"w": tensor_ops("0", 4, 0, [4], [1])})
    path = write_archive(tmp_path / "w.bin", pickle_data, {"0": FOUR_FLOATS}, byteorder=b"big")
    message = read_error(path)
    assert str(path) in message
    assert "big-endian" in message


def test_compressed_storage_rejected(tmp_path, sample_bin):
    path = tmp_path / "deflated.bin"
    with zipfile.ZipFile(sample_bin) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    message = read_error(path)
    assert str(path) in message
    assert "is compressed" in message
    assert "/data/0'" in message  # the first storage that data.pkl names


def test_storage_range_outside_member(tmp_path):
    path = write_archive(tmp_path / "w.bin", state_dict_ops({"w": tensor_ops("0", 4, 2, [3], [1])}), {"0": FOUR_FLOATS})
    message = read_error(path)
    assert "tensor 'w'" in message
    assert "lie outside its 16-byte storage" in message


def test_storage_size_mismatch(tmp_path):
    path = write_archive(tmp_path / "w.bin", state_dict_ops({"w": tensor_ops("0", 8, 0, [4], [1])}), {"0": FOUR_FLOATS})
    message = read_error(path)
    assert "tensor 'w'" in message
    assert "declares 8 elements of F32, which is 32 bytes" in message


def test_missing_storage_member(tmp_path):
    path = write_archive(tmp_path / "w.bin", state_dict_ops({"w": tensor_ops("0", 4, 0, [4], [1])}), {"1": FOUR_FLOATS})
    assert "storage 'archive/data/0' that data.pkl refers to is missing" in read_error(path)


def test_storage_key_path_rejected(tmp_path):
    pickle_data = state_dict_ops({"w": tensor_ops("../data.pkl", 4, 0, [4], [1])})
    message = read_error(write_archive(tmp_path / "w.bin", pickle_data, {"0": FOUR_FLOATS}))
    assert "not a valid PyTorch state dict pickle" in message
    assert "invalid storage key '../data.pkl'" in message


def test_build_on_tensor_rejected(tmp_path):
    # BUILD would otherwise overwrite the recorded offset of the tensor.
    tensor = tensor_ops("0", 4, 0, [4], [1]) + b"}" + op_str("storage_offset") + op_int(3) + b"sb"
    message = read_error(write_archive(tmp_path / "w.bin", state_dict_ops({"w": tensor}), {"0": FOUR_FLOATS}))
    assert "not a valid PyTorch state dict pickle" in message


def test_non_contiguous_rejected(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"transposed": torch.randn(3, 4).t()}, path)
    message = read_error(path)
    assert "tensor 'transposed' is stored non-contiguously (shape [4, 3], stride [1, 4])" in message
    assert ".contiguous()" in message


def test_lazy_negation_rejected(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"negated": torch._neg_view(torch.randn(3))}, path)
    assert "tensor 'negated' was saved with torch's lazy neg bit set" in read_error(path)


def test_non_tensor_value_rejected(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(2), "step": 5}, path)
    assert "state dict entry 'step' is a int, not a tensor" in read_error(path)


def test_unsupported_torch_dtype_rejected(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"c": torch.ones(2, dtype=torch.complex64)}, path)
    message = read_error(path)
    assert "torch.ComplexFloatStorage" in message
    assert "does not support" in message


def test_legacy_format_rejected(tmp_path):
    path = tmp_path / BIN
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    message = read_error(path)
    assert "legacy format of torch < 1.6" in message
    assert "torch.save(torch.load(path, weights_only=True), path)" in message


def test_not_zip_rejected(tmp_path):
    path = tmp_path / BIN
    path.write_bytes(b"GARBAGE" * 10)
    message = read_error(path)
    assert "is not a zip archive" in message
    assert "torch.save(torch.load(path, weights_only=True), path)" in message


def test_pickle_size_limit(tmp_path, sample_bin, monkeypatch):
    monkeypatch.setattr(torch_zip_checkpoint, "MAX_PICKLE_BYTES", 64)
    message = read_error(sample_bin)
    assert "data.pkl is" in message
    assert "more than the 64 bytes" in message


# Hostile pickles: each would create the marker file if its code ran.


class ReduceTo:
    """An object that pickles as a call of ``function(*args)``."""

    def __init__(self, function, *args):
        self.function = function
        self.args = args

    def __reduce__(self):
        return self.function, self.args


def hostile_pickles(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles that would create ``marker``, each with the global that the error must name."""
    command = f"touch {marker}"
    expression = f"open({str(marker)!r}, 'w')"
    tensor = tensor_ops("0", 4, 0, [4], [1])
    return {
        "os_system_global": (b"cos\nsystem\n(" + op_str(command) + b"tR.", "os.system"),
        "builtin_exec_protocol0": (b"c__builtin__\nexec\n(V" + expression.encode() + b"\ntR.", "__builtin__.exec"),
        "builtins_eval_stack_global": (pickle.dumps(ReduceTo(eval, expression), protocol=4), "builtins.eval"),
        "builtins_getattr": (
            b"\x80\x02" + op_global("builtins", "getattr") + op_tuple([op_global("os", "path"), op_str("exists")]) + b"R.",
            "builtins.getattr",
        ),
        "after_a_tensor": (state_dict_ops({"w": tensor, "x": b"cos\nsystem\n(" + op_str(command) + b"tR"}), "os.system"),
    }


HOSTILE_CASES = ["os_system_global", "builtin_exec_protocol0", "builtins_eval_stack_global", "builtins_getattr", "after_a_tensor"]


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_global_rejected(tmp_path, case):
    marker = tmp_path / "marker"
    pickle_data, global_name = hostile_pickles(marker)[case]
    path = write_archive(tmp_path / BIN, pickle_data, {"0": FOUR_FLOATS})
    message = read_error(path)
    assert str(path) in message
    assert f"Python global {global_name}," in message
    assert not marker.exists()


def test_hostile_attribute_rejected(tmp_path):
    # A hostile value hidden in a tensor's Python attributes, written by torch.save itself.
    marker = tmp_path / "marker"
    tensor = torch.ones(3)
    tensor.payload = ReduceTo(os.system, f"touch {marker}")
    path = tmp_path / BIN
    torch.save({"w": tensor}, path)
    message = read_error(path)
    assert f"Python global {os.system.__module__}.system," in message
    assert not marker.exists()


def test_hostile_expert_merge_writes_nothing(tmp_path, tiny_llama, tiny_experts):
    marker = tmp_path / "marker"
    expert = copy_without_weights(tiny_experts[0], tmp_path / "hostile")
    state_dict = read_tensors(tiny_experts[0])
    state_dict["model.norm.weight"].payload = ReduceTo(os.system, f"touch {marker}")
    torch.save(state_dict, expert / BIN)
    config = merge_yaml(tmp_path / "merge.yml", tiny_llama, [expert, *tiny_experts[1:]])
    before = sorted(path.name for path in tmp_path.iterdir())

    with pytest.raises(SourceError) as caught:
        merge(config, tmp_path / "out")

    assert str(expert / BIN) in str(caught.value)
    assert f"{os.system.__module__}.system" in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert not marker.exists()
