"""Helpers shared by train.py and evaluate.py: JSONL files, image paths, model loading.

Why a module: both scripts read JSONL files whose errors must name the line, both resolve image paths
against the data file's folder (not the working directory), and both load the model the same way.
Item validation itself stays in the processor (``normalize_items``); this module only maps its
``ItemError.index`` back to where an item came from.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the problem."""


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; invalid JSON names its line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: invalid JSON: {error.msg} (column {error.colno})") from None


URL_SCHEMES = ("http://", "https://", "data:")  # read in any case, as encode() reads them


def resolve_image(value: Any, base_dir: Path) -> Any:
    """A relative image path is taken relative to the data file's folder, never the working folder (a missing image
    fails naming that path); URLs, absolute paths and strings that may be base64 pass unchanged."""
    if not isinstance(value, str) or value[:8].lower().startswith(URL_SCHEMES) or os.path.isabs(value):
        return value
    candidate = base_dir / value
    try:
        found = candidate.is_file()
    except OSError:  # e.g. a base64 string longer than a file name may be
        return value
    return str(candidate) if found or not _may_be_base64(value) else value


def _may_be_base64(value: str) -> bool:
    """Whether a string could be base64 image data (only its alphabet and line breaks): "page.png" cannot."""
    return re.fullmatch(r"[A-Za-z0-9+/=\s]+", value) is not None


def resolve_item_images(item: Any, base_dir: Path) -> Any:
    """A copy of a raw item (str or dict) with its ``image`` resolved against ``base_dir``."""
    if isinstance(item, dict) and "image" in item:
        return {**item, "image": resolve_image(item["image"], base_dir)}
    return item


def item_problem(error: ValueError, base_dir: Path | None = None) -> tuple[int | None, str]:
    """(item index, problem) of a processor error; the index is None for errors about the whole call."""
    index = getattr(error, "index", None)
    problem = getattr(error, "problem", str(error))
    if base_dir is not None and "existing path" in problem:
        problem += f" (relative image paths are resolved against {base_dir})"
    return index, problem


def load_model(
    name_or_path: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
    load_task_adapters: bool = True, revision: str | None = None,
) -> torch.nn.Module:
    """The nova model exactly as the README loads it (transformers' remote code), in ``dtype`` (a name or a torch
    dtype), on ``device`` (default: cuda if present), at ``revision`` if given."""
    from transformers import AutoModel

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    kwargs = {"revision": revision} if revision else {}
    model = AutoModel.from_pretrained(
        name_or_path, trust_remote_code=True, dtype=dtype, load_task_adapters=load_task_adapters, **kwargs
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device)


def exit_status(command: Callable[[], Any]) -> int:
    """Run a subcommand's work for its ``main``: 0, or 2 with a one-line message for bad input (a ``ValueError``:
    bad data, an unknown adapter or task), never a traceback for the user's mistake."""
    try:
        command()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DataError", "DTYPES", "iter_jsonl", "resolve_image", "resolve_item_images", "item_problem", "load_model", "exit_status"]
