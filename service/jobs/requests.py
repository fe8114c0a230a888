"""Checking a job submission completely before anything is queued."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlora.adapter.config import AdapterConfig, AdapterConfigError
from rlora.basemodels import list_base_models
from rlora.train.config import MixtureEntry, TrainConfig

from service.api.errors import invalid_fields, pydantic_details
from service.ids import could_exist
from service.models import File
from service.api.schemas import JobCreate
from service.settings import Settings
from service.jobs.storage import blob_path


@dataclass
class CheckedJob:
    adapter: dict[str, Any]
    file_ids: list[str]


def request_hash(body: JobCreate) -> str:
    """Of the body with defaults filled in, so equivalent submissions hash alike."""
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def check_job(session: Session, settings: Settings, tenant_id: str, body: JobCreate) -> CheckedJob:
    """Every problem with ``body`` as one 422 naming the fields; else the normalised parts."""
    problems: list[dict[str, str]] = []

    available = list_base_models(settings.models_dir)
    if body.base_model not in available:
        problems.append({"field": "base_model", "message": f"unknown base model {body.base_model!r}; available: {', '.join(available)}"})

    wanted = {item.file_id for item in body.mixture} | {i.validation_file_id for i in body.mixture if i.validation_file_id}
    candidates = [file_id for file_id in wanted if could_exist(file_id)]
    files = {f.id: f for f in session.scalars(select(File).where(File.tenant_id == tenant_id, File.id.in_(candidates)))}
    for index, item in enumerate(body.mixture):
        for name in ("file_id", "validation_file_id"):
            file_id = getattr(item, name)
            if file_id is not None and file_id not in files:
                problems.append({"field": f"mixture[{index}].{name}", "message": f"no file {file_id!r}"})

    adapter: dict[str, Any] = {}
    try:
        adapter = AdapterConfig.from_dict(body.adapter).to_dict()
    except AdapterConfigError as err:
        problems.append({"field": f"adapter.{err.field}", "message": err.message})
    except TypeError as err:
        problems.append({"field": "adapter", "message": str(err)})

    if not problems:
        # The trainer's own input model has the rules that span fields (one task per dataset).
        try:
            TrainConfig(
                base_model=body.base_model,
                mixture=[
                    MixtureEntry(
                        path=str(blob_path(settings, files[item.file_id].sha256)),
                        weight=item.weight,
                        task=item.task,
                        validation_path=str(blob_path(settings, files[item.validation_file_id].sha256)) if item.validation_file_id else None,
                    )
                    for item in body.mixture
                ],
                adapter=adapter,
                training=body.training,
                output_dir=str(settings.jobs_dir),
            )
        except ValidationError as err:
            problems += pydantic_details(list(err.errors()))
    if problems:
        raise invalid_fields(problems)
    return CheckedJob(adapter=adapter, file_ids=sorted(wanted))
