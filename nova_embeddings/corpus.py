"""Encode a corpus at scale: JSONL/Parquet rows in, Parquet shards keyed by id out.

One process or many (``torchrun``, ``accelerate launch``, several nodes): every rank reads RANK / WORLD_SIZE /
LOCAL_RANK, scans the same input, and cuts it into shards of ``--shard-size`` rows by input order, so the
shards depend on the input alone. Rank 0 lists the shards still to do (missing, or written from other
inputs or settings) and broadcasts that list; every rank then takes its share, balanced by estimated
length, and writes each shard to a temporary file that ``os.replace`` renames when complete. A re-run skips
finished shards; a killed rank loses only the shard it was encoding. After a barrier, rank 0 checks every
shard against the input and writes ``manifest.json`` (and ``errors.jsonl`` with ``--skip-bad-rows``).

Output, in ``OUTPUT_DIR/shards/shard-KKKKK-of-NNNNN.parquet``: ``id``, ``vector``
(``fixed_size_list<float32>[D]``) and/or ``multi_vector`` (``list<fixed_size_list<float32>[128]>``, one entry per
token), the layouts LanceDB, Milvus, Qdrant and pgvector loaders read directly.

The model is used as a user uses it: ``AutoModel.from_pretrained(path, trust_remote_code=True)`` and ``encode``;
the processor's ``ItemError.index`` is mapped back to the row's id, file and line. ``NovaEmbedder`` runs the
same encoding inside Ray Data's ``map_batches``.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nova_embeddings.corpus_encode import (
    DTYPES,
    VECTOR_KINDS,
    EncodeSettings,
    check_settings,
    encode_items,
    load_model,
    output_dims,
    resolve_dtype,
    vector_column,
)
from nova_embeddings.corpus_input import CorpusError, CorpusIndex, read_rows, row_item, scan_corpus

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("encode-corpus needs pyarrow: pip install 'pyarrow>=16' (the corpus extra)") from _error

LOG = logging.getLogger("nova_embeddings.corpus")

FORMAT = "nova-corpus-v1"
SHARD_DIR, MANIFEST, ERRORS = "shards", "manifest.json", "errors.jsonl"
META_HASH, META_ERRORS = b"nova.shard_hash", b"nova.errors"


# ---------------------------------------------------------------------- distribution
@dataclass(frozen=True)
class Distributed:
    """This process's place in the job, from the launcher's environment (torchrun, accelerate launch)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str, timeout_min: float) -> Distributed:
    """Read RANK / WORLD_SIZE / LOCAL_RANK; join a process group (nccl on CUDA, gloo on CPU) only when there are several."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process on a node
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min))
    return Distributed(rank, world_size, local_rank, chosen)


def broadcast(value: Any, dist: Distributed) -> Any:
    """Rank 0's ``value`` on every rank."""
    if dist.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Distributed) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


def assign_shards(costs: dict[int, int], world_size: int) -> list[list[int]]:
    """Greedy longest-first: each shard (largest estimated cost first) goes to the least loaded rank.

    Deterministic (ties by shard number, then rank), so every rank computes the same plan.
    """
    loads = [(0, rank) for rank in range(world_size)]
    plan: list[list[int]] = [[] for _ in range(world_size)]
    for shard in sorted(costs, key=lambda k: (-costs[k], k)):
        load, rank = heapq.heappop(loads)
        plan[rank].append(shard)
        heapq.heappush(loads, (load + costs[shard], rank))
    return plan


# ---------------------------------------------------------------------- shards
def shard_path(output_dir: Path, shard: int, n_shards: int) -> Path:
    return output_dir / SHARD_DIR / f"shard-{shard:05d}-of-{n_shards:05d}.parquet"


def shard_hash(settings_hash: str, index: CorpusIndex, shard: int) -> str:
    """What a finished shard must match to be reused: the run's settings and the shard's own input rows."""
    return hashlib.sha256(f"{settings_hash}:{index.shard_size}:{shard}:{index.shard_fingerprint(shard)}".encode()).hexdigest()


def stored_hash(path: Path) -> str | None:
    """The hash a shard file was written with, or None when the file is missing or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(META_HASH)
    return value.decode() if value else None


def pending_shards(output_dir: Path, index: CorpusIndex, settings_hash: str) -> list[int]:
    """Shards to (re)do: missing, unreadable, or written from other input rows or settings; stray files go."""
    expected = {shard_path(output_dir, k, index.n_shards).name for k in range(index.n_shards)}
    for stray in sorted((output_dir / SHARD_DIR).glob("shard-*.parquet")):
        if stray.name not in expected:
            LOG.warning("removing %s: it belongs to a plan with another shard count", stray)
            stray.unlink()
    pending = []
    for shard in range(index.n_shards):
        path = shard_path(output_dir, shard, index.n_shards)
        found = stored_hash(path)
        if found == shard_hash(settings_hash, index, shard):
            LOG.info("shard %d: already done, skipped", shard)
            continue
        if found is not None:
            LOG.info("shard %d: written from other input rows or settings, will be re-encoded", shard)
        pending.append(shard)
    return pending


def encode_shard(
    model: Any, index: CorpusIndex, shard: int, settings: EncodeSettings, dims: dict[str, int], skip_bad_rows: bool,
    chunk_size: int,
) -> tuple[pa.Table, list[dict]]:
    """One shard's rows -> (table of its good rows in input order, errors as {"id", "error", "where"})."""
    rows = index.shard_rows(shard)
    items = [row_item(record, index.files[index.file_of[row]].resolve().parent)
             for row, record in zip(rows, read_rows(index, rows))]
    errors: list[dict] = []

    def on_bad_item(position: int, problem: str) -> None:
        row = rows[position]
        if not skip_bad_rows:
            raise CorpusError(f"{index.describe(row)}: {problem} (pass --skip-bad-rows to write it to {ERRORS} and go on)")
        errors.append({"id": index.ids[row], "error": problem, "where": index.where(row)})

    good: list[int] = []
    vectors: dict[str, list] = {column: [] for column in settings.kinds}
    for start in range(0, len(items), chunk_size):
        chunk = range(start, min(start + chunk_size, len(items)))
        kept, chunk_vectors = encode_items(model, [items[i] for i in chunk], settings,
                                           lambda position, problem: on_bad_item(chunk[position], problem))
        good.extend(chunk[i] for i in kept)
        for column in settings.kinds:
            vectors[column].extend(chunk_vectors[column])
    columns = {"id": pa.array([index.ids[rows[i]] for i in good])}
    for column in settings.kinds:
        columns[column] = vector_column(column, vectors[column], dims[column])
    return pa.table(columns), errors


def write_shard(path: Path, table: pa.Table, errors: list[dict], hash_value: str) -> None:
    """Write to a temporary file, then rename: a shard file either is complete or does not exist."""
    metadata = {META_HASH: hash_value.encode(), META_ERRORS: json.dumps(errors).encode()}
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


# ---------------------------------------------------------------------- manifest
def write_manifest(output_dir: Path, index: CorpusIndex, run: dict, skip_bad_rows: bool) -> dict:
    """Check every shard against the input (ids in order, each once, or listed as an error), then write the manifest."""
    ids, errors, shards = [], [], []
    for shard in range(index.n_shards):
        path = shard_path(output_dir, shard, index.n_shards)
        if not path.is_file():
            raise CorpusError(f"{path} is missing after all ranks finished: the output directory must be on storage "
                              "that every node shares")
        parquet = pq.ParquetFile(path)
        shard_errors = json.loads((parquet.schema_arrow.metadata or {}).get(META_ERRORS, b"[]"))
        shard_ids = parquet.read(columns=["id"]).column("id").to_pylist()
        failed = {error["id"] for error in shard_errors}
        expected = [index.ids[row] for row in index.shard_rows(shard) if index.ids[row] not in failed]
        if shard_ids != expected or len(failed) != len(shard_errors):
            raise CorpusError(f"{path} does not hold the ids of its input rows; delete it and run again")
        ids.extend(shard_ids)
        errors.extend(shard_errors)
        rows = index.shard_rows(shard)
        shards.append({"file": str(path.relative_to(output_dir)), "rows": [rows.start, rows.stop],
                       "n_vectors": len(shard_ids), "n_errors": len(shard_errors)})
    if errors or skip_bad_rows:
        write_atomically(output_dir / ERRORS, "".join(json.dumps(error) + "\n" for error in errors))
    else:
        (output_dir / ERRORS).unlink(missing_ok=True)  # left by an earlier run of other inputs
    manifest = {
        "format": FORMAT, **run, "n_input_rows": len(index), "n_encoded": len(ids), "n_errors": len(errors),
        "errors_file": ERRORS if (errors or skip_bad_rows) else None, "shard_size": index.shard_size,
        "n_shards": index.n_shards, "shards": shards, "ids": ids,
    }
    write_atomically(output_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------- command line
def settings_hash(run: dict) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()


def run_description(args: argparse.Namespace, model: Any, settings: EncodeSettings, dims: dict[str, int], dtype) -> dict:
    """Everything that determines the vectors (hashed into every shard), as recorded in the manifest."""
    model_path = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    return {
        "model": model_path, "revision": args.revision, "model_commit": getattr(model.config, "_commit_hash", None),
        "dtype": str(dtype).removeprefix("torch."), "settings": settings.identity(), "dims": dims,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nova-embeddings encode-corpus", description=__doc__.split("\n\n")[0],
        epilog="Several GPUs: torchrun --nproc-per-node N -m nova_embeddings.corpus ... (or accelerate launch).",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="JSONL or Parquet files, read in this order; rows have "
                        "'id' and 'text' and/or 'image' (path relative to the file, URL, base64), optional "
                        "'task', 'instructions', 'adapter' (null: not given). Other columns are ignored.")
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--revision", help="Hub revision of the model")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--vectors", choices=VECTOR_KINDS, default="single", help="single vectors, multi vectors (one "
                        "per token), or both")
    parser.add_argument("--dimensions", type=int, help="Matryoshka size of single vectors (one of the config's matryoshka_dims)")
    parser.add_argument("--task", help="default task of rows that give none (default: the model's)")
    parser.add_argument("--instructions", help="default instructions of rows that give none")
    adapters = parser.add_mutually_exclusive_group()
    adapters.add_argument("--adapter", help="adapter of rows that name none (default: each row's task adapter)")
    adapters.add_argument("--no-adapter", action="store_true", help="rows that name no adapter run on the bare backbone")
    parser.add_argument("--shard-size", type=int, default=8192, help="rows per output shard (a re-run redoes whole shards)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per encode() call: bounds the decoded images "
                        "held in memory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--truncate", action="store_true", help="cut over-long texts (with a warning) instead of failing")
    parser.add_argument("--min-pixels", type=int)
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--skip-bad-rows", action="store_true", help=f"write bad rows to {ERRORS} (id + error) and go on")
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if CUDA is present, else cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--dist-timeout-min", type=float, default=120.0, help="how long ranks wait for each other")
    return parser


def settings_from_args(args: argparse.Namespace) -> EncodeSettings:
    return EncodeSettings(
        vectors=args.vectors, dimensions=args.dimensions, task=args.task, instructions=args.instructions,
        adapter=args.adapter, bare_backbone=args.no_adapter, batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens, truncate=args.truncate, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )


def encode_corpus(args: argparse.Namespace, dist: Distributed) -> dict | None:
    """The whole job on this rank: scan -> load -> plan -> encode this rank's shards -> barrier -> manifest (rank 0)."""
    settings = settings_from_args(args)
    if args.chunk_size < 1:
        raise CorpusError(f"--chunk-size must be positive, got {args.chunk_size}")
    index = scan_corpus(args.inputs, args.shard_size)
    dtype = resolve_dtype(args.dtype, dist.device)
    model = load_model(args.model, args.revision, dtype, dist.device)
    check_settings(model, settings)
    dims = output_dims(model, settings)
    run = run_description(args, model, settings, dims, dtype)
    run_hash = settings_hash(run)
    pending = broadcast(pending_shards(args.output_dir, index, run_hash) if dist.is_main else None, dist)
    mine = assign_shards({shard: index.shard_cost(shard) for shard in pending}, dist.world_size)[dist.rank]
    with tqdm(total=sum(len(index.shard_rows(shard)) for shard in mine), unit="row", disable=not dist.is_main,
              desc=f"rank 0 of {dist.world_size}") as progress:
        for shard in mine:
            table, errors = encode_shard(model, index, shard, settings, dims, args.skip_bad_rows, args.chunk_size)
            path = shard_path(args.output_dir, shard, index.n_shards)
            write_shard(path, table, errors, shard_hash(run_hash, index, shard))
            LOG.info("shard %d: encoded %d rows (%d errors) -> %s", shard, table.num_rows, len(errors), path)
            progress.update(len(index.shard_rows(shard)))
    barrier(dist)
    if not dist.is_main:
        return None
    batching = {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "chunk_size": args.chunk_size}
    run = {**run, "batching": batching, "inputs": [str(path) for path in index.files], "config_hash": run_hash,
           "world_size": dist.world_size}
    manifest = write_manifest(args.output_dir, index, run, args.skip_bad_rows)
    LOG.info("wrote %s: %d vectors, %d errors", args.output_dir / MANIFEST, manifest["n_encoded"], manifest["n_errors"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``encode-corpus``: returns 0 on success, 2 on bad input (the message names the row)."""
    args = build_parser().parse_args(argv)
    dist = setup_distributed(args.device, args.dist_timeout_min)
    logging.basicConfig(level=logging.INFO, format=f"[rank {dist.rank}] %(message)s", stream=sys.stderr)
    try:
        encode_corpus(args, dist)
    except CorpusError as error:
        print(f"encode-corpus: error (rank {dist.rank}): {error}", file=sys.stderr)
        return 2
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


__all__ = ["main", "build_parser", "encode_corpus", "assign_shards", "CorpusError", "EncodeSettings"]


if __name__ == "__main__":
    raise SystemExit(main())
