"""Dataset files on disk: staged under ``tmp/``, then renamed into ``files/`` by sha256.

A stored file is written whole before it gets its final name, so a reader never sees half a
file; the same content from several uploads is stored once.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import File
from service.settings import Settings


def blob_path(settings: Settings, sha256: str) -> Path:
    return settings.files_dir / sha256[:2] / sha256


def store_blob(settings: Settings, staged: Path, sha256: str) -> Path:
    """Move a fully written, fsynced staged file to its content address."""
    target = blob_path(settings, sha256)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # os.replace is atomic on one filesystem; when the content is already there it swaps
    # identical bytes, so concurrent uploads of one file are harmless.
    os.replace(staged, target)
    return target


def remove_blob_if_unused(session: Session, settings: Settings, sha256: str) -> None:
    """Delete the stored content once no file record (of any tenant) refers to it."""
    if session.scalar(select(func.count()).select_from(File).where(File.sha256 == sha256)) == 0:
        blob_path(settings, sha256).unlink(missing_ok=True)
