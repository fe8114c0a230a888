"""The deployment files name only real settings and real commands, and fit together: each
engine instance on its own GPU and port, the API tier forwarding to those ports."""

import re
import subprocess
import sys
from pathlib import Path

import httpx

from service.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _env_example() -> dict[str, str]:
    lines = [line for line in (DEPLOY / "rlora.env.example").read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_env_example_names_real_settings_with_valid_values(monkeypatch):
    values = _env_example()
    known = {f"RLORA_{name.upper()}" for name in Settings.model_fields}
    assert set(values) <= known, set(values) - known
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.auto_device_class == "gpu" and settings.adapter_cache_bytes == 4 << 30


def test_systemd_units_run_existing_commands_with_real_settings():
    known = {f"RLORA_{name.upper()}" for name in Settings.model_fields}
    for unit in (DEPLOY / "systemd").glob("*.service"):
        for name, value in re.findall(r"^Environment=(RLORA_\w+)=(.*)$", unit.read_text(), re.M):
            assert name in known, (unit.name, name)
            Settings(**{name.removeprefix("RLORA_").lower(): value})
        for command in re.findall(r"^Exec\w*=\S*/rlora (.+)$", unit.read_text(), re.M):
            subcommand = command.split()[0]
            # Every subcommand with its flags must be one the CLI accepts (its --help parses them).
            result = subprocess.run([sys.executable, "-m", "service.cli", subcommand, "--help"], capture_output=True, text=True)
            assert result.returncode == 0, (unit.name, result.stderr)
            for flag in re.findall(r"--[\w-]+", command):
                assert flag in result.stdout, (unit.name, flag)


def _unit_settings(unit: str) -> Settings:
    """The settings a unit's process reads: the environment file, then the unit's own lines."""
    values = _env_example()
    values.update(re.findall(r"^Environment=(RLORA_\w+)=(.*)$", (DEPLOY / "systemd" / unit).read_text(), re.M))
    return Settings(**{name.removeprefix("RLORA_").lower(): value for name, value in values.items()})


def _exec_arguments(unit: str) -> list[str]:
    return re.search(r"^ExecStart=\S*/rlora (.+)$", (DEPLOY / "systemd" / unit).read_text(), re.M).group(1).split()


def _flag(arguments: list[str], flag: str) -> str:
    return arguments[arguments.index(flag) + 1]


def _engine_ports() -> list[int]:
    """The port of each instance rlora-engine@0 to @9."""
    port = _flag(_exec_arguments("rlora-engine@.service"), "--port")
    return [int(port.replace("%i", str(gpu))) for gpu in range(10)]


def test_each_engine_instance_has_its_own_gpu_and_port():
    unit = (DEPLOY / "systemd" / "rlora-engine@.service").read_text()
    assert re.search(r"^Environment=CUDA_VISIBLE_DEVICES=%i$", unit, re.M)
    arguments = _exec_arguments("rlora-engine@.service")
    assert arguments[0] == "engine" and _flag(arguments, "--device") == "cuda"  # the one GPU it sees
    ports = _engine_ports()
    assert len(set(ports)) == 10 and all(1024 < port < 65536 for port in ports)


def test_the_api_tier_forwards_generation_to_the_engine_ports():
    from service.cli import serve_refusal

    settings = _unit_settings("rlora-api.service")
    workers = int(_flag(_exec_arguments("rlora-api.service"), "--workers"))
    assert workers > 1 and settings.engine_url_list
    assert serve_refusal(settings, workers) is None
    assert {httpx.URL(url).port for url in settings.engine_url_list} <= set(_engine_ports())
    # The engines listen where the API hosts reach them, and only with the token.
    engine = _unit_settings("rlora-engine@.service")
    assert engine.engine_host == "0.0.0.0" and engine.engine_token == settings.engine_token is not None


def test_every_unit_creates_private_files():
    """UMask=0077: the database, uploads and adapters its processes create are their user's alone."""
    units = list((DEPLOY / "systemd").glob("*.service"))
    assert units
    for unit in units:
        assert re.search(r"^UMask=0077$", unit.read_text(), re.M), unit.name
