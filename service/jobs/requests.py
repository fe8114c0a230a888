"""A job request: checked completely before anything is queued, stored as a `Job`, and turned
into the trainer's input (`train_config`) by the same code at submission and in the worker."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlora.adapter.config import AdapterConfig, AdapterConfigError
from rlora.basemodels import list_base_models, resolve_base_model
from rlora.data.mixture import TaskNotInRecords, entry_tasks, held_out_count
from rlora.training.config import MixtureEntry, TrainConfig, TrainingSettings
from rlora.training.limits import TrainingLimits, limit_problems
from rlora.training.memory import DeviceCapacity
from service.ids import could_exist
from service.jobs.queue import device_class_for, queue_for
from service.jobs.states import Status
from service.jobs.storage import blob_path
from service.models import File, Job
from service.problems import validation_problems
from service.settings import Settings

# The weight and task rules are the trainer's own (MixtureEntry); only the source differs.
_ENTRY = MixtureEntry.model_fields


class MixtureItem(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    file_id: str = Field(min_length=1, description="id of an uploaded dataset file (POST /v1/files)")
    weight: float = _ENTRY["weight"]
    task: str = _ENTRY["task"]
    validation_file_id: str | None = Field(None, description="held-out set; otherwise training.validation_share of the file")


class JobRequest(BaseModel):
    """What a tenant asks to train: datasets by file id, the adapter and training settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: str = Field(min_length=1, max_length=255, description="a base model of GET /v1/models, e.g. tiny")
    mixture: list[MixtureItem] = Field(min_length=1, max_length=64, description="the datasets, one entry per task")
    adapter: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "the adapter (AdapterConfig): method (lora, hydralora or rlora, the default), heads (default 1 for lora, "
            "else 3), rank (4), alpha (32), dropout (0.2), target_modules (default gate_proj, up_proj, down_proj; "
            "or 'all-linear'), seed, rank_stabilized, gamma, init_scale, and R-LoRA's ablation switches "
            "multi_head_dropout and random_init"
        ),
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="optimisation settings")


class InvalidJobRequest(ValueError):
    """Every problem found with a request, each ``{"field", "message"}``; the first leads."""

    def __init__(self, problems: list[dict[str, Any]]):
        super().__init__("; ".join(f"{p['field']}: {p['message']}" if p.get("field") else p["message"] for p in problems))
        self.problems = problems


class JobInputError(ValueError):
    """The job cannot run as submitted (one of its files is gone)."""


@dataclass
class CheckedJob:
    job: Job  # queued, not yet added to a session
    file_ids: list[str]


def request_hash(request: JobRequest) -> str:
    """Of the request with defaults filled in, so equivalent submissions hash alike."""
    return hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def mixture_file_ids(mixture: Iterable[Mapping[str, Any]]) -> set[str]:
    """The ids of a stored mixture's files, validation sets included."""
    return {item["file_id"] for item in mixture} | {item["validation_file_id"] for item in mixture if item.get("validation_file_id")}


def tenant_files(session: Session, tenant_id: str, file_ids: Iterable[str]) -> dict[str, File]:
    """The tenant's files among ``file_ids``, by id; the others do not exist (for this tenant)."""
    candidates = [file_id for file_id in file_ids if could_exist(file_id)]
    return {f.id: f for f in session.scalars(select(File).where(File.tenant_id == tenant_id, File.id.in_(candidates)))}


def train_config(settings: Settings, job: Job, files: Mapping[str, File], output_dir: Path) -> TrainConfig:
    """The trainer's input for ``job``, its datasets read from the stored content of ``files``.

    Raises ``JobInputError`` for a file that is gone, and pydantic's ``ValidationError`` for
    what the trainer's own rules refuse (those that span fields, such as one task per dataset).
    """

    def path(file_id: str) -> str:
        file = files.get(file_id)
        if file is None or not blob_path(settings, file.sha256).is_file():
            raise JobInputError(f"file {file_id} was deleted")
        return str(blob_path(settings, file.sha256))

    return TrainConfig(
        base_model=job.base_model,
        mixture=[
            MixtureEntry(
                path=path(item["file_id"]),
                weight=item["weight"],
                task=item["task"],
                validation_path=path(item["validation_file_id"]) if item.get("validation_file_id") else None,
            )
            for item in job.mixture
        ],
        adapter=job.adapter,
        training=job.training,
        output_dir=str(output_dir),
    )


def _limit_problems(settings: Settings, config: TrainConfig, job: Job, files: Mapping[str, File]) -> list[dict[str, Any]]:
    """The settings of ``config`` (``job``'s) over the server's limits or the base model's context."""
    base_model = resolve_base_model(config.base_model, settings.models_dir, settings.cache_dir)
    train_examples = 0
    for item in job.mixture:
        labels = files[item["file_id"]].tasks
        for label in entry_tasks(labels, item["task"]).values():
            records = labels[label]
            held_out = 0 if item.get("validation_file_id") else held_out_count(records, config.training.validation_share)
            train_examples += records - held_out
    # The library's limits are the settings of the same names.
    limits = TrainingLimits(**{field.name: getattr(settings, field.name) for field in fields(TrainingLimits)})
    device_class = device_class_for(settings, config.training.device)
    memory = settings.gpu_memory_bytes if device_class == "gpu" else settings.cpu_memory_bytes
    device = None if memory is None else DeviceCapacity(memory, cuda=device_class == "gpu", name=f"{device_class} worker's")
    found = limit_problems(config.training, config.adapter_config, base_model, train_examples, limits, device)
    return [{"field": problem.field, "message": problem.message} for problem in found]


def _task_problems(mixture: list[dict[str, Any]], files: Mapping[str, File]) -> list[dict[str, Any]]:
    """Each entry's task against its file's labels (from the upload's summary, as the trainer
    reads them: `entry_tasks`): a task no record carries, or one two entries train."""
    problems, owner = [], {}
    for index, item in enumerate(mixture):
        try:
            tasks = entry_tasks(files[item["file_id"]].tasks, item["task"])
        except TaskNotInRecords as err:
            problems.append({"field": f"mixture[{index}].task", "message": f"file {item['file_id']}: {err}"})
            continue
        for task in tasks:
            if task in owner and owner[task] != index:
                problems.append({"field": f"mixture[{index}].task", "message": f"task {task!r} is also the task of mixture[{owner[task]}]"})
            owner.setdefault(task, index)
    return problems


def check_job(session: Session, settings: Settings, tenant_id: str, request: JobRequest) -> CheckedJob:
    """The queued job of ``request``, normalised; else ``InvalidJobRequest`` with every problem."""
    problems: list[dict[str, Any]] = []

    available = list_base_models(settings.models_dir)
    if request.base_model not in available:
        problems.append({"field": "base_model", "message": f"unknown base model {request.base_model!r}; available: {', '.join(available)}"})

    mixture = [item.model_dump(mode="json") for item in request.mixture]
    wanted = mixture_file_ids(mixture)
    files = tenant_files(session, tenant_id, wanted)
    for index, item in enumerate(mixture):
        for name in ("file_id", "validation_file_id"):
            file_id = item[name]
            if file_id is not None and file_id not in files:
                problems.append({"field": f"mixture[{index}].{name}", "message": f"no file {file_id!r}"})

    adapter: dict[str, Any] = {}
    try:
        adapter = AdapterConfig.from_dict(request.adapter).to_dict()
    except AdapterConfigError as err:
        problems.append({"field": f"adapter.{err.field}", "message": err.message})
    except TypeError as err:
        problems.append({"field": "adapter", "message": str(err)})

    job = Job(
        tenant_id=tenant_id,
        status=Status.QUEUED,
        base_model=request.base_model,
        mixture=mixture,
        adapter=adapter,
        training=request.training.model_dump(mode="json"),
        queue=queue_for(settings, request.training.device),
    )
    if not problems:
        # The job's checkpoints and adapter have no folder before it has an id; none is written.
        try:
            config = train_config(settings, job, files, settings.jobs_dir)
        except ValidationError as err:
            problems += validation_problems(err.errors())
        except JobInputError as err:  # a file deleted while this request was being checked
            problems.append({"field": "mixture", "message": str(err)})
        else:
            problems += _task_problems(mixture, files) or _limit_problems(settings, config, job, files)
    if problems:
        raise InvalidJobRequest(problems)
    return CheckedJob(job=job, file_ids=sorted(wanted))
