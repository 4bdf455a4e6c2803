"""The only calls that contact the Hugging Face Hub: a repository's file list, and file downloads into the cache.

huggingface_hub finds the user's token itself: the HF_TOKEN variable, or the
file that ``hf auth login`` writes. lowmem-moe never passes, prints or logs
it. Error messages state only whether a token was found.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OIDCError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import SourceError
from .model_reference import ModelReference

try:
    # huggingface_hub 2.x sends requests through httpx2, whose connection
    # errors are not OSErrors.
    from httpx2 import TransportError
except ImportError:
    TransportError = OSError  # type: ignore[misc,assignment]

logger = logging.getLogger(__name__)

# Connection failures, timeouts and offline mode. OSError includes
# huggingface_hub's LocalEntryNotFoundError and OfflineModeIsEnabled.
NETWORK_ERRORS = (TransportError, OSError)


@dataclass(frozen=True)
class RepoListing:
    """A repository's files at one commit, as the Hub lists them."""

    commit: str
    sizes: dict[str, int | None]  # file name -> bytes, None when the Hub gives no size


def fetch_listing(reference: ModelReference, revision: str) -> RepoListing:
    """Return the commit that ``revision`` names and the size of every file at that commit.

    Raises:
        SourceError: the repository or revision does not exist, is not
            accessible with the user's token, or the Hub cannot be reached.
    """
    logger.info("Looking up %s at revision %s on the Hugging Face Hub (%s)", reference.repo_id, revision, token_status())
    # NOTE: this call was not run against the Hub here, because the tests run
    # without a network. Everything around it is tested on a cache folder.
    try:
        info = HfApi().model_info(reference.repo_id, revision=revision, files_metadata=True)
    except (HfHubHTTPError, EntryNotFoundError, *NETWORK_ERRORS) as error:
        raise _hub_error(reference, revision, error) from error
    if not info.sha:
        raise SourceError(f"The Hub returned no commit for {reference.repo_id} at revision {revision}. Try again later.")
    return RepoListing(commit=info.sha, sizes={sibling.rfilename: sibling.size for sibling in info.siblings or ()})


def fetch_file(reference: ModelReference, commit: str, name: str, cache_dir: Path) -> Path:
    """Download one file of ``commit`` into the cache and return its path in the snapshot folder.

    hf_hub_download (huggingface_hub 2.4) writes the file to
    ``blobs/<hash>.incomplete`` as it arrives and renames it when complete,
    so a file never passes through memory whole, and an interrupted
    download leaves no file that looks complete.

    Raises:
        SourceError: the download failed. The message names the model and file.
    """
    # NOTE: this call was not run against the Hub here, because the tests run
    # without a network. Everything around it is tested on a cache folder.
    try:
        path = hf_hub_download(reference.repo_id, name, revision=commit, cache_dir=cache_dir)
    except (HfHubHTTPError, EntryNotFoundError, *NETWORK_ERRORS) as error:
        raise _hub_error(reference, commit, error, name) from error
    return Path(path)


def token_status() -> str:
    """Return whether huggingface_hub finds a token, as words for a message. The token itself is never returned."""
    try:
        found = get_token() is not None
    except (OIDCError, OSError):
        return "the Hugging Face token could not be read"
    return "a Hugging Face token was found" if found else "no Hugging Face token was found"


def _hub_error(reference: ModelReference, revision: str, error: Exception, name: str | None = None) -> SourceError:
    subject = f"{reference.repo_id} at revision {revision}" + (f", file {name}" if name else "")
    # Subclasses come before their bases: GatedRepoError is a
    # RepositoryNotFoundError, and LocalEntryNotFoundError (no connection and
    # no cached copy) is an EntryNotFoundError.
    if isinstance(error, LocalEntryNotFoundError):
        return _network_error(subject, reference, error)
    if isinstance(error, GatedRepoError):
        return SourceError(
            f"{subject}: the model is gated. Accept its terms on its Hub page, then log in with `hf auth login` "
            f"({token_status()})."
        )
    if isinstance(error, RepositoryNotFoundError):
        return SourceError(
            f"{subject}: no such model on the Hub, or it is private and the token cannot access it ({token_status()}). "
            "Check the name, or log in with `hf auth login`."
        )
    if isinstance(error, RevisionNotFoundError):
        return SourceError(f"{subject}: the Hub has no revision {revision!r} of this model. Check the part after '@'.")
    if isinstance(error, EntryNotFoundError):
        return SourceError(f"{subject}: the file is not in the repository at this revision.")
    if isinstance(error, HfHubHTTPError):
        return SourceError(f"{subject}: the Hub request failed: {error}")
    return _network_error(subject, reference, error)


def _network_error(subject: str, reference: ModelReference, error: Exception) -> SourceError:
    return SourceError(
        f"{subject}: cannot reach the Hugging Face Hub ({type(error).__name__}: {error}). Check the network connection, "
        f"or fetch the model on a machine that has one with `{reference.download_command()}` and copy the cache."
    )
