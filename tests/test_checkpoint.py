"""Opening source model folders: single-file and sharded safetensors, and the ways they go wrong."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_moe.checkpoint import Checkpoint
from lowmem_moe.errors import SourceError
from model_factory import TinyModelSpec, edit_json, make_model

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    """A tiny Llama saved in several shards with an index."""
    return make_model(tmp_path_factory.mktemp("sharded") / "model", TinyModelSpec(max_shard_size="40KB"), seed=1)


@pytest.fixture
def sharded_copy(tmp_path, sharded_model) -> Path:
    """A copy of the sharded model that a test may change."""
    return Path(shutil.copytree(sharded_model, tmp_path / "model"))


def read_weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def write_weight_map(folder: Path, weight_map: dict[str, str]) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = weight_map
    (folder / INDEX).write_text(json.dumps(index))


def open_error(folder: Path) -> str:
    with pytest.raises(SourceError) as caught:
        Checkpoint.open(folder)
    return str(caught.value)


def location_bytes(checkpoint: Checkpoint, name: str) -> bytes:
    location = checkpoint.locate(name)
    with open(location.path, "rb") as handle:
        handle.seek(location.entry.offset)
        return handle.read(location.entry.nbytes)


def safetensors_bytes(path: Path, name: str) -> bytes:
    with safe_open(str(path), framework="pt") as handle:
        tensor = handle.get_tensor(name)
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# Valid folders.


def test_single_file_tensor_names(tiny_llama):
    checkpoint = Checkpoint.open(tiny_llama)
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as handle:
        expected = set(handle.keys())
    assert set(checkpoint.tensor_names) == expected
    assert len(checkpoint.headers) == 1


def test_single_file_config(tiny_llama):
    config = Checkpoint.open(tiny_llama).config
    assert config.hidden_size == 64
    assert config.num_hidden_layers == 2
    assert config.model_type == "llama"


def test_single_file_bytes_match(tiny_llama):
    checkpoint = Checkpoint.open(tiny_llama)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert location_bytes(checkpoint, name) == safetensors_bytes(tiny_llama / "model.safetensors", name), name


def test_sharded_has_several_shards(sharded_model):
    assert len(set(read_weight_map(sharded_model).values())) > 1


def test_sharded_tensor_names(sharded_model):
    checkpoint = Checkpoint.open(sharded_model)
    assert set(checkpoint.tensor_names) == set(read_weight_map(sharded_model))
    assert len(checkpoint.headers) == len(set(read_weight_map(sharded_model).values()))


def test_sharded_locations_follow_index(sharded_model):
    checkpoint = Checkpoint.open(sharded_model)
    for name, file_name in read_weight_map(sharded_model).items():
        location = checkpoint.locate(name)
        assert location.path.name == file_name, name
        assert location_bytes(checkpoint, name) == safetensors_bytes(sharded_model / file_name, name), name


def test_locate_unknown_tensor(tiny_llama):
    checkpoint = Checkpoint.open(tiny_llama)
    assert not checkpoint.has("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(SourceError) as caught:
        checkpoint.locate("model.layers.9.mlp.up_proj.weight")
    assert str(tiny_llama) in str(caught.value)
    assert "'model.layers.9.mlp.up_proj.weight' not found" in str(caught.value)


def test_hub_cache_symlinks_accepted(tmp_path, sharded_model):
    # The Hugging Face cache layout: a snapshot folder whose files are
    # relative symlinks to content-addressed blobs two folders up.
    repo = tmp_path / "models--tiny--llama"
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, source in enumerate(sorted(sharded_model.iterdir())):
        blob = blobs / f"blob{index:04d}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(Path("../../blobs") / blob.name)

    checkpoint = Checkpoint.open(snapshot)
    assert set(checkpoint.tensor_names) == set(read_weight_map(sharded_model))
    name = "model.layers.0.self_attn.q_proj.weight"
    file_name = read_weight_map(sharded_model)[name]
    assert location_bytes(checkpoint, name) == safetensors_bytes(sharded_model / file_name, name)


def test_shard_in_subfolder_accepted(sharded_copy):
    weight_map = read_weight_map(sharded_copy)
    moved = sorted(set(weight_map.values()))[0]
    (sharded_copy / "weights").mkdir()
    (sharded_copy / moved).rename(sharded_copy / "weights" / moved)
    write_weight_map(sharded_copy, {k: f"weights/{v}" if v == moved else v for k, v in weight_map.items()})

    checkpoint = Checkpoint.open(sharded_copy)
    name = next(k for k, v in weight_map.items() if v == moved)
    assert checkpoint.locate(name).path.parent.name == "weights"


# Index entries that point out of the folder.


def redirect_first_shard(folder: Path, new_name: str) -> str:
    """Point every tensor of the index's first shard at ``new_name`` and return that shard's name."""
    weight_map = read_weight_map(folder)
    first = sorted(set(weight_map.values()))[0]
    write_weight_map(folder, {k: new_name if v == first else v for k, v in weight_map.items()})
    return first


def test_index_parent_path_rejected(sharded_copy):
    first = redirect_first_shard(sharded_copy, "../outside.safetensors")
    shutil.copyfile(sharded_copy / first, sharded_copy.parent / "outside.safetensors")
    message = open_error(sharded_copy)
    assert str(sharded_copy / INDEX) in message
    assert "'../outside.safetensors'" in message
    assert "outside the model folder" in message


def test_index_dotdot_part_rejected(sharded_copy):
    first = redirect_first_shard(sharded_copy, "sub/../shard.safetensors")
    (sharded_copy / "sub").mkdir()
    shutil.copyfile(sharded_copy / first, sharded_copy / "shard.safetensors")
    message = open_error(sharded_copy)
    assert "outside the model folder" in message


def test_index_absolute_path_rejected(sharded_copy):
    first = sorted(set(read_weight_map(sharded_copy).values()))[0]
    # Absolute even though it names a file inside the folder.
    redirect_first_shard(sharded_copy, str(sharded_copy / first))
    message = open_error(sharded_copy)
    assert str(sharded_copy / INDEX) in message
    assert "invalid file name" in message


def test_index_symlinked_subfolder_leading_out_rejected(sharded_copy, tmp_path):
    first = redirect_first_shard(sharded_copy, "link/shard.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(sharded_copy / first, outside / "shard.safetensors")
    (sharded_copy / "link").symlink_to(outside, target_is_directory=True)
    message = open_error(sharded_copy)
    assert "'link/shard.safetensors'" in message
    assert "outside the model folder" in message


def test_shard_symlink_leading_out_rejected(sharded_copy, tmp_path):
    first = sorted(set(read_weight_map(sharded_copy).values()))[0]
    outside = tmp_path / "outside.safetensors"
    (sharded_copy / first).rename(outside)
    (sharded_copy / first).symlink_to(outside)
    message = open_error(sharded_copy)
    assert f"'{first}'" in message
    assert "symlink" in message
    assert "outside the model folder" in message


def test_single_file_symlink_leading_out_rejected(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    message = open_error(folder)
    assert "symlink" in message
    assert "outside the model folder" in message


def test_symlink_to_other_snapshot_blobs_rejected(tmp_path, sharded_model):
    # A snapshot file may link into its own repository's blobs only.
    repo = tmp_path / "models--tiny--llama"
    other_blobs = tmp_path / "models--other--repo" / "blobs"
    snapshot = repo / "snapshots" / "0123abcd"
    other_blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, source in enumerate(sorted(sharded_model.iterdir())):
        blob = other_blobs / f"blob{index:04d}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(blob)
    message = open_error(snapshot)
    assert "outside the model folder" in message


def test_index_dotdot_through_symlink_rejected(sharded_copy, tmp_path):
    # "link/.." is the parent of the link's target, not the model folder.
    first = redirect_first_shard(sharded_copy, "link/../shard.safetensors")
    target = tmp_path / "elsewhere" / "inner"
    target.mkdir(parents=True)
    shutil.copyfile(sharded_copy / first, target.parent / "shard.safetensors")
    (sharded_copy / "link").symlink_to(target, target_is_directory=True)
    message = open_error(sharded_copy)
    assert "outside the model folder" in message


@pytest.mark.parametrize("file_name", ["", None, 3, ["a"], "bad\0name.safetensors"])
def test_index_invalid_file_name(sharded_copy, file_name):
    redirect_first_shard(sharded_copy, file_name)
    message = open_error(sharded_copy)
    assert "invalid file name" in message


# Index entries that do not match the files.


def test_index_names_missing_shard(sharded_copy):
    redirect_first_shard(sharded_copy, "model-00099-of-00099.safetensors")
    message = open_error(sharded_copy)
    assert str(sharded_copy / INDEX) in message
    assert "shard 'model-00099-of-00099.safetensors'" in message
    assert "not found" in message


def test_index_names_folder_as_shard(sharded_copy):
    (sharded_copy / "subfolder").mkdir()
    redirect_first_shard(sharded_copy, "subfolder")
    message = open_error(sharded_copy)
    assert "not found" in message


def test_index_tensor_missing_from_shard(sharded_copy):
    weight_map = read_weight_map(sharded_copy)
    first = sorted(set(weight_map.values()))[0]
    weight_map["model.layers.0.mlp.extra.weight"] = first
    write_weight_map(sharded_copy, weight_map)
    message = open_error(sharded_copy)
    assert str(sharded_copy / first) in message
    assert "'model.layers.0.mlp.extra.weight'" in message
    assert "missing from this shard" in message


def test_index_invalid_json(sharded_copy):
    (sharded_copy / INDEX).write_text('{"weight_map": {')
    message = open_error(sharded_copy)
    assert str(sharded_copy / INDEX) in message
    assert "cannot read the index" in message


@pytest.mark.parametrize("index", [{}, {"weight_map": {}}, {"weight_map": ["a"]}, ["weight_map"]])
def test_index_without_weight_map(sharded_copy, index):
    (sharded_copy / INDEX).write_text(json.dumps(index))
    message = open_error(sharded_copy)
    assert "missing or empty 'weight_map'" in message


def test_corrupt_shard_named(sharded_copy):
    last = sorted(set(read_weight_map(sharded_copy).values()))[-1]
    content = (sharded_copy / last).read_bytes()
    (sharded_copy / last).write_bytes(content[:-16])
    message = open_error(sharded_copy)
    assert str(sharded_copy / last) in message
    assert "outside the data section" in message


# Folders without usable weights or config.


def test_missing_folder(tmp_path):
    message = open_error(tmp_path / "absent")
    assert "Model folder not found" in message
    assert str(tmp_path / "absent") in message


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    message = open_error(path)
    assert "Model folder not found" in message


def test_folder_without_config(tmp_path, tiny_llama):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / "config.json").unlink()
    message = open_error(folder)
    assert str(folder) in message
    assert "no config.json" in message


def test_folder_without_weights(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copyfile(tiny_llama / "config.json", folder / "config.json")
    message = open_error(folder)
    assert "no weights found" in message
    assert "model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json" in message


def test_pytorch_bin_only_opens(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copyfile(tiny_llama / "config.json", folder / "config.json")
    torch.save({"model.norm.weight": torch.ones(64)}, folder / "pytorch_model.bin")
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.tensor_names == ["model.norm.weight"]
    assert checkpoint.locate("model.norm.weight").path == folder / "pytorch_model.bin"


def test_pytorch_bin_index_missing_shard(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copyfile(tiny_llama / "config.json", folder / "config.json")
    index = {"weight_map": {"model.norm.weight": "pytorch_model-00001-of-00001.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    message = open_error(folder)
    assert "shard 'pytorch_model-00001-of-00001.bin'" in message
    assert "not found" in message


def test_invalid_config_json(tmp_path, tiny_llama):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / "config.json").write_text('{\n  "hidden_size": 64,\n  "model_type": llama\n}\n')
    message = open_error(folder)
    assert str(folder / "config.json") in message
    assert "invalid JSON at line 3, column 17" in message


def test_config_not_object(tmp_path, tiny_llama):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / "config.json").write_text("[64, 2]")
    message = open_error(folder)
    assert "must contain a JSON object" in message


def test_config_not_utf8(tmp_path, tiny_llama):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    message = open_error(folder)
    assert str(folder / "config.json") in message
    assert "cannot read" in message


def test_config_folder_instead_of_file(tmp_path, tiny_llama):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    message = open_error(folder)
    assert str(folder / "config.json") in message


@pytest.mark.parametrize("value", [..., "64", 64.0, True, None])
def test_config_integer_field_checked(tmp_path, tiny_llama, value):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    edit_json(folder / "config.json", hidden_size=value)
    config = Checkpoint.open(folder).config
    with pytest.raises(SourceError) as caught:
        config.hidden_size
    assert str(folder / "config.json") in str(caught.value)
    assert "'hidden_size' must be an integer" in str(caught.value)


def test_symlinked_model_folder_accepted(tmp_path, tiny_llama):
    link = tmp_path / "link"
    os.symlink(tiny_llama, link, target_is_directory=True)
    checkpoint = Checkpoint.open(link)
    assert checkpoint.has("model.embed_tokens.weight")


@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "9" * 5000])
def test_config_json_beyond_parser_limits(tmp_path, tiny_llama, value):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (folder / "config.json").write_text('{"hidden_size": ' + value + "}")
    message = open_error(folder)
    assert str(folder / "config.json") in message
    assert "invalid JSON" in message


@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "9" * 5000])
def test_index_json_beyond_parser_limits(sharded_copy, value):
    (sharded_copy / INDEX).write_text('{"weight_map": ' + value + "}")
    message = open_error(sharded_copy)
    assert str(sharded_copy / INDEX) in message
    assert "cannot read the index" in message
