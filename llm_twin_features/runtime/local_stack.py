"""The laptop stack as child processes: the model server, then either `dg dev` (UI, daemon
and code server) or a headless `dagster-daemon` with its own code server.

Used by `llm-twin-features dev` (and so `make run`), by the end-to-end event test and by the
freshness benchmark. Children run in their own process groups and are stopped with SIGINT
(`dg dev`, like `dagster dev`, ignores SIGTERM), then killed if they linger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from llm_twin_features.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # pyproject.toml: the `dg` project
BIN = Path(sys.executable).parent


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until(check, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


class LocalStack:
    def __init__(
        self,
        settings: Settings,
        dagster_home: Path,
        ui_port: int | None = 3000,
        model_port: int | None = None,
        log: IO[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.dagster_home = dagster_home
        self.ui_port = ui_port
        self.model_port = model_port or 8765
        self.log = log
        self.processes: list[subprocess.Popen] = []
        self.home = Path(dagster_home).resolve()
        self.ui_record = ""  # what this stack published in `dagster_ui_file`
        self.env = {**os.environ, "DAGSTER_HOME": str(dagster_home), **(extra_env or {})}
        self.env["LLM_TWIN_DATA_DIR"] = str(settings.resolved_data_dir)
        self.env["VIRTUAL_ENV"] = sys.prefix  # `dg dev --use-active-venv`: this interpreter

    def _start(self, *command: str | Path) -> subprocess.Popen:
        process = subprocess.Popen(
            [str(c) for c in command],
            env=self.env,
            cwd=PROJECT_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
            start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop the children
            # A child of a background job would inherit SIGINT ignored, and could not be stopped.
            preexec_fn=_default_sigint,
        )
        self.processes.append(process)
        return process

    def __enter__(self) -> LocalStack:
        try:
            self._start_model_server()
            if self.ui_port is None:
                self._start_daemon()
            else:
                # `dg dev` in the project root: it loads the code location the project's
                # pyproject.toml names ([tool.dg]), with this interpreter.
                self._start(
                    BIN / "dg",
                    "dev",
                    "--use-active-venv",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.ui_port),
                )
                # `backfill` over the same data dir and Dagster home launches through it.
                self.ui_record = json.dumps(
                    {"url": f"http://127.0.0.1:{self.ui_port}", "dagster_home": str(self.home)}
                )
                dagster_ui_file(self.settings).write_text(self.ui_record)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _start_model_server(self) -> None:
        if self.settings.embedding_service_url:  # an external one is configured: use it
            return
        url = f"http://127.0.0.1:{self.model_port}"
        process = self._start(
            BIN / "llm-twin-features", "serve-models", "--port", str(self.model_port)
        )
        _wait_until(
            lambda: urllib.request.urlopen(url + "/health", timeout=1).status == 200,
            timeout=180,
            what="model server",
            process=process,
        )
        self.env["EMBEDDING_SERVICE_URL"] = url
        # Commands over the same data dir (`search`, `backfill`) find it and use it.
        model_server_file(self.settings).write_text(url)

    def _start_daemon(self) -> None:
        grpc_port = free_port()
        code_server = self._start(
            BIN / "dagster",
            "api",
            "grpc",
            "-m",
            "llm_twin_features.definitions",
            "-h",
            "127.0.0.1",
            "-p",
            str(grpc_port),
        )

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", grpc_port), timeout=1):
                return True

        _wait_until(listening, timeout=120, what="code server", process=code_server)
        workspace = self.dagster_home / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {grpc_port}\n      location_name: llm_twin_features\n"
        )
        self._start(BIN / "dagster-daemon", "run", "-w", workspace)

    def wait(self) -> int:
        """Blocks until the Dagster process exits or Ctrl-C; returns its exit code."""
        try:
            return self.processes[-1].wait()
        except KeyboardInterrupt:
            return 0

    def stop(self, timeout: float = 30) -> None:
        published = model_server_file(self.settings)
        if published.exists() and published.read_text() == self.env.get("EMBEDDING_SERVICE_URL"):
            published.unlink(missing_ok=True)
        ui = dagster_ui_file(self.settings)
        if self.ui_record and ui.exists() and ui.read_text() == self.ui_record:
            ui.unlink(missing_ok=True)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        for process in reversed(self.processes):
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


def model_server_file(settings: Settings) -> Path:
    """Where the laptop stack publishes its model server's URL, next to the stores it serves."""
    return settings.resolved_data_dir / "model_server.url"


def dagster_ui_file(settings: Settings) -> Path:
    """Where the laptop stack publishes its Dagster webserver's URL and Dagster home."""
    return settings.resolved_data_dir / "dagster_ui.json"


def running_dagster_ui(settings: Settings, dagster_home: Path, timeout: float = 0.5) -> str | None:
    """The URL of the Dagster webserver of a laptop stack that runs over this data dir and
    `dagster_home` (its runs are recorded where this process would record its own); None
    when there is none, or it does not answer."""
    try:
        published = json.loads(dagster_ui_file(settings).read_text())
        if Path(published["dagster_home"]).resolve() != Path(dagster_home).resolve():
            return None
        url = str(published["url"])
        with urllib.request.urlopen(url + "/server_info", timeout=timeout) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_model_server(settings: Settings, timeout: float = 0.5) -> str | None:
    """The URL of the laptop stack's model server for this data dir, if one is up with its
    models loaded (a stale file from a killed stack answers nothing and is ignored)."""
    try:
        url = model_server_file(settings).read_text().strip()
        with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError):
        return None


@contextmanager
def model_server_in_environment(url: str) -> Iterator[None]:
    """`EMBEDDING_SERVICE_URL` set to `url` meanwhile: the runs this process starts read their
    resources from the environment. Restored afterwards."""
    previous = os.environ.get("EMBEDDING_SERVICE_URL")
    os.environ["EMBEDDING_SERVICE_URL"] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("EMBEDDING_SERVICE_URL", None)
        else:
            os.environ["EMBEDDING_SERVICE_URL"] = previous


@contextmanager
def helper_model_server(settings: Settings) -> Iterator[str | None]:
    """A model server for one command (a backfill), started before the command's own work.

    Importing torch and loading the model takes a fresh process about 2 s (sentence-transformers,
    for models other than plain BERT ones, 4-6 s more). In a helper process that happens on
    another core while the command imports Dagster and runs the first stages; the runs then
    embed through it (they wait for it if it is still loading, and load the model themselves
    if it died). Yields its URL, with `EMBEDDING_SERVICE_URL` set to it meanwhile; yields
    None, starting nothing, when a model server is configured or this process has a model
    loaded already."""
    from llm_twin_features.domain.embedding import loaded_models

    if settings.embedding_service_url or loaded_models():
        yield None
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [BIN / "llm-twin-features", "serve-models", "--port", str(port), "--exit-with-parent"],
        stdin=subprocess.PIPE,  # closed when this process ends, however it ends: it exits then
        stdout=subprocess.DEVNULL,  # its errors (stderr) stay visible
        start_new_session=True,  # Ctrl-C reaches the command, which stops it
    )
    try:
        with model_server_in_environment(url):
            yield url
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        process.kill()  # it keeps nothing: no need to wait for a graceful stop (seconds)
        process.wait()
