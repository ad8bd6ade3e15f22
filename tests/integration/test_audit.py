"""The audit finds every kind of drift, reports it (CLI, asset check) and the repair heals it,
both from the CLI and through the scheduled audit -> repair sensor path."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.cli.common import feature_store_of, warehouse_of
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import FEATURE_ASSET_KEYS, run_scope, scoped_run_config
from llm_twin_features.defs.checks import REPAIR_IDS_KEY, WAREHOUSE_AUDIT
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB
from llm_twin_features.domain.models import chunk_point_id, document_point_id
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import Point, cleaned_collection, vector_collection

from ..conftest import SAMPLE_CORPUS

LONG_ARTICLE = "0c67a2cb-603c-4616-b7a2-2873705bdd12"


@pytest.fixture
def backfilled(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli.main(["ingest", "--no-publish", str(SAMPLE_CORPUS)]) == 0
    with dg.instance_for_test() as instance:
        job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
        assert job.execute_in_process(instance=instance, partition_key="articles").success
        yield instance


def article_ids() -> list[str]:
    with warehouse_of(Settings()) as warehouse:
        return sorted(warehouse.documents("articles").ids() - {LONG_ARTICLE})


def make_drift() -> dict[str, str]:
    """One document per kind of drift, made behind the pipeline's back."""
    ids = [i for i in article_ids() if not i.startswith("invalid-")]
    drift = {
        "missing": ids[0],
        "stale": ids[1],
        "chunks_without_vectors": LONG_ARTICLE,
        "without_vectors": ids[2],
        "wrong_model": ids[3],
        "orphans": "ghost-article",
    }
    with warehouse_of(Settings()) as warehouse:
        articles = warehouse.documents("articles")
        stale = articles.get(drift["stale"])
        stale["content"]["Content"] += "\n\nA late correction."
        articles.replace_many([stale])
    with feature_store_of(Settings()) as store:
        vectors = vector_collection("articles")
        store.delete_points(
            cleaned_collection("articles"), [document_point_id("articles", drift["missing"])]
        )
        store.delete_points(vectors, [chunk_point_id("articles", LONG_ARTICLE, 1)])
        store.delete_points(
            vectors, [p.id for p in store.points(vectors, [drift["without_vectors"]])]
        )
        (point,) = list(store.points(vectors, [drift["wrong_model"]], with_vectors=True))[:1]
        store.upsert(
            vectors,
            [Point(id=point.id, vector=point.vector, payload={**point.payload, "model_id": "old"})],
        )
        store.upsert(
            vectors,
            [
                Point(
                    id="00000000-0000-4000-8000-0000000000aa",
                    vector=point.vector,
                    payload={**point.payload, "document_id": "ghost-article"},
                )
            ],
        )
    return drift


def test_audit_cli_reports_every_kind_of_drift_and_repairs_it(backfilled, capsys):
    assert cli.main(["audit", "--type", "articles"]) == 0
    drift = make_drift()
    capsys.readouterr()

    assert cli.main(["audit", "--type", "articles", "--json"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["in_sync"] is False
    for kind, document_id in drift.items():
        assert report[kind] == 1, kind
        assert report["examples"][kind] == [document_id]
    assert "audit --repair" in err

    assert cli.main(["audit", "--type", "articles", "--repair"]) == 0
    out, _ = capsys.readouterr()
    assert "audit-repair: articles" in out and "repaired" in out
    assert cli.main(["audit"]) == 1  # posts and repositories were never backfilled here
    assert cli.main(["audit", "--type", "articles"]) == 0


def repair_requests(defs: dg.Definitions, instance: dg.DagsterInstance, audit_run) -> dict:
    """What `audit_repair_sensor` requests after `audit_run`, by partition."""
    context = dg.build_run_status_sensor_context(
        sensor_name="audit_repair_sensor",
        dagster_instance=instance,
        dagster_run=audit_run.dagster_run,
        dagster_event=audit_run.get_run_success_event(),
    )
    return {r.partition_key: r for r in defs.resolve_sensor_def("audit_repair_sensor")(context)}


def test_scheduled_audit_requests_scoped_repair_runs(backfilled):
    drift = make_drift()
    defs = build_definitions()
    instance = backfilled

    audit_run = defs.resolve_job_def("audit_job").execute_in_process(instance=instance)
    assert audit_run.success  # a failed check is a finding, not a failed run
    (evaluation,) = audit_run.get_asset_check_evaluations()
    assert evaluation.check_name == WAREHOUSE_AUDIT and not evaluation.passed
    assert json.loads(json.dumps(evaluation.metadata["articles"].value))["stale"] == 1
    repair_ids = evaluation.metadata[REPAIR_IDS_KEY].value
    assert set(repair_ids) == {"articles", "posts", "repositories"}
    assert set(drift.values()) <= set(repair_ids["articles"])

    sensor = defs.resolve_sensor_def("audit_repair_sensor")
    context = dg.build_run_status_sensor_context(
        sensor_name="audit_repair_sensor",
        dagster_instance=instance,
        dagster_run=audit_run.dagster_run,
        dagster_event=audit_run.get_run_success_event(),
    )
    requests = {r.partition_key: r for r in sensor(context)}
    articles = requests["articles"]
    assert articles.run_key == f"repair-{audit_run.run_id}-articles"
    scope = run_scope(articles.run_config)
    assert set(scope) == set(repair_ids["articles"])

    job = defs.resolve_job_def("audit_repair_job")
    for request in requests.values():
        result = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
        )
        assert result.success
    again = defs.resolve_job_def("audit_job").execute_in_process(instance=instance)
    (evaluation,) = again.get_asset_check_evaluations()
    assert evaluation.passed, evaluation.metadata[REPAIR_IDS_KEY].value


def test_repair_runs_are_capped(backfilled):
    make_drift()
    defs = build_definitions()
    run = defs.resolve_job_def("audit_job").execute_in_process(
        instance=backfilled,
        run_config={"ops": {"embedded_chunks_warehouse_audit": {"config": {"repair_cap": 2}}}},
    )
    (evaluation,) = run.get_asset_check_evaluations()
    assert all(len(ids) <= 2 for ids in evaluation.metadata[REPAIR_IDS_KEY].value.values())


def test_repair_skips_documents_that_runs_since_the_audit_cover(backfilled):
    drift = make_drift()
    defs = build_definitions()
    audit_run = defs.resolve_job_def("audit_job").execute_in_process(instance=backfilled)
    # An event run for one drifted document lands after the audit started: work in progress,
    # not lost work, so the repair leaves it out.
    events_run = defs.resolve_job_def("warehouse_events_job").execute_in_process(
        instance=backfilled,
        partition_key="articles",
        run_config=scoped_run_config([drift["stale"]]),
    )
    assert events_run.success
    requests = repair_requests(defs, backfilled, audit_run)
    scope = run_scope(requests["articles"].run_config)
    assert drift["stale"] not in scope and drift["missing"] in scope


def test_a_shard_run_since_the_audit_covers_its_shard_only(backfilled):
    """A shard run (`backfill --shards N`) after the audit takes care of its shard's drifted
    documents, not of the others: the repair still requests those. Before, a shard run
    counted as covering the whole partition, and the others' drift waited for the next
    audit."""
    from llm_twin_features.domain.shards import Shard

    make_drift()
    defs = build_definitions()
    audit_run = defs.resolve_job_def("audit_job").execute_in_process(instance=backfilled)
    (evaluation,) = audit_run.get_asset_check_evaluations()
    drifted = set(evaluation.metadata[REPAIR_IDS_KEY].value["articles"])
    shard = Shard(0, 2)
    assert {shard.holds(i) for i in drifted} == {True, False}  # drift in both shards
    shard_run = defs.resolve_job_def("feature_pipeline_job").execute_in_process(
        instance=backfilled,
        partition_key="articles",
        run_config=scoped_run_config(None, shard=str(shard)),
    )
    assert shard_run.success
    scope = run_scope(repair_requests(defs, backfilled, audit_run)["articles"].run_config)
    assert set(scope) == {i for i in drifted if not shard.holds(i)}


def test_a_scoped_audit_looks_at_its_documents_only(backfilled):
    """The in-asset check of an event run audits the run's documents, not the partition."""
    from llm_twin_features.pipeline.audit import audit
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

    drift = make_drift()
    settings = Settings()
    embedder = EmbeddingDispatcher.embedder("articles", settings)
    clean = [i for i in article_ids() if i not in drift.values() and not i.startswith("invalid-")]
    with warehouse_of(settings) as warehouse, feature_store_of(settings) as store:
        whole = audit(warehouse, store, "articles", embedder)
        others = audit(warehouse, store, "articles", embedder, scope=clean[:3])
        pair = [drift["missing"], "ghost-article"]
        one = audit(warehouse, store, "articles", embedder, scope=pair)
    assert set(whole.drifted_ids) == set(drift.values())
    assert others.in_sync and others.warehouse_documents == 3
    assert one.drift == {"missing": [drift["missing"]], "orphans": ["ghost-article"]}


def test_a_materialization_launched_from_the_ui_covers_its_partition(backfilled):
    """The UI's "Materialize" runs Dagster's own asset job: the repair sensor recognises it by
    its asset selection, not by the job's internal name."""
    make_drift()
    defs = build_definitions()
    audit_run = defs.resolve_job_def("audit_job").execute_in_process(instance=backfilled)
    ui_run = backfilled.create_run_for_job(
        job_def=defs.resolve_implicit_global_asset_job_def(),
        asset_selection=frozenset(FEATURE_ASSET_KEYS),
        tags={"dagster/partition": "articles"},
        status=dg.DagsterRunStatus.STARTED,
    )
    assert ui_run.job_name != "audit_repair_job"
    requests = repair_requests(defs, backfilled, audit_run)
    assert "articles" not in requests  # the whole partition is being rebuilt already
    assert "posts" in requests
