"""The run server's local feature store, kept open between steps (`KeptLocalStore`): another
process's request to let go closes it at once between steps, or at the end of the step in
progress, and only once."""

from __future__ import annotations

import threading
from pathlib import Path

from llm_twin_features.stores.feature_store import KeptLocalStore, open_feature_store


def test_a_request_during_a_step_closes_the_store_when_the_step_ends_and_only_then(
    tmp_path: Path,
):
    kept = KeptLocalStore(tmp_path)
    with kept.use() as store:
        pass
    with kept.use() as again:
        assert again is store  # kept open between steps

    in_step, step_done = threading.Event(), threading.Event()

    def step() -> None:
        with kept.use():
            in_step.set()
            step_done.wait()

    worker = threading.Thread(target=step)
    worker.start()
    in_step.wait()
    assert not kept.let_go(timeout=0.1)  # in use: the asker waits for the folder meanwhile
    step_done.set()
    worker.join()
    # Closed at the end of that step: another opener gets the folder at once.
    open_feature_store(None, None, tmp_path, lock_timeout=0).close()

    # The request was served: the next steps keep the store open again.
    with kept.use() as reopened:
        pass
    with kept.use() as again:
        assert again is reopened
    assert kept.let_go(timeout=1)  # between steps: at once
    open_feature_store(None, None, tmp_path, lock_timeout=0).close()
