"""Find each model of a merge YAML on disk: a local folder, a Hugging Face cache snapshot, or files to download.

A reference resolves in this order:

1. a local folder, relative to the YAML's folder;
2. a model in the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub), used as
   cached without asking the Hub whether a branch such as ``main`` has moved;
3. the Hub.

Resolution has two steps, so that ``plan`` can show what a merge would
download before any weights move:

- ``resolve_sources`` decides which files the merge needs from each model.
  For a model that the cache lacks, or has only in part, it requests the
  repository's file list and sizes from the Hub and downloads config.json
  and the weight index (small JSON files) into the cache. In offline mode
  (HF_HUB_OFFLINE=1) it reads only the cache, and a missing file is an error.
- ``download_pending`` downloads the remaining files into the cache. Only
  ``merge`` calls it.
"""

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import SAFETENSORS_INDEX
from .config import MergeConfig
from .errors import SourceError
from .hub_cache import find_cached_file, hub_cache_dir, hub_offline, record_ref, snapshot_folder
from .hub_download import RepoListing, fetch_file, fetch_listing
from .hub_files import CONFIG_FILE, INDEX_FILES, ModelRole, choose_weights_file, needed_shards, select_files
from .model_reference import ModelReference, parse_model_reference
from .output_files import TOKENIZER_VOCABULARY_FILES
from .partial_checkpoint import read_weight_map

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingFile:
    """A file the merge needs that is not in the cache yet."""

    name: str
    size: int | None  # bytes, as the Hub lists it; None when the Hub gives no size


@dataclass(frozen=True)
class ResolvedModel:
    """The location of one model of the YAML, and the files to download before the merge reads it."""

    reference: str  # as written in the YAML
    label: str  # where the YAML names it first, such as "the expert on line 7"
    folder: Path  # the local folder, or the cache snapshot folder
    role: ModelRole
    hub: ModelReference | None = None  # None for a local folder
    commit: str | None = None  # the Hub commit the files come from
    # Shards of the safetensors index that the merge reads, for an expert
    # whose other shards may be absent. None reads every shard.
    shard_files: frozenset[str] | None = None
    skipped_shards: int = 0  # shards of the index that hold no tensor the merge reads
    pending: tuple[PendingFile, ...] = ()

    @property
    def bytes_to_download(self) -> int:
        return sum(file.size or 0 for file in self.pending)


@dataclass(frozen=True)
class SourceResolution:
    """The resolved base, experts and shared experts, in YAML order. A model named twice appears twice."""

    base: ResolvedModel
    experts: tuple[ResolvedModel, ...]
    shared_experts: tuple[ResolvedModel, ...]
    cache_dir: Path

    @property
    def models(self) -> list[ResolvedModel]:
        """Every distinct resolved model, base first."""
        unique: dict[int, ResolvedModel] = {}
        for model in (self.base, *self.experts, *self.shared_experts):
            unique.setdefault(id(model), model)
        return list(unique.values())

    @property
    def pending_files(self) -> int:
        return sum(len(model.pending) for model in self.models)

    @property
    def bytes_to_download(self) -> int:
        """Bytes still to download, counting only files whose size the Hub lists."""
        return sum(model.bytes_to_download for model in self.models)

    @property
    def unknown_sizes(self) -> int:
        """Pending files whose size the Hub does not list."""
        return sum(1 for model in self.models for file in model.pending if file.size is None)

    def download_json_dict(self) -> dict[str, Any]:
        """Return the pending downloads as JSON-ready data."""
        return {
            "cache_dir": str(self.cache_dir),
            "bytes_to_download": self.bytes_to_download,
            "models": [
                {
                    "reference": model.reference,
                    "repo_id": model.hub.repo_id if model.hub else None,
                    "commit": model.commit,
                    "files": [{"name": file.name, "size": file.size} for file in model.pending],
                }
                for model in self.models
                if model.pending
            ],
        }


@dataclass(frozen=True)
class _Use:
    label: str
    reference: str
    local_path: Path
    role: ModelRole


def resolve_sources(config: MergeConfig, cache_only: bool = False) -> SourceResolution:
    """Resolve every model of the config, fetching nothing but small metadata files.

    With ``cache_only``, for commands that never download, it reads only the
    Hugging Face cache, as in offline mode, and its errors do not suggest
    going online to let lowmem-moe download.

    Raises:
        SourceError: a model is neither a local folder nor a Hub model, is
            missing from the cache in offline mode, or the Hub rejected the
            request. The message names the YAML line.
    """
    uses = [_Use(f"base_model on line {config.base_line}", config.base_reference, config.base_model, ModelRole.BASE)]
    groups = {"experts": config.experts, "shared_experts": config.shared_experts}
    for key, experts in groups.items():
        noun = "expert" if key == "experts" else "shared expert"
        uses += [
            _Use(f"the {noun} on line {expert.line}", expert.source_reference, expert.source_model, ModelRole.EXPERT)
            for expert in experts
        ]

    # A model named as the base and as an expert resolves once, as a base,
    # because the base needs every file.
    roles: dict[Path, ModelRole] = {}
    for use in uses:
        if roles.get(use.local_path) is not ModelRole.BASE:
            roles[use.local_path] = use.role

    cache_dir = hub_cache_dir()
    offline = cache_only or hub_offline()
    resolved: dict[Path, ResolvedModel] = {}
    for use in uses:
        if use.local_path not in resolved:
            try:
                resolved[use.local_path] = _resolve(use, roles[use.local_path], cache_dir, offline, cache_only)
            except SourceError as error:
                raise SourceError(f"{error} (referenced by {use.label} in {config.path})") from error

    models = [resolved[use.local_path] for use in uses]
    experts_end = 1 + len(config.experts)
    return SourceResolution(
        base=models[0],
        experts=tuple(models[1:experts_end]),
        shared_experts=tuple(models[experts_end:]),
        cache_dir=cache_dir,
    )


def download_pending(resolution: SourceResolution) -> SourceResolution:
    """Download every pending file into the cache and return the resolution with nothing pending.

    Raises:
        SourceError: the cache's disk has too little free space, or a
            download failed.
    """
    if not resolution.pending_files:
        return resolution
    _check_cache_space(resolution)

    done: dict[int, ResolvedModel] = {}
    for model in resolution.models:
        for file in model.pending:
            assert model.hub is not None and model.commit is not None, "only Hub models have pending files"
            logger.info("Downloading %s from %s at commit %s", file.name, model.hub.repo_id, model.commit)
            fetch_file(model.hub, model.commit, file.name, resolution.cache_dir)
        done[id(model)] = replace(model, pending=())

    return replace(
        resolution,
        base=done[id(resolution.base)],
        experts=tuple(done[id(model)] for model in resolution.experts),
        shared_experts=tuple(done[id(model)] for model in resolution.shared_experts),
    )


def _resolve(use: _Use, role: ModelRole, cache_dir: Path, offline: bool, cache_only: bool) -> ResolvedModel:
    # A local folder wins over a Hub model of the same name.
    if use.local_path.is_dir():
        return ResolvedModel(reference=use.reference, label=use.label, folder=use.local_path, role=role)
    reference = parse_model_reference(use.reference)
    if reference is None:
        raise SourceError(f"Model folder not found: {use.local_path}. Check the path in the merge YAML.")
    return _resolve_hub(reference, use, role, cache_dir, offline, cache_only)


def _resolve_hub(
    reference: ModelReference, use: _Use, role: ModelRole, cache_dir: Path, offline: bool, cache_only: bool
) -> ResolvedModel:
    cached_config = find_cached_file(cache_dir, reference, CONFIG_FILE)
    if cached_config is not None:
        commit = cached_config.commit
        folder = snapshot_folder(cache_dir, reference, commit)
        model = _select(reference, use, role, commit, folder, _snapshot_files(folder), None)
        gaps = _cache_gaps(model, folder)
        if model is not None and not model.pending and not gaps:
            logger.info(
                "%s: using commit %s from the Hugging Face cache (revision %s)",
                reference.repo_id, commit, reference.revision_or_default,
            )
            return model
        if offline:
            missing_files = [file.name for file in model.pending] if model else []
            raise SourceError(_incomplete_cache_message(reference, commit, folder, missing_files, gaps, cache_only))
        listing = fetch_listing(reference, commit)
    else:
        if offline:
            raise SourceError(_not_cached_message(reference, use.local_path, cache_dir, cache_only))
        try:
            listing = fetch_listing(reference, reference.revision_or_default)
        except SourceError as error:
            # The user may have meant a local folder, so both failures are named.
            raise SourceError(f"Model folder not found: {use.local_path}, and {error}") from error

    folder = snapshot_folder(cache_dir, reference, listing.commit)
    _fetch_metadata(reference, listing, folder, cache_dir)
    record_ref(cache_dir, reference, listing.commit)
    model = _select(reference, use, role, listing.commit, folder, set(listing.sizes), listing)
    if model is None:
        raise SourceError(
            f"{reference.repo_id} at commit {listing.commit} has no safetensors or PyTorch weights "
            "(model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index)."
        )
    return model


def _select(
    reference: ModelReference,
    use: _Use,
    role: ModelRole,
    commit: str,
    folder: Path,
    available: set[str],
    listing: RepoListing | None,
) -> ResolvedModel | None:
    """Return the model with the files it needs, or None when ``available`` contains no weights.

    An index in ``available`` must be in ``folder`` already.
    """
    weights_file = choose_weights_file(available)
    if weights_file is None:
        return None
    weight_map = read_weight_map(folder / weights_file) if weights_file in INDEX_FILES else None

    files = select_files(available, weights_file, weight_map, role)
    pending = tuple(
        PendingFile(name=name, size=listing.sizes.get(name) if listing else None)
        for name in files
        if not (folder / name).is_file()
    )
    shard_files = None
    skipped_shards = 0
    if role is ModelRole.EXPERT and weights_file == SAFETENSORS_INDEX and weight_map is not None:
        shard_files = frozenset(needed_shards(weight_map, role))
        skipped_shards = len(set(weight_map.values()) - shard_files)
    return ResolvedModel(
        reference=use.reference,
        label=use.label,
        folder=folder,
        role=role,
        hub=reference,
        commit=commit,
        shard_files=shard_files,
        skipped_shards=skipped_shards,
        pending=pending,
    )


def _cache_gaps(model: ResolvedModel | None, folder: Path) -> list[str]:
    """Return what a cached snapshot lacks beyond named pending files, in words."""
    if model is None:
        return ["the weights (model.safetensors, its index, pytorch_model.bin or its index)"]
    if model.role is ModelRole.BASE and not any((folder / name).is_file() for name in TOKENIZER_VOCABULARY_FILES):
        return ["the tokenizer (one of " + ", ".join(TOKENIZER_VOCABULARY_FILES) + ")"]
    return []


def _snapshot_files(folder: Path) -> set[str]:
    """Return the names, relative to ``folder``, of the files a snapshot folder contains."""
    names = set()
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file():  # skips symlinks whose blob is missing
                names.add(path.relative_to(folder).as_posix())
    return names


def _fetch_metadata(reference: ModelReference, listing: RepoListing, folder: Path, cache_dir: Path) -> None:
    # config.json and the weight index decide which shards to download, and
    # they are small JSON files, so resolution fetches them even for plan.
    weights_file = choose_weights_file(set(listing.sizes))
    names = [CONFIG_FILE] + ([weights_file] if weights_file in INDEX_FILES else [])
    for name in names:
        if name in listing.sizes and not (folder / name).is_file():
            fetch_file(reference, listing.commit, name, cache_dir)


def _check_cache_space(resolution: SourceResolution) -> None:
    probe = resolution.cache_dir.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if resolution.bytes_to_download > free:
        raise SourceError(
            f"Not enough disk space for the Hugging Face cache at {resolution.cache_dir}: the merge downloads "
            f"{resolution.bytes_to_download:,} bytes and {free:,} are free. Free space there, or set HF_HUB_CACHE "
            "to a folder on a larger disk."
        )


def _not_cached_message(reference: ModelReference, local_path: Path, cache_dir: Path, cache_only: bool) -> str:
    missing = (
        f"Model folder not found: {local_path}, and {reference.repo_id} at revision {reference.revision_or_default} "
        f"is not in the Hugging Face cache at {cache_dir}."
    )
    if cache_only:
        return (
            f"{missing} This command reads only the cache and downloads nothing. Fetch the model with "
            f"`{reference.download_command()}` and run the command again."
        )
    return (
        f"{missing} HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so it "
        f"cannot be downloaded. Fetch it with `{reference.download_command()}` while online, or unset the variable "
        "to let lowmem-moe download only the files the merge needs."
    )


def _incomplete_cache_message(
    reference: ModelReference, commit: str, folder: Path, missing_files: list[str], gaps: list[str], cache_only: bool
) -> str:
    # Named files can be fetched one by one. A gap without a file name needs
    # the whole commit, which for a base is little more than it needs anyway.
    files = () if gaps else tuple(missing_files)
    command = reference.download_command(files, commit)
    missing = (
        f"{reference.repo_id}: the Hugging Face cache has commit {commit} ({folder}) only in part. Missing: "
        f"{', '.join([*missing_files, *gaps])}."
    )
    if cache_only:
        return (
            f"{missing} This command reads only the cache and downloads nothing. Fetch the files with `{command}` "
            "and run the command again."
        )
    return (
        f"{missing} HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can be "
        f"downloaded. Fetch the files with `{command}` while online, or unset the variable."
    )
