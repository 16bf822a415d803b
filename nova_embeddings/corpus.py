"""Encode a corpus at scale: JSONL/Parquet rows in, Parquet shards keyed by id out.

One process or many (``torchrun``, ``accelerate launch``, several nodes): every rank reads RANK / WORLD_SIZE /
LOCAL_RANK, scans the same input, and cuts it into shards of ``--shard-size`` rows by input order, so the
shards depend on the input alone. Rank 0 lists the shards still to do (missing, or written from other
inputs or settings) and broadcasts that list; every rank then takes its share, balanced by estimated
length, and streams each shard into a temporary file that ``os.replace`` renames when complete. A re-run skips
finished shards; a killed rank loses only the shards in flight. After a barrier, rank 0 checks every shard
against the input and writes ``manifest.json`` (and ``errors.jsonl`` with ``--skip-bad-rows``).

Within a rank, chunks of ``--chunk-size`` rows go through three overlapped stages (``corpus_pipeline``): read and
``model.prepare_items`` in worker threads, ``model.encode`` (the GPU) in the main thread, Arrow conversion and
Parquet writing in a writer thread; ``--prepare-ahead`` bounds how many chunks wait between them.

Output, in ``OUTPUT_DIR/shards/shard-KKKKK-of-NNNNN.parquet``: ``id``, ``vector``
(``fixed_size_list<float32>[D]``) and/or ``multi_vector`` (``list<fixed_size_list<float32>[128]>``, one entry per
token), the layouts LanceDB, Milvus, Qdrant and pgvector loaders read directly.

The model is used as a user uses it: ``AutoModel.from_pretrained(path, trust_remote_code=True)``, ``prepare_items``
and ``encode``;
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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from nova_embeddings.corpus_encode import (
    DTYPES,
    VECTOR_KINDS,
    EncodeSettings,
    check_settings,
    encode_prepared,
    output_dims,
    prepare_rows,
    resolve_dtype,
    vector_column,
    vector_type,
)
from nova_embeddings.corpus_input import CorpusError, CorpusIndex, read_rows, row_item, scan_corpus
from nova_embeddings.data import load_model
from nova_embeddings.corpus_pipeline import StageTimes, run_pipeline, timed

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


def shard_metadata(path: Path) -> dict[bytes, bytes]:
    """The key-value metadata of a Parquet file's footer (where a shard keeps its hash and errors)."""
    return pq.read_metadata(path).metadata or {}


def stored_hash(path: Path) -> str | None:
    """The hash a shard file was written with, or None when the file is missing or unreadable."""
    try:
        value = shard_metadata(path).get(META_HASH)
    except (OSError, pa.ArrowInvalid):
        return None
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


@dataclass(frozen=True)
class Chunk:
    """Input rows ``rows`` of shard ``shard``, encoded by one ``encode()`` call; ``last``: the shard's final chunk."""

    shard: int
    rows: range
    last: bool


@dataclass
class ChunkResult:
    """A chunk after the prepare stage (``prepared`` set) and after the encode stage (``vectors`` set)."""

    chunk: Chunk
    kept: list[int]  # positions in chunk.rows of the good rows, in input order
    prepared: Any = None  # the good rows' PreparedItems (None once encoded, or when no row is good)
    vectors: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[int, dict]] = field(default_factory=list)  # (row, {"id", "error", "where"})


def plan_chunks(index: CorpusIndex, shards: list[int], chunk_size: int) -> Iterator[Chunk]:
    """This rank's shards cut into chunks of ``chunk_size`` rows, in the order they are encoded."""
    for shard in shards:
        rows = index.shard_rows(shard)
        for start in range(rows.start, rows.stop, chunk_size):
            stop = min(start + chunk_size, rows.stop)
            yield Chunk(shard, range(start, stop), last=stop == rows.stop)


@contextmanager
def naming_failures(stage: str, chunk: Chunk, index: CorpusIndex) -> Iterator[None]:
    """An unexpected error of a stage becomes a ``CorpusError`` saying which stage, shard and rows (traceback logged)."""
    try:
        yield
    except CorpusError:
        raise
    except Exception as error:
        first, last = chunk.rows[0], chunk.rows[-1]
        where = f"{stage} shard {chunk.shard} (ids {index.ids[first]!r} to {index.ids[last]!r}, from {index.where(first)})"
        LOG.error("%s failed", where, exc_info=True)
        raise CorpusError(f"{where} failed: {type(error).__name__}: {error}") from error


class CorpusStages:
    """One rank's three stages: ``prepare`` (read rows, ``model.prepare_items``), ``encode`` (``model.encode``: the
    GPU) and ``write`` (Arrow conversion; each shard streamed, chunk by chunk, into a temporary Parquet file that
    is renamed when its last chunk is in). ``run_pipeline`` overlaps them."""

    def __init__(self, model: Any, index: CorpusIndex, settings: EncodeSettings, dims: dict[str, int], skip_bad_rows: bool,
                 output_dir: Path, run_hash: str, times: StageTimes, progress: tqdm):
        self.model, self.index, self.settings, self.dims = model, index, settings, dims
        self.skip_bad_rows, self.output_dir, self.run_hash = skip_bad_rows, output_dir, run_hash
        self.times, self.progress = times, progress
        id_type = pa.string() if isinstance(index.ids[0], str) else pa.int64()
        self.schema = pa.schema([("id", id_type)] + [(column, vector_type(column, dims[column])) for column in settings.kinds])
        self.writer: pq.ParquetWriter | None = None  # the shard being written
        self.temporary: Path | None = None
        self.shard_errors: list[dict] = []
        self.shard_vectors = 0

    def on_bad_row(self, chunk: Chunk, errors: list[tuple[int, dict]]) -> Callable[[int, str], None]:
        """What to do with a bad row (position in the chunk): stop with its id, file and line, or record it."""
        def on_bad_item(position: int, problem: str) -> None:
            row = chunk.rows[position]
            if not self.skip_bad_rows:
                raise CorpusError(f"{self.index.describe(row)}: {problem} (pass --skip-bad-rows to write it to {ERRORS} "
                                  "and go on)")
            errors.append((row, {"id": self.index.ids[row], "error": problem, "where": self.index.where(row)}))
        return on_bad_item

    def prepare(self, chunk: Chunk) -> ChunkResult:
        """Read the chunk's rows and prepare them (runs in a worker thread, while the GPU encodes an earlier chunk)."""
        with naming_failures("reading and preparing", chunk, self.index):
            start = time.perf_counter()
            records = read_rows(self.index, chunk.rows)
            items = [row_item(record, self.index.files[self.index.file_of[row]].resolve().parent)
                     for row, record in zip(chunk.rows, records)]
            self.times.add("read", time.perf_counter() - start)
            result = ChunkResult(chunk, [])
            result.kept, result.prepared = timed(self.times, "prepare", prepare_rows, self.model, items, self.settings,
                                                 self.on_bad_row(chunk, result.errors))
            return result

    def encode(self, result: ChunkResult) -> ChunkResult:
        """``model.encode`` of the prepared rows, once per output column (the calling thread: the GPU's)."""
        with naming_failures("encoding", result.chunk, self.index):
            result.kept, result.vectors = encode_prepared(self.model, result.kept, result.prepared, self.settings,
                                                          self.on_bad_row(result.chunk, result.errors))
            result.prepared = None  # tokens and decoded images can go
            return result

    def write(self, result: ChunkResult) -> None:
        """Append the chunk to its shard's temporary file; after the shard's last chunk, rename it into place."""
        chunk = result.chunk
        with naming_failures("writing", chunk, self.index):
            start = time.perf_counter()
            if self.writer is None:
                self.open_shard(chunk.shard)
            columns = [pa.array([self.index.ids[chunk.rows[i]] for i in result.kept], self.schema.field("id").type)]
            columns += [vector_column(column, result.vectors[column], self.dims[column]) for column in self.settings.kinds]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self.shard_errors += [error for _, error in sorted(result.errors, key=lambda pair: pair[0])]
            self.shard_vectors += len(result.kept)
            if chunk.last:
                self.finish_shard(chunk.shard)
            self.times.add("write", time.perf_counter() - start)
        self.times.add("rows", len(chunk.rows))
        self.times.add("chunks", 1)
        self.progress.update(len(chunk.rows))

    def open_shard(self, shard: int) -> None:
        path = shard_path(self.output_dir, shard, self.index.n_shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = path.with_name(f".{path.name}.tmp")
        self.writer = pq.ParquetWriter(self.temporary, self.schema)
        self.shard_errors, self.shard_vectors = [], 0

    def finish_shard(self, shard: int) -> None:
        """Close the temporary file with the shard's hash and errors in its footer, then rename: a shard file
        either is complete or does not exist."""
        hash_value = shard_hash(self.run_hash, self.index, shard)
        self.writer.add_key_value_metadata({META_HASH: hash_value.encode(), META_ERRORS: json.dumps(self.shard_errors).encode()})
        self.writer.close()
        path = shard_path(self.output_dir, shard, self.index.n_shards)
        os.replace(self.temporary, path)
        self.writer = self.temporary = None
        LOG.info("shard %d: encoded %d rows (%d errors) -> %s", shard, self.shard_vectors, len(self.shard_errors), path)

    def discard_unfinished(self) -> None:
        """After a failed run: close and delete the temporary file of a shard left half written."""
        if self.writer is not None:
            self.writer.close()
            self.temporary.unlink(missing_ok=True)
            self.writer = self.temporary = None


# ---------------------------------------------------------------------- manifest
def write_manifest(output_dir: Path, index: CorpusIndex, run: dict, skip_bad_rows: bool) -> dict:
    """Check every shard against the input (ids in order, each once, or listed as an error), then write the manifest."""
    ids, errors, shards = [], [], []
    for shard in range(index.n_shards):
        path = shard_path(output_dir, shard, index.n_shards)
        if not path.is_file():
            raise CorpusError(f"{path} is missing after all ranks finished: the output directory must be on storage "
                              "that every node shares")
        shard_errors = json.loads(shard_metadata(path).get(META_ERRORS, b"[]"))
        shard_ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
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
                        "held in memory (1 + --prepare-ahead chunks at a time)")
    parser.add_argument("--prepare-ahead", type=int, default=2, help="chunks read and tokenised (in as many threads) "
                        "while the GPU encodes the current one, and written chunks queued for the writer thread; 0: "
                        "read, prepare, encode and write one after another")
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


def encode_corpus(args: argparse.Namespace, dist: Distributed, model: Any = None,
                  times: StageTimes | None = None) -> dict | None:
    """The whole job on this rank: scan -> load -> plan -> encode this rank's shards -> barrier -> manifest (rank 0).

    ``model``: an already loaded model to use instead of loading ``args.model`` (the benchmark's warm runs);
    ``times`` is filled with the seconds each stage took.
    """
    times = StageTimes() if times is None else times
    start = time.perf_counter()
    settings = settings_from_args(args)
    if args.chunk_size < 1:
        raise CorpusError(f"--chunk-size must be positive, got {args.chunk_size}")
    if args.prepare_ahead < 0:
        raise CorpusError(f"--prepare-ahead must be 0 or more, got {args.prepare_ahead}")
    index = scan_corpus(args.inputs, args.shard_size)
    if model is None:
        model = load_model(args.model, dtype=resolve_dtype(args.dtype, dist.device), device=dist.device,
                           revision=args.revision)
    check_settings(model, settings)
    dims = output_dims(model, settings)
    run = run_description(args, model, settings, dims, model.dtype)
    run_hash = settings_hash(run)
    pending = broadcast(pending_shards(args.output_dir, index, run_hash) if dist.is_main else None, dist)
    mine = assign_shards({shard: index.shard_cost(shard) for shard in pending}, dist.world_size)[dist.rank]
    times.add("setup", time.perf_counter() - start)
    with tqdm(total=sum(len(index.shard_rows(shard)) for shard in mine), unit="row", disable=not dist.is_main,
              desc=f"rank 0 of {dist.world_size}") as progress:
        stages = CorpusStages(model, index, settings, dims, args.skip_bad_rows, args.output_dir, run_hash, times, progress)
        try:
            run_pipeline(plan_chunks(index, mine, args.chunk_size), stages.prepare, stages.encode, stages.write,
                         ahead=args.prepare_ahead, times=times)
        finally:
            stages.discard_unfinished()
    LOG.info("this rank: %s", times.summary())
    barrier(dist)
    if not dist.is_main:
        return None
    batching = {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "chunk_size": args.chunk_size,
                "prepare_ahead": args.prepare_ahead}
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
