"""The client commands of ``rlora``: login, files, jobs, adapters, generate, chat, keys.

Each prints what a script wants on stdout (an id, a table, JSON, generated text) and what a
person wants on stderr (notes, progress). Exit codes: 0 done; 1 the server refused (its message
printed), could not be reached, or a watched job failed; 2 a mistake on this side (a missing
file, no key); 3 a watched job was cancelled; 130 interrupted. A user's mistake never prints a
traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from service.client.http import ApiClient, ApiError, ServiceUnreachable
from service.client.jobfile import JobFileError, job_request, read_job_file
from service.client.profile import Connection, ProfileError, resolve, write_profile

COMMANDS = ("login", "files", "jobs", "adapters", "generate", "chat", "keys")
# A watched job's outcome -> the exit code.
WATCH_EXIT = {"succeeded": 0, "failed": 1, "cancelled": 3}
EXIT_SERVER, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A mistake on the client's side: exit 2 with this message."""


def note(message: str) -> None:
    print(message, file=sys.stderr)


# --- the parsers -----------------------------------------------------------------------------


def add_client_commands(
    commands: argparse._SubParsersAction, duration: Callable[[str], timedelta], positive_duration: Callable[[str], timedelta]
) -> None:
    """The client commands as subcommands of ``rlora``; ``duration`` parses 90d, 12h, 30m, 3600s
    (``positive_duration`` the same, above zero)."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--api", metavar="URL", help="the API's base URL (default: RLORA_API_URL, the profile, http://127.0.0.1:8000)")
    group.add_argument("--key", metavar="KEY", help="the API key (default: RLORA_API_KEY, or the profile rlora login wrote)")
    group.add_argument("--profile", metavar="PATH", help="the profile file (default: RLORA_PROFILE or ~/.config/rlora/profile.json)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the objects as JSON instead of a table")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--adapter", metavar="ID", help="one of your adapters (default: the base model)")
    sampling.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    sampling.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--seed", type=int, help="the same seed gives the same output")
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")

    def group_of(name: str, help: str) -> argparse._SubParsersAction:
        parser = commands.add_parser(name, help=help)
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    login = commands.add_parser("login", parents=[connection], help="check a key against the API and keep both in the profile (mode 0600)")
    login.set_defaults(run=_login)

    files = group_of("files", "your datasets on the service")
    upload = files.add_parser("upload", parents=[connection], help="upload a JSONL or JSON dataset; prints its file id")
    upload.add_argument("path")
    upload.set_defaults(run=_files_upload)
    files.add_parser("list", parents=[connection, as_json], help="your files, newest first").set_defaults(run=_files_list)

    jobs = group_of("jobs", "your fine-tuning jobs")
    create = jobs.add_parser("create", parents=[connection], help="a job from a YAML file like rlora train's; prints its id")
    create.add_argument("config", help="base_model, mixture (local path or file_id per entry), adapter, training")
    create.add_argument("--watch", action="store_true", help="then watch it (exit code by its outcome)")
    create.set_defaults(run=_jobs_create)
    listing = jobs.add_parser("list", parents=[connection, as_json], help="your jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    listing.set_defaults(run=_jobs_list)
    for name, run, help in (
        ("get", _jobs_get, "the job as JSON"),
        ("cancel", _jobs_cancel, "stop a queued or running job"),
        ("events", _jobs_events, "the job's events, oldest first"),
        ("watch", _jobs_watch, "a live progress bar until the job ends; exit 0 succeeded, 1 failed, 3 cancelled"),
    ):
        command = jobs.add_parser(name, parents=[connection], help=help)
        command.add_argument("job_id")
        command.set_defaults(run=run)
        if name == "watch":
            command.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")

    adapters = group_of("adapters", "your trained adapters")
    adapters.add_parser("list", parents=[connection, as_json], help="your adapters, newest first").set_defaults(run=_adapters_list)
    download = adapters.add_parser("download", parents=[connection], help="the adapter folder as a zip")
    download.add_argument("adapter_id")
    download.add_argument("-o", "--output", help="the zip file, or a folder for ADAPTER_ID.zip in it (default: the current folder)")
    download.set_defaults(run=_adapters_download)

    generate = commands.add_parser("generate", parents=[connection, sampling], help="generate from a prompt, streamed to the terminal")
    generate.add_argument("prompt", help="the prompt; - reads it from stdin")
    generate.set_defaults(run=_generate)
    chat = commands.add_parser(
        "chat", parents=[connection, sampling],
        help="interactive: each line you type is the next turn of a conversation (the model's chat template), answered as it is generated",
    )
    chat.add_argument("--no-history", dest="history", action="store_false", help="send each line alone, without the earlier turns")
    chat.set_defaults(run=_chat)

    keys = group_of("keys", "your tenant's API keys (operators: rlora key)")
    keys.add_parser("list", parents=[connection, as_json], help="your keys: id, prefix, name, status, times").set_defaults(run=_keys_list)
    revoke = keys.add_parser("revoke", parents=[connection], help="refuse a key from the next request on")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_keys_revoke)
    rotate = keys.add_parser("rotate", parents=[connection], help="a new key in place of KEY_ID (a lost or leaked one); prints it")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=duration, default=timedelta(0), metavar="DURATION", help="the old key works this long more (at most 30d)")
    rotate.add_argument("--expires-in", type=positive_duration, metavar="DURATION", help="the new key stops working after this")
    rotate.set_defaults(run=_keys_rotate)


# --- running one -----------------------------------------------------------------------------


def run_client_command(args: argparse.Namespace) -> int:
    """Runs the client command ``args`` names: its exit code, every failure a message."""
    try:
        connection, profile_path = resolve(args.api, args.key, args.profile)
        if args.run is _login:
            return _login(args, connection, profile_path)
        if not connection.api_key:
            raise UsageError("no API key: pass --key, set RLORA_API_KEY, or run rlora login (rlora tenant create NAME makes one)")
        args.connection, args.profile_path = connection, profile_path
        with ApiClient(connection.api_url, connection.api_key) as client:
            return args.run(args, client)
    except ApiError as err:
        note(_refusal(err, connection))
        return EXIT_SERVER
    except ServiceUnreachable as err:
        note(f"error: {err} (is `rlora serve` running there? --api or RLORA_API_URL picks another address)")
        return EXIT_SERVER
    except (UsageError, JobFileError, ProfileError) as err:
        note(f"error: {err}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        note("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `rlora jobs list | head`: the reader left; nothing more to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a local file that cannot be read or written
        note(f"error: {err}")
        return EXIT_USAGE


def _refusal(err: ApiError, connection: Connection) -> str:
    where = f" ({err.field})" if err.field and err.field not in err.message else ""
    message = f"error: {err.message}{where} [HTTP {err.status} {err.code}]"
    if err.status == 401:
        message += (
            f"\nthe key from {connection.key_source} was refused by {connection.api_url}; a key works only on the "
            "service whose database made it (rlora tenant create and rlora serve with the same RLORA_HOME)"
        )
    return message


# --- output ----------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = [list(headers)] + [["-" if value is None else str(value) for value in row] for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(headers))]
    for line in table:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())


def _listed(args: argparse.Namespace, objects: list[dict], headers: Sequence[str], row: Callable[[dict], Sequence[Any]]) -> int:
    if args.json:
        _print_json(objects)
    else:
        _print_table(headers, map(row, objects))
    return 0


def _when(value: Any) -> str | None:
    """An API time (ISO 8601, or Unix seconds) as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromtimestamp(value, timezone.utc) if isinstance(value, (int, float)) else datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    value = int(round(value))
    return f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


# --- login -----------------------------------------------------------------------------------


def _login(args: argparse.Namespace, connection: Connection, profile_path: Path) -> int:
    key = args.key
    if not key:
        if sys.stdin.isatty():
            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise UsageError("no API key given: pass --key, or type it (or pipe it) when asked")
    with ApiClient(connection.api_url, key) as client:
        try:
            client.list_keys()  # the key works there, or the server says why
        except ApiError as err:
            if err.status == 401:
                raise UsageError(f"{connection.api_url} refused the key: {err.message}") from None
            raise
    write_profile(profile_path.expanduser(), connection.api_url, key)
    note(f"logged in to {connection.api_url}; the key is kept in {profile_path} (readable by you only)")
    return 0


# --- files -----------------------------------------------------------------------------------


def _files_upload(args: argparse.Namespace, client: ApiClient) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise UsageError(f"no such file {path}")
    file = client.upload_file(path)
    tasks = ", ".join(f"{task}: {count}" for task, count in file["tasks"].items()) or "no task labels"
    note(f"uploaded {path} as {file['id']}: {file['records']} records ({tasks})")
    print(file["id"])
    return 0


def _files_list(args: argparse.Namespace, client: ApiClient) -> int:
    return _listed(
        args, client.list_files(), ("ID", "FILENAME", "RECORDS", "BYTES", "TASKS", "CREATED"),
        lambda f: (f["id"], f["filename"], f["records"], f["bytes"], ",".join(f.get("tasks") or {}) or None, _when(f["created_at"])),
    )


# --- jobs ------------------------------------------------------------------------------------


def _jobs_create(args: argparse.Namespace, client: ApiClient) -> int:
    body = job_request(client, read_job_file(Path(args.config)), note)
    job = client.create_job(body)
    note(f"job {job['id']} {job['status']}")
    print(job["id"])
    sys.stdout.flush()
    if args.watch:
        args.interval = 1.0
        args.job_id = job["id"]
        return _jobs_watch(args, client)
    return 0


def _step(job: dict) -> str | None:
    progress = job.get("progress") or {}
    if progress.get("step") is None:
        return None
    return f"{progress['step']}/{progress.get('total_steps') or '?'}"


def _jobs_list(args: argparse.Namespace, client: ApiClient) -> int:
    def row(job: dict) -> Sequence[Any]:
        loss = (job.get("progress") or {}).get("loss")
        return (job["id"], job["status"], job.get("phase"), _step(job), None if loss is None else f"{loss:.4f}",
                job["base_model"], job.get("adapter_id"), _when(job["created_at"]))

    jobs = client.list_jobs(args.status, args.limit)
    return _listed(args, jobs, ("ID", "STATUS", "PHASE", "STEP", "LOSS", "BASE MODEL", "ADAPTER", "CREATED"), row)


def _jobs_get(args: argparse.Namespace, client: ApiClient) -> int:
    _print_json(client.get_job(args.job_id))
    return 0


def _jobs_cancel(args: argparse.Namespace, client: ApiClient) -> int:
    job = client.cancel_job(args.job_id)
    print(f"job {job['id']}: {job['status']}" + (" (cancel requested; it stops at its next step)" if job["status"] == "running" else ""))
    return 0


def _event_line(event: dict) -> str:
    data = json.dumps(event["data"], ensure_ascii=False, separators=(",", ":")) if event["data"] else ""
    return f"{_when(event['created_at'])}  {event['kind']:<16} {data}".rstrip()


def _jobs_events(args: argparse.Namespace, client: ApiClient) -> int:
    for event in client.job_events(args.job_id):
        print(_event_line(event))
    return 0


def _jobs_watch(args: argparse.Namespace, client: ApiClient) -> int:
    """Polls the job (and its new events) until it ends; the bar shows step, loss, phase and
    the server's ETA. Interrupting stops the watching, not the job."""
    from tqdm import tqdm

    bar = tqdm(
        total=None, unit="step", file=sys.stderr, dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    )
    last_event: int | None = None
    try:
        while True:
            job = client.get_job(args.job_id)
            for event in client.job_events(args.job_id, last_event):
                last_event = event["id"]
                if event["kind"] != "progress":
                    bar.write(_event_line(event), file=sys.stderr)
            progress = job.get("progress") or {}
            bar.set_description_str(f"{job['id']} {job.get('phase') or job['status']}", refresh=False)
            if progress.get("total_steps"):
                bar.total = progress["total_steps"]
            bar.n = progress.get("step") or 0
            postfix = {}
            if progress.get("loss") is not None:
                postfix["loss"] = f"{progress['loss']:.4f}"
            if job["status"] == "running":
                postfix["eta"] = _seconds(progress.get("eta_seconds"))
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
            if job["status"] in WATCH_EXIT:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        bar.close()
        note(f"stopped watching; job {args.job_id} goes on (rlora jobs cancel {args.job_id} stops it)")
        return EXIT_INTERRUPTED
    bar.close()
    return _outcome(job)


def _outcome(job: dict) -> int:
    status = job["status"]
    if status == "succeeded":
        evaluation = ", ".join(
            f"{task}: loss {scores.get('loss', float('nan')):.4f}, exact match {scores.get('accuracy', float('nan')):.1%}"
            for task, scores in ((job.get("metrics") or {}).get("eval") or {}).items()
        )
        note(f"job {job['id']} succeeded" + (f"; eval {evaluation}" if evaluation else "") + f"; adapter {job['adapter_id']}")
        print(job["adapter_id"])
    elif status == "failed":
        error = job.get("error") or {}
        note(f"job {job['id']} failed: {error.get('message') or 'no reason given'} ({error.get('code') or '-'})")
    else:
        note(f"job {job['id']} was cancelled")
    return WATCH_EXIT[status]


# --- adapters --------------------------------------------------------------------------------


def _adapters_list(args: argparse.Namespace, client: ApiClient) -> int:
    def row(adapter: dict) -> Sequence[Any]:
        config = adapter.get("config") or {}
        accuracy = [scores["accuracy"] for scores in (adapter.get("eval") or {}).values() if scores.get("accuracy") is not None]
        return (adapter["id"], adapter["job_id"], adapter["base_model"], config.get("method"), config.get("heads"), config.get("rank"),
                f"{sum(accuracy) / len(accuracy):.1%}" if accuracy else None, _when(adapter["created_at"]))

    adapters = client.list_adapters()
    return _listed(args, adapters, ("ID", "JOB", "BASE MODEL", "METHOD", "HEADS", "RANK", "EXACT MATCH", "CREATED"), row)


def _adapters_download(args: argparse.Namespace, client: ApiClient) -> int:
    destination = Path(args.output or ".")
    if destination.is_dir():
        destination = destination / f"{args.adapter_id}.zip"
    if not destination.parent.is_dir():
        raise UsageError(f"no such folder {destination.parent}")
    size = client.download_adapter(args.adapter_id, destination)
    note(f"adapter {args.adapter_id}: {size} bytes written to {destination}")
    print(destination)
    return 0


# --- generation ------------------------------------------------------------------------------


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    parameters: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.adapter:
        parameters["adapter_id"] = args.adapter
    if args.temperature is not None:
        parameters.update(temperature=args.temperature, do_sample=True)
    for name in ("top_p", "seed", "stop"):
        if getattr(args, name) is not None:
            parameters[name] = getattr(args, name)
    return parameters


def _stream(client: ApiClient, prompt: str, parameters: dict[str, Any]) -> None:
    """Prints each token's text as it comes (special tokens such as end-of-sequence left out)."""
    for event in client.generate_stream(prompt, parameters):
        token = event["token"]
        if not token.get("special"):
            sys.stdout.write(token["text"])
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _generate(args: argparse.Namespace, client: ApiClient) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    _stream(client, prompt, _parameters(args))
    return 0


def _chat(args: argparse.Namespace, client: ApiClient) -> int:
    """A conversation through /v1/chat/completions (the base model's chat template, as the
    adapter was trained): each line read is the next user turn, answered as it is generated,
    the earlier turns sent with it (``--no-history``: each line alone). An empty line is
    skipped, end of input ends it. A refused turn prints the server's message, is left out of
    the conversation, and the chat goes on."""
    model = args.adapter or (client.base_models() or [None])[0]
    if model is None:
        raise ApiError(404, "not_found", "the service lists no base model to chat with")
    request: dict[str, Any] = {"model": model, "max_tokens": args.max_new_tokens, "temperature": args.temperature or 0.0}
    for name in ("top_p", "seed", "stop"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    interactive = sys.stdin.isatty()
    if interactive:
        note(f"chatting with {model} at {client.api_url}; Ctrl-D ends")
    messages: list[dict[str, str]] = []
    refused = False
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return EXIT_SERVER if refused and not interactive else 0
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        turn = [*(messages if args.history else []), {"role": "user", "content": prompt}]
        answer = []
        try:
            for text in client.chat_stream({**request, "messages": turn}):
                answer.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
        except ApiError as err:
            sys.stdout.write("\n")
            note(f"error: {err.message} [HTTP {err.status} {err.code}]")
            if err.status == 401:
                raise
            refused = True
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages = [*turn, {"role": "assistant", "content": "".join(answer)}]


# --- keys ------------------------------------------------------------------------------------


def _keys_list(args: argparse.Namespace, client: ApiClient) -> int:
    return _listed(
        args, client.list_keys(), ("ID", "PREFIX", "NAME", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED"),
        lambda k: (k["id"], k["prefix"], k["name"], k["status"], _when(k["created_at"]), _when(k["last_used_at"]),
                   _when(k["expires_at"]), _when(k["revoked_at"])),
    )


def _keys_revoke(args: argparse.Namespace, client: ApiClient) -> int:
    key = client.revoke_key(args.key_id)
    print(f"key {key['id']} ({key['prefix']}...) revoked at {_when(key['revoked_at'])}")
    return 0


def _keys_rotate(args: argparse.Namespace, client: ApiClient) -> int:
    expires_at = None
    if args.expires_in is not None:
        expires_at = (datetime.now(timezone.utc) + args.expires_in).isoformat()
    connection: Connection = args.connection
    rotated = next((key for key in client.list_keys() if key["id"] == args.key_id), None)
    new = client.rotate_key(args.key_id, int(args.grace.total_seconds()), expires_at)
    ends = f"works until {_when_in(args.grace)}" if args.grace else "is revoked"
    note(f"key {args.key_id} {ends}; its successor {new['id']} ({new['prefix']}...), shown only this once:")
    print(new["key"])
    if rotated and connection.key_source == str(args.profile_path) and connection.api_key.startswith(rotated["prefix"]):
        # The profile's own key: keep the profile working with its successor.
        write_profile(args.profile_path.expanduser(), connection.api_url, new["key"])
        note(f"the profile {args.profile_path} now holds the new key")
    return 0


def _when_in(delta: timedelta) -> str:
    return (datetime.now(timezone.utc) + delta).strftime("%Y-%m-%d %H:%M:%S")
