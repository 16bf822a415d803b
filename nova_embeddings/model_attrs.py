"""``--model-attr NAME=VALUE`` of the benchmark, the load test and ``serve``: one of the model's speed knobs set for
a run (``attention_packing``, ``adapter_batching``, ``cuda_graphs``, ...), so two configurations compare in one
session, and a server runs the configuration its operator chose."""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence


def parse_model_attr(text: str) -> tuple[str, Any]:
    """NAME=VALUE, VALUE read as JSON when it parses (numbers, true/false), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def apply_model_attrs(model: Any, pairs: Sequence[tuple[str, Any]]) -> None:
    """Set each attribute; ValueError for a name the model does not have (a typo would otherwise run the default
    configuration under another name)."""
    for name, value in pairs:
        if not hasattr(model, name):
            raise ValueError(f"--model-attr: the model has no attribute {name!r}")
        setattr(model, name, value)


def set_model_attrs(model: Any, pairs: Sequence[tuple[str, Any]]) -> None:
    """``apply_model_attrs`` for a measuring run: a bad name ends it with an error line."""
    try:
        apply_model_attrs(model, pairs)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
