"""Where the client connects and with which key: ``--api``/``--key``, else ``RLORA_API_URL``/
``RLORA_API_KEY``, else the profile file ``rlora login`` wrote (readable by its user only),
else (for the address) the local ``rlora serve`` default."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ClientSettings(BaseSettings):
    """The client's environment, apart from the server's `Settings`: a user's machine need
    have none of the server's settings, and the server reads none of these."""

    model_config = SettingsConfigDict(env_prefix="RLORA_", extra="ignore")

    api_url: str | None = Field(None, description="the API's base URL")
    api_key: str | None = Field(None, description="the tenant's API key")
    profile: Path | None = Field(None, description="the profile file; default ~/.config/rlora/profile.json")


def default_profile_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "rlora" / "profile.json"


class ProfileError(Exception):
    """The profile file exists but cannot be used."""


@dataclass(frozen=True)
class Connection:
    api_url: str
    api_key: str | None
    key_source: str  # where the key came from, for messages: "--key", "RLORA_API_KEY", the profile's path


def read_profile(path: Path) -> dict[str, str]:
    """The profile's ``api_url`` and ``api_key`` ({} when there is no profile)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ProfileError(f"cannot read the profile {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, ""), str) for k in ("api_url", "api_key")):
        raise ProfileError(f"the profile {path} is not a JSON object with api_url and api_key strings; run rlora login again")
    return data


def write_profile(path: Path, api_url: str, api_key: str) -> None:
    """Written whole (a temporary file renamed over it), mode 0600 in a 0700 folder: it holds a key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump({"api_url": api_url, "api_key": api_key}, out, indent=2)
            out.write("\n")
        os.chmod(temporary, 0o600)  # whatever the umask
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def resolve(api_flag: str | None, key_flag: str | None, profile_flag: str | None) -> tuple[Connection, Path]:
    """The connection the flags, the environment and the profile give, and the profile's path."""
    settings = ClientSettings()
    path = Path(profile_flag) if profile_flag else (settings.profile or default_profile_path())
    profile = read_profile(path.expanduser())
    api_url = api_flag or settings.api_url or profile.get("api_url") or DEFAULT_API_URL
    for key, source in ((key_flag, "--key"), (settings.api_key, "RLORA_API_KEY"), (profile.get("api_key"), str(path))):
        if key:
            return Connection(api_url, key, source), path
    return Connection(api_url, None, ""), path
