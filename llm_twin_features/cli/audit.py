"""`status` and `audit [--repair]`: the warehouse against every stage."""

from __future__ import annotations

import argparse
import json

from llm_twin_features.cli.common import audits, err
from llm_twin_features.cli.pipeline import run_pipeline
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    rows = [
        {
            "type": r.data_type,
            "warehouse": r.warehouse_documents,
            "quarantined": r.quarantined,
            "cleaned": r.cleaned_points,
            "chunks": r.chunks,
            "vectors": r.vectors,
            "missing": len(r.missing),
            "stale": len(r.stale),
            "orphans": len(r.orphans),
            "in_sync": r.in_sync,
        }
        for r in audits(settings, dict.fromkeys(data_types()))
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 1 when the feature store has drifted from the warehouse. With --repair: runs the
    drifted documents again, audits again, and exits 1 only if drift remains (3 if a repair
    run failed)."""
    chosen = [args.type] if args.type else list(data_types())
    reports = audits(settings, dict.fromkeys(chosen))
    if args.json:
        for report in reports:
            print(
                json.dumps(
                    {
                        "type": report.data_type,
                        "in_sync": report.in_sync,
                        **report.counts(),
                        "examples": report.examples(),
                    }
                )
            )
    else:
        print_table(
            [
                {
                    "type": r.data_type,
                    **{k: len(v) for k, v in r.drift_kinds().items()},
                    "in_sync": r.in_sync,
                }
                for r in reports
            ]
        )
        for report in reports:
            for kind, ids in report.examples().items():
                print(
                    f"{report.data_type} {kind}: {', '.join(ids)}"
                    + (" ..." if len(report.drift[kind]) > len(ids) else "")
                )
    drifted = {r.data_type: r.drifted_ids for r in reports if not r.in_sync}
    if not drifted:
        return 0
    if not args.repair:
        err("drift found; repair with `llm-twin-features audit --repair` (scoped runs)")
        return 1
    if run_pipeline(settings, drifted, trigger="audit-repair"):
        return 3
    remaining = {
        r.data_type: r.counts() for r in audits(settings, dict.fromkeys(chosen)) if not r.in_sync
    }
    if remaining:
        err(f"drift remains after the repair: {json.dumps(remaining)}")
        return 1
    print("repaired: the feature store matches the warehouse")
    return 0
