"""A run process started before its run exists (see run_launcher.py).

It imports Dagster and the code location, builds the repository and what executing a run needs
(the stages' lazily imported libraries, the instance's storage), then waits on stdin for one
line: the serialized `ExecuteRunArgs` of a run. It answers on its reply pipe "run", and executes
the run exactly as `dagster api execute_run` does; or "stale" when a source file of the code
location was edited after this process started (an edit never runs with old code), or "declined"
when it could not prepare the run (the code location failed to load, or the Dagster private API
it needs, dagster_private.py, changed): the launcher then starts that run the usual way, which
reports a code location's error on the run. End of stdin (the launcher closed it, or its process
is gone) or Ctrl-C while waiting ends it quietly.

Usage: python -m llm_twin_features.runtime.run_worker SERIALIZED_REPOSITORY_ORIGIN REPLY_FD
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RUN = "run"
STALE = "stale"
DECLINED = "declined"


def edited_since(started_ns: int) -> list[str]:
    """The imported modules' files, other than installed libraries' (the code location's own,
    an editable install included), modified after `started_ns`: this process runs old code."""
    library_roots = tuple(
        str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}
    )
    edited = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        # A relative path is a made-up one (torch.ops says "_ops.py"), not a source file.
        if (
            not path
            or not os.path.isabs(path)
            or str(Path(path).resolve()).startswith(library_roots)
        ):
            continue
        try:
            if os.stat(path).st_mtime_ns > started_ns:
                edited.append(path)
        except OSError:  # deleted or moved since
            edited.append(path)
    return edited


def preload(serialized_origin: str) -> bool:
    """Imports and builds the code location, and imports what executing a run needs; False if
    that failed (the launcher then starts the run the usual way, which reports a code location's
    error on the run)."""
    try:
        from llm_twin_features.runtime import dagster_private

        dagster_private.prepare_run_execution()  # what `dagster api execute_run` imports
        dagster_private.load_code_location(serialized_origin)
        from llm_twin_features.pipeline import stages

        stages.warm_up()  # what the stages import on first use
        if os.environ.get("DAGSTER_HOME"):  # what opening the run's instance imports
            import dagster as dg

            dg.DagsterInstance.get().dispose()
    except Exception as error:
        print(f"run worker: could not preload the code location: {error!r}", file=sys.stderr)
        return False
    return True


def readable(request: str) -> bool:
    """Whether this process's Dagster reads `request` as the arguments of a run."""
    from llm_twin_features.runtime import dagster_private

    try:
        dagster_private.run_id_of_request(request)
    except Exception as error:
        print(f"run worker: cannot read the run's arguments: {error!r}", file=sys.stderr)
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
        if not preloaded or not readable(request):
            reply.write(DECLINED + "\n")
            return 0
        if edited_since(started_ns):
            reply.write(STALE + "\n")
            return 0
        reply.write(RUN + "\n")
    from llm_twin_features.runtime import dagster_private

    dagster_private.execute_run(request)  # exits
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
