"""``--model-attr NAME=VALUE`` of the benchmark and the load test: one of the model's speed knobs set for a run
(``attention_packing``, ``adapter_batching``, ``cuda_graphs``, ...), so two configurations compare in one session."""

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


def set_model_attrs(model: Any, pairs: Sequence[tuple[str, Any]]) -> None:
    """Set each attribute; a name the model does not have ends the run with an error line (a typo would otherwise
    measure the default configuration under another name)."""
    for name, value in pairs:
        if not hasattr(model, name):
            raise SystemExit(f"error: --model-attr: the model has no attribute {name!r}")
        setattr(model, name, value)
