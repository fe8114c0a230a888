"""The deployment files name only real settings and real commands."""

import re
import subprocess
import sys
from pathlib import Path

from service.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_env_example_names_real_settings_with_valid_values(monkeypatch):
    lines = [line for line in (DEPLOY / "rlora.env.example").read_text().splitlines() if line and not line.startswith("#")]
    values = dict(line.split("=", 1) for line in lines)
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
