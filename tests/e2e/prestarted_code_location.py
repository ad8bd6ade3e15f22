"""A code location for tests/e2e/test_run_launcher.py, which copies it into a temp directory."""

import os
import time
from pathlib import Path

import dagster as dg

if marker := os.environ.get("PRESTARTED_JOBS_IMPORTED"):
    Path(marker).write_text(str(os.getpid()))  # the test sees when a process imported this


@dg.op(config_schema={"path": str})
def write_pid(context: dg.OpExecutionContext) -> None:
    Path(context.op_config["path"]).write_text(str(os.getpid()))


@dg.op
def sleep_long() -> None:
    time.sleep(120)


@dg.job(executor_def=dg.in_process_executor)
def marker_job():
    write_pid()


@dg.job(executor_def=dg.in_process_executor)
def sleeping_job():
    sleep_long()


defs = dg.Definitions(jobs=[marker_job, sleeping_job])
