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
import dataclasses
import hashlib
import heapq
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

try:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("encode-corpus needs pyarrow: pip install 'pyarrow>=14' (the corpus extra)") from _error

LOG = logging.getLogger("nova_embeddings.corpus")

ITEM_FIELDS = ("text", "image", "task", "instructions", "adapter")  # row fields handed to encode()
VECTOR_KINDS = ("single", "multi", "both")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_COST_CHARS = 3072  # balance estimate: an image at the default pixel cap is ~768 tokens, ~4 characters each
FORMAT = "nova-corpus-v1"
SHARD_DIR, MANIFEST, ERRORS = "shards", "manifest.json", "errors.jsonl"
META_HASH, META_ERRORS = b"nova.shard_hash", b"nova.errors"


class CorpusError(ValueError):
    """Bad input or output state; the message names the file, line and row id where there is one."""


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class EncodeSettings:
    """What every row is encoded with: defaults a row may override (task, instructions, adapter) and the call's knobs."""

    vectors: str = "single"
    dimensions: int | None = None
    task: str | None = None
    instructions: str | None = None
    adapter: str | None = None  # a loaded adapter's name; None: each item's task adapter
    bare_backbone: bool = False  # True: items that name no adapter run on the backbone alone
    batch_size: int = 64
    max_batch_tokens: int = 32768
    truncate: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.vectors not in VECTOR_KINDS:
            raise ValueError(f"vectors must be one of {VECTOR_KINDS}, got {self.vectors!r}")
        if self.adapter is not None and self.bare_backbone:
            raise ValueError("give an adapter name or bare_backbone=True, not both")
        if self.dimensions is not None and self.vectors == "multi":
            raise ValueError("dimensions applies to single vectors; it cannot be used with vectors='multi'")

    @property
    def kinds(self) -> list[str]:
        """Output columns in the order they are computed."""
        return {"single": ["vector"], "multi": ["multi_vector"], "both": ["vector", "multi_vector"]}[self.vectors]

    def encode_kwargs(self, column: str) -> dict[str, Any]:
        """Keyword arguments of ``model.encode`` for one output column."""
        kwargs: dict[str, Any] = {
            "task": self.task, "instructions": self.instructions, "return_multivector": column == "multi_vector",
            "batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens, "truncate": self.truncate,
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "output": "numpy", "show_progress_bar": False,
        }
        if column == "vector":
            kwargs["dimensions"] = self.dimensions
        if self.bare_backbone:
            kwargs["adapter"] = None
        elif self.adapter is not None:
            kwargs["adapter"] = self.adapter
        return kwargs


def output_dims(model: Any, settings: EncodeSettings) -> dict[str, int]:
    """Width of each output column, from the model's config (also needed for shards without a good row)."""
    dims = {"vector": settings.dimensions or model.config.embedding_dim,
            "multi_vector": model.config.multi_vector_projector_dim}
    return {column: dims[column] for column in settings.kinds}


def check_settings(model: Any, settings: EncodeSettings) -> None:
    """Call-level mistakes fail once, up front, instead of as an error on every row."""
    if settings.adapter is not None and settings.adapter not in model.list_adapters():
        raise CorpusError(f"unknown adapter {settings.adapter!r}; loaded adapters: {model.list_adapters()}")
    if settings.dimensions is not None and settings.dimensions not in model.config.matryoshka_dims:
        raise CorpusError(f"--dimensions {settings.dimensions} is not allowed; choose one of {model.config.matryoshka_dims}")


# ---------------------------------------------------------------------- encoding rows (shared with Ray)
def item_error_index(error: BaseException) -> int | None:
    """The item index of the processor's ``ItemError`` (duck-typed: remote code may load its own copy of the class)."""
    index = getattr(error, "index", None)
    return index if isinstance(error, ValueError) and isinstance(index, int) else None


def encode_items(
    model: Any, items: list[dict], settings: EncodeSettings, on_bad_item: Callable[[int, str], None]
) -> tuple[list[int], dict[str, Any]]:
    """Encode items with ``model.encode``; returns (indices of the good items, column -> their vectors).

    A bad item raises ``ItemError`` before any GPU work; ``on_bad_item(index, problem)`` either raises (the
    default behaviour of the CLI) or records it, and the call is repeated without that item, so the good
    items are encoded together exactly as they would be without the bad one.
    """
    alive = list(range(len(items)))
    while alive:
        batch = [items[i] for i in alive]
        try:
            return alive, {column: model.encode(batch, **settings.encode_kwargs(column)) for column in settings.kinds}
        except ValueError as error:
            position = item_error_index(error)
            if position is None or not 0 <= position < len(alive):
                raise
            on_bad_item(alive[position], getattr(error, "problem", str(error)))
            del alive[position]
    return [], {column: [] for column in settings.kinds}


def vector_column(column: str, vectors: Any, dim: int, valid: Sequence[bool] | None = None) -> pa.Array:
    """Arrow column of single vectors (fixed_size_list<float32>[dim]) or multi vectors (list of those).

    ``vectors`` has one entry per valid row; invalid rows (``valid`` False) become nulls.
    """
    valid = [True] * len(vectors) if valid is None else list(valid)
    mask = pa.array([not v for v in valid], pa.bool_()) if not all(valid) else None
    source = iter(vectors)
    if column == "vector":
        rows = [np.asarray(next(source), np.float32) if ok else np.zeros(dim, np.float32) for ok in valid]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim, mask=mask)
    rows = [np.asarray(next(source), np.float32).reshape(-1, dim) if ok else np.zeros((0, dim), np.float32) for ok in valid]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    flat = np.concatenate(rows).reshape(-1) if rows else np.zeros(0, np.float32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tokens, mask=mask)


def row_item(row: dict, image_root: Path | None) -> dict:
    """The encode() item of an input row: its item fields, nulls meaning "not given", images resolved."""
    item = {key: row[key] for key in ITEM_FIELDS if row.get(key) is not None}
    if image_root is not None and "image" in item:
        item["image"] = resolve_image(item["image"], image_root)
    return item


def resolve_image(value: Any, base_dir: Path) -> Any:
    """A relative image path is taken relative to the data file's folder; URLs, base64 and absolute paths pass."""
    if not isinstance(value, str) or value.startswith(("http://", "https://", "data:")) or os.path.isabs(value):
        return value
    candidate = base_dir / value
    try:
        return str(candidate) if candidate.is_file() else value
    except OSError:  # e.g. a base64 string longer than a file name may be
        return value


# ---------------------------------------------------------------------- input: scan and read
@dataclass
class CorpusIndex:
    """Every input row's id and where it is, plus what the plan needs: length estimates and per-shard fingerprints."""

    files: list[Path]
    shard_size: int
    ids: list[Any] = field(default_factory=list)
    file_of: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)  # JSONL: byte offset of the line; Parquet: row number
    line: list[int] = field(default_factory=list)  # JSONL: 1-based line number; Parquet: 0-based row number
    cost: list[int] = field(default_factory=list)
    _hashers: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_shards(self) -> int:
        return -(-len(self) // self.shard_size)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self)))

    def shard_cost(self, shard: int) -> int:
        return sum(self.cost[i] for i in self.shard_rows(shard))

    def shard_fingerprint(self, shard: int) -> str:
        return self._hashers[shard].hexdigest()

    def where(self, row: int) -> str:
        unit = "line" if is_jsonl(self.files[self.file_of[row]]) else "row"
        return f"{self.files[self.file_of[row]]} {unit} {self.line[row]}"

    def describe(self, row: int) -> str:
        return f"row id {self.ids[row]!r} ({self.where(row)})"

    def add(self, file_index: int, position: int, line: int, row_id: Any, cost: int, content: bytes) -> None:
        """Record one row (ids are checked later, all at once)."""
        row = len(self.ids)
        if row % self.shard_size == 0:
            self._hashers.append(hashlib.sha256())
        self._hashers[-1].update(len(content).to_bytes(8, "little") + content)
        self.ids.append(row_id)
        self.file_of.append(file_index)
        self.position.append(position)
        self.line.append(line)
        self.cost.append(cost)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson", ".json")


def input_format(path: Path) -> str:
    if is_jsonl(path):
        return "jsonl"
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    raise CorpusError(f"{path}: unknown input format (use .jsonl/.ndjson/.json lines or .parquet)")


def row_cost(text: Any, has_image: bool) -> int:
    """Length estimate used to balance shards across ranks: characters, plus a constant per image."""
    return (len(text) if isinstance(text, str) else 0) + (IMAGE_COST_CHARS if has_image else 0)


def scan_corpus(files: Sequence[Path], shard_size: int) -> CorpusIndex:
    """Read every input once: ids, positions, length estimates, shard fingerprints; checks ids."""
    if shard_size < 1:
        raise CorpusError(f"--shard-size must be positive, got {shard_size}")
    index = CorpusIndex(files=[Path(f) for f in files], shard_size=shard_size)
    for file_index, path in enumerate(index.files):
        if not path.is_file():
            raise CorpusError(f"input file {path} does not exist")
        scan = scan_jsonl if input_format(path) == "jsonl" else scan_parquet
        scan(index, file_index, path)
    if not len(index):
        raise CorpusError(f"no rows in {', '.join(map(str, files))}")
    check_ids(index)
    return index


def scan_jsonl(index: CorpusIndex, file_index: int, path: Path) -> None:
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            row = parse_json_row(raw, path, number)
            index.add(file_index, start, number, row.get("id"), row_cost(row.get("text"), row.get("image") is not None),
                      raw.rstrip(b"\r\n"))


def parse_json_row(raw: bytes, path: Path, number: int) -> dict:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorpusError(f"{path} line {number}: invalid JSON: {error}") from None
    if not isinstance(row, dict):
        raise CorpusError(f"{path} line {number}: expected a JSON object with an 'id', got {type(row).__name__}")
    return row


def parquet_columns(path: Path) -> list[str]:
    names = pq.ParquetFile(path).schema_arrow.names
    if "id" not in names:
        raise CorpusError(f"{path}: no 'id' column (columns: {names})")
    return ["id"] + [name for name in ITEM_FIELDS if name in names]


def scan_parquet(index: CorpusIndex, file_index: int, path: Path) -> None:
    columns = parquet_columns(path)
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=8192):
        values = {name: batch.column(name).to_pylist() for name in columns}
        for i in range(batch.num_rows):
            row = {name: values[name][i] for name in columns}
            content = repr(tuple(row.values())).encode()
            index.add(file_index, number, number, row["id"], row_cost(row.get("text"), row.get("image") is not None), content)
            number += 1


def check_ids(index: CorpusIndex) -> None:
    """Every row has an id, all str or all int, and no id appears twice."""
    first_seen: dict[Any, int] = {}
    kind = None
    for row, row_id in enumerate(index.ids):
        if row_id is None:
            raise CorpusError(f"{index.where(row)}: the row has no 'id'")
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            raise CorpusError(f"{index.where(row)}: 'id' must be a string or an integer, got {type(row_id).__name__}")
        if kind is None:
            kind = type(row_id)
        elif not isinstance(row_id, kind):
            raise CorpusError(f"{index.where(row)}: id {row_id!r} is a {type(row_id).__name__}, but earlier ids are "
                              f"{kind.__name__}s; use one type for all ids")
        if row_id in first_seen:
            raise CorpusError(f"duplicate id {row_id!r}: {index.where(first_seen[row_id])} and {index.where(row)}")
        first_seen[row_id] = row


def read_rows(index: CorpusIndex, rows: range) -> list[dict]:
    """The input rows ``rows`` (as dicts), read again from their files."""
    result: list[dict] = []
    start = rows.start
    while start < rows.stop:
        file_index = index.file_of[start]
        stop = start
        while stop < rows.stop and index.file_of[stop] == file_index:
            stop += 1
        path = index.files[file_index]
        if input_format(path) == "jsonl":
            result.extend(read_jsonl_rows(path, [(index.position[i], index.line[i]) for i in range(start, stop)]))
        else:
            result.extend(read_parquet_rows(path, index.position[start], stop - start))
        start = stop
    return result


def read_jsonl_rows(path: Path, lines: list[tuple[int, int]]) -> list[dict]:
    """The JSONL rows at these (byte offset, line number) places."""
    rows = []
    with open(path, "rb") as handle:
        for offset, number in lines:
            handle.seek(offset)
            rows.append(parse_json_row(handle.readline(), path, number))
    return rows


def read_parquet_rows(path: Path, first: int, count: int) -> list[dict]:
    """Rows [first, first + count) of a Parquet file, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    columns = parquet_columns(path)
    groups, group_start, skip = [], 0, None
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        if group_start + group_rows > first and group_start < first + count:
            groups.append(group)
            skip = first - group_start if skip is None else skip
        group_start += group_rows
    table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(skip or 0, count).to_pylist()


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
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
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


# ---------------------------------------------------------------------- model
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(path: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> Any:
    """The model exactly as the README loads it."""
    from transformers import AutoModel

    kwargs = {"revision": revision} if revision else {}
    return AutoModel.from_pretrained(path, trust_remote_code=True, dtype=dtype, **kwargs).to(device)


def settings_hash(run: dict) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()


def run_description(args: argparse.Namespace, model: Any, settings: EncodeSettings, dims: dict[str, int], dtype) -> dict:
    """Everything that determines the vectors (hashed into every shard), as recorded in the manifest."""
    model_path = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    return {
        "model": model_path, "revision": args.revision, "model_commit": getattr(model.config, "_commit_hash", None),
        "dtype": str(dtype).removeprefix("torch."), "settings": dataclasses.asdict(settings), "dims": dims,
    }


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encode-corpus", description=__doc__.split("\n\n")[0],
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
    """The whole job on this rank; returns the manifest on rank 0."""
    settings = settings_from_args(args)
    index = scan_corpus(args.inputs, args.shard_size)
    dtype = resolve_dtype(args.dtype, dist.device)
    model = load_model(args.model, args.revision, dtype, dist.device)
    check_settings(model, settings)
    dims = output_dims(model, settings)
    run = run_description(args, model, settings, dims, dtype)
    run_hash = settings_hash(run)
    pending = pending_shards(args.output_dir, index, run_hash) if dist.is_main else None
    pending = broadcast(pending, dist)
    mine = assign_shards({k: index.shard_cost(k) for k in pending}, dist.world_size)[dist.rank]
    if args.chunk_size < 1:
        raise CorpusError(f"--chunk-size must be positive, got {args.chunk_size}")
    from tqdm.auto import tqdm

    with tqdm(total=sum(len(index.shard_rows(k)) for k in mine), unit="row", disable=not dist.is_main,
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
    run = {**run, "inputs": [str(path) for path in index.files], "config_hash": run_hash, "world_size": dist.world_size}
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
        print(f"encode-corpus: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


__all__ = ["main", "build_parser", "encode_corpus", "EncodeSettings", "encode_items", "scan_corpus", "CorpusError",
           "assign_shards", "vector_column"]


if __name__ == "__main__":
    raise SystemExit(main())
