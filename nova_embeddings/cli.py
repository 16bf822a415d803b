"""The ``nova-embeddings`` command: one subcommand per tool.

Each subcommand is a module with ``main(argv: list[str] | None) -> int`` that parses its own flags, so
``nova-embeddings <sub> --help`` shows exactly that module's options. Modules are imported only when their
subcommand runs (``--help`` of the command itself imports no torch). A new subcommand is one row of
``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

from . import __version__

PROG = "nova-embeddings"


@dataclass(frozen=True)
class Subcommand:
    """A subcommand name, the module whose ``main(argv)`` runs it, and its one-line summary."""

    name: str
    module: str
    summary: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("serve", "nova_embeddings.serve", "serve an OpenAI-compatible embeddings API (FastAPI + uvicorn)"),
    Subcommand("convert", "nova_embeddings.convert", "convert a local jina-embeddings-v4 repository into a nova one"),
    Subcommand("train", "nova_embeddings.train", "train a LoRA adapter with a contrastive loss"),
    Subcommand("evaluate", "nova_embeddings.evaluate", "score retrieval on a BEIR-style folder (nDCG, MRR, recall)"),
    Subcommand("bench", "nova_embeddings.bench.benchmark", "benchmark encode() against jina's reference path"),
    Subcommand("bench-vision", "nova_embeddings.bench.vision", "time the fast vision tower against the stock one"),
    Subcommand("load-test", "nova_embeddings.bench.load_test", "load test of the embeddings server (loopback only)"),
    Subcommand("demo", "nova_embeddings.demo", "encode mixed items and show what comes back"),
    Subcommand("tiny", "nova_embeddings.tiny", "write a tiny random-weight checkpoint in jina's layout"),
    Subcommand("encode-corpus", "nova_embeddings.corpus",
               "embed a JSONL/Parquet corpus into sharded Parquet, resumable, on one or many GPUs (torchrun)"),
    Subcommand("export-vllm", "nova_embeddings.export_vllm",
               "write a stock Qwen2.5-VL checkpoint with one adapter merged in, for vLLM"),
)
BY_NAME = {sub.name: sub for sub in SUBCOMMANDS}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" suffix, except where the help already states its default or there is none
    (a None default means "not given"; "(default: None)" tells the reader nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the subcommands; everything after the subcommand goes to its module."""
    width = max(len(sub.name) for sub in SUBCOMMANDS)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for nova-embeddings-v1. Run `nova-embeddings <subcommand> --help` for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {sub.name:<{width}}  {sub.summary}" for sub in SUBCOMMANDS),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("subcommand", choices=list(BY_NAME), metavar="<subcommand>", help="one of those listed below")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="the subcommand's own flags")
    return parser


@contextlib.contextmanager
def program_name(name: str) -> Iterator[None]:
    """Let the subcommand's argparse (which reads ``sys.argv[0]``) print ``nova-embeddings <sub>`` as its name."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        sys.argv[0] = saved


def run(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run subcommand ``name`` with ``argv`` (default: ``sys.argv[1:]``); returns its exit status."""
    module = importlib.import_module(BY_NAME[name].module)
    with program_name(prog or f"{PROG} {name}"):
        return module.main(list(sys.argv[1:] if argv is None else argv))


def run_deprecated(name: str, script: str) -> int:
    """What the old ``scripts/<script>`` wrappers do: say they are deprecated, then run the subcommand."""
    print(f"{script} is deprecated: use `{PROG} {name}` (same flags; `pip install -e .` installs it)",
          file=sys.stderr)
    return run(name, prog=f"{script} [deprecated]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nova-embeddings`` console script."""
    args = build_parser().parse_args(argv)
    return run(args.subcommand, args.args)
