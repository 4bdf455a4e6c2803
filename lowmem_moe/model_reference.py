"""Hugging Face Hub references in a merge YAML, such as ``org/name`` or ``org/name@revision``.

A reference is only a candidate: a local folder of the same name wins over it
(see model_resolution.py). Parsing here touches neither the disk nor the network.
"""

import re
from dataclasses import dataclass

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

DEFAULT_REVISION = "main"

# A branch, tag or commit hash. The revision ends up in cache paths
# (refs/<revision>), so ".." parts and leading slashes are rejected.
REVISION_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")


@dataclass(frozen=True)
class ModelReference:
    """A Hub model repository and the revision that the YAML requests."""

    text: str  # as written in the YAML
    repo_id: str  # "org/name", or "name" for the Hub's older un-namespaced models
    revision: str | None  # the part after "@", or None for the default branch

    @property
    def revision_or_default(self) -> str:
        return self.revision or DEFAULT_REVISION

    def download_command(self, files: tuple[str, ...] = (), revision: str | None = None) -> str:
        """Return the ``hf download`` command line that fetches ``files``, or the whole repository when empty."""
        parts = ["hf", "download", self.repo_id, *files]
        revision = revision or self.revision
        if revision:
            parts += ["--revision", revision]
        return " ".join(parts)


def parse_model_reference(text: str) -> ModelReference | None:
    """Parse ``org/name`` or ``org/name@revision``, returning None when ``text`` cannot name a Hub model.

    The split at the first "@" follows mergekit's model references. Paths
    such as ``./models/base``, ``/data/base`` or ``a/b/c`` return None.
    """
    repo_id, separator, revision = text.strip().partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if separator and not _is_valid_revision(revision):
        return None
    return ModelReference(text=text, repo_id=repo_id, revision=revision if separator else None)


def _is_valid_revision(revision: str) -> bool:
    if not REVISION_PATTERN.fullmatch(revision) or revision.endswith("/"):
        return False
    return ".." not in revision.split("/") and "//" not in revision
