"""The deployment files name only real settings and real commands, and fit together: each
engine instance on its own GPU and port, the API tier forwarding to those ports; the compose
file valid by the compose specification and the Kubernetes manifests by Kubernetes' schemas
(both shipped by Python packages, read offline), the image built from the project's torch pin."""

import copy
import json
import re
import subprocess
import sys
from functools import cache
from importlib import resources
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.cli import WORKER_STOP_SECONDS
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KNOWN_SETTINGS = {f"RLORA_{name.upper()}" for name in Settings.model_fields}
KUBERNETES_VERSION = "1.33.0"  # the oldest release the manifests are checked against


@cache
def _help(*command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "service.cli", *command, "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def assert_cli_accepts(where: str, arguments: list[str]) -> None:
    """``rlora ARGUMENTS`` names a subcommand the CLI has, with flags it takes (its --help parses)."""
    text = _help(arguments[0])
    for flag in (argument.split("=")[0] for argument in arguments if argument.startswith("--")):
        assert flag in text, (where, flag)
    if "--queues" in arguments:  # device classes the worker takes
        from service.jobs.queue import DEVICE_CLASSES

        assert set(arguments[arguments.index("--queues") + 1].split(",")) <= set(DEVICE_CLASSES), where


def assert_real_settings(where: str, values: dict[str, str]) -> Settings:
    """Every RLORA_* name is a setting, and the values together are valid ones."""
    names = {name for name in values if name.startswith("RLORA_")}
    assert names <= KNOWN_SETTINGS, (where, names - KNOWN_SETTINGS)
    return Settings(**{name.removeprefix("RLORA_").lower(): str(values[name]) for name in names})


def _env_example() -> dict[str, str]:
    lines = [line for line in (DEPLOY / "rlora.env.example").read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_env_example_names_real_settings_with_valid_values(monkeypatch):
    values = _env_example()
    assert set(values) <= KNOWN_SETTINGS, set(values) - KNOWN_SETTINGS
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.auto_device_class == "gpu" and settings.adapter_cache_bytes == 4 << 30


def test_systemd_units_run_existing_commands_with_real_settings():
    for unit in (DEPLOY / "systemd").glob("*.service"):
        assert_real_settings(unit.name, dict(re.findall(r"^Environment=(RLORA_\w+)=(.*)$", unit.read_text(), re.M)))
        for command in re.findall(r"^Exec\w*=\S*/rlora (.+)$", unit.read_text(), re.M):
            assert_cli_accepts(unit.name, command.replace("%i", "gpu").split())  # instances: rlora-worker@gpu, @cpu


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


# --- the image ------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_the_image_has_the_projects_torch_a_non_root_user_and_rlora_as_entry_point():
    dockerfile = _dockerfile()
    makefile_pin = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text()).group(1)
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == makefile_pin
    # A CPU and a CUDA torch, chosen by VARIANT, under one stage that adds the service.
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.M)
    assert {"torch-cpu", "torch-cuda"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    assert final.startswith("\nFROM torch-${VARIANT} AS ")
    assert re.search(r"^USER rlora$", final, re.M) and "useradd --system --uid 10001" in dockerfile
    assert json.loads(re.search(r"^ENTRYPOINT (.+)$", final, re.M).group(1)) == ["rlora"]
    assert_cli_accepts("Dockerfile CMD", json.loads(re.search(r"^CMD (.+)$", final, re.M).group(1)))
    assert_real_settings("Dockerfile ENV", dict(re.findall(r"\b(RLORA_\w+)=(\S+)", dockerfile)))


def test_dockerignore_keeps_out_what_the_image_does_not_copy():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    copied = {source for line in re.findall(r"^COPY (?!--from)(.+)$", _dockerfile(), re.M) for source in line.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "rlora", "service", "worker", "migrations"}
    assert not copied & ignored
    assert {".git", "tests", "docs", "**/__pycache__"} <= ignored


# --- docker compose -----------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _compose_errors(document: dict) -> list[str]:
    # The compose specification's schema, as check-jsonschema vendors it from compose-spec/compose-spec.
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification():
    compose = _compose()
    assert _compose_errors(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_done"  # the check can fail
    assert _compose_errors(broken)


def _interpolated(value: str) -> str:
    """Compose's ``${NAME:-default}`` as its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_services_run_real_commands_with_real_settings():
    for name, service in _compose()["services"].items():
        environment = {key: _interpolated(str(value)) for key, value in service.get("environment", {}).items()}
        if service.get("image", "").startswith("rlora-service"):
            settings = assert_real_settings(f"compose {name}", environment)
            assert settings.home == Path("/var/lib/rlora") and f"rlora-home:{settings.home}" in service["volumes"]
            assert settings.database_url.startswith("postgresql+psycopg://") and "@postgres:" in settings.database_url
            assert settings.broker_url == "redis://redis:6379/0"
            assert_cli_accepts(f"compose {name}", service["command"])


def test_compose_migrates_once_before_the_api_and_lets_workers_hand_their_jobs_back():
    services = _compose()["services"]
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-cpu", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("postgres", "redis", "api", "worker-cpu", "worker-gpu"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("worker-cpu", "worker-gpu"):
        assert services[name]["command"][:2] == ["worker", "--queues"]
        assert services[name]["stop_grace_period"] == f"{WORKER_STOP_SECONDS}s"
        port = services[name]["environment"]["RLORA_WORKER_METRICS_PORT"]
        assert f"127.0.0.1:{port}/metrics" in " ".join(services[name]["healthcheck"]["test"])
    # The GPU worker: only with --profile gpu, the CUDA image, one NVIDIA GPU.
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["command"][-1] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert all("profiles" not in services[name] for name in services if name != "worker-gpu")


# --- Kubernetes ---------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict]]:
    return [
        (path.name, document)
        for path in sorted((DEPLOY / "k8s").glob("*.yaml")) if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text()) if document
    ]


def _kind(kind: str) -> dict[str, dict]:
    return {document["metadata"]["name"]: document for _, document in _manifests() if document["kind"] == kind}


def test_kubernetes_manifests_follow_the_kubernetes_schemas():
    manifests = _manifests()
    assert {document["kind"] for _, document in manifests} >= {
        "Deployment", "Service", "Job", "ConfigMap", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget",
    }
    for name, document in manifests:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(_kind("Deployment")["rlora-api"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # a typo: the check can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    # kustomize applies every manifest in the folder.
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {path.name for path in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def _pods() -> dict[str, dict]:
    """The pod spec of every Deployment and Job, by name."""
    return {name: document["spec"]["template"]["spec"] for kind in ("Deployment", "Job") for name, document in _kind(kind).items()}


def test_kubernetes_pods_run_real_commands_with_real_settings_on_the_shared_home():
    config_map, secret = _kind("ConfigMap")["rlora-settings"], _kind("Secret")["rlora-secrets"]
    settings = assert_real_settings("k8s", {**config_map["data"], **secret["stringData"]})
    claim = _kind("PersistentVolumeClaim")["rlora-home"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # API pods and workers on many nodes
    pods = _pods()
    assert set(pods) == {"rlora-api", "rlora-worker-cpu", "rlora-worker-gpu", "rlora-migrate"}
    for name, pod in pods.items():
        (container,) = pod["containers"]
        assert container["image"].startswith("rlora-service:")
        assert_cli_accepts(name, container["args"])
        assert {source.get("configMapRef", source.get("secretRef"))["name"] for source in container["envFrom"]} == {"rlora-settings", "rlora-secrets"}
        assert_real_settings(name, {env["name"]: env["value"] for env in container.get("env", [])})
        (mount,) = container["volumeMounts"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert mount["mountPath"] == str(settings.home) and volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "rlora-home"
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pods["rlora-migrate"]["containers"][0]["args"] == ["migrate"]


def test_kubernetes_probes_gpu_placement_and_a_graceful_worker_stop():
    api = _pods()["rlora-api"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert api["livenessProbe"]["httpGet"]["path"] == "/health" and api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert port[api["readinessProbe"]["httpGet"]["port"]] == int(api["args"][api["args"].index("--port") + 1])
    service = _kind("Service")["rlora-api"]
    assert service["spec"]["selector"] == _kind("Deployment")["rlora-api"]["spec"]["template"]["metadata"]["labels"]
    settings = assert_real_settings("k8s", _kind("ConfigMap")["rlora-settings"]["data"])
    for device_class in ("cpu", "gpu"):
        deployment = _kind("Deployment")[f"rlora-worker-{device_class}"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["worker", "--queues", device_class]
        # Time to stop at the next step and hand the job back (worker.runner), as `rlora serve` gives its worker.
        assert pod["terminationGracePeriodSeconds"] == WORKER_STOP_SECONDS
        assert {p["containerPort"] for p in container["ports"]} == {settings.worker_metrics_port}
        budget = _kind("PodDisruptionBudget")[f"rlora-worker-{device_class}"]
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    gpu = _pods()["rlora-worker-gpu"]
    assert gpu["containers"][0]["image"] == "rlora-service:cuda" and gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert "nvidia.com/gpu" not in str(_pods()["rlora-worker-cpu"]) and _pods()["rlora-worker-cpu"]["containers"][0]["image"] == "rlora-service:cpu"
    assert _kind("PodDisruptionBudget")["rlora-api"]["spec"]["minAvailable"] >= 1
