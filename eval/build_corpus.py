"""Builds the retrieval-eval corpus (`eval/corpus.jsonl`) and its queries (`eval/queries.jsonl`).

The corpus is real text this machine ships, none of it written for the eval, chosen to differ
from the held-out corpus of issue 14 (which used PyPI package descriptions, standard-library
modules and PyPI summaries):

- **posts** (90): the descriptions of installed Debian packages (`/var/lib/dpkg/status`):
  the one-line synopsis, a blank line, then the extended description (its " ." lines become
  paragraph breaks). Packages whose extended description has fewer than three usable
  sentences are skipped; identical descriptions (e.g. -dev/-common twins) are kept once.
- **articles** (85): Markdown / reStructuredText / plain-text documentation shipped under
  `/usr/share/doc` (Node.js API and contributor guides, READMEs of Debian packages, systemd,
  OpenSSL, pip and setuptools docs, X11 protocol notes, ...), 2.5-25 kB each, decompressed
  when gzipped. Title: the first heading (or the file name); Subtitle: `None` for every other
  document (crawled articles often have none), otherwise "<package> documentation".
- **repositories** (75): one folder of source files each (not recursive): Python packages
  and sub-packages under `/usr/lib/python3/dist-packages` (pip internals and vendored
  libraries, setuptools, pygments, oauthlib, cryptography, yaml, ...) and the `contrib`
  tools of git under `/usr/share/doc/git/contrib` (shell, Perl, Python). Files are added in
  name order while the total stays under ~14 kB (files over 14 kB are skipped; a folder
  with only large files contributes its smallest file cut at a blank line).

Selection is deterministic: candidates are sorted by the md5 of their source path, with a cap
per source group so that no single package dominates. Ids are uuid5 of the source path;
authors are one of five ids, picked by the same hash; post platforms likewise.

Queries: for every document one **exact** query, a sentence taken from the middle of it: the
candidate sentence (8-40 words, mostly letters; for code, sentences of comments and
docstrings with the comment markers removed) closest to the middle of the document's text,
whitespace collapsed, which occurs in no other document. For every third document (in corpus
order) a **paraphrase** of that sentence, written by hand, read from `eval/paraphrases.json`
(keyed by document id; the builder checks that the exact sentence it was written for is still
the one chosen).

    .venv/bin/python eval/build_corpus.py            # writes eval/corpus.jsonl, queries.jsonl
    .venv/bin/python eval/build_corpus.py --pending  # sentences still lacking a paraphrase

The committed files were generated once on the project's dev machine (Debian 12, Python 3.11);
the eval reads only the committed files, so it does not depend on what is installed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
import uuid
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.jsonl"
QUERIES = HERE / "queries.jsonl"
PARAPHRASES = HERE / "paraphrases.json"

DOC_ROOT = Path("/usr/share/doc")
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
DPKG_STATUS = Path("/var/lib/dpkg/status")

N_POSTS, N_ARTICLES, N_REPOSITORIES = 90, 85, 75
NAMESPACE = uuid.UUID("6f1d1c2e-4b7a-4f43-9d1c-2b8e3c1a7e55")
AUTHORS = [str(uuid.uuid5(NAMESPACE, f"author-{i}")) for i in range(5)]
PLATFORMS = ["linkedin", "x", "mastodon"]
REPO_BUDGET = 14_000
CODE_SUFFIXES = {".py", ".sh", ".pl", ".pm", ".perl", ".go", ".c", ".h", ".el", ".js", ".rb"}


def h(key: str) -> str:
    return hashlib.md5(key.encode()).hexdigest()


def pick(key: str, options: list[str]) -> str:
    return options[int(h(key), 16) % len(options)]


def read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def collapse(text: str) -> str:
    return " ".join(text.split())


# --- sentences -------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")
_COMMENT = re.compile(r'^\s*(#+|//+|/\*+|\*+/?|"""|\'\'\'|--|;+)\s?')


def prose_ok(sentence: str) -> bool:
    words = sentence.split()
    if not 8 <= len(words) <= 40:
        return False
    if any(m in sentence for m in ("](", "][", "**", "|", "http", "<!--", "```", "===", "---")):
        return False
    if not sentence.endswith((".", "!", "?", ":", ")", '"')):
        return False
    chars = [c for c in sentence if not c.isspace()]
    letters = sum(c.isalpha() for c in chars)
    return letters / len(chars) >= 0.78 and sentence[0].isupper()


def sentences_with_offsets(text: str, code: bool) -> list[tuple[int, str]]:
    """Candidate query sentences and their character offset in `text`.

    Prose: paragraphs (blank-line separated, code fences and indented blocks skipped) split
    into sentences. Code: runs of comment/docstring lines, markers removed, split likewise.
    """
    blocks: list[tuple[int, list[str]]] = []
    offset = 0
    current: list[str] = []
    start = 0
    in_fence = False
    in_docstring = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if code:
            quotes = stripped.count('"""') + stripped.count("'''")
            m = _COMMENT.match(line)
            body = ""
            if in_docstring or quotes:  # docstring text (Python)
                body = stripped.replace('"""', " ").replace("'''", " ").strip()
                if not in_docstring and not stripped.startswith(('"""', "'''", 'r"""')):
                    body = ""  # a string literal on a code line, not a docstring
            elif m and not stripped.startswith(("#!", "#include", "#define", "#if", "#end")):
                body = line[m.end() :].strip()
            if quotes % 2:
                in_docstring = not in_docstring
            usable = bool(body) and not body.startswith(("-", "*", ">>>", "...", ":"))
        else:
            if stripped.startswith("```"):
                in_fence = not in_fence
            body = stripped.lstrip("#>*- ").strip()
            usable = (
                bool(stripped)
                and not in_fence
                and not line.startswith(("    ", "\t"))
                and not stripped.startswith(("```", "|", "+--", "..", ":"))
            )
        if usable:
            if not current:
                start = offset
            current.append(body)
        elif current:
            blocks.append((start, current))
            current = []
        offset += len(line)
    if current:
        blocks.append((start, current))
    out = []
    for start, lines in blocks:
        paragraph = collapse(" ".join(lines))
        pos = start
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if prose_ok(sentence):
                out.append((pos, sentence))
            pos += len(sentence) + 1
    return out


# --- posts -----------------------------------------------------------------------------------


def debian_descriptions() -> list[tuple[str, str]]:
    """(package, post text) for every installed package, from dpkg's status file."""
    out = []
    for stanza in DPKG_STATUS.read_text(encoding="utf-8").split("\n\n"):
        package, description, in_desc = None, [], False
        for line in stanza.splitlines():
            if line.startswith("Package: "):
                package = line.split(": ", 1)[1]
            if line.startswith("Description: "):
                description, in_desc = [line.split(": ", 1)[1]], True
            elif in_desc and line.startswith(" "):
                description.append(line[1:])
            else:
                in_desc = False
        if not package or len(description) < 2:
            continue
        paragraphs, current = [], []
        for line in description[1:]:
            if line.strip() == ".":
                paragraphs.append(" ".join(current))
                current = []
            else:
                current.append(line.strip())
        paragraphs.append(" ".join(current))
        body = "\n\n".join(p for p in paragraphs if p)
        out.append((package, f"{description[0].strip()}\n\n{body}"))
    return out


def build_posts() -> list[dict]:
    seen_bodies = set()
    candidates = []
    for package, text in sorted(debian_descriptions()):
        body = text.split("\n\n", 1)[1]
        if body in seen_bodies:
            continue
        seen_bodies.add(body)
        if len(sentences_with_offsets(body, code=False)) < 3:
            continue
        candidates.append((h(f"posts:{package}"), package, text))
    candidates.sort()
    docs = []
    for _, package, text in candidates[: N_POSTS * 2]:
        source = f"dpkg:{package}"
        docs.append(
            {
                "type": "posts",
                "_id": str(uuid.uuid5(NAMESPACE, source)),
                "platform": pick(source + ":platform", PLATFORMS),
                "author_id": pick(source, AUTHORS),
                "content": {"text": text},
                "_source": source,
            }
        )
    return docs


# --- articles --------------------------------------------------------------------------------

ARTICLE_NAMES = re.compile(r"(README|\.md|\.rst|\.txt)(\.gz)?$|/(glossary|onboarding)\.md$", re.I)


def article_candidates() -> list[tuple[str, Path]]:
    paths = []
    for path in DOC_ROOT.rglob("*"):
        rel = path.relative_to(DOC_ROOT)
        if not path.is_file() or path.is_symlink() or not ARTICLE_NAMES.search(str(rel)):
            continue
        parts = rel.parts
        if (parts[0] == "git" and "RelNotes" in parts) or "changelog" in str(rel).lower():
            continue
        if parts[0] == "nodejs" and len(parts) > 1 and parts[1] in ("api", "contributing"):
            group = f"nodejs/{parts[1]}"
        else:
            group = parts[0]
        if len(parts) > 3:
            continue
        paths.append((group, path))
    return sorted(paths)


def title_of(text: str, path: Path) -> str:
    for line in text.splitlines()[:40]:
        m = re.match(r"^#{1,3}\s+(.+)$", line.strip())
        if m:
            return m.group(1).strip()
    lines = text.splitlines()
    for i, line in enumerate(lines[:40]):  # RST / setext: a line underlined with = or -
        underlined = i + 1 < len(lines) and re.fullmatch(r"[=\-~*]{3,}", lines[i + 1].strip())
        if underlined and sum(c.isalpha() for c in line) >= 3:
            return line.strip()
    return path.name.removesuffix(".gz")


def build_articles() -> list[dict]:
    seen = set()
    ranked = []
    for group, path in article_candidates():
        text = read_text(path)
        if text is None or not 2500 <= len(text) <= 25000 or "\x00" in text:
            continue
        digest = h(text)
        if digest in seen:
            continue
        seen.add(digest)
        if len(sentences_with_offsets(text, code=False)) < 10:
            continue
        ranked.append((h(f"articles:{path}"), group, path, text))
    ranked.sort()
    per_group: Counter[str] = Counter()
    docs = []
    for _, group, path, text in ranked:
        cap = 14 if group.startswith("nodejs/") else 3
        if per_group[group] >= cap:
            continue
        per_group[group] += 1
        source = str(path)
        package = path.relative_to(DOC_ROOT).parts[0]
        subtitle = None if int(h(source + ":sub"), 16) % 2 else f"{package} documentation"
        docs.append(
            {
                "type": "articles",
                "_id": str(uuid.uuid5(NAMESPACE, source)),
                "platform": "docs",
                "link": f"file://{source}",
                "author_id": pick(source, AUTHORS),
                "content": {
                    "Title": title_of(text, path),
                    "Subtitle": subtitle,
                    "Content": text,
                    "language": "en",
                },
                "_source": source,
            }
        )
    return docs


# --- repositories ----------------------------------------------------------------------------


def repo_folders() -> list[tuple[str, Path, Path]]:
    """(group, folder, root) of every folder holding at least two code files."""
    out = []
    for root in (DIST_PACKAGES, DOC_ROOT / "git" / "contrib"):
        for folder in sorted([root, *root.rglob("*")]):
            if not folder.is_dir() or "__pycache__" in folder.parts or folder.is_symlink():
                continue
            if any(p in ("test", "tests", "t") for p in folder.parts):
                continue
            files = [f for f in folder.iterdir() if f.is_file() and f.suffix in CODE_SUFFIXES]
            if root == DOC_ROOT / "git" / "contrib":
                files = [f for f in folder.iterdir() if f.is_file() and f.suffix != ".gz"]
            if len(files) < 2 or folder == root:
                continue
            rel = folder.relative_to(root)
            group = "git-contrib" if root != DIST_PACKAGES else rel.parts[0]
            out.append((group, folder, root))
    return out


def repo_files(folder: Path) -> dict[str, str]:
    texts = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.is_symlink():
            continue
        text = read_text(f)
        if not text or not text.strip() or "\x00" in text:
            continue
        texts[f.name] = text
    chosen: dict[str, str] = {}
    total = 0
    for name, text in texts.items():
        if len(text) > REPO_BUDGET or total + len(text) > REPO_BUDGET:
            continue
        chosen[name] = text
        total += len(text)
    if total < 3000 and texts:
        name, text = min(texts.items(), key=lambda kv: (len(kv[1]) > REPO_BUDGET, len(kv[1])))
        if len(text) > REPO_BUDGET:
            cut = text.rfind("\n\n", 0, REPO_BUDGET)
            text = text[: cut if cut > 0 else REPO_BUDGET]
        chosen = {name: text}
    return chosen


def build_repositories() -> list[dict]:
    ranked = []
    seen_names: set[str] = set()
    seen_content: set[str] = set()
    for group, folder, root in repo_folders():
        files = repo_files(folder)
        total = sum(len(t) for t in files.values())
        if total < 3000:
            continue
        text = "\n".join(files.values())
        if len(sentences_with_offsets(text, code=True)) < 4:
            continue
        ranked.append((h(f"repositories:{folder}"), group, folder, root, files))
    ranked.sort()
    per_group: Counter[str] = Counter()
    docs = []
    for _, group, folder, root, files in ranked:
        cap = 14 if group in ("pip", "git-contrib") else 10
        name = folder.name
        digest = h(json.dumps(files, sort_keys=True))
        if per_group[group] >= cap or name in seen_names or digest in seen_content:
            continue
        per_group[group] += 1
        seen_names.add(name)
        seen_content.add(digest)
        rel = folder.relative_to(root)
        prefix = "" if root == DIST_PACKAGES else "git/contrib/"
        source = str(folder)
        docs.append(
            {
                "type": "repositories",
                "_id": str(uuid.uuid5(NAMESPACE, source)),
                "name": f"{prefix}{rel}".replace("/", "-"),
                "link": f"file://{source}",
                "owner_id": pick(source, AUTHORS),
                "content": {f"{prefix}{rel}/{n}": t for n, t in files.items()},
                "_source": source,
            }
        )
    return docs


# --- queries ---------------------------------------------------------------------------------


def document_text(doc: dict) -> str:
    if doc["type"] == "posts":
        return doc["content"]["text"]
    if doc["type"] == "articles":
        return doc["content"]["Content"]
    return "\n\n".join(doc["content"].values())


def middle_sentence(doc: dict, others: str) -> str | None:
    text = document_text(doc)
    code = doc["type"] == "repositories"
    middle = len(text) / 2
    for _, sentence in sorted(
        sentences_with_offsets(text, code), key=lambda c: (abs(c[0] - middle), c[0])
    ):
        if sentence not in others and others.count(sentence) == 0:
            return sentence
    return None


def build() -> tuple[list[dict], list[dict]]:
    pools = {
        "posts": build_posts(),
        "articles": build_articles(),
        "repositories": build_repositories(),
    }
    wanted = {"posts": N_POSTS, "articles": N_ARTICLES, "repositories": N_REPOSITORIES}
    # Uniqueness is checked against every candidate document, so it holds for any subset.
    flat = {d["_id"]: collapse(document_text(d)) for pool in pools.values() for d in pool}
    flat_code = {
        d["_id"]: collapse(" ".join(s for _, s in sentences_with_offsets(document_text(d), True)))
        for d in pools["repositories"]
    }
    corpus, queries = [], []
    for data_type, pool in pools.items():
        kept = 0
        for doc in pool:
            if kept == wanted[data_type]:
                break
            others = "\n".join(v for k, v in {**flat, **flat_code}.items() if k != doc["_id"])
            sentence = middle_sentence(doc, others)
            if sentence is None:
                continue
            kept += 1
            doc = {k: v for k, v in doc.items() if k != "_source"}
            corpus.append(doc)
            queries.append(
                {"query": sentence, "kind": "exact", "type": data_type, "document_id": doc["_id"]}
            )
    return corpus, queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pending", action="store_true", help="list sentences lacking a paraphrase"
    )
    args = parser.parse_args()
    corpus, queries = build()
    paraphrases = json.loads(PARAPHRASES.read_text()) if PARAPHRASES.exists() else {}
    chosen = [q for i, q in enumerate(queries) if i % 3 == 0]  # every third document
    if args.pending:
        pending = {
            q["document_id"]: {"type": q["type"], "exact": q["query"], "paraphrase": ""}
            for q in chosen
            if q["document_id"] not in paraphrases
        }
        json.dump(pending, sys.stdout, indent=1, ensure_ascii=False)
        return 0
    out = list(queries)
    missing = 0
    for q in chosen:
        entry = paraphrases.get(q["document_id"])
        if not entry or not entry.get("paraphrase"):
            missing += 1
            continue
        if entry["exact"] != q["query"]:
            print(f"stale paraphrase for {q['document_id']}: sentence changed", file=sys.stderr)
            missing += 1
            continue
        out.append({**q, "query": entry["paraphrase"], "kind": "paraphrase"})
    with CORPUS.open("w", encoding="utf-8") as f:
        for doc in corpus:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with QUERIES.open("w", encoding="utf-8") as f:
        for q in out:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    counts = Counter(d["type"] for d in corpus)
    kinds = Counter((q["type"], q["kind"]) for q in out)
    print(f"{len(corpus)} documents {dict(counts)}; {len(out)} queries {dict(kinds)}")
    if missing:
        print(f"{missing} paraphrases missing (see --pending)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
