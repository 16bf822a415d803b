"""Ray Data integration: ``NovaEmbedder``, a callable class for ``Dataset.map_batches``.

Ray Data owns the distribution (reading, splitting into blocks, one model replica per actor, retries,
writing); this class only turns a batch of rows into the same vectors as ``encode-corpus``::

    import ray
    from nova_embeddings.corpus_ray import NovaEmbedder

    ds = ray.data.read_parquet("s3://bucket/corpus/")          # columns: id, text and/or image, ...
    ds = ds.map_batches(
        NovaEmbedder,
        fn_constructor_kwargs={"model": "path/to/nova-embeddings-v1", "vectors": "single", "dimensions": 512},
        concurrency=8, num_gpus=1, batch_size=256, batch_format="pyarrow",
    )
    ds.write_parquet("s3://bucket/vectors/")

Ray needs nothing from this module and this module imports nothing from Ray (``pip install "ray[data]"``
is the ``ray`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import torch

from nova_embeddings.corpus_encode import (
    EncodeSettings,
    check_settings,
    encode_items,
    output_dims,
    resolve_dtype,
    vector_column,
)
from nova_embeddings.corpus_input import CorpusError, row_item
from nova_embeddings.data import load_model


class NovaEmbedder:
    """Adds ``vector`` and/or ``multi_vector`` columns to each batch of rows (``id`` and ``text``/``image``, ...).

    Args:
        model: model folder or Hub id, loaded with ``AutoModel.from_pretrained(model, trust_remote_code=True)``
            once per actor.
        revision: Hub revision of the model.
        device: "auto" (the GPU Ray gives the actor, else the CPU) or a torch device string.
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        skip_bad_rows: False: a bad row raises an error naming its id. True: the row stays, its vectors are
            null and a string column ``error`` says why (null for good rows).
        image_root: folder that relative image paths are resolved against (default: the worker's directory).
        **settings: fields of ``EncodeSettings``: ``vectors`` ("single", "multi", "both"), ``dimensions``,
            ``task``, ``instructions``, ``adapter``, ``bare_backbone``, ``batch_size``, ``max_batch_tokens``,
            ``truncate``, ``min_pixels``, ``max_pixels``. Rows override task, instructions and adapter.

    A batch may be a ``pyarrow.Table`` (``batch_format="pyarrow"``), a pandas DataFrame or a dict of NumPy
    arrays (Ray's default); the result is a ``pyarrow.Table``: the input columns plus the vector columns.
    """

    def __init__(
        self, model: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto",
        skip_bad_rows: bool = False, image_root: str | None = None, **settings: Any,
    ):
        self.settings = EncodeSettings(**settings)
        chosen = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model = load_model(model, dtype=resolve_dtype(dtype, chosen), device=chosen, revision=revision)
        check_settings(self.model, self.settings)
        self.dims = output_dims(self.model, self.settings)
        self.skip_bad_rows = skip_bad_rows
        self.image_root = Path(image_root) if image_root is not None else None

    def __call__(self, batch: pa.Table | Mapping[str, Any] | Any) -> pa.Table:
        table = as_arrow_table(batch)
        if "id" not in table.column_names:
            raise CorpusError(f"rows need an 'id' column; columns: {table.column_names}")
        clash = [column for column in (*self.settings.kinds, "error") if column in table.column_names]
        if clash:
            raise CorpusError(f"the input already has column(s) {clash}; rename or drop them before embedding")
        ids = table.column("id").to_pylist()
        items = [row_item(row, self.image_root) for row in table.to_pylist()]
        errors: list[str | None] = [None] * len(items)

        def on_bad_item(position: int, problem: str) -> None:
            if not self.skip_bad_rows:
                raise CorpusError(f"row id {ids[position]!r}: {problem} (pass skip_bad_rows=True to keep going)")
            errors[position] = problem

        _, vectors = encode_items(self.model, items, self.settings, on_bad_item)
        valid = [error is None for error in errors]
        for column in self.settings.kinds:
            table = table.append_column(column, vector_column(column, vectors[column], self.dims[column], valid))
        if self.skip_bad_rows:
            table = table.append_column("error", pa.array(errors, pa.string()))
        return table


def as_arrow_table(batch: Any) -> pa.Table:
    """Ray hands batches as pyarrow Tables, pandas DataFrames or dicts of NumPy arrays."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, Mapping):
        return pa.table({name: pa.array(list(values)) for name, values in batch.items()})
    if type(batch).__name__ == "DataFrame":
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise TypeError(f"unsupported batch type {type(batch).__name__}; use batch_format='pyarrow'")


__all__ = ["NovaEmbedder"]
