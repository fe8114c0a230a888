"""A job from a YAML file like ``rlora train``'s: each mixture entry's local ``path`` (and
``validation_path``) is uploaded and replaced by its ``file_id`` (``validation_file_id``), or an
entry names an uploaded file by ``file_id`` itself; ``output_dir`` has no meaning for the
service (it keeps the adapter) and is left out. Everything else goes to ``POST /v1/jobs`` as
written, and the server checks it (a 422 names the field)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlora.training.config import read_yaml_settings
from service.client.http import ApiClient

# An entry's local file -> the job request's field for its uploaded id.
UPLOADED_FIELDS = {"path": "file_id", "validation_path": "validation_file_id"}


class JobFileError(ValueError):
    """The YAML file cannot become a job request (unreadable, or a dataset it names is missing)."""


def read_job_file(path: Path) -> dict[str, Any]:
    """The file's settings, local paths made absolute (relative ones are relative to the file)."""
    try:
        data = read_yaml_settings(path)
    except ValueError as err:
        raise JobFileError(str(err)) from None
    mixture = data.get("mixture")
    if not isinstance(mixture, list) or not all(isinstance(entry, dict) for entry in mixture):
        raise JobFileError(f"{path}: mixture must be a list of entries, each with a path (or file_id), task and weight")
    folder = path.resolve().parent
    for index, entry in enumerate(mixture):
        for local in UPLOADED_FIELDS:
            if local in entry:
                dataset = folder / str(entry[local])
                if not dataset.is_file():
                    raise JobFileError(f"{path}: mixture[{index}].{local}: no such file {dataset}")
                entry[local] = dataset
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as content:
        for block in iter(lambda: content.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_request(client: ApiClient, settings: dict[str, Any], note: Callable[[str], None]) -> dict[str, Any]:
    """The body of ``POST /v1/jobs`` for ``settings`` (of `read_job_file`): its datasets
    uploaded, each once; a file the tenant uploaded before (the same content) is reused."""
    body = {name: value for name, value in settings.items() if name != "output_dir"}
    if "output_dir" in settings:
        note("output_dir is not used by the service: the job's adapter stays there (rlora adapters download)")
    uploaded: dict[str, str] = {}  # sha256 -> file id
    datasets = [entry[local] for entry in body["mixture"] for local in UPLOADED_FIELDS if local in entry]
    if datasets:
        uploaded = {file["sha256"]: file["id"] for file in reversed(client.list_files())}  # the newest of equal files wins
    mixture = []
    for entry in body["mixture"]:
        entry = dict(entry)
        for local, field in UPLOADED_FIELDS.items():
            if local not in entry:
                continue
            dataset = entry.pop(local)
            digest = _sha256(dataset)
            if digest in uploaded:
                note(f"{dataset}: uploaded before as {uploaded[digest]}")
            else:
                file = client.upload_file(dataset)
                uploaded[digest] = file["id"]
                note(f"{dataset}: uploaded as {file['id']} ({file['records']} records)")
            entry[field] = uploaded[digest]
        mixture.append(entry)
    body["mixture"] = mixture
    return body
