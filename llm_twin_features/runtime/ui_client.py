"""Runs launched through the laptop stack's Dagster webserver, by its GraphQL API.

A command that runs the pipeline in its own process imports Dagster and its storage first
(about 2 s), and qdrant-client, and waits for a Qdrant local folder that the stack's runs may
hold. While `llm-twin-features dev` runs over the same data dir and Dagster home, a command
instead asks the stack's webserver to launch the run: the stack's run coordinator starts it
in a run process that has everything imported (run_launcher.py), it embeds through the
stack's model server, and it queues behind the stack's other runs instead of contending for
the store. This module imports no Dagster: plain HTTP and JSON.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUCCESS = "SUCCESS"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
POLL_SECONDS = 0.1

_JOBS = """
query Jobs {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
  }
}"""

_LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PipelineNotFoundError { message }
    ... on InvalidSubsetError { message }
  }
}"""

_PROGRESS = """
query Progress($runId: ID!, $cursor: String) {
  runOrError(runId: $runId) { __typename ... on Run { status } }
  logsForRun(runId: $runId, afterCursor: $cursor) {
    __typename
    ... on EventConnection { cursor events { __typename ... on LogMessageEvent { message } } }
  }
}"""

_MATERIALIZATIONS = """
query Materializations($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      assetMaterializations {
        assetKey { path }
        metadataEntries {
          label
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
        }
      }
    }
  }
}"""


class UiError(RuntimeError):
    """The webserver refused or failed a request."""


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    status: str
    # asset name -> its materialization's metadata (int, float and text entries)
    materializations: dict[str, dict[str, Any]]

    @property
    def success(self) -> bool:
        return self.status == SUCCESS


class DagsterUi:
    """The GraphQL API of a Dagster webserver at `url`."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _query(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.load(response)
        except (OSError, ValueError) as error:
            raise UiError(f"the Dagster webserver at {self.url} did not answer: {error}") from error
        if reply.get("errors"):
            raise UiError(f"the Dagster webserver at {self.url}: {reply['errors'][0]}")
        return reply["data"]

    def job_location(self, job_name: str) -> tuple[str, str] | None:
        """(code location, repository) that define `job_name`; None: not loaded (yet)."""
        repositories = self._query(_JOBS)["repositoriesOrError"]
        for repository in repositories.get("nodes", []):
            if any(job["name"] == job_name for job in repository["jobs"]):
                return repository["location"]["name"], repository["name"]
        return None

    def launch(
        self,
        job_name: str,
        location: tuple[str, str],
        run_config: dict[str, Any],
        tags: dict[str, str],
    ) -> str:
        """Launches a run of `job_name` (its partition in `tags`, `dagster/partition`)."""
        params = {
            "selector": {
                "repositoryLocationName": location[0],
                "repositoryName": location[1],
                "jobName": job_name,
            },
            "runConfigData": run_config,
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        result = self._query(_LAUNCH, {"params": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            reason = result.get("message") or "; ".join(
                e["message"] for e in result.get("errors", [])
            )
            raise UiError(f"the run was not launched: {result['__typename']}: {reason}")
        return result["run"]["runId"]

    def wait(
        self, run_id: str, on_log: Callable[[str], Any] | None = None, timeout: float | None = None
    ) -> FinishedRun:
        """Polls the run until it has finished, handing each message it logs to `on_log` (the
        stages' progress lines); UiError past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = None
        while True:
            reply = self._query(_PROGRESS, {"runId": run_id, "cursor": cursor})
            run, logs = reply["runOrError"], reply["logsForRun"]
            if run["__typename"] != "Run":
                raise UiError(f"run {run_id}: {run['__typename']}")
            if logs["__typename"] == "EventConnection":
                cursor = logs["cursor"]
                for event in logs["events"]:
                    if on_log is not None and event["__typename"] == "LogMessageEvent":
                        on_log(event["message"])
            if run["status"] in FINISHED:  # its last messages came with this reply
                found = self._query(_MATERIALIZATIONS, {"runId": run_id})["runOrError"]
                return FinishedRun(run_id, run["status"], _materializations(found))
            if deadline is not None and time.monotonic() > deadline:
                raise UiError(f"run {run_id} has not finished within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)


def _materializations(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for event in run.get("assetMaterializations", []):
        metadata = {}
        for entry in event["metadataEntries"]:
            for field in ("intValue", "floatValue", "text"):
                if field in entry:
                    metadata[entry["label"]] = entry[field]
        found[event["assetKey"]["path"][-1]] = metadata
    return found
