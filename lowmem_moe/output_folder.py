"""The output folder's lifecycle: built in a staging folder, moved into place when complete.

Nothing at OUT_DIR looks like a model until the last file is written: the
merge writes into a hidden sibling folder and renames it to OUT_DIR at the
end. A merge that fails on bad input removes its staging folder. One that is
killed, interrupted or stopped by a full disk leaves it, and a rerun of the
same merge resumes from it. While a merge uses the staging folder, it holds
an exclusive flock on the folder, so that a second merge into the same
OUT_DIR fails at once instead of resuming or removing live progress.
"""

import enum
import fcntl
import logging
import os
import shutil
from pathlib import Path

from typing import Any

from .errors import OutputError
from .merge_progress import JOURNAL_NAME, mismatch_reason, read_journal, remove_progress_files, write_journal

logger = logging.getLogger(__name__)

STAGING_MARKER = JOURNAL_NAME


class FolderState(enum.Enum):
    NEW = "new"
    STAGING = "staging"
    PUBLISHED = "published"
    DISCARDED = "discarded"


class OutputFolder:
    """Stages a merge's output and publishes it at ``target`` in one rename."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.staging = self.target.parent / f".{self.target.name}.lowmem-moe-partial"
        self.state = FolderState.NEW
        self._lock_descriptor: int | None = None  # open on the staging folder while this object holds its lock

    def check_target(self) -> None:
        """Raise OutputError unless the target can receive the merge.

        The target must be absent, an empty folder, or, with overwrite, a
        folder whose contents may be replaced.
        """
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"Output path {self.target} exists and is not a folder. Choose another OUT_DIR.")
        if self.target.is_dir() and any(self.target.iterdir()) and not self.overwrite:
            raise OutputError(
                f"Output folder {self.target} is not empty. Choose another OUT_DIR, or pass --overwrite to replace "
                "its contents."
            )
        if not self.target.parent.is_dir():
            raise OutputError(f"Parent folder of {self.target} does not exist. Create it first.")

    def open_staging(self, fingerprint: dict[str, Any]) -> bool:
        """Create the staging folder, or reopen the one of an interrupted run of the same merge.

        Returns whether earlier progress is resumed. Progress of a different
        merge is removed, with a warning that gives the reason.
        """
        self._expect(FolderState.NEW, "open_staging")
        self.check_target()
        if self.staging.exists():
            # Locked before it is read, so that the progress of a live merge is not resumed or removed.
            self._lock()
            if not (self.staging / STAGING_MARKER).is_file():
                self._unlock()
                raise OutputError(
                    f"{self.staging} exists but was not made by lowmem-moe. Move it away and run again."
                )
            reason = mismatch_reason(read_journal(self.staging), fingerprint)
            if reason is None:
                logger.info("Resuming the interrupted merge in %s", self.staging)
                self.state = FolderState.STAGING
                return True
            logger.warning("Not resuming the earlier progress in %s, because %s. Starting over.", self.staging, reason)
            shutil.rmtree(self.staging)
            self._unlock()
        try:
            self.staging.mkdir()
        except OSError as error:
            raise OutputError(f"Cannot create {self.staging}: {error.strerror or error}.") from error
        self._lock()
        try:
            write_journal(self.staging, fingerprint)
        except OSError as error:
            self._unlock()
            raise OutputError(f"Cannot create {self.staging}: {error.strerror or error}.") from error
        self.state = FolderState.STAGING
        return False

    def publish(self) -> Path:
        """Move the staged files into place as the finished model folder."""
        self._expect(FolderState.STAGING, "publish")
        _fsync_folder(self.staging)

        # The staging folder keeps its journal until it has its final name,
        # so a run killed before the rename still finds resumable progress.
        if self.target.is_dir() and any(self.target.iterdir()):
            # Only reachable with overwrite, which check_target verified.
            retired = self.target.parent / f".{self.target.name}.lowmem-moe-replaced"
            if retired.exists():
                shutil.rmtree(retired)
            os.rename(self.target, retired)
            os.rename(self.staging, self.target)
            shutil.rmtree(retired)
        else:
            if self.target.is_dir():
                self.target.rmdir()
            os.rename(self.staging, self.target)
        remove_progress_files(self.target)
        _fsync_folder(self.target.parent)
        self._unlock()
        self.state = FolderState.PUBLISHED
        return self.target

    def keep(self) -> None:
        """Leave the staging folder, unlocked, for a later resume after an interruption or a full disk."""
        if self.state is FolderState.STAGING:
            logger.info("Progress kept in %s; rerun the same command to resume.", self.staging)
        self._unlock()

    def discard(self) -> None:
        """Remove the staging folder. Safe to call in any state."""
        if self.state is FolderState.STAGING and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()
        if self.state is not FolderState.PUBLISHED:
            self.state = FolderState.DISCARDED

    def _lock(self) -> None:
        """Take the exclusive lock on the staging folder, or raise OutputError when another merge holds it."""
        try:
            descriptor = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise OutputError(
                f"Cannot open {self.staging}: {error.strerror or error}. Move it away and run again."
            ) from error
        try:
            # flock locks belong to the open file description, so a second
            # open of the folder conflicts even within one process.
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputError(
                f"Another lowmem-moe merge is writing to {self.target} (staging folder {self.staging}). "
                "Wait for it to finish or choose another OUT_DIR."
            ) from None
        self._lock_descriptor = descriptor

    def _unlock(self) -> None:
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)  # closing the last descriptor releases the flock
            self._lock_descriptor = None

    def _expect(self, state: FolderState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{self.target}: {action} called in state {self.state.value}, expected {state.value}")


def _fsync_folder(path: Path) -> None:
    # Makes the renames inside the folder durable.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
