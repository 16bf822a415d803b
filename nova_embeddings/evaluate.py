"""Score nova-embeddings-v1 on a BEIR-style retrieval folder, without and with instructions.

Folder layout (BEIR): corpus.jsonl, queries.jsonl, and qrels.tsv (or qrels/<split>.tsv).
    corpus.jsonl   {"_id": "d1", "title": "...", "text": "...", "image": "pages/1.png"}   (text and/or image)
    queries.jsonl  {"_id": "q1", "text": "...", "image": ..., "instructions": ...}       (instructions optional)
    qrels.tsv      query-id <tab> corpus-id <tab> score       (header optional; score > 0 means relevant)
Image paths are relative to the folder (URLs and base64 also work); a title is joined to its text as BEIR does.

Metrics: nDCG@10 (graded relevance as gain, trec_eval's formula), MRR@10, Recall@1/10/100, each for single
vectors (cosine) and multi vectors (MaxSim), averaged over the queries that have a relevant document. The table
shows "no instruction" beside "with instruction" when --instructions (or per-query instructions) are given,
so the instruction gains claimed for the model can be checked on one's own data.

Usage:
    nova-embeddings evaluate --model DIR_OR_ID --data BEIR_DIR [--adapter NAME|DIR|none]
        [--instructions "..."] [--doc-instructions "..."] [--vectors single multi] [--output-json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .cli import DefaultsHelpFormatter
from .data import DataError, exit_status, item_problem, iter_jsonl, load_model, resolve_image

NO_INSTRUCTION = "no instruction"
WITH_INSTRUCTION = "with instruction"
VECTOR_KINDS = ("single", "multi")
TASK_ADAPTER = object()  # --adapter not given: each item uses its task's adapter (encode's default)


# ---------------------------------------------------------------------- metrics (pure functions)
def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain: gain / log2(rank + 1), ranks from 1."""
    return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """nDCG@k with the relevance grade as gain (as trec_eval / BEIR); unjudged documents count 0."""
    gains = [max(qrels.get(doc, 0), 0) for doc in ranking[:k]]
    ideal = sorted((grade for grade in qrels.values() if grade > 0), reverse=True)[:k]
    return dcg(gains) / dcg(ideal) if ideal else 0.0


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """1 / rank of the first relevant document within the top k, else 0."""
    for rank, doc in enumerate(ranking[:k], start=1):
        if qrels.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    relevant = {doc for doc, grade in qrels.items() if grade > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


METRICS: tuple[tuple[str, Callable[[Sequence[str], Mapping[str, int], int], float], int], ...] = (
    ("nDCG@10", ndcg_at_k, 10),
    ("MRR@10", mrr_at_k, 10),
    ("Recall@1", recall_at_k, 1),
    ("Recall@10", recall_at_k, 10),
    ("Recall@100", recall_at_k, 100),
)
DEPTH = max(k for _, _, k in METRICS)  # documents ranked per query


def mean_metrics(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Every metric averaged over the ranked queries that have at least one relevant document."""
    judged = [qid for qid in rankings if any(grade > 0 for grade in qrels.get(qid, {}).values())]
    if not judged:
        raise ValueError("no ranked query has a relevant document in the qrels")
    return {name: sum(fn(rankings[q], qrels[q], k) for q in judged) / len(judged) for name, fn, k in METRICS}


# ---------------------------------------------------------------------- data
@dataclass
class RetrievalSet:
    """Queries (with their own instructions, if any), documents and graded judgements, as encode items."""

    query_ids: list[str]
    queries: list[dict]
    query_instructions: list[str | None]
    doc_ids: list[str]
    documents: list[dict]
    qrels: dict[str, dict[str, int]]
    skipped_judgements: int = 0


def content_item(row: dict, where: str, folder: Path, text_fields: Sequence[str]) -> dict:
    """An encode item from a row's text fields (joined by a space, BEIR-style) and image."""
    texts = [row[name].strip() for name in text_fields if isinstance(row.get(name), str) and row[name].strip()]
    item: dict[str, Any] = {"text": " ".join(texts)} if texts else {}
    if row.get("image") is not None:
        item["image"] = resolve_image(row["image"], folder)
    if not item:
        raise DataError(f"{where}: no {' / '.join(repr(n) for n in text_fields)} text and no 'image'")
    return item


def load_rows(path: Path, text_fields: Sequence[str]) -> tuple[list[str], list[dict], list[dict]]:
    """(ids, items, raw rows) of a corpus or queries file; every row needs a unique ``_id``."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    ids, items, rows, seen = [], [], [], set()
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        if not isinstance(row, dict) or "_id" not in row:
            raise DataError(f"{where}: expected a JSON object with an '_id'")
        row_id = str(row["_id"])
        if row_id in seen:
            raise DataError(f"{where}: duplicate _id {row_id!r}")
        seen.add(row_id)
        ids.append(row_id)
        items.append(content_item(row, where, path.parent, text_fields))
        rows.append(row)
    if not ids:
        raise DataError(f"{path}: empty")
    return ids, items, rows


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels (query-id, corpus-id, score; header optional) or TREC (query-id, 0, corpus-id, score)."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            fields = text.split()
            if not fields:
                continue
            if len(fields) not in (3, 4):
                raise DataError(f"{path}, line {line}: expected 3 columns (query-id, corpus-id, score), got {len(fields)}")
            query_id, doc_id, score = fields if len(fields) == 3 else (fields[0], fields[2], fields[3])
            try:
                grade = int(float(score))
            except ValueError:
                if line == 1:
                    continue  # the header
                raise DataError(f"{path}, line {line}: score {score!r} is not a number") from None
            qrels.setdefault(query_id, {})[doc_id] = grade
    return qrels


def find_qrels(folder: Path, split: str) -> Path:
    """qrels.tsv at the top, else BEIR's qrels/<split>.tsv."""
    for candidate in (folder / "qrels.tsv", folder / "qrels" / f"{split}.tsv"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: no qrels.tsv nor qrels/{split}.tsv")


def load_retrieval_set(folder: Path, split: str = "test", qrels_path: Path | None = None) -> RetrievalSet:
    """Load a BEIR folder; keep the queries that have a relevant document, drop judgements of unknown ids."""
    folder = Path(folder)
    doc_ids, documents, _ = load_rows(folder / "corpus.jsonl", ("title", "text"))
    query_ids, queries, rows = load_rows(folder / "queries.jsonl", ("text",))
    qrels = load_qrels(qrels_path or find_qrels(folder, split))
    known_docs = set(doc_ids)
    skipped = sum(doc not in known_docs for judged in qrels.values() for doc in judged)
    qrels = {q: {d: g for d, g in judged.items() if d in known_docs} for q, judged in qrels.items()}
    keep = [i for i, qid in enumerate(query_ids) if any(g > 0 for g in qrels.get(qid, {}).values())]
    if not keep:
        raise DataError(f"{folder}: no query of queries.jsonl has a relevant document (score > 0) in the qrels")
    instructions = [rows[i].get("instructions") for i in keep]
    for i, value in zip(keep, instructions):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{folder / 'queries.jsonl'}: query {query_ids[i]!r}: 'instructions' must be a non-empty string")
    return RetrievalSet(
        query_ids=[query_ids[i] for i in keep], queries=[queries[i] for i in keep], query_instructions=instructions,
        doc_ids=doc_ids, documents=documents, qrels={query_ids[i]: qrels[query_ids[i]] for i in keep},
        skipped_judgements=skipped,
    )


# ---------------------------------------------------------------------- encoding and ranking
@dataclass
class EvalSettings:
    """How both sides are encoded: tasks, instructions, adapter, vector kinds and batching."""

    query_task: str = "retrieval.query"
    document_task: str = "retrieval.passage"
    instructions: str | None = None
    doc_instructions: str | None = None
    adapter: Any = TASK_ADAPTER
    vectors: tuple[str, ...] = VECTOR_KINDS
    batch_size: int = 32
    max_batch_tokens: int = 32768
    chunk_size: int = 1024  # items per encode call: bounds the decoded images held at once
    truncate: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    progress: bool = False


def encode_items(model, items: Sequence[dict], ids: Sequence[str], *, task: str, instructions: str | None, multi: bool,
                 settings: EvalSettings, source: str) -> torch.Tensor | list[torch.Tensor]:
    """``model.encode`` over chunks; an item error (bad image, too long) names the file and the row's _id."""
    kwargs = dict(task=task, instructions=instructions, return_multivector=multi, batch_size=settings.batch_size,
                  max_batch_tokens=settings.max_batch_tokens, truncate=settings.truncate, min_pixels=settings.min_pixels,
                  max_pixels=settings.max_pixels, show_progress_bar=None if settings.progress else False)
    if settings.adapter is not TASK_ADAPTER:
        kwargs["adapter"] = settings.adapter
    vectors: list = []
    for start in range(0, len(items), settings.chunk_size):
        try:
            out = model.encode(list(items[start : start + settings.chunk_size]), **kwargs)
        except ValueError as error:
            index, problem = item_problem(error)
            if index is None:
                raise
            raise DataError(f"{source}: _id {ids[start + index]!r}: {problem}") from None
        if multi:
            vectors.extend(out)
        else:
            vectors.append(out)
    return vectors if multi else torch.cat(vectors)


def rank(score_block: Callable[[int, int], torch.Tensor], n_queries: int, depth: int, block: int = 64) -> list[list[int]]:
    """Top ``depth`` document indices per query, best first; ties keep corpus order (stable sort)."""
    rankings: list[list[int]] = []
    for start in range(0, n_queries, block):
        scores = score_block(start, min(start + block, n_queries))  # (queries in block, documents)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :depth]
        rankings.extend(order.tolist())
    return rankings


def score_fn(model, kind: str, queries, documents) -> Callable[[int, int], torch.Tensor]:
    """Cosine of single vectors, or MaxSim of multi vectors, for a block of queries against all documents."""
    if kind == "single":
        return lambda start, end: model.score_single_vector(queries[start:end], documents)
    return lambda start, end: model.score_multi_vector(queries[start:end], documents)


def instruction_runs(data: RetrievalSet, settings: EvalSettings) -> dict[str, tuple[list[dict], str | None, str | None]]:
    """Per run label: (query items, call-level query instructions, document instructions)."""
    runs = {NO_INSTRUCTION: (data.queries, None, None)}
    if settings.instructions or settings.doc_instructions or any(data.query_instructions):
        instructed = [{**query, "instructions": own} if own else query
                      for query, own in zip(data.queries, data.query_instructions)]
        runs[WITH_INSTRUCTION] = (instructed, settings.instructions, settings.doc_instructions)
    return runs


Results = dict[str, dict[str, dict[str, float]]]  # run label -> vector kind -> metric -> value


def evaluate(model, data: RetrievalSet, settings: EvalSettings, folder: Path = Path(".")) -> Results:
    """Metrics of every (instruction run, vector kind); documents are encoded once per (instructions, kind)."""
    results: Results = {}
    documents_cache: dict[tuple[str | None, str], Any] = {}
    for label, (queries, query_instructions, doc_instructions) in instruction_runs(data, settings).items():
        results[label] = {}
        for kind in settings.vectors:
            multi = kind == "multi"
            key = (doc_instructions, kind)
            if key not in documents_cache:
                documents_cache[key] = encode_items(
                    model, data.documents, data.doc_ids, task=settings.document_task, instructions=doc_instructions,
                    multi=multi, settings=settings, source=str(folder / "corpus.jsonl"),
                )
            encoded = encode_items(
                model, queries, data.query_ids, task=settings.query_task, instructions=query_instructions,
                multi=multi, settings=settings, source=str(folder / "queries.jsonl"),
            )
            block = 16 if multi else 256  # MaxSim holds (block, 128 documents, query tokens, document tokens) floats
            order = rank(score_fn(model, kind, encoded, documents_cache[key]), len(queries), DEPTH, block)
            rankings = {qid: [data.doc_ids[i] for i in row] for qid, row in zip(data.query_ids, order)}
            results[label][kind] = mean_metrics(rankings, data.qrels)
    return results


# ---------------------------------------------------------------------- output
def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A markdown table: one row per metric; per vector kind, "no instruction" | "with instruction" | delta."""
    runs = list(results)
    kinds = list(results[runs[0]])
    header, align = ["metric"], ["---"]
    for kind in kinds:
        if len(runs) == 1:
            header.append(kind)
            align.append("---:")
        else:
            header += [f"{kind}: {NO_INSTRUCTION}", f"{kind}: {WITH_INSTRUCTION}", f"{kind}: Δ"]
            align += ["---:"] * 3
    lines = [header, align]
    for name, _, _ in METRICS:
        row = [name]
        for kind in kinds:
            values = [results[run][kind][name] for run in runs]
            row += [f"{value:.4f}" for value in values]
            if len(runs) > 1:
                row.append(f"{values[1] - values[0]:+.4f}")
        lines.append(row)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def resolve_adapter(model, value: str | None) -> Any:
    """--adapter: absent -> each task's adapter; "none" -> bare backbone; a folder -> loaded; else a loaded name."""
    if value is None:
        return TASK_ADAPTER
    if value.lower() == "none":
        return None
    if Path(value).is_dir():
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(value).resolve().name) or "custom"
        if name in model.list_adapters() or name in model.config.task_names:  # a task's name would route its task
            name = f"eval_{name}"
        model.load_adapter(value, adapter_name=name)
        return name
    if value in model.list_adapters():
        return value
    raise ValueError(f"--adapter {value!r} is neither an adapter folder nor a loaded adapter; "
                     f"loaded: {model.list_adapters()} (or 'none' for the bare backbone)")


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="nova-embeddings-v1 folder or Hub id")
    parser.add_argument("--data", required=True, type=Path, help="BEIR-style folder")
    parser.add_argument("--split", default="test", help="qrels/<split>.tsv when there is no qrels.tsv")
    parser.add_argument("--qrels", type=Path, help="explicit qrels file")
    parser.add_argument("--adapter", help="a loaded adapter's name, an adapter folder to load, or 'none' "
                        "(default: each task's adapter)")
    parser.add_argument("--instructions", help="query-side instructions for the 'with instruction' run")
    parser.add_argument("--doc-instructions", help="document-side instructions for the 'with instruction' run")
    parser.add_argument("--query-task", default="retrieval.query")
    parser.add_argument("--document-task", default="retrieval.passage")
    parser.add_argument("--vectors", nargs="+", choices=VECTOR_KINDS, default=list(VECTOR_KINDS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=False,
                        help="cut over-long texts (else: error)")
    parser.add_argument("--min-pixels", type=int)
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--output-json", type=Path, help="also write the results (and the settings) here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def adapter_label(adapter: Any) -> str:
    """How a run's adapter choice is printed and recorded."""
    if adapter is TASK_ADAPTER:
        return "each task's adapter"
    return "none (bare backbone)" if adapter is None else adapter


def report(args: argparse.Namespace, data: RetrievalSet, adapter: Any, results: Results) -> dict:
    """The JSON record of a run: what was evaluated, how, and the numbers."""
    return {
        "model": args.model, "data": str(args.data), "adapter": adapter_label(adapter),
        "query_task": args.query_task, "document_task": args.document_task,
        "instructions": args.instructions, "doc_instructions": args.doc_instructions,
        "queries_with_own_instructions": sum(bool(i) for i in data.query_instructions),
        "n_queries": len(data.query_ids), "n_documents": len(data.doc_ids), "results": results,
    }


def run(args: argparse.Namespace, model=None) -> dict:
    """Load (unless given a model), evaluate, print the table; return the JSON record."""
    data = load_retrieval_set(args.data, args.split, args.qrels)
    if data.skipped_judgements:
        warnings.warn(f"{data.skipped_judgements} qrels lines name documents missing from corpus.jsonl; ignored")
    if model is None:
        model = load_model(args.model, dtype=args.dtype, device=args.device).eval()
    adapter = resolve_adapter(model, args.adapter)
    settings = EvalSettings(
        query_task=args.query_task, document_task=args.document_task, instructions=args.instructions,
        doc_instructions=args.doc_instructions, adapter=adapter, vectors=tuple(args.vectors), batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens, truncate=args.truncate, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, progress=args.progress,
    )
    results = evaluate(model, data, settings, Path(args.data))
    record = report(args, data, adapter, results)
    print(f"{args.data}: {record['n_queries']} queries, {record['n_documents']} documents; adapter: {record['adapter']}")
    print(format_table(results))
    if args.output_json:
        args.output_json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
