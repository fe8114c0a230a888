"""Adapter downloads: each adapter's zip is built once, on its first download, and kept beside
the adapter folder (``<folder>.zip``) until the adapter is deleted.

An adapter folder never changes once written, so its zip stays right. The zip is staged under
``RLORA_HOME/tmp`` and renamed into place, so nothing half-written is ever served; two first
downloads at once both build it, and the second rename swaps in the same content.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from service.api.staging import staging_file
from service.settings import Settings


def archive_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.zip")


def adapter_archive(settings: Settings, adapter_id: str, folder: Path) -> Path:
    """The adapter folder as a zip of ``<adapter_id>/<file>`` entries, built on the first call.
    Raises ``FileNotFoundError`` when the folder is gone (deleted, even while it was built)."""
    archive = archive_path(folder)
    if archive.is_file():
        return archive
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    fd, staged = staging_file(settings, "adapter-", ".zip")
    try:
        with os.fdopen(fd, "wb") as out:
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        zipped.write(path, f"{adapter_id}/{path.relative_to(folder)}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(staged, archive)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    if not folder.is_dir():  # the adapter was deleted while its zip was built
        archive.unlink(missing_ok=True)
        raise FileNotFoundError(folder)
    return archive


def remove_adapter_archive(folder: Path) -> None:
    archive_path(folder).unlink(missing_ok=True)
