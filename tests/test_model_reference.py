"""Hub model references: parsing, resolution through a real cache folder, file selection and error messages.

Every test runs offline (conftest sets HF_HUB_OFFLINE=1) against a cache
folder built here in huggingface_hub's layout: models--org--name/ with
blobs/, refs/ and snapshots/<commit>/ whose files link to the blobs.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from lowmem_moe.config import load_merge_config
from lowmem_moe.errors import SourceError
from lowmem_moe.hub_cache import hub_cache_dir, record_ref
from lowmem_moe.hub_download import _hub_error, token_status
from lowmem_moe.hub_files import ModelRole, needed_shards, select_files
from lowmem_moe.model_reference import parse_model_reference
from lowmem_moe.model_resolution import PendingFile, ResolvedModel, SourceResolution, resolve_sources
from lowmem_moe.plan_report import download_report
from lowmem_moe.sources import open_sources
from merge_helpers import merge, merge_yaml

COMMIT_MAIN = hashlib.sha1(b"main").hexdigest()
COMMIT_V2 = hashlib.sha1(b"v2").hexdigest()
SHARDS = tuple(f"model-0000{number}-of-00003.safetensors" for number in (1, 2, 3))


def add_snapshot(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",), skip=()) -> Path:
    """Add the files of a model folder to the cache as huggingface_hub lays them out, and return the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        if not file.is_file() or file.name in skip:
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    for ref in refs:
        # huggingface_hub writes the commit without a newline.
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def write_sharded_copy(source: Path, target: Path) -> Path:
    """Copy a single-file model as three shards: every non-MLP tensor, then layer 0's MLP, then layer 1's MLP."""

    def shard_of(name: str) -> str:
        if ".mlp." not in name:
            return SHARDS[0]
        return SHARDS[1] if name.startswith("model.layers.0.") else SHARDS[2]

    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, target / file.name)
    tensors = load_file(source / "model.safetensors")
    for shard in SHARDS:
        save_file({name: t for name, t in tensors.items() if shard_of(name) == shard}, target / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: shard_of(name) for name in sorted(tensors)},
    }
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory, tiny_llama, tiny_experts) -> dict[str, Path]:
    """Three-shard copies of the base and of expert 0."""
    root = tmp_path_factory.mktemp("sharded")
    return {
        "base": write_sharded_copy(tiny_llama, root / "base"),
        "expert0": write_sharded_copy(tiny_experts[0], root / "expert0"),
    }


@pytest.fixture
def cached_models(hub_cache, sharded_models, tiny_experts) -> Path:
    """A cache with org/base (every shard), org/expert0 (without its non-MLP shard) and org/expert1 and 2."""
    add_snapshot(hub_cache, "org/base", sharded_models["base"], COMMIT_MAIN)
    add_snapshot(hub_cache, "org/expert0", sharded_models["expert0"], COMMIT_MAIN, skip={SHARDS[0]})
    add_snapshot(hub_cache, "org/expert1", tiny_experts[1], COMMIT_MAIN)
    add_snapshot(hub_cache, "org/expert2", tiny_experts[2], COMMIT_MAIN)
    return hub_cache


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowmem_moe.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


# Parsing.


@pytest.mark.parametrize(
    "text, repo_id, revision",
    [
        ("NousResearch/Nous-Hermes-2-Yi-34B", "NousResearch/Nous-Hermes-2-Yi-34B", None),
        ("org/name@v1.0", "org/name", "v1.0"),
        (f"org/name@{COMMIT_V2}", "org/name", COMMIT_V2),
        ("SUS-Chat-34B", "SUS-Chat-34B", None),
    ],
)
def test_parse_hub_reference(text, repo_id, revision):
    reference = parse_model_reference(text)
    assert reference is not None
    assert reference.repo_id == repo_id
    assert reference.revision == revision


@pytest.mark.parametrize("text", ["./models/base", "/data/base", "~/base", "a/b/c", "org/name@", "org/name@../x", "org--x/y"])
def test_parse_rejects_paths(text):
    assert parse_model_reference(text) is None


# Resolution order.


def test_local_folder_beats_cache(tmp_path, hub_cache, tiny_llama, tiny_experts):
    add_snapshot(hub_cache, "org/base", tiny_llama, COMMIT_MAIN)
    shutil.copytree(tiny_experts[0], tmp_path / "org" / "base")
    config = merge_yaml(tmp_path / "merge.yml", "org/base", tiny_experts[1:])

    resolution = resolve_sources(load_merge_config(config))

    assert resolution.base.folder == tmp_path.resolve() / "org" / "base"
    assert resolution.base.commit is None


def test_cached_reference_opens_snapshot(tmp_path, cached_models, tiny_experts):
    config = merge_yaml(tmp_path / "merge.yml", "org/base", tiny_experts[1:])

    resolution = resolve_sources(load_merge_config(config))

    snapshot = cached_models / "models--org--base" / "snapshots" / COMMIT_MAIN
    assert resolution.base.folder == snapshot
    assert resolution.base.commit == COMMIT_MAIN
    assert resolution.base.pending == ()


def test_cache_found_through_hf_home(tmp_path, monkeypatch, tiny_llama, tiny_experts):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    add_snapshot(tmp_path / "hf-home" / "hub", "org/base", tiny_llama, COMMIT_MAIN)
    config = merge_yaml(tmp_path / "merge.yml", "org/base", tiny_experts[1:])

    resolution = resolve_sources(load_merge_config(config))

    assert hub_cache_dir() == tmp_path / "hf-home" / "hub"
    assert resolution.base.commit == COMMIT_MAIN


@pytest.mark.parametrize("pin", ["v2", COMMIT_V2])
def test_revision_pin_selects_snapshot(tmp_path, hub_cache, tiny_llama, tiny_experts, pin):
    add_snapshot(hub_cache, "org/base", tiny_llama, COMMIT_MAIN)
    add_snapshot(hub_cache, "org/base", tiny_experts[0], COMMIT_V2, refs=("v2",))
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", f"org/base@{pin}", tiny_experts[1:]))

    resolution = resolve_sources(config)
    sources = open_sources(config, resolution)

    snapshot = hub_cache / "models--org--base" / "snapshots" / COMMIT_V2
    assert resolution.base.commit == COMMIT_V2
    assert sources.base.locate("model.layers.0.mlp.up_proj.weight").path.parent == snapshot


def test_recorded_ref_resolves_branch(tmp_path, hub_cache, tiny_llama, tiny_experts):
    add_snapshot(hub_cache, "org/base", tiny_llama, COMMIT_V2, refs=())
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", "org/base@dev", tiny_experts[1:]))
    with pytest.raises(SourceError):
        resolve_sources(config)

    record_ref(hub_cache, parse_model_reference("org/base@dev"), COMMIT_V2)

    assert resolve_sources(config).base.commit == COMMIT_V2
    assert (hub_cache / "models--org--base" / "refs" / "dev").read_text() == COMMIT_V2


def test_base_named_as_expert_resolves_once(tmp_path, cached_models):
    config = merge_yaml(tmp_path / "merge.yml", "org/base", ["org/base", "org/expert1"])

    resolution = resolve_sources(load_merge_config(config))

    assert resolution.experts[0] is resolution.base
    assert resolution.base.shard_files is None


# Merging from the cache.


def test_merge_from_cache_matches_local(tmp_path, cached_models, tiny_llama, tiny_experts):
    local = merge(merge_yaml(tmp_path / "local.yml", tiny_llama, tiny_experts, gate_mode="hidden"), tmp_path / "local")
    hub = merge(
        merge_yaml(tmp_path / "hub.yml", "org/base", ["org/expert0", "org/expert1", "org/expert2"], gate_mode="hidden"),
        tmp_path / "hub",
    )

    names = sorted(path.name for path in local.iterdir())
    assert sorted(path.name for path in hub.iterdir()) == names
    for name in names:
        if name != "README.md":
            assert (hub / name).read_bytes() == (local / name).read_bytes(), name


def test_expert_skips_non_mlp_shard(tmp_path, cached_models):
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", "org/base", ["org/expert0", "org/expert1"]))

    resolution = resolve_sources(config)
    sources = open_sources(config, resolution)

    expert = resolution.experts[0]
    assert expert.shard_files == frozenset(SHARDS[1:])
    assert expert.skipped_shards == 1
    assert expert.pending == ()
    assert not sources.experts[0].has("model.embed_tokens.weight")
    assert sources.experts[0].has("model.layers.1.mlp.down_proj.weight")


def test_model_card_lists_commits(tmp_path, cached_models, tiny_experts):
    out = merge(merge_yaml(tmp_path / "merge.yml", "org/base", ["org/expert1", tiny_experts[2]]), tmp_path / "out")

    card = (out / "README.md").read_text()

    assert f"- base model: `org/base` (Hub commit `{COMMIT_MAIN}`)" in card
    assert f"| 0 | `org/expert1` | Hub commit `{COMMIT_MAIN}` |" in card
    assert f"| 1 | `{tiny_experts[2]}` | local folder |" in card


def test_plan_downloads_nothing_when_cached(tmp_path, cached_models):
    config = merge_yaml(tmp_path / "merge.yml", "org/base", ["org/expert0", "org/expert1"])

    result = run_cli("plan", config, tmp_path / "out")

    assert result.returncode == 0, result.stderr
    assert "to download           0 B (0)" in result.stdout
    assert not (tmp_path / "out").exists()


# Missing models.


def test_uncached_model_names_fetch_command(tmp_path, cached_models):
    config = merge_yaml(tmp_path / "merge.yml", "org/base", ["org/expert1", "org/absent@v3"])

    result = run_cli("merge", config, tmp_path / "out")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "org/absent at revision v3 is not in the Hugging Face cache" in result.stderr
    assert "`hf download org/absent --revision v3`" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr
    assert "the expert on line 6" in result.stderr
    assert not (tmp_path / "out").exists()


def test_partial_expert_names_missing_shard(tmp_path, hub_cache, sharded_models):
    add_snapshot(hub_cache, "org/base", sharded_models["base"], COMMIT_MAIN)
    add_snapshot(hub_cache, "org/expert0", sharded_models["expert0"], COMMIT_MAIN, skip={SHARDS[2]})
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", "org/base", ["org/base", "org/expert0"]))

    with pytest.raises(SourceError) as caught:
        resolve_sources(config)

    message = str(caught.value)
    assert f"Missing: {SHARDS[2]}." in message
    assert f"`hf download org/expert0 {SHARDS[2]} --revision {COMMIT_MAIN}`" in message
    assert "the expert on line 6" in message


def test_base_needs_every_shard(tmp_path, hub_cache, sharded_models, tiny_experts):
    add_snapshot(hub_cache, "org/base", sharded_models["base"], COMMIT_MAIN, skip={SHARDS[0]})
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", "org/base", tiny_experts[:2]))

    with pytest.raises(SourceError) as caught:
        resolve_sources(config)

    assert f"Missing: {SHARDS[0]}." in str(caught.value)
    assert "base_model on line 1" in str(caught.value)


def test_base_without_tokenizer_rejected(tmp_path, hub_cache, tiny_llama, tiny_experts):
    add_snapshot(hub_cache, "org/base", tiny_llama, COMMIT_MAIN, skip={"tokenizer.json"})
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", "org/base", tiny_experts[:2]))

    with pytest.raises(SourceError) as caught:
        resolve_sources(config)

    assert "Missing: the tokenizer" in str(caught.value)
    assert f"`hf download org/base --revision {COMMIT_MAIN}`" in str(caught.value)


@pytest.mark.parametrize("reference", ["./nowhere", "a/b/c"])
def test_path_not_found_names_line(tmp_path, hub_cache, tiny_experts, reference):
    config = load_merge_config(merge_yaml(tmp_path / "merge.yml", reference, tiny_experts[:2]))

    with pytest.raises(SourceError) as caught:
        resolve_sources(config)

    assert "Model folder not found" in str(caught.value)
    assert "base_model on line 1" in str(caught.value)


# File selection, on a synthetic index.

WEIGHT_MAP = {
    "model.embed_tokens.weight": "model-00001-of-00004.safetensors",
    "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00004.safetensors",
    "model.layers.0.input_layernorm.weight": "model-00001-of-00004.safetensors",
    "model.layers.0.mlp.gate_proj.weight": "model-00002-of-00004.safetensors",
    "model.layers.0.mlp.up_proj.weight": "model-00002-of-00004.safetensors",
    "model.layers.0.mlp.down_proj.weight": "model-00002-of-00004.safetensors",
    "model.layers.1.self_attn.q_proj.weight": "model-00002-of-00004.safetensors",
    "model.layers.1.self_attn.k_proj.weight": "model-00003-of-00004.safetensors",
    "model.layers.1.mlp.gate_proj.weight": "model-00004-of-00004.safetensors",
    "model.norm.weight": "model-00004-of-00004.safetensors",
    "lm_head.weight": "model-00003-of-00004.safetensors",
}
REPO_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "pytorch_model.bin.index.json",
    *WEIGHT_MAP.values(),
}


def test_expert_shards_hold_mlp():
    shards = needed_shards(WEIGHT_MAP, ModelRole.EXPERT)

    assert shards == ("model-00002-of-00004.safetensors", "model-00004-of-00004.safetensors")


def test_select_expert_files():
    files = select_files(REPO_FILES, "model.safetensors.index.json", WEIGHT_MAP, ModelRole.EXPERT)

    assert files == (
        "config.json",
        "model.safetensors.index.json",
        "model-00002-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    )


def test_select_base_files():
    files = select_files(REPO_FILES, "model.safetensors.index.json", WEIGHT_MAP, ModelRole.BASE)

    assert files == (
        "config.json",
        "model.safetensors.index.json",
        *(f"model-0000{number}-of-00004.safetensors" for number in (1, 2, 3, 4)),
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    )


def test_pytorch_index_keeps_every_shard():
    bin_map = {name: file.replace(".safetensors", ".bin") for name, file in WEIGHT_MAP.items()}

    files = select_files(REPO_FILES, "pytorch_model.bin.index.json", bin_map, ModelRole.EXPERT)

    assert len(files) == 2 + 4


def test_select_single_file():
    files = select_files({"config.json", "model.safetensors"}, "model.safetensors", None, ModelRole.EXPERT)

    assert files == ("config.json", "model.safetensors")


# Reports and tokens.


def test_download_report_totals(tmp_path):
    expert = ResolvedModel(
        reference="org/expert@v1",
        label="the expert on line 5",
        folder=tmp_path,
        role=ModelRole.EXPERT,
        hub=parse_model_reference("org/expert@v1"),
        commit=COMMIT_V2,
        skipped_shards=2,
        pending=(PendingFile("config.json", 1000), PendingFile("model-00002-of-00004.safetensors", 3 * 2**30)),
    )
    local = ResolvedModel(reference="base", label="base_model on line 1", folder=tmp_path, role=ModelRole.BASE)
    resolution = SourceResolution(base=local, experts=(expert,), shared_experts=(), cache_dir=tmp_path / "cache")

    report = download_report(resolution)

    total = 3 * 2**30 + 1000
    assert report.splitlines()[0] == f"to download  3.00 GiB ({total:,}) in 2 files, into {tmp_path / 'cache'}"
    assert f"org/expert@v1 (the expert on line 5): commit {COMMIT_V2}, 2 files, 3.00 GiB" in report
    assert "2 shards without MLP tensors are skipped" in report
    assert resolution.download_json_dict()["bytes_to_download"] == total


def test_token_status_hides_token(monkeypatch):
    secret = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)

    status = token_status()

    assert status == "a Hugging Face token was found"
    assert secret not in status


def test_gated_error_hides_token(monkeypatch):
    secret = "hf_" + "y" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    response = httpx2.Response(403, request=httpx2.Request("GET", "http://127.0.0.1/api/models/org/gated"))

    message = str(_hub_error(parse_model_reference("org/gated"), "main", GatedRepoError("gated", response=response)))

    assert message.startswith("org/gated at revision main: the model is gated.")
    assert "`hf auth login`" in message
    assert "a Hugging Face token was found" in message
    assert secret not in message


def test_unreachable_hub_error_names_command():
    error = LocalEntryNotFoundError("no connection and no cached file")

    message = str(_hub_error(parse_model_reference("org/name@v1"), "v1", error, "config.json"))

    assert message.startswith("org/name at revision v1, file config.json: cannot reach the Hugging Face Hub")
    assert "`hf download org/name --revision v1`" in message
