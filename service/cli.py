"""The ``rlora`` command: serve, engine, worker, tenant create, key, migrate, train; and, as a
client of a running service, login, files, jobs, adapters, generate, chat, keys
(`service.client.commands`)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import datetime, timedelta

from pydantic import ValidationError

from service.logs import LEVELS, configure_logging, quiet_progress_bars
from service.settings import Settings, get_settings

log = logging.getLogger("rlora")

# The long-running commands: their events (requests, jobs) are logged from info up by default;
# the others say only what went wrong.
_SERVICE_COMMANDS = ("serve", "engine", "worker")

# A stopping worker gives its job back at the trainer's next check (one step, or one
# evaluation batch); loading a model can take longer, and a killed worker's job waits for
# the heartbeat timeout instead.
WORKER_STOP_SECONDS = 60

# Everything the command creates (database and its WAL, uploads, jobs, adapters, the broker's
# messages) is its user's alone: tenants' data and hashed keys.
PRIVATE_UMASK = 0o077

_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_MAX_DURATION = timedelta(days=36_525)


def _duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m`` or ``3600s``: a length of time, up to 100 years."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90d, 12h, 30m or 3600s")
    try:
        duration = timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        duration = _MAX_DURATION * 2
    if duration > _MAX_DURATION:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 100 years")
    return duration


def _positive_duration(text: str) -> timedelta:
    """A `_duration` above zero (an expiry of 0 would be no expiry at all)."""
    duration = _duration(text)
    if not duration:
        raise argparse.ArgumentTypeError(f"{text!r}: a key's lifetime must be more than zero")
    return duration


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlora-service")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    from service.client.commands import COMMANDS as CLIENT_COMMANDS, add_client_commands, run_client_command

    parser = argparse.ArgumentParser(prog="rlora", description="R-LoRA fine-tuning service")
    parser.add_argument("--version", action="version", version=f"rlora {_version()}")
    parser.add_argument(
        "--log-level", choices=LEVELS, type=str.lower,
        help="default RLORA_LOG_LEVEL, else info for serve, engine and worker and warning for the other commands",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="the API and one worker (embedded default: no other services)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="API only; workers run elsewhere (rlora worker)")
    serve.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="API processes sharing the port (default 1); above 1 needs RLORA_ENGINE_URLS or RLORA_INFERENCE_IN_API=false",
    )

    engine = commands.add_parser(
        "engine", help="an inference engine for one device; API processes forward generation to it (RLORA_ENGINE_URLS)",
    )
    engine.add_argument("--host", help="default RLORA_ENGINE_HOST (127.0.0.1)")
    engine.add_argument("--port", type=int, help="default RLORA_ENGINE_PORT (8200)")
    engine.add_argument("--device", help="e.g. cuda, cuda:1, cpu; default RLORA_INFERENCE_DEVICE (cuda when available)")
    engine.add_argument(
        "--base-model", action="append", default=[], dest="base_models", metavar="NAME",
        help="load this base model before serving (repeatable); others load on first use",
    )

    worker = commands.add_parser("worker", help="a Celery worker for the configured broker")
    worker.add_argument("--queues", help="comma-separated device classes to take (cpu, gpu); default: this host's")

    tenant = commands.add_parser("tenant", help="manage tenants")
    tenant_commands = tenant.add_subparsers(dest="tenant_command", required=True)
    create = tenant_commands.add_parser("create", help="a new tenant; prints its API key (alone on stdout)")
    create.add_argument("name")

    key = commands.add_parser("key", help="manage a tenant's API keys")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    expires_in = dict(type=_positive_duration, metavar="DURATION", help="the key stops working after this (90d, 12h, 30m, 3600s); default never")
    key_create = key_commands.add_parser("create", help="a new API key for a tenant; prints it (alone on stdout)")
    key_create.add_argument("--name", help="what the key is for, shown in lists")
    key_create.add_argument("--expires-in", **expires_in)
    key_commands.add_parser("list", help="the tenant's keys: id, prefix, name, status, times; never the keys themselves")
    key_revoke = key_commands.add_parser("revoke", help="refuse a key from the next request on")
    key_revoke.add_argument("key_id")
    key_rotate = key_commands.add_parser("rotate", help="a new key in place of KEY_ID; prints it (alone on stdout)")
    key_rotate.add_argument("key_id")
    key_rotate.add_argument(
        "--grace", type=_duration, default=timedelta(0), metavar="DURATION",
        help="the old key goes on working this long, for clients to change over (at most 30d); default: revoked at once",
    )
    key_rotate.add_argument("--expires-in", **expires_in)
    for key_command in key_commands.choices.values():
        key_command.add_argument("--tenant", required=True, help="the tenant's name or id")

    commands.add_parser("migrate", help="apply database migrations")

    train = commands.add_parser("train", help="train locally without the service")
    train.add_argument("config", help="YAML with the fields of POST /v1/jobs, local paths and output_dir")

    add_client_commands(commands, _duration, _positive_duration)

    args = parser.parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)  # a client: no server settings, data or logging here
    os.umask(PRIVATE_UMASK)  # before anything is created; the embedded worker inherits it
    try:
        settings = get_settings()
    except ValidationError as err:
        print(f"error: invalid RLORA_* environment setting:\n{err}", file=sys.stderr)
        return 2
    log_level = _set_up_logging(settings, args.log_level, args.command)
    if args.command == "train":
        return _train(settings, args.config)
    if args.command == "serve":
        return _serve(settings, args.host, args.port, processes=args.workers, with_worker=not args.no_worker)
    if args.command == "engine":
        from service.engine.server import serve_engine

        return serve_engine(
            settings, host=args.host or settings.engine_host, port=args.port or settings.engine_port,
            device=args.device, base_models=args.base_models,
        )
    if args.command == "worker":
        return _worker(settings, args.queues, log_level)
    if args.command == "migrate":
        _migrate(settings)
        print(f"database at head: {_display_url(settings.database)}")
        return 0
    if args.command == "key":
        return _key(settings, args)
    return _create_tenant(settings, args.name)


def _set_up_logging(settings: Settings, flag: str | None, command: str) -> str:
    """This process's logging (service.logs), and its children's: the API's uvicorn processes
    and the embedded worker read the level from RLORA_LOG_LEVEL, as the flag sets it. The level."""
    level = flag or settings.log_level or ("info" if command in _SERVICE_COMMANDS else "warning")
    os.environ["RLORA_LOG_LEVEL"] = level
    configure_logging(level, settings.log_format)
    if command in _SERVICE_COMMANDS:
        quiet_progress_bars()
    return level


def _train(settings: Settings, config_path: str) -> int:
    """``rlora train CONFIG.yaml``: exit 0 when trained, 2 for a bad config, 1 for a failure,
    130 when interrupted (the same command again resumes from the last checkpoint)."""
    import json

    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    from rlora.training import Progress, read_train_config, train

    transformers_logging.disable_progress_bar()  # ours is the one progress bar
    try:
        config = read_train_config(config_path)
        for entry in config.mixture:
            for file in filter(None, (entry.path, entry.validation_path)):
                if not os.path.isfile(file):
                    raise ValueError(f"mixture task {entry.task!r}: no such file {file}")
    except ValueError as err:
        print(f"rlora train: {err}", file=sys.stderr)
        return 2
    # disable=None: a bar on a terminal only (elsewhere its first frame is a stray "0step" line).
    bar = tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr, disable=None)

    def progress(p: Progress) -> None:
        bar.total = p.total_steps
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.learning_rate:.2e}", tok_s=f"{p.tokens_per_second:.0f}", refresh=False)
        bar.refresh()

    events = []  # a run found finished returns its results at once, announcing no phase

    def event(kind: str, data: dict) -> None:
        events.append(kind)
        if kind == "resumed":
            bar.write(f"resuming from the checkpoint at step {data['step']}", file=sys.stderr)

    try:
        metrics = train(config, on_progress=progress, on_event=event,
                        models_dir=settings.models_dir, cache_dir=settings.cache_dir)
    except KeyboardInterrupt:
        bar.close()
        print("rlora train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command's contract: a message and exit 1
        bar.close()
        print(f"rlora train: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    bar.close()
    if not events:
        print(f"rlora train: {config.output_dir} holds this run already finished; its results:", file=sys.stderr)
    print(json.dumps({"output_dir": config.output_dir, "steps": metrics["steps"], "eval": metrics["eval"],
                      "head_similarity": metrics["head_similarity"]["mean"]}, indent=2))
    return 0


def _migrate(settings: Settings) -> None:
    from service.migrate import upgrade_database

    settings.prepare_dirs()
    upgrade_database(settings.database)


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _create_tenant(settings: Settings, name: str) -> int:
    from service.api.auth import TenantExists, create_tenant
    from service.db import Database

    if not name.strip() or len(name) > 200:
        print("error: a tenant name has 1 to 200 characters", file=sys.stderr)
        return 2
    _migrate(settings)
    db = Database(settings.database)
    try:
        with db.session() as session:
            tenant, key = create_tenant(session, name)
    except TenantExists as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    # The key alone on stdout (KEY=$(rlora tenant create NAME)); what it is, on stderr.
    print(f"tenant {tenant.name} ({tenant.id}) created; its API key, shown only this once:", file=sys.stderr)
    print(key)
    return 0


def _key(settings: Settings, args: argparse.Namespace) -> int:
    """``rlora key create|list|revoke|rotate --tenant T``: exit 0 when done, 1 for an unknown
    tenant or key or a key that cannot be rotated, 2 for a bad argument."""
    from service import keys
    from service.db import Database
    from service.models import utcnow

    grace = getattr(args, "grace", timedelta(0))
    if grace > keys.MAX_ROTATION_GRACE:
        print(f"error: --grace is at most {keys.MAX_ROTATION_GRACE.days}d", file=sys.stderr)
        return 2
    expires_in = getattr(args, "expires_in", None)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    _migrate(settings)
    db = Database(settings.database)
    try:
        with db.session() as session:
            tenant = keys.find_tenant(session, args.tenant)
            if args.key_command == "list":
                _print_keys(keys.tenant_keys(session, tenant.id))
                return 0
            if args.key_command == "create":
                row, secret = keys.create_key(session, tenant.id, args.name, expires_at)
                print(f"key {row.id} ({row.prefix}...) created for tenant {tenant.name}; the key, shown only this once:", file=sys.stderr)
                print(secret)
                return 0
            key = keys.tenant_key(session, tenant.id, args.key_id)
            if args.key_command == "revoke":
                keys.revoke_key(session, key)
                print(f"key {key.id} ({key.prefix}...) revoked at {_when(key.revoked_at)}")
                return 0
            row, secret = keys.rotate_key(session, key, grace, expires_at)
            ends = "revoked" if key.revoked_at else f"works until {_when(key.expires_at)}"
            print(f"key {key.id} rotated ({ends}); its successor {row.id} ({row.prefix}...), shown only this once:", file=sys.stderr)
            print(secret)
            return 0
    except (keys.UnknownTenant, keys.UnknownKey, keys.KeyNotActive) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        db.dispose()


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


def _print_keys(rows: list) -> None:
    from service.keys import key_state
    from service.models import utcnow

    now = utcnow()
    table = [("ID", "PREFIX", "NAME", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED")]
    for row in rows:
        table.append((
            row.id, row.prefix, row.name or "-", key_state(row.revoked_at, row.expires_at, now),
            _when(row.created_at), _when(row.last_used_at), _when(row.expires_at), _when(row.revoked_at),
        ))
    widths = [max(len(str(line[column])) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(str(value).ljust(width) for value, width in zip(line, widths)).rstrip())


def _worker(settings: Settings, queues: str | None, log_level: str) -> int:
    from service.jobs.queue import DEVICE_CLASSES, queue_name

    classes = [q.strip() for q in (queues or settings.worker_queues or _host_device_class()).split(",") if q.strip()]
    unknown = sorted(set(classes) - set(DEVICE_CLASSES))
    if unknown or not classes:
        print(f"error: queues must be among {', '.join(DEVICE_CLASSES)}, got {queues!r}", file=sys.stderr)
        return 2
    settings.prepare_dirs()
    from worker.app import app

    app.worker_main([
        "--quiet",  # Celery's: no banner (what it says is in the settings and the first events)
        "worker",
        # One job per process: the trainer itself uses every core (or the GPU).
        "--pool=solo",
        "--concurrency=1",
        f"--queues={','.join(queue_name(settings, c) for c in classes)}",
        f"--hostname=rlora-{os.getpid()}@%h",
        f"--loglevel={log_level.upper()}",  # to the logging set-up of worker.app
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ])
    return 0


def _host_device_class() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


class _WorkerProcess:
    """The embedded worker of ``rlora serve``: a child process, restarted if it dies."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._supervise, name="rlora-worker-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _supervise(self) -> None:
        from service.jobs.queue import DEVICE_CLASSES

        # Takes every device class: with one worker, a GPU job on a CPU-only host should
        # fail with a readable error rather than wait forever.
        from service.metrics import MULTIPROCESS_DIR_VARIABLE

        command = [sys.executable, "-m", "service.cli", "worker", "--queues", ",".join(DEVICE_CLASSES)]
        # The API processes' metrics folder is theirs: the worker has a registry of its own.
        env = {name: value for name, value in os.environ.items() if name != MULTIPROCESS_DIR_VARIABLE}
        while not self.stopping.is_set():
            self.process = subprocess.Popen(command, env=env)
            code = self.process.wait()
            if not self.stopping.is_set():
                log.error("embedded worker exited with %s; restarting", code)
                self.stopping.wait(2)

    def stop(self) -> None:
        self.stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        # The worker's warm shutdown (worker.app): its running job goes back to the queue at
        # once and resumes from its checkpoint on the next start.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the embedded worker did not stop within %d s; killed (its job is requeued once found lost)", WORKER_STOP_SECONDS)
            process.kill()
            process.wait()


def serve_refusal(settings: Settings, processes: int) -> str | None:
    """Why ``rlora serve --workers PROCESSES`` will not start with these settings (None: it will)."""
    if processes < 1:
        return "--workers must be at least 1"
    if processes > 1 and settings.inference_in_api and not settings.engine_urls:
        # Each process would load its own copy of every base model it serves (on the GPU too).
        return (
            f"--workers {processes} would load the base models once per process; run `rlora engine` "
            "per device and set RLORA_ENGINE_URLS to forward generation to it, or set "
            "RLORA_INFERENCE_IN_API=false for an API tier that serves no generation (README: the API tier)"
        )
    return None


def _serve(settings: Settings, host: str, port: int, *, processes: int, with_worker: bool) -> int:
    import uvicorn

    from service.metrics import MULTIPROCESS_DIR_VARIABLE

    refusal = serve_refusal(settings, processes)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    _migrate(settings)  # once, before any process starts; the processes do not migrate
    metrics_dir = None
    if processes > 1 and MULTIPROCESS_DIR_VARIABLE not in os.environ:
        # The processes share one port, so a scrape reaches any one of them: each writes its
        # metrics to files in this folder, read together by whichever answers (service.metrics).
        # Local and fresh at every start: values of a previous run must not be summed in.
        metrics_dir = tempfile.mkdtemp(prefix="rlora-metrics-")
        os.environ[MULTIPROCESS_DIR_VARIABLE] = metrics_dir
    worker = _WorkerProcess() if with_worker else None
    if worker is not None:
        worker.start()
    log.info("data under %s; create an API key with: rlora tenant create NAME", settings.home)
    # uvicorn shuts down on SIGTERM, then raises the signal again; as an exception it lets
    # the finally clause below stop the worker instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # The factory reads the same RLORA_* environment as this command, in every process.
        # Logging is the command's (service.logs): uvicorn's own set-up and access lines left out
        # (every request is one event of service.api.telemetry, with its request id).
        uvicorn.run(
            "service.api.app:create_served_app", factory=True, workers=processes, host=host, port=port,
            log_config=None, access_log=False,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has shut down already
    finally:
        if worker is not None:
            worker.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
