"""Secrets: none in the code, the image or compose; the ones set in the environment
(QDRANT_API_KEY, RabbitMQ and MongoDB credentials) are used, and never printed by the CLI,
written to Dagster's instance (run config, event log, compute logs) or shown in reprs.

Real components: the CLI as child processes, the local RabbitMQ (its `guest` account),
Dagster runs on a test instance. No Qdrant or MongoDB server runs here: the API key is checked
on the wire with a small HTTP endpoint that answers like Qdrant and records request headers,
and MongoDB credentials where pymongo holds them after parsing MONGO_URI.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import sync_features
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB
from llm_twin_features.defs.resources import build_resources
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import open_feature_store
from llm_twin_features.stores.queue import BrokerUnavailable, EventPublisher
from llm_twin_features.stores.warehouse import open_warehouse

from ..conftest import STORE_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "llm-twin-features")

# Recognisable, URL-safe secrets: found verbatim wherever they would leak.
MONGO_PASSWORD = "mongo-S3cret-4d0e7a"
RABBITMQ_PASSWORD = "rabbit-S3cret-7f2a91"
QDRANT_API_KEY = "qdrant-S3cret-91bc3e"
SECRETS = (MONGO_PASSWORD, RABBITMQ_PASSWORD, QDRANT_API_KEY)
QDRANT_CLIENT_VERSION = importlib.metadata.version("qdrant-client")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def secret_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """Every secret set; the stores they guard unreachable, so commands fail fast."""
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env.update(
        LLM_TWIN_DATA_DIR=str(data_dir),
        DAGSTER_HOME=str(data_dir / "dagster_home"),
        TOKENIZERS_PARALLELISM="false",
        MONGO_URI=f"mongodb://twin:{MONGO_PASSWORD}@127.0.0.1:{closed_port()}/?authSource=admin",
        QDRANT_URL=f"http://127.0.0.1:{closed_port()}",
        QDRANT_API_KEY=QDRANT_API_KEY,
        RABBITMQ_USER="twin",
        RABBITMQ_PASSWORD=RABBITMQ_PASSWORD,
        RABBITMQ_QUEUE="security_test_never_declared",
    )
    env.update(overrides)
    return {k: v for k, v in env.items() if v != ""}


# --- no credentials in code, image or compose ----------------------------------------------------

SCANNED = (
    "llm_twin_features",
    "bench",
    "deploy",
    "docs",
    ".ci",
    "Dockerfile",
    ".dockerignore",
    "docker-compose.yml",
    "dagster.yaml",
    "workspace.yaml",
    "Makefile",
    ".env.example",
    "pyproject.toml",
    "README.md",
)
URI_CREDENTIALS = re.compile(  # scheme://user:PASSWORD@ (user and password may be ${...})
    r"\b[a-z][a-z0-9+.-]*://(?:\$\{[^}]*\}|[^\s/:@'\"$])+:((?:\$\{[^}]*\}|[^\s@'\"$])+)@"
)
SECRET_NAME = re.compile(r"(?:^|_)(PASSWORD|PASSWD|PASS|SECRET|TOKEN|API_KEY|APIKEY)$", re.I)
# `name = "literal"` (also annotated, or as a keyword argument) in code
CODE_LITERAL = re.compile(r"\b([A-Za-z_]\w*)\s*(?::[^=\n]+)?=\s*[rbuf]?(['\"])(.*?)\2")
# `NAME=value`, `NAME: value`, `ENV NAME=value`, also commented out, in configuration and docs
CONFIG_VALUE = re.compile(
    r"^[\s#>*`-]*(?:export\s+|ENV\s+|ARG\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*[:=]\s*(['\"]?)([^\s'\"#`]*)\2"
)
PLACEHOLDER = re.compile(r"^(\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}?|<[A-Z0-9_]+>|change-me|)$")
CRAWLED_DATA = ROOT / "llm_twin_features" / "sample_data"  # documents' text, not configuration
NOT_SOURCE = {"__pycache__", ".work"}  # bytecode; benchmark output (git-ignored)


def literal_secrets(line: str, code: bool) -> list[str]:
    """Literal secret values written on a line (placeholders and interpolations are not)."""
    found = [m.group(1) for m in URI_CREDENTIALS.finditer(line)]
    if code:
        found += [v for n, _, v in CODE_LITERAL.findall(line) if SECRET_NAME.search(n)]
    elif match := CONFIG_VALUE.match(line):
        found += [match.group(3)] if SECRET_NAME.search(match.group(1)) else []
    return [value for value in found if not PLACEHOLDER.match(value)]


def test_the_secret_detector_finds_literals_and_passes_placeholders():
    for line, code in [
        ('password = "hunter2"', True),
        ('client = connect(api_key="hunter2")', True),
        ("RABBITMQ_PASSWORD=hunter2", False),
        ("# MONGO_ROOT_PASSWORD=hunter2", False),
        ("      QDRANT__SERVICE__API_KEY: hunter2", False),
        ("ENV DAGSTER_POSTGRES_PASSWORD=hunter2", False),
        ("MONGO_URI: mongodb://twin:hunter2@mongo:27017/", False),
        ('uri = "amqp://guest:hunter2@localhost/"', True),
    ]:
        assert literal_secrets(line, code) == ["hunter2"], line
    for line, code in [
        ('password: str = ""', True),
        ("password=self.password or None,", True),
        ('qdrant_api_key=_env("QDRANT_API_KEY", ""),', True),
        ("RABBITMQ_PASSWORD=", False),
        ("# RABBITMQ_PASSWORD=change-me", False),
        ("  RABBITMQ_PASSWORD: ${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD in .env}", False),
        ("MONGO_URI: mongodb://${MONGO_APP_USER:-twin}:${MONGO_APP_PASSWORD:?set}@mongo/", False),
        ("TOKENIZERS_PARALLELISM=false", False),
    ]:
        assert literal_secrets(line, code) == [], line


def scanned_files() -> Iterator[Path]:
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (
                p for p in sorted(path.rglob("*")) if p.is_file() and not NOT_SOURCE & set(p.parts)
            )


def test_no_credentials_in_code_images_or_compose():
    """Every file of the package, the image (Dockerfile, .dockerignore), compose, the Dagster
    and CI configuration and the docs: no URI carries a literal password, and no variable or
    field named like a secret (…PASSWORD, …SECRET, …TOKEN, …API_KEY) is given a literal value
    (compose's `${VAR:?…}` interpolation and the `change-me` placeholder of .env.example are
    not values). The image: its build context admits no `.env`, and it bakes no secret."""
    findings = []
    files = [p for p in scanned_files() if CRAWLED_DATA not in p.parents]
    assert len(files) > 20
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        code = path.suffix in (".py", ".js")
        for number, line in enumerate(text.splitlines(), start=1):
            if literal_secrets(line, code):
                findings.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert findings == []

    dockerignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert dockerignore[0] == "*"  # everything excluded, then a few paths admitted
    assert not any(".env" in line for line in dockerignore if line.startswith("!"))
    baked = re.findall(r"^(?:ENV|ARG)\s+(.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    names = [part.split("=")[0] for line in baked for part in line.split() if part != "\\"]
    assert names and not [n for n in names if SECRET_NAME.search(n.upper())]


# --- reprs ---------------------------------------------------------------------------------------


def set_secrets(monkeypatch: pytest.MonkeyPatch, **overrides: str) -> None:
    for name, value in secret_env(Path(os.environ["LLM_TWIN_DATA_DIR"]), **overrides).items():
        monkeypatch.setenv(name, value)
    for name in overrides:
        if not overrides[name]:
            monkeypatch.delenv(name, raising=False)


def test_settings_broker_config_and_resources_mask_rabbitmq_and_qdrant_secrets(
    data_dir, monkeypatch
):
    """With every secret in the environment: the CLI's Settings (repr, str, JSON dump), the
    broker config it builds, and the Dagster resources as defined (`dg.EnvVar`: the variable's
    name, not its value) show neither the RabbitMQ password nor the Qdrant API key."""
    set_secrets(monkeypatch)
    settings = Settings()
    assert settings.rabbitmq_password.get_secret_value() == RABBITMQ_PASSWORD
    assert settings.qdrant_api_key.get_secret_value() == QDRANT_API_KEY
    broker = settings.broker_config()
    assert broker.password == RABBITMQ_PASSWORD
    texts = [repr(settings), str(settings), settings.model_dump_json(), repr(broker), str(broker)]
    for text in texts:
        assert RABBITMQ_PASSWORD not in text and QDRANT_API_KEY not in text
    resources = build_resources()
    assert not leaks(repr(resources))
    assert resources["event_broker"].password == "RABBITMQ_PASSWORD"  # an EnvVar: the name
    assert resources["warehouse"].mongo_uri == "MONGO_URI"


def test_settings_repr_hides_the_mongodb_password(data_dir, monkeypatch):
    """MONGO_URI carries the MongoDB password; Settings' repr and str must not show it."""
    set_secrets(monkeypatch)
    settings = Settings()
    assert MONGO_PASSWORD in settings.mongo_uri  # the value is there to be used...
    assert MONGO_PASSWORD not in repr(settings)  # ...but not shown
    assert MONGO_PASSWORD not in str(settings)


# --- the CLI and Dagster never print or store a secret ---------------------------------------


def files_leaking(directory: Path) -> list[str]:
    """Files under `directory` whose bytes contain a secret (sqlite databases included)."""
    found = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    return found


def test_cli_commands_never_print_a_secret(tmp_path: Path):
    """Every secret set, and the stores they guard unreachable (nothing listens on the ports
    of MONGO_URI and QDRANT_URL; RabbitMQ refuses `twin` with that password), so each
    command fails on the guarded store, all at once: ingest, delete, status, audit, search
    with MongoDB down; ingest and delete on the embedded warehouse with RabbitMQ refusing;
    backfill on the embedded warehouse with Qdrant down (retried by the real policy). Must
    hold: each fails with a clear message naming the store, and no secret appears in any
    output, nor in any file of the data dir and Dagster home (sqlite event logs, compute
    logs) the backfill wrote."""
    post = {
        "type": "posts",
        "_id": "security-post",
        "platform": "linkedin",
        "content": {"text": "Secrets belong in the environment, never in the code."},
        "author_id": "a1",
    }
    source = tmp_path / "post.jsonl"
    source.write_text(json.dumps(post) + "\n")
    mongo_down = secret_env(tmp_path / "mongo_down")
    embedded = secret_env(tmp_path / "embedded", MONGO_URI="")
    commands = {
        "ingest, MongoDB down": (
            mongo_down,
            ["ingest", str(source)],
            "error: warehouse unreachable",
        ),
        "delete, MongoDB down": (
            mongo_down,
            ["delete", "x", "--type", "posts"],
            "error: warehouse unreachable",
        ),
        "status, MongoDB down": (mongo_down, ["status", "--json"], "error: warehouse unreachable"),
        "audit, MongoDB down": (mongo_down, ["audit", "--json"], "error: warehouse unreachable"),
        "search, Qdrant down": (mongo_down, ["search", "vector database"], "error: Qdrant at"),
        "ingest, RabbitMQ refuses": (embedded, ["ingest", str(source)], "ACCESS_REFUSED"),
        "delete, RabbitMQ refuses": (
            embedded,
            ["delete", "security-post", "--type", "posts"],
            "ACCESS_REFUSED",
        ),
        "backfill, Qdrant down": (
            embedded,
            ["backfill", "--type", "posts"],
            "posts: FAILED",
        ),
    }
    # The embedded warehouse gets its document first, so the backfill has work to fail on.
    seeded = subprocess.run(
        [CLI, "ingest", "--no-publish", str(source)],
        env=embedded,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert seeded.returncode == 0, seeded.stderr
    processes = {
        name: subprocess.Popen(
            [CLI, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (env, argv, _) in commands.items()
    }
    outputs = {}
    try:
        for name, process in processes.items():
            out, err = process.communicate(timeout=180)
            outputs[name] = (process.returncode, out + err)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(30)

    for name, (_, _, expected) in commands.items():
        code, output = outputs[name]
        assert not leaks(output), (name, output[-2000:])
        assert expected in output, (name, output[-2000:])
        assert code != 0, name
    for name in ("ingest, RabbitMQ refuses", "delete, RabbitMQ refuses"):
        assert "change events were NOT published" in outputs[name][1]
    assert "unreachable" in outputs["backfill, Qdrant down"][1]
    assert files_leaking(tmp_path / "embedded") == []
    assert (tmp_path / "embedded" / "dagster_home" / "storage").is_dir()


def test_dagster_runs_and_sensor_ticks_keep_secrets_out_of_the_instance(
    data_dir, tmp_path, monkeypatch
):
    """Every secret set: a run of feature_pipeline_job whose warehouse (MONGO_URI with a
    password) is down, and a tick of warehouse_events_sensor that RabbitMQ refuses. Must
    hold: the run fails with "warehouse unreachable", the tick is skipped with the broker's
    refusal, and no secret is in the run's config, tags, event log, compute logs or any file
    of the instance. (One attempt: the step's retries are turned off for the test.)"""
    set_secrets(monkeypatch)
    monkeypatch.setattr(sync_features.op, "_retry_policy", None)
    instance_dir = tmp_path / "instance"
    instance_dir.mkdir()
    with dg.instance_for_test(temp_dir=str(instance_dir)) as instance:
        defs = build_definitions()
        result = defs.resolve_job_def(FEATURE_PIPELINE_JOB).execute_in_process(
            instance=instance, partition_key="posts", raise_on_error=False
        )
        assert not result.success
        sensor = defs.resolve_sensor_def("warehouse_events_sensor")
        tick = sensor.evaluate_tick(
            dg.build_sensor_context(
                instance=instance,
                definitions=defs,
                resources=defs.get_repository_def().get_top_level_resources(),
            )
        )
        run = instance.get_run_by_id(result.run_id)
        records = instance.all_logs(result.run_id)
    texts = [json.dumps(run.run_config, default=str), json.dumps(dict(run.tags))]
    texts += [repr(record) for record in records]
    assert any("warehouse unreachable" in text for text in texts)
    assert "ACCESS_REFUSED" in tick.skip_message
    texts.append(tick.skip_message)
    assert [leaks(text) for text in texts if leaks(text)] == []
    assert files_leaking(instance_dir) == []


# --- credentials set in the environment are used ------------------------------------------------


def resolved(name: str):
    """The Dagster resource `name` of the code location, initialised as a run would (its
    `dg.EnvVar` fields read from the environment now)."""
    with dg.build_resources({name: build_resources()[name]}) as resources:
        return getattr(resources, name)


class RecordingQdrant(ThreadingHTTPServer):
    """Answers the few Qdrant REST calls `status` makes (no collection exists) and records
    each request's path and `api-key` header."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("api-key")))
                path = self.path.split("?")[0]
                if path == "/":
                    body, status = {"title": "qdrant", "version": QDRANT_CLIENT_VERSION}, 200
                elif path == "/collections":
                    body, status = {"result": {"collections": []}, "status": "ok"}, 200
                elif path == "/aliases":
                    body, status = {"result": {"aliases": []}, "status": "ok"}, 200
                elif path.endswith("/exists"):
                    body, status = {"result": {"exists": False}, "status": "ok"}, 200
                else:
                    body, status = {"status": {"error": "Not found"}}, 404
                payload = json.dumps({**body, "time": 0.0}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for_version_checks(self, clients: int, timeout: float = 15) -> None:
        """qdrant-client checks the server version on a thread of its own: wait for those
        requests before the server goes away, so every client's requests are recorded."""
        deadline = time.monotonic() + timeout
        while sum(path == "/" for path, _ in self.requests) < clients:
            assert time.monotonic() < deadline, self.requests
            time.sleep(0.05)

    def __enter__(self) -> RecordingQdrant:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()
        self.server_close()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_credentials_set_in_the_environment_are_used(data_dir, broker, monkeypatch, capsys):
    """RabbitMQ: RABBITMQ_USER/RABBITMQ_PASSWORD reach the real broker from the CLI's settings
    and from the Dagster resource (the right password is let in, a wrong one refused with
    ACCESS_REFUSED, which proves it is sent). Qdrant: QDRANT_API_KEY is sent as the `api-key`
    header on every request of `llm-twin-features status` and of the Dagster resource.
    MongoDB: the user, password and authSource of MONGO_URI are the credentials pymongo holds,
    from both paths (no MongoDB server runs here to log in to)."""
    from llm_twin_features.events.schema import ChangeEvent

    monkeypatch.setenv("RABBITMQ_USER", "guest")
    monkeypatch.setenv("RABBITMQ_PASSWORD", "guest")  # the local broker's loopback account
    event = ChangeEvent(type="posts", entry_id="credentials", op="insert")
    from_settings = Settings().broker_config()
    from_resource = resolved("event_broker").config()
    for config in (from_settings, from_resource):
        assert (config.user, config.password, config.queue) == ("guest", "guest", broker.queue)
        with EventPublisher(config) as publisher:
            assert publisher.publish([event]) == 1
    monkeypatch.setenv("RABBITMQ_PASSWORD", RABBITMQ_PASSWORD)  # not guest's password
    for config in (
        Settings().broker_config(),
        resolved("event_broker").config(),
    ):
        with pytest.raises(BrokerUnavailable, match="ACCESS_REFUSED") as refused:
            EventPublisher(config).__enter__()
        assert not leaks(str(refused.value))

    with RecordingQdrant() as qdrant:
        monkeypatch.setenv("QDRANT_URL", qdrant.url)
        monkeypatch.setenv("QDRANT_API_KEY", QDRANT_API_KEY)
        capsys.readouterr()
        assert cli.main(["status", "--json"]) == 0
        out, err = capsys.readouterr()
        assert not leaks(out + err)
        assert [json.loads(line)["cleaned"] for line in out.splitlines()] == [0, 0, 0]
        from_cli = len(qdrant.requests)
        with resolved("feature_store").open() as store:
            assert not store.exists("vector_posts")
        qdrant.wait_for_version_checks(clients=2)
    assert from_cli >= 4 and len(qdrant.requests) > from_cli
    assert {key for _, key in qdrant.requests} == {QDRANT_API_KEY}
    with RecordingQdrant() as control:  # no key set: none sent
        open_feature_store(control.url, None, data_dir).close()
        control.wait_for_version_checks(clients=1)
    assert control.requests and {key for _, key in control.requests} == {None}

    uri = f"mongodb://twin:{MONGO_PASSWORD}@127.0.0.1:{closed_port()}/?authSource=admin"
    monkeypatch.setenv("MONGO_URI", uri)
    for mongo_uri in (Settings().mongo_uri, resolved("warehouse").mongo_uri):
        warehouse = open_warehouse(mongo_uri, "twin", "twin_features", data_dir)
        try:
            credentials = warehouse.client.options.pool_options._credentials  # pymongo's parse
            assert (credentials.username, credentials.password, credentials.source) == (
                "twin",
                MONGO_PASSWORD,
                "admin",
            )
        finally:
            warehouse.close()
