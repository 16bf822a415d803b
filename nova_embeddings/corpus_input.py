"""Reading a corpus: JSONL/Parquet rows with ids, scanned once, then read back shard by shard.

The scan records, per row, its id, where it is (file, byte offset or row number, line) and a length
estimate, and per shard a fingerprint of its rows' content, so that the plan and the resume check depend on
the input alone. Every error names the file and line (and the id where there is one).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nova_embeddings.data import resolve_image

try:
    import pyarrow.parquet as pq
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("encode-corpus needs pyarrow: pip install 'pyarrow>=16' (the corpus extra)") from _error

ITEM_FIELDS = ("text", "image", "task", "instructions", "adapter")  # row fields handed to encode()
IMAGE_COST_CHARS = 3072  # balance estimate: an image at the default pixel cap is ~768 tokens, ~4 characters each


class CorpusError(ValueError):
    """Bad input or output state; the message names the file, line and row id where there is one."""


def row_item(row: dict, image_root: Path | None) -> dict:
    """The encode() item of an input row: its item fields, nulls meaning "not given", images resolved."""
    item = {key: row[key] for key in ITEM_FIELDS if row.get(key) is not None}
    if image_root is not None and "image" in item:
        item["image"] = resolve_image(item["image"], image_root)
    return item


@dataclass
class CorpusIndex:
    """Every input row's id and where it is, plus what the plan needs: length estimates and per-shard fingerprints."""

    files: list[Path]
    shard_size: int
    ids: list[Any] = field(default_factory=list)
    file_of: array = field(default_factory=lambda: array("q"))
    position: array = field(default_factory=lambda: array("q"))  # JSONL: byte offset of the line; Parquet: row number
    line: array = field(default_factory=lambda: array("q"))  # JSONL: 1-based line number; Parquet: 0-based row number
    cost: array = field(default_factory=lambda: array("q"))  # estimated characters, to balance ranks
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


__all__ = ["CorpusError", "CorpusIndex", "ITEM_FIELDS", "scan_corpus", "read_rows", "row_item", "resolve_image"]
