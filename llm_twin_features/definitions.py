"""The code location: every module of `defs/` (assets, checks, jobs, sensors, schedules,
resources), loaded by Dagster's `load_from_defs_folder` (`dg dev`, `dagster dev -m
llm_twin_features.definitions`, `workspace.yaml`)."""

from pathlib import Path

import dagster as dg


def build_definitions() -> dg.Definitions:
    """The definitions with resources read from the environment as it is now."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
