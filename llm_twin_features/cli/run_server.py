"""The run server: a warm `backfill` for commands run without the laptop stack.

A `backfill` that runs its pipeline runs in its own process first imports Dagster, its storage,
qdrant-client and the definitions, and opens the Qdrant local folder, which loads every point:
3-4 s before a one-document edit or delete does anything. So such a command, once done, starts
this process in the background (unless `RUN_SERVER_IDLE_SECONDS=0`). It prepares all of that
once, loads the embedding models, and takes the next commands' runs over a local socket
(`run_through_server`): the runs execute here as in the command's own process (`InProcessRuns`,
recorded in the same Dagster instance), and their output streams back to the command. It keeps
the local feature store open between runs (`KeptLocalStore`), and lets go of it between two
steps when another process asks for the folder.

It serves only commands with its own configuration (`Settings.fingerprint`) and code: after a
source file was edited it declines and exits. It exits after `RUN_SERVER_IDLE_SECONDS` without
a command, on SIGTERM (`stop_run_server`), when a newer server is published over the same data
dir, or when its data dir is gone. If it dies during a run, the command runs the same runs
itself (they are idempotent): nothing is lost. Its log is `run_server.log` in the data dir.

Usage: python -m llm_twin_features.cli.run_server  (the environment is the command's)
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llm_twin_features.cli.common import err, prepare_dagster_home
from llm_twin_features.settings import Settings

if TYPE_CHECKING:
    from llm_twin_features.cli.runs import Run
    from llm_twin_features.stores.feature_store import KeptLocalStore

RUN = "run"
QUEUED = "queued"
ACCEPTED = "accepted"
GO = "go"
DECLINED = "declined"
EXIT = "exit"
# A command waits this long for a server that is still starting (importing, loading models)
# to answer; past it, it runs its runs itself. Queued behind another command's runs, it waits
# as long as those take.
ACCEPT_TIMEOUT_SECONDS = 60.0
SEND_TIMEOUT_SECONDS = 30.0


def server_file(settings: Settings) -> Path:
    """Where the run server of a data dir publishes its port, token and configuration."""
    return settings.resolved_data_dir / "run_server.json"


def log_file(settings: Settings) -> Path:
    return settings.resolved_data_dir / "run_server.log"


def _published(settings: Settings) -> dict[str, Any] | None:
    """The run server published for the data dir, if its process still runs (the same
    process: a pid reused after a crash has another start time)."""
    from llm_twin_features.runtime.dead_runs import owner_gone

    try:
        published = json.loads(server_file(settings).read_text())
        return None if owner_gone(published["owner"]) else published
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Readers see the old file or the whole new one; only this user can read the token."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(json.dumps(payload))
    partial.replace(path)


def _unlink_if_mine(path: Path, token: str) -> None:
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass


# --- the command's side -----------------------------------------------------------------------


def run_through_server(
    settings: Settings, home: Path, runs: list[Run], trigger: str, force: bool
) -> int | None:
    """The runs executed by the data dir's run server, its output streamed here; the exit code,
    or None when no server took them (none running, another configuration or code, or it
    stopped during the runs): the caller runs them itself."""
    published = _published(settings)
    if published is None:
        return None
    request = {
        "token": published["token"],
        "request": RUN,
        "fingerprint": settings.fingerprint(),
        "dagster_home": str(home),
        "runs": [asdict(run) for run in runs],
        "trigger": trigger,
        "force": force,
    }
    try:
        connection = socket.create_connection(("127.0.0.1", int(published["port"])), timeout=2)
    except OSError:
        return None
    with connection:
        try:
            connection.sendall(json.dumps(request).encode() + b"\n")
            connection.settimeout(ACCEPT_TIMEOUT_SECONDS)
            replies = connection.makefile("r", encoding="utf-8")
            first = json.loads(replies.readline() or "{}")
            if first.get(QUEUED):
                err(f"{trigger}: waiting for the run server to finish another command's runs")
                connection.settimeout(None)
                first = json.loads(replies.readline() or "{}")
        except (OSError, ValueError):
            return None
        if first.get(DECLINED):
            err(f"{trigger}: the run server declined ({first[DECLINED]}); running here")
            return None
        if not first.get(ACCEPTED):
            return None
        try:
            connection.sendall(f"{GO}\n".encode())
        except OSError:
            return None
        print(
            f"{trigger}: through the run server (process {published['pid']}, kept from an "
            "earlier command; RUN_SERVER_IDLE_SECONDS=0 turns it off)",
            flush=True,
        )
        connection.settimeout(None)
        try:
            for line in replies:
                reply = json.loads(line)
                if EXIT in reply:
                    return int(reply[EXIT])
                stream = sys.stdout if reply.get("fd") == 1 else sys.stderr
                stream.write(reply["text"])
                stream.flush()
        except KeyboardInterrupt:
            err(f"stopped waiting; the runs go on in the run server (log: {log_file(settings)})")
            return 130
        except (OSError, ValueError):
            pass
    err(
        f"{trigger}: the run server stopped during the runs (log: {log_file(settings)}); "
        "running them here"
    )
    return None


def start_run_server(settings: Settings, home: Path) -> None:
    """Starts the data dir's run server in the background, unless one with this configuration
    runs already or `run_server_idle_seconds` is 0; it outlives this command."""
    if settings.run_server_idle_seconds <= 0:
        return
    published = _published(settings)
    if published is not None and published.get("fingerprint") == settings.fingerprint():
        return
    with open(log_file(settings), "a") as log:
        subprocess.Popen(
            [sys.executable, "-m", "llm_twin_features.cli.run_server"],
            env={**os.environ, "DAGSTER_HOME": str(home)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal is the command's, not its
        )


def stop_run_server(settings: Settings, timeout: float = 30.0) -> bool:
    """Stops the data dir's run server (SIGTERM: it finishes closing the store); whether one
    was running."""
    published = _published(settings)
    if published is None:
        return False
    from llm_twin_features.runtime.dead_runs import owner_gone

    pid = int(published["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ChildProcessError):  # this process's child: reap it
                os.waitpid(pid, os.WNOHANG)
            if owner_gone(published["owner"]):
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    except ProcessLookupError:
        pass
    return True


# --- the server ---------------------------------------------------------------------------------


class _Stream(io.TextIOBase):
    """sys.stdout or sys.stderr of a run, as JSON lines to the command; once the command is
    gone (Ctrl-C), the output is dropped and the runs go on."""

    def __init__(self, sink: _Sink, fd: int) -> None:
        self.sink, self.fd = sink, fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.sink.send({"fd": self.fd, "text": text})
        return len(text)


class _Sink:
    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.lock = threading.Lock()
        self.gone = False

    def send(self, reply: dict[str, Any]) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                self.connection.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                self.gone = True


class RunServer:
    def __init__(self, settings: Settings) -> None:
        self.started_ns = time.time_ns()  # a source edit after this: decline, and exit
        self.settings = settings
        self.fingerprint = settings.fingerprint()
        self.home = prepare_dagster_home(settings)
        self.token = secrets.token_hex(16)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(1.0)
        self.port = self.listener.getsockname()[1]
        self.run_lock = threading.Lock()
        self.activity = threading.Lock()  # guards `busy` and `last_used`
        self.busy = 0  # connections being handled
        self.last_used = time.monotonic()
        self.stopping = False
        self.kept: KeptLocalStore | None = None

    def publish(self) -> None:
        """Published before anything is imported: a command that comes meanwhile queues on the
        socket instead of starting a second import of everything beside this one."""
        from llm_twin_features.runtime.dead_runs import owner_tags

        record = {"pid": os.getpid(), "owner": owner_tags(), "port": self.port, "token": self.token}
        _write_atomically(server_file(self.settings), {**record, "fingerprint": self.fingerprint})
        if not self.settings.qdrant_url:
            from llm_twin_features.stores.feature_store import holder_file, keep_local_store

            self.kept = keep_local_store(self.settings.resolved_data_dir)
            _write_atomically(holder_file(self.settings.resolved_data_dir), record)

    def prepare(self) -> None:
        """Everything a run needs, once: Dagster, the definitions and instance, the stages'
        libraries, the models (a thread: the first runs need not wait for them)."""
        from llm_twin_features.cli.runs import InProcessRuns
        from llm_twin_features.pipeline import stages

        self.runner = InProcessRuns(self.home)
        stages.warm_up()
        import qdrant_client.local.qdrant_local  # noqa: F401

        if not self.settings.embedding_service_url:
            threading.Thread(target=self._load_models, daemon=True, name="models").start()

    def _load_models(self) -> None:
        from llm_twin_features.domain.data_types import data_types
        from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

        for data_type in data_types():
            EmbeddingDispatcher.embedder(data_type, self.settings).model  # noqa: B018

    def serve(self) -> None:
        idle = self.settings.run_server_idle_seconds
        while not self.stopping:
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                with self.activity:
                    if self.busy:
                        continue
                    idle_for = time.monotonic() - self.last_used
                if idle_for > idle:
                    print(f"run server: idle for {idle:.0f} s; exiting", flush=True)
                    return
                if not self._still_published():
                    print("run server: replaced or its data dir is gone; exiting", flush=True)
                    return
                continue
            with self.activity:
                self.busy += 1
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _still_published(self) -> bool:
        try:
            return json.loads(server_file(self.settings).read_text())["token"] == self.token
        except (OSError, ValueError, KeyError):
            return False

    def close(self) -> None:
        """Unpublished at once; the store closed once a run in progress has ended (30 s at
        most: past that, the process exits during the run, and its command runs it itself)."""
        self.stopping = True
        _unlink_if_mine(server_file(self.settings), self.token)
        if self.kept is not None:
            from llm_twin_features.stores.feature_store import holder_file

            _unlink_if_mine(holder_file(self.settings.resolved_data_dir), self.token)
            if self.run_lock.acquire(timeout=30):
                self.kept.let_go(timeout=30)
        self.listener.close()

    def _handle(self, connection: socket.socket) -> None:
        try:
            with connection:
                self._answer(connection)
        finally:
            with self.activity:
                self.busy -= 1
                self.last_used = time.monotonic()

    def _answer(self, connection: socket.socket) -> None:
        from llm_twin_features.stores.feature_store import LET_GO

        # A command that stops reading (suspended, or piped into a pager) is dropped after
        # this long instead of holding up the runs, the store and the commands behind it.
        connection.settimeout(SEND_TIMEOUT_SECONDS)
        reader = connection.makefile("r", encoding="utf-8")
        try:
            request = json.loads(reader.readline())
        except (OSError, ValueError):
            return
        if not isinstance(request, dict) or not hmac.compare_digest(
            str(request.get("token")), self.token
        ):
            return
        sink = _Sink(connection)
        if request.get("request") == LET_GO:  # another process wants the local store
            timeout = min(float(request.get("timeout", 5.0)), SEND_TIMEOUT_SECONDS)
            closed = self.kept.let_go(timeout) if self.kept is not None else False
            sink.send({"closed": closed})
        elif request.get("request") == RUN:
            self._run(request, sink, reader)

    def _run(self, request: dict[str, Any], sink: _Sink, reader: IO[str]) -> None:
        from llm_twin_features.cli.runs import Run
        from llm_twin_features.runtime.run_worker import edited_since

        if request["fingerprint"] != self.fingerprint:
            sink.send({DECLINED: "the command's configuration differs from its own"})
            return
        if Path(request["dagster_home"]) != self.home:
            sink.send({DECLINED: f"it records runs in {self.home}"})
            return
        if not self.run_lock.acquire(blocking=False):
            sink.send({QUEUED: True})  # the command waits without a time limit from now on
            self.run_lock.acquire()
        try:
            if self.stopping:
                return  # the command runs them itself
            edited = edited_since(self.started_ns)
            if edited:
                self.stopping = True
                sink.send({DECLINED: f"{edited[0]} was edited since it started; it exits"})
                return
            sink.send({ACCEPTED: True})
            # The command may have given up waiting and run them itself: only a command that
            # answers gets its runs run here.
            try:
                if reader.readline().strip() != GO:
                    return
            except OSError:
                return
            runs = [Run(**run) for run in request["runs"]]
            with _output_to(sink):
                try:
                    code = self.runner.run(runs, request["trigger"], bool(request["force"]))
                except Exception as error:  # reported to the command, which exits 1
                    print(f"run server: the runs failed: {error!r}", file=sys.stderr)
                    code = 1
            sink.send({EXIT: code})
        finally:
            self.run_lock.release()


@contextlib.contextmanager
def _output_to(sink: _Sink) -> Iterator[None]:
    """The run's prints and Dagster's console log (its handler takes sys.stderr when the run
    starts) go to the command."""
    with contextlib.redirect_stdout(_Stream(sink, 1)), contextlib.redirect_stderr(_Stream(sink, 2)):
        yield


def _exit(*_: object) -> None:
    raise SystemExit(0)  # in the main thread: `close` below still runs


def main() -> int:
    signal.signal(signal.SIGTERM, _exit)
    server = RunServer(Settings())
    try:
        server.publish()
        server.prepare()
        print(f"run server: ready on port {server.port} (process {os.getpid()})", flush=True)
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
