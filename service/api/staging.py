"""Staging files under ``RLORA_HOME/tmp``: uploads on their way into the store, adapter zips
on their way into their cache (service/api/archives.py). Each is removed or renamed by the
request that made it; one left behind by a process that died (killed mid-upload, say) is
swept when an API process starts.

Several API processes share ``RLORA_HOME``, and another one may be writing a staging file right
now, so only files untouched for ``RLORA_STAGING_MAX_AGE`` are swept: an upload that goes on
writes (or gets a 408 after ``RLORA_BODY_IDLE_TIMEOUT``), and a zip is renamed into its cache
as soon as it is built.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from service.settings import Settings

log = logging.getLogger(__name__)


def staging_file(settings: Settings, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new, empty staging file: its open descriptor and its path."""
    settings.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=settings.tmp_dir)
    return fd, Path(name)


def sweep_staging(settings: Settings) -> int:
    """Remove the staging files not modified for ``staging_max_age`` seconds; how many went."""
    oldest = time.time() - settings.staging_max_age
    removed = 0
    try:
        entries = list(os.scandir(settings.tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < oldest:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass  # another process swept it first
    if removed:
        log.info("removed %d staging file(s) older than %g s from %s", removed, settings.staging_max_age, settings.tmp_dir)
    return removed
