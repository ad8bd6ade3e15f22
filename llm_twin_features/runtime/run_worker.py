"""A run process started before its run exists (see run_launcher.py).

It imports Dagster and the code location, builds the repository, then waits on stdin for one
line: the serialized `ExecuteRunArgs` of a run. It answers on its reply pipe "run", and
executes the run exactly as `dagster api execute_run` does, or "stale" when a source file of
the code location was edited after this process started (the launcher then starts that run
the usual way: an edit never runs with old code). End of stdin (the launcher closed it, or
its process is gone) or Ctrl-C while waiting ends it quietly.

Usage: python -m llm_twin_features.runtime.run_worker SERIALIZED_REPOSITORY_ORIGIN REPLY_FD
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RUN = "run"
STALE = "stale"


def edited_since(started_ns: int) -> list[str]:
    """The imported modules' files, other than installed libraries' (the code location's own,
    an editable install included), modified after `started_ns`: this process runs old code."""
    library_roots = tuple(
        str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}
    )
    edited = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or str(Path(path).resolve()).startswith(library_roots):
            continue
        try:
            if os.stat(path).st_mtime_ns > started_ns:
                edited.append(path)
        except OSError:  # deleted or moved since
            edited.append(path)
    return edited


def preload(serialized_origin: str) -> bool:
    """Imports and builds the code location; False if that failed (the launcher then starts
    the run the usual way, which reports the error on the run)."""
    from dagster._cli.api import api_cli  # noqa: F401  (what `dagster api execute_run` imports)
    from dagster._core.origin import RepositoryPythonOrigin
    from dagster._serdes import deserialize_value
    from dagster._utils.hosted_user_process import recon_repository_from_origin

    try:
        origin = deserialize_value(serialized_origin, RepositoryPythonOrigin)
        recon_repository_from_origin(origin).get_definition()
    except Exception as error:
        print(f"run worker: could not preload the code location: {error}", file=sys.stderr)
        return False
    return True


def main(argv: list[str]) -> int:
    started_ns = time.time_ns()  # an edit after this may be missing from what gets imported
    serialized_origin, reply_fd = argv[1], int(argv[2])
    with os.fdopen(reply_fd, "w") as reply:
        try:
            preloaded = preload(serialized_origin)
            request = sys.stdin.readline().strip()
        except KeyboardInterrupt:  # `dagster dev` stopping while this process waited
            return 0
        if not request:
            return 0
        if not preloaded or edited_since(started_ns):
            reply.write(STALE + "\n")
            return 0
        reply.write(RUN + "\n")
    from dagster._cli.api import api_cli

    api_cli.main(args=["execute_run", request], prog_name="dagster api")  # exits
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
