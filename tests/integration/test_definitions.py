"""The code location's definitions are built once per environment: a prestarted run process
builds them before its run and Dagster loads them again when the run starts."""

from __future__ import annotations

import pytest

from llm_twin_features.definitions import build_definitions


def test_definitions_are_built_once_per_environment(monkeypatch: pytest.MonkeyPatch):
    first = build_definitions()
    assert build_definitions() is first
    # What Dagster sets itself while it executes a run does not count.
    monkeypatch.setenv("SF_PARTNER", "dagster")
    monkeypatch.setenv("DAGSTER_RUN_JOB_NAME", "feature_pipeline_job")
    assert build_definitions() is first
    # A setting does: a model change restarts the code location with new definitions.
    monkeypatch.setenv("EMBEDDING_MODEL", "another-model")
    assert build_definitions() is not first
