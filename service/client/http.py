"""`ApiClient`: the service's HTTP API as methods, every refusal an `ApiError` carrying the
server's own message (the one error shape, ``{"error": {"code", "message", "field"?}}``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

# Reads wait this long for a response; a generation's stream and a download may go quiet
# longer between chunks (a base model loading on the first request), so they wait longer.
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
STREAM_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class ApiError(Exception):
    """The server refused a request: its status, error code, message and field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def of(cls, response: httpx.Response) -> "ApiError":
        try:
            body = response.json()
            error = body["error"]
            if isinstance(error, str):  # the TGI routes answer in TGI's shape: {"error", "error_type", ...}
                return cls(response.status_code, body.get("code") or body.get("error_type", ""), error, body.get("field"))
            # The service's shape names the field `field`; OpenAI's (its /v1 routes) `param`.
            return cls(response.status_code, error.get("code") or "", error["message"], error.get("field") or error.get("param"))
        except (ValueError, KeyError, TypeError, AttributeError):  # not the service's shape: a proxy, another server
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(response.status_code, "http_error", f"HTTP {response.status_code}: {text}")


class ServiceUnreachable(Exception):
    """Nothing answered at the API's address (or the connection broke)."""


class ApiClient:
    def __init__(self, api_url: str, api_key: str | None, *, transport: httpx.BaseTransport | None = None):
        self.api_url = api_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.api_url, headers=headers, timeout=TIMEOUT, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ServiceUnreachable(f"cannot reach the rlora API at {self.api_url}: {err or type(err).__name__}") from None
        if response.is_error:
            raise ApiError.of(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _all(self, path: str, params: dict[str, Any] | None = None, limit: int | None = None) -> list[dict]:
        """Every object of a list route (newest first), following its cursor; at most ``limit``."""
        params = dict(params or {}, limit=100 if limit is None else min(limit, 100))
        found: list[dict] = []
        while True:
            page = self._json("GET", path, params=params)
            found += page["data"]
            if not page.get("next_cursor") or (limit is not None and len(found) >= limit):
                return found[:limit]
            params["after"] = page["next_cursor"]

    # --- files -----------------------------------------------------------------------------

    def upload_file(self, path: str | os.PathLike) -> dict:
        path = Path(path)
        with path.open("rb") as content:
            return self._json("POST", "/v1/files", files={"file": (path.name, content)}, timeout=STREAM_TIMEOUT)

    def list_files(self, limit: int | None = None) -> list[dict]:
        return self._all("/v1/files", limit=limit)

    # --- jobs ------------------------------------------------------------------------------

    def create_job(self, body: dict[str, Any]) -> dict:
        return self._json("POST", "/v1/jobs", json=body)

    def list_jobs(self, status: str | None = None, limit: int | None = None) -> list[dict]:
        return self._all("/v1/jobs", {"status": status} if status else None, limit)

    def get_job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def job_events(self, job_id: str, after: int | None = None) -> list[dict]:
        """The job's events after the event id ``after``, oldest first, every page of them."""
        events: list[dict] = []
        params: dict[str, Any] = {"limit": 100}
        if after is not None:
            params["after"] = after
        while True:
            page = self._json("GET", f"/v1/jobs/{job_id}/events", params=params)
            events += page["data"]
            if not page.get("next_cursor"):
                return events
            params["after"] = page["next_cursor"]

    # --- adapters --------------------------------------------------------------------------

    def list_adapters(self, limit: int | None = None) -> list[dict]:
        return self._all("/v1/adapters", limit=limit)

    def download_adapter(self, adapter_id: str, destination: Path) -> int:
        """The adapter's zip written to ``destination`` (whole or not at all); its size in bytes."""
        partial = destination.with_name(f".{destination.name}.partial")
        try:
            with self._http.stream("GET", f"/v1/adapters/{adapter_id}/download", timeout=STREAM_TIMEOUT) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.of(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            partial.replace(destination)
        except httpx.TransportError as err:
            raise ServiceUnreachable(f"the download from {self.api_url} broke off: {err or type(err).__name__}") from None
        finally:
            partial.unlink(missing_ok=True)
        return destination.stat().st_size

    # --- generation ------------------------------------------------------------------------

    def generate_stream(self, inputs: str, parameters: dict[str, Any]) -> Iterator[dict]:
        """TGI's /generate_stream: each server-sent event's data, one per token, the last with
        ``generated_text``. An error event (the stream had begun) is raised as an `ApiError`."""
        for event in self._server_sent_events("/generate_stream", {"inputs": inputs, "parameters": parameters}):
            if "error" in event:
                raise ApiError(200, event.get("error_type") or "generation", event["error"])
            yield event

    def chat_stream(self, body: dict[str, Any]) -> Iterator[str]:
        """OpenAI's /v1/chat/completions, streamed: the text of each chunk as it comes. An error
        event (the stream had begun) is raised as an `ApiError`."""
        for event in self._server_sent_events("/v1/chat/completions", {**body, "stream": True}):
            if "error" in event:
                error = event["error"]
                raise ApiError(200, error.get("code") or "generation", error.get("message", ""), error.get("param"))
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text

    def _server_sent_events(self, path: str, body: dict[str, Any]) -> Iterator[dict]:
        """The data of each server-sent event of a streamed POST, until the stream ends (or
        OpenAI's ``[DONE]``); a refusal before the stream began is an `ApiError`."""
        try:
            with self._http.stream("POST", path, json=body, timeout=STREAM_TIMEOUT) as response:
                if response.is_error:
                    response.read()
                    raise ApiError.of(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.TransportError as err:
            raise ServiceUnreachable(f"the stream from {self.api_url} broke off: {err or type(err).__name__}") from None

    def base_models(self) -> list[str]:
        """The base models the service serves, as /v1/models lists them (adapters left out)."""
        return [model["id"] for model in self._json("GET", "/v1/models")["data"] if model.get("owned_by") == "system"]

    # --- keys ------------------------------------------------------------------------------

    def list_keys(self) -> list[dict]:
        return self._all("/v1/keys")

    def revoke_key(self, key_id: str) -> dict:
        return self._json("DELETE", f"/v1/keys/{key_id}")

    def rotate_key(self, key_id: str, grace_seconds: int = 0, expires_at: str | None = None) -> dict:
        body: dict[str, Any] = {"grace_seconds": grace_seconds}
        if expires_at is not None:
            body["expires_at"] = expires_at
        return self._json("POST", f"/v1/keys/{key_id}/rotate", json=body)

    def usage(self) -> dict:
        return self._json("GET", "/v1/usage")
