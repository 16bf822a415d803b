"""Encoding rows with the model, shared by ``encode-corpus`` and Ray Data's ``NovaEmbedder``.

The model is used as a user uses it: ``AutoModel.from_pretrained(path, trust_remote_code=True)`` and its
public ``prepare_items`` (validate, tokenise: the CPU half, safe in another thread) and ``encode``; a bad item's
``ItemError.index`` is handed back so the caller can name the row's id.
Vectors become Arrow columns: ``vector`` as ``fixed_size_list<float32>[D]`` and ``multi_vector`` as
``list<fixed_size_list<float32>[128]>`` (one entry per token), the layouts vector databases load directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

try:
    import pyarrow as pa
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("encode-corpus needs pyarrow: pip install 'pyarrow>=16' (the corpus extra)") from _error

from nova_embeddings.corpus_input import CorpusError
from nova_embeddings.data import DTYPES

VECTOR_KINDS = ("single", "multi", "both")


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
            raise CorpusError(f"vectors must be one of {VECTOR_KINDS}, got {self.vectors!r}")
        if self.adapter is not None and self.bare_backbone:
            raise CorpusError("give an adapter name or bare_backbone=True, not both")
        if self.dimensions is not None and self.vectors == "multi":
            raise CorpusError("dimensions applies to single vectors; it cannot be used with vectors='multi'")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the vectors (batching only decides the speed): what a resumed run must match."""
        fields = dataclasses.asdict(self)
        for speed_only in ("batch_size", "max_batch_tokens"):
            fields.pop(speed_only)
        return fields

    @property
    def kinds(self) -> list[str]:
        """Output columns in the order they are computed."""
        return {"single": ["vector"], "multi": ["multi_vector"], "both": ["vector", "multi_vector"]}[self.vectors]

    def prepare_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.prepare_items``: what the items are formatted and routed with."""
        kwargs: dict[str, Any] = {"task": self.task, "instructions": self.instructions, "truncate": self.truncate,
                                  "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        if self.bare_backbone:
            kwargs["adapter"] = None
        elif self.adapter is not None:
            kwargs["adapter"] = self.adapter
        return kwargs

    def encode_kwargs(self, column: str) -> dict[str, Any]:
        """Keyword arguments of ``model.encode`` (given prepared items) for one output column."""
        kwargs: dict[str, Any] = {
            "return_multivector": column == "multi_vector", "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens, "output": "numpy", "show_progress_bar": False,
        }
        if column == "vector":
            kwargs["dimensions"] = self.dimensions
        return kwargs


def output_dims(model: Any, settings: EncodeSettings) -> dict[str, int]:
    """Width of each output column, from the model's config (also needed for shards without a good row)."""
    dims = {"vector": settings.dimensions or model.config.embedding_dim,
            "multi_vector": model.config.multi_vector_projector_dim}
    return {column: dims[column] for column in settings.kinds}


def check_settings(model: Any, settings: EncodeSettings) -> None:
    """Call-level mistakes fail once, up front, instead of as an error on every row."""
    if settings.task is not None and settings.task not in model.config.task_prompts:
        raise CorpusError(f"unknown task {settings.task!r}; valid tasks: {sorted(model.config.task_prompts)}")
    if settings.adapter is not None and settings.adapter not in model.list_adapters():
        raise CorpusError(f"unknown adapter {settings.adapter!r}; loaded adapters: {model.list_adapters()}")
    if settings.dimensions is not None and settings.dimensions not in model.config.matryoshka_dims:
        raise CorpusError(f"--dimensions {settings.dimensions} is not allowed; choose one of {model.config.matryoshka_dims}")


# ---------------------------------------------------------------------- encoding rows (shared with Ray)
def item_error_index(error: BaseException) -> int | None:
    """The item index of the processor's ``ItemError`` (duck-typed: remote code may load its own copy of the class)."""
    index = getattr(error, "index", None)
    return index if isinstance(error, ValueError) and isinstance(index, int) else None


def prepare_rows(
    model: Any, items: list[dict], settings: EncodeSettings, on_bad_item: Callable[[int, str], None]
) -> tuple[list[int], Any]:
    """Validate, tokenise and route items with ``model.prepare_items`` (the CPU half of ``encode``).

    Returns (indices of the good items, their ``PreparedItems``; None when no item is good). A bad item raises
    ``ItemError``; ``on_bad_item(index, problem)`` either raises (the CLI's default) or records it, and the
    remaining items are prepared again without it, so they are encoded exactly as they would be without it.
    """
    alive = list(range(len(items)))
    while alive:
        try:
            return alive, model.prepare_items([items[i] for i in alive], **settings.prepare_kwargs())
        except ValueError as error:
            position = item_error_index(error)
            if position is None or not 0 <= position < len(alive):
                raise
            on_bad_item(alive[position], getattr(error, "problem", str(error)))
            del alive[position]
    return [], None


def encode_prepared(
    model: Any, kept: list[int], prepared: Any, settings: EncodeSettings, on_bad_item: Callable[[int, str], None]
) -> tuple[list[int], dict[str, Any]]:
    """``model.encode`` of prepared items, once per output column; returns (kept indices, column -> vectors).

    An ``ItemError`` here (an image the processor fails to collate) names the item's index in the
    ``prepare_items`` call; that item goes to ``on_bad_item`` and the others are encoded again without it.
    """
    positions = list(range(len(kept)))  # indices in the prepare_items call (each TokenizedItem's item.index)
    while positions and prepared is not None:
        try:
            vectors = {column: model.encode(prepared, **settings.encode_kwargs(column)) for column in settings.kinds}
            return [kept[p] for p in positions], vectors
        except ValueError as error:
            index = item_error_index(error)
            if index is None or index not in positions:
                raise
            on_bad_item(kept[index], getattr(error, "problem", str(error)))
            where = positions.index(index)
            del positions[where]
            prepared = type(prepared)(prepared.tokenized[:where] + prepared.tokenized[where + 1:],
                                      prepared.adapters[:where] + prepared.adapters[where + 1:], prepared.limits)
    return [], {column: [] for column in settings.kinds}


def encode_items(
    model: Any, items: list[dict], settings: EncodeSettings, on_bad_item: Callable[[int, str], None]
) -> tuple[list[int], dict[str, Any]]:
    """Prepare then encode items (tokenised once for all output columns); returns (good indices, column -> vectors)."""
    kept, prepared = prepare_rows(model, items, settings, on_bad_item)
    return encode_prepared(model, kept, prepared, settings, on_bad_item)


def vector_type(column: str, dim: int) -> pa.DataType:
    """Arrow type of a column: ``fixed_size_list<float32>[dim]``, or a list of those for multi vectors."""
    single = pa.list_(pa.float32(), dim)
    return single if column == "vector" else pa.list_(single)


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


__all__ = ["EncodeSettings", "VECTOR_KINDS", "DTYPES", "prepare_rows", "encode_prepared", "encode_items", "vector_column",
           "vector_type", "output_dims", "check_settings", "resolve_dtype"]
