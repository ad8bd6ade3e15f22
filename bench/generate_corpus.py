"""Generate a deterministic synthetic LLM-twin corpus for benchmarks.

The output has the same JSONL format as ``llm_twin_features/sample_data/corpus.jsonl``:
one document per line with ``type`` (``posts``, ``articles`` or ``repositories``) and
``_id``. Text is composed from sentence templates and an ML-engineering vocabulary, so
it is varied enough that chunks differ. Only the standard library is used.

Usage::

    python bench/generate_corpus.py --out /tmp/bench.jsonl --posts 150 --articles 120 \
        --repositories 30 --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from collections.abc import Callable
from pathlib import Path

AUTHORS = (
    "7c1e2f4a-9b3d-4e6f-8a1b-2c3d4e5f6a7b",
    "d94b6a21-5e7f-4c83-b2a9-0e1f3d5c7b9a",
)

POST_CHARS = (300, 1500)
ARTICLE_CHARS = (3000, 8000)
REPO_FILES = (5, 12)

TOOLS = [
    "Dagster",
    "Airflow",
    "Prefect",
    "ZenML",
    "MLflow",
    "Comet ML",
    "Weights & Biases",
    "Qdrant",
    "pgvector",
    "Weaviate",
    "Milvus",
    "Elasticsearch",
    "OpenSearch",
    "FAISS",
    "MongoDB",
    "Postgres",
    "Redis",
    "Kafka",
    "RabbitMQ",
    "Bytewax",
    "Spark",
    "Polars",
    "DuckDB",
    "dbt",
    "Great Expectations",
    "Pydantic",
    "FastAPI",
    "vLLM",
    "TGI",
    "SageMaker",
    "Kubernetes",
    "Docker",
    "Terraform",
    "GitHub Actions",
    "LangChain",
    "LlamaIndex",
    "Hugging Face",
    "PyTorch",
    "sentence-transformers",
    "Opik",
    "Langfuse",
]
CONCEPTS = [
    "feature pipeline",
    "training pipeline",
    "inference pipeline",
    "vector database",
    "embedding model",
    "chunking strategy",
    "reranker",
    "hybrid search",
    "model registry",
    "feature store",
    "data contract",
    "change data capture",
    "prompt template",
    "instruction dataset",
    "evaluation set",
    "LLM judge",
    "quantized model",
    "LoRA adapter",
    "KV cache",
    "continuous batching",
    "retrieval step",
    "data warehouse",
    "asset check",
    "dead-letter queue",
    "schema validation",
    "cleaning step",
    "deduplication step",
    "backfill job",
    "experiment tracker",
    "monitoring dashboard",
    "streaming consumer",
    "batch job",
    "golden set",
    "tokenizer",
    "context window",
    "system prompt",
    "guardrail",
    "semantic cache",
    "metadata filter",
    "payload index",
]
DATA = [
    "LinkedIn posts",
    "Medium articles",
    "GitHub repositories",
    "support tickets",
    "product reviews",
    "meeting transcripts",
    "news articles",
    "chat logs",
    "PDF reports",
    "API documentation",
    "code snippets",
    "Substack newsletters",
    "internal wiki pages",
    "release notes",
    "customer emails",
]
METRICS = [
    "recall@10",
    "MRR",
    "p95 latency",
    "faithfulness",
    "answer relevance",
    "context precision",
    "token cost",
    "throughput",
    "time to first token",
    "chunk count",
    "duplicate rate",
    "validation error rate",
    "consumer lag",
    "GPU utilization",
    "cache hit rate",
    "freshness",
]
PROBLEMS = [
    "silent truncation",
    "schema drift",
    "duplicate chunks",
    "stale embeddings",
    "mixed embedding models",
    "hallucinated answers",
    "runaway token costs",
    "noisy Unicode formatting",
    "broken links",
    "empty documents",
    "slow reindexing",
    "out-of-order events",
    "memory spikes",
    "flaky tests",
    "leaking test data",
    "unversioned prompts",
    "missing metadata",
    "overlapping chunks",
]
ROLES = [
    "ML engineers",
    "data engineers",
    "platform teams",
    "data scientists",
    "backend developers",
    "MLOps teams",
    "solo builders",
    "research engineers",
]
VERBS = [
    "validate",
    "clean",
    "chunk",
    "embed",
    "deduplicate",
    "index",
    "rerank",
    "monitor",
    "version",
    "evaluate",
    "cache",
    "quantize",
    "batch",
    "stream",
    "backfill",
    "trace",
]
ADJECTIVES = [
    "boring",
    "idempotent",
    "observable",
    "reproducible",
    "cheap",
    "fast",
    "robust",
    "deterministic",
    "testable",
    "incremental",
    "modular",
    "explicit",
]
MODELS = [
    "Mistral-7B",
    "Llama-3-8B",
    "Phi-3-mini",
    "Qwen2-7B",
    "Gemma-7B",
    "all-MiniLM-L6-v2",
    "bge-small-en-v1.5",
    "e5-base-v2",
    "gte-base",
]
EMOJIS = ["🚀", "🔥", "👇", "✅", "💡", "📈", "🧠", "🛠️", "⚡", "🎯", "📚", "🤖", "🧪"]
ARROWS = ["→", "↳", "↓", "➡️", "•", "-"]
HASHTAGS = [
    "#MLOps",
    "#LLM",
    "#RAG",
    "#DataEngineering",
    "#MachineLearning",
    "#GenerativeAI",
    "#LLMOps",
    "#Python",
    "#VectorDB",
    "#AI",
]

SENTENCES = [
    "Most {roles} underestimate how much {problem} hurts the {concept}.",
    "The {concept} should be {adj}, otherwise every rerun becomes an incident.",
    "We moved the {concept} to {tool} and {metric} improved by {pct}%.",
    "If you {verb} {data} before you {verb2} them, the {concept} gets much simpler.",
    "A {adj} {concept} is worth more than a clever one.",
    "In our last project, {problem} cost us {num} days of debugging.",
    "{tool} handles the {concept}, while {tool2} takes care of the {concept2}.",
    "Measure {metric} on your own {data}, not on a public benchmark.",
    "The first version used {tool}; the second one dropped it for {tool2}.",
    "Every {concept} needs a test on a small fixture of {data}.",
    "With {model}, we saw {metric} stay flat while {metric2} dropped by {pct}%.",
    "Log the {concept} version next to every output, or {problem} will bite you.",
    "Nobody on the team wanted to own the {concept}, so {problem} went unnoticed.",
    "We {verb} roughly {num},000 {data} every night with {tool}.",
    "The trick is to {verb} early and {verb2} late.",
    "{problem} is rarely a model problem; it is almost always a data problem.",
    "Keep the {concept} and the {concept2} in separate stages with explicit outputs.",
    "A {concept} that fails loudly beats one that silently skips records.",
    "Our {metric} went from {small} to {big} after we started to {verb} {data}.",
    "{roles} often ask whether they need {tool}; usually {tool2} is enough at first.",
    "Once the {concept} was {adj}, onboarding new {roles} took hours instead of weeks.",
    "Don't {verb} everything: start with the {data} that users actually query.",
    "We alert on {metric} and {metric2}, and we read {num} traces by hand every week.",
    "The {concept} reads from the {concept2} and writes nothing else.",
    "Switching to {model} halved our {metric} but required a new {concept}.",
    "Treat the {concept} as a product with owners, docs and an SLA.",
    "When {problem} shows up, the first question is always what changed upstream.",
    "A {num}-line script with {tool} replaced a whole service we used to maintain.",
    "If the {concept} is not {adj}, backfills turn into manual cleanups.",
    "The cheapest improvement was to {verb} {data} with a {concept} before indexing.",
    "Remember that {tool} is a means, not a goal; the goal is {metric}.",
    "Each run records its {metric}, its {metric2} and the config that produced them.",
]
HOOKS = [
    "{num} lessons from running a {concept} in production",
    "Stop ignoring {problem} in your {concept}",
    "How we cut {metric} by {pct}% with a better {concept}",
    "Why every {concept} should be {adj}",
    "{tool} vs {tool2} for the {concept}: what we learned",
    "The {concept} nobody talks about",
    "What {num} months of {problem} taught me",
    "A {adj} {concept} in {num} steps",
]
TITLES = [
    "Building a {adj} {concept} with {tool}",
    "A Practical Guide to the {concept_t}",
    "{problem_t}: Causes, Symptoms and Fixes",
    "How to {verb_t} {data} for Retrieval-Augmented Generation",
    "Lessons from Running {tool} in Production",
    "From Notebook to Production: The {concept_t}",
    "Why Your {concept_t} Needs a Data Contract",
    "Scaling the {concept_t} to {num} Million Documents",
    "{tool} and {tool2}: Designing a {adj_t} {concept_t}",
]
SUBTITLES = [
    "What we learned after {num} months in production",
    "A step-by-step walkthrough with code",
    "Trade-offs, pitfalls and a checklist",
    "How {roles} can avoid {problem}",
    "Measuring {metric} before and after",
]


def _fill(rng: random.Random, template: str) -> str:
    """Fill a template's placeholders with random vocabulary."""
    tool, tool2 = rng.sample(TOOLS, 2)
    concept, concept2 = rng.sample(CONCEPTS, 2)
    metric, metric2 = rng.sample(METRICS, 2)
    verb, verb2 = rng.sample(VERBS, 2)
    small = round(rng.uniform(0.2, 0.6), 2)
    values = {
        "tool": tool,
        "tool2": tool2,
        "concept": concept,
        "concept2": concept2,
        "metric": metric,
        "metric2": metric2,
        "verb": verb,
        "verb2": verb2,
        "data": rng.choice(DATA),
        "problem": rng.choice(PROBLEMS),
        "roles": rng.choice(ROLES),
        "adj": rng.choice(ADJECTIVES),
        "model": rng.choice(MODELS),
        "num": rng.randint(2, 40),
        "pct": rng.randint(5, 70),
        "small": small,
        "big": round(min(small + rng.uniform(0.1, 0.4), 0.99), 2),
    }
    values["concept_t"] = concept.title()
    values["problem_t"] = values["problem"].capitalize()
    values["verb_t"] = verb.capitalize()
    values["adj_t"] = values["adj"].capitalize()
    text = template.format(**values)
    return text[0].upper() + text[1:]


def _paragraph(rng: random.Random, low: int = 3, high: int = 7) -> str:
    return " ".join(_fill(rng, rng.choice(SENTENCES)) for _ in range(rng.randint(low, high)))


def _bullets(rng: random.Random) -> str:
    arrow = rng.choice(ARROWS)
    count = rng.randint(2, 5)
    return "\n".join(f"{arrow} {_fill(rng, rng.choice(SENTENCES))}" for _ in range(count))


def _bold(text: str) -> str:
    """Render text with LinkedIn-style Unicode mathematical sans-serif bold."""
    out = []
    for char in text:
        if "A" <= char <= "Z":
            out.append(chr(0x1D5D4 + ord(char) - ord("A")))
        elif "a" <= char <= "z":
            out.append(chr(0x1D5EE + ord(char) - ord("a")))
        elif "0" <= char <= "9":
            out.append(chr(0x1D7EC + ord(char) - ord("0")))
        else:
            out.append(char)
    return "".join(out)


def _sentences(text: str) -> list[str]:
    parts = text.split(". ")
    return [p if p.endswith(".") else p + "." for p in parts if p.strip()]


def _compose(
    rng: random.Random,
    bounds: tuple[int, int],
    make_block: Callable[[], str],
    head: list[str] | None = None,
) -> str:
    """Join blocks with blank lines until a random target length within bounds."""
    low, high = bounds
    target = rng.randint(low, high)
    blocks = list(head or [])
    length = sum(len(b) for b in blocks) + 2 * max(len(blocks) - 1, 0)
    while length < target:
        block = make_block()
        room = high - length - (2 if blocks else 0)
        if len(block) > room:
            kept = ""
            for sentence in _sentences(block):
                candidate = f"{kept} {sentence}".strip()
                if len(candidate) > room:
                    break
                kept = candidate
            block = kept
        if not block:
            break
        length += len(block) + (2 if blocks else 0)
        blocks.append(block)
    while length < low:  # rare: trimmed too much, top up with short sentences
        sentence = _fill(rng, rng.choice(SENTENCES))
        blocks.append(sentence)
        length += len(sentence) + 2
    return "\n\n".join(blocks)


def _new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in keep.split("-") if part)


def make_post(rng: random.Random) -> dict:
    """Build one LinkedIn/X post document."""
    hook = _fill(rng, rng.choice(HOOKS))
    slug = _slug(hook)[:40].strip("-") or "post"
    shown = _bold(hook) if rng.random() < 0.5 else hook
    head = [f"{shown} {rng.choice(EMOJIS)}"]

    def block() -> str:
        roll = rng.random()
        if roll < 0.3:
            return _bullets(rng)
        if roll < 0.4:
            link = rng.choice(["https://medium.com/decodingml/", "www.decodingml.substack.com/p/"])
            return f"More details here 👇 {link}{slug}"
        return _paragraph(rng, 2, 4)

    text = _compose(rng, POST_CHARS, block, head)
    tags = " ".join(rng.sample(HASHTAGS, rng.randint(1, 3)))
    if len(text) + len(tags) + 2 <= POST_CHARS[1]:
        text = f"{text}\n\n{tags}"
    shape = rng.random()
    if shape < 0.7:
        content: dict = {"text": text}
    elif shape < 0.85:
        content = {"text": text, "image": None}
    else:
        content = {"Title": _fill(rng, rng.choice(HOOKS)), "text": text}
    return {
        "type": "posts",
        "_id": _new_id(rng),
        "platform": "linkedin" if rng.random() < 0.8 else "x",
        "content": content,
        "author_id": rng.choice(AUTHORS),
    }


def make_article(rng: random.Random) -> dict:
    """Build one Medium/Substack article document."""
    title = _fill(rng, rng.choice(TITLES))
    subtitle = None if rng.random() < 0.25 else _fill(rng, rng.choice(SUBTITLES))

    def block() -> str:
        return _bullets(rng) if rng.random() < 0.15 else _paragraph(rng)

    platform = rng.choice(["medium", "substack"])
    slug = f"{_slug(title)}-{rng.getrandbits(48):012x}"
    if platform == "medium":
        link = f"https://medium.com/decodingml/{slug}"
    else:
        link = f"https://decodingml.substack.com/p/{slug}"
    return {
        "type": "articles",
        "_id": _new_id(rng),
        "platform": platform,
        "link": link,
        "content": {
            "Title": title,
            "Subtitle": subtitle,
            "Content": _compose(rng, ARTICLE_CHARS, block),
            "language": "en",
        },
        "author_id": rng.choice(AUTHORS),
    }


def _identifier(rng: random.Random) -> str:
    noun = rng.choice(CONCEPTS).replace(" ", "_").replace("-", "_").lower()
    return f"{rng.choice(VERBS)}_{noun}"


def _function(rng: random.Random) -> str:
    name = _identifier(rng)
    arg = rng.choice(["records", "documents", "chunks", "rows", "events", "texts"])
    limit = rng.choice([32, 64, 128, 256, 500, 1000])
    doc = _fill(rng, rng.choice(SENTENCES))
    bodies = [
        (
            f"    out = []\n    for item in {arg}:\n"
            f"        if not item:\n            continue\n"
            f"        out.append(item.strip() if isinstance(item, str) else item)\n"
            f"    return out[:{limit}]\n"
        ),
        (
            f"    steps = range(0, len({arg}), {limit})\n"
            f"    batches = [{arg}[i : i + {limit}] for i in steps]\n"
            f'    logger.info("processing %d batches", len(batches))\n'
            f"    return [x for batch in batches for x in batch]\n"
        ),
        (
            f"    seen: set[str] = set()\n    result = []\n    for item in {arg}:\n"
            f"        key = hashlib.sha256(str(item).encode()).hexdigest()\n"
            f"        if key not in seen:\n            seen.add(key)\n"
            f"            result.append(item)\n"
            f"    return result\n"
        ),
        (
            f"    if len({arg}) > {limit}:\n"
            f'        raise ValueError(f"too many {arg}: {{len({arg})}} > {limit}")\n'
            f"    return sorted({arg}, key=lambda x: str(x))\n"
        ),
    ]
    return f'def {name}({arg}: list) -> list:\n    """{doc}"""\n{rng.choice(bodies)}'


def _python_file(rng: random.Random) -> str:
    words = rng.choice(CONCEPTS).replace("-", " ").split()
    cls = "".join(w.capitalize() for w in words) + "Config"
    fields = "\n".join(
        f"    {rng.choice(VERBS)}_{i}: int = {rng.randint(1, 512)}"
        for i in range(rng.randint(2, 4))
    )
    funcs = "\n\n".join(_function(rng) for _ in range(rng.randint(2, 5)))
    return (
        f'"""{_fill(rng, rng.choice(SENTENCES))}"""\n'
        "import hashlib\nimport logging\nfrom dataclasses import dataclass\n\n"
        "logger = logging.getLogger(__name__)\n\n\n"
        f"@dataclass\nclass {cls}:\n{fields}\n\n\n{funcs}"
    )


def make_repository(rng: random.Random) -> dict:
    """Build one GitHub repository document with 5-12 files."""
    name = f"{rng.choice(ADJECTIVES)}-{_slug(rng.choice(CONCEPTS))}"
    package = name.replace("-", "_")
    n_files = rng.randint(*REPO_FILES)
    files: dict[str, str] = {
        "README.md": f"# {name}\n\n{_paragraph(rng, 2, 4)}\n\n"
        f"## Usage\n\n```bash\npip install -r requirements.txt\n"
        f"python -m {package}.main\n```\n",
        "requirements.txt": "\n".join(
            sorted(
                f"{_slug(t)}=={rng.randint(0, 3)}.{rng.randint(0, 20)}.0"
                for t in rng.sample(TOOLS, 4)
            )
        )
        + "\n",
        "Dockerfile": "FROM python:3.11-slim\nWORKDIR /app\nCOPY . .\n"
        "RUN pip install --no-cache-dir -r requirements.txt\n"
        f'CMD ["python", "-m", "{package}.main"]\n',
        "config.yaml": "\n".join(
            f"{_identifier(rng)}: {rng.randint(1, 1000)}" for _ in range(rng.randint(3, 8))
        )
        + "\n",
    }
    while len(files) < n_files:
        files[f"{package}/{_identifier(rng)}.py"] = _python_file(rng)
    return {
        "type": "repositories",
        "_id": _new_id(rng),
        "name": name,
        "link": f"https://github.com/decodingml/{name}",
        "content": files,
        "owner_id": rng.choice(AUTHORS),
    }


def generate(
    posts: int = 150, articles: int = 120, repositories: int = 30, seed: int = 7
) -> list[dict]:
    """Return a deterministic list of corpus documents for the given counts and seed."""
    rng = random.Random(seed)
    docs = [make_post(rng) for _ in range(posts)]
    docs += [make_article(rng) for _ in range(articles)]
    docs += [make_repository(rng) for _ in range(repositories)]
    rng.shuffle(docs)
    return docs


def _text_chars(doc: dict) -> int:
    content = doc.get("content")
    if not isinstance(content, dict):
        return 0
    return sum(len(v) for v in content.values() if isinstance(v, str))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: write the corpus as JSONL and print totals."""
    parser = argparse.ArgumentParser(description="Generate a synthetic LLM-twin corpus.")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL file")
    parser.add_argument("--posts", type=int, default=150)
    parser.add_argument("--articles", type=int, default=120)
    parser.add_argument("--repositories", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    docs = generate(args.posts, args.articles, args.repositories, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")

    totals: dict[str, list[int]] = {}
    for doc in docs:
        entry = totals.setdefault(doc["type"], [0, 0])
        entry[0] += 1
        entry[1] += _text_chars(doc)
    for doc_type, (count, chars) in sorted(totals.items()):
        print(f"{doc_type:<13} {count:>6} documents {chars:>10,} characters")
    all_chars = sum(c for _, c in totals.values())
    print(f"{'total':<13} {len(docs):>6} documents {all_chars:>10,} characters -> {args.out}")


if __name__ == "__main__":
    main()
