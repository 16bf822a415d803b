"""encode-corpus against encode() in one process, like with like (GPU figures for the README).

Both sides run on the same loaded model after ``model.warmup()`` (compilation done), on the same rows, with the
same batch settings and dtype: ``encode()`` gets every text in one call; ``encode-corpus`` runs in this process
(``encode_corpus`` handed the loaded model), reading the rows from JSONL and writing Parquet shards. Printed:
items/s of each and their ratio; ``encode()`` split into ``prepare_items`` (CPU) and the model; where
encode-corpus's time goes (setup, the GPU stage, its idle time waiting for prepared rows or for the writer, and
the read / prepare / write work done beside it). ``--cold`` also times both from a cold start, each in a fresh
process (interpreter start, model load and compilation included), reported separately.

On CUDA the model is the full-size architecture with random weights (saved with ``save_pretrained``, so the run
also checks that a full-size model round-trips); on CPU it is the tiny checkpoint (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..corpus import Distributed, build_parser, encode_corpus
from ..corpus_encode import resolve_dtype
from ..data import load_model
from ..corpus_pipeline import StageTimes


def write_corpus(path: Path, rows: int, seed: int) -> list[str]:
    """Texts of 32-512 words of a small vocabulary, one JSONL row each."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "page", "model", "vector", "query", "table", "figure"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(32, 512))) for _ in range(rows)]
    with path.open("w") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"id": index, "text": text}) + "\n")
    return texts


def build_model_dir(kind: str, device: torch.device, workdir: Path) -> Path:
    """A model folder: the tiny checkpoint, or the full-size architecture with random weights saved beside it."""
    from ..serve import build_tiny_checkpoint

    tiny = build_tiny_checkpoint(workdir / "tiny")
    if kind == "tiny":
        return tiny
    from .load_test import random_full_size_model

    start = time.perf_counter()
    model = random_full_size_model(tiny, str(device), torch.bfloat16)
    model.save_pretrained(workdir / "full")
    del model
    empty_cache(device)
    print(f"full-size random model saved in {time.perf_counter() - start:.1f} s", flush=True)
    return workdir / "full"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def corpus_argv(args: argparse.Namespace, model_dir: Path, out: Path, prepare_ahead: int) -> list[str]:
    """encode-corpus's command line with the benchmark's settings (the same ones encode() gets)."""
    return [str(args.workdir / "corpus.jsonl"), "--model", str(model_dir), "--output-dir", str(out), "--no-adapter",
            "--shard-size", str(args.shard_size), "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size),
            "--max-batch-tokens", str(args.max_batch_tokens), "--prepare-ahead", str(prepare_ahead),
            "--device", str(args.device), "--dtype", args.dtype]


def encode_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "output": "numpy",
            "show_progress_bar": False}


def timed_corpus_run(model: Any, args: argparse.Namespace, model_dir: Path, prepare_ahead: int) -> tuple[float, StageTimes, Path]:
    """encode-corpus in this process on the loaded model, into a fresh folder: (seconds, stage times, output)."""
    out = args.workdir / f"out-warm-ahead{prepare_ahead}"
    shutil.rmtree(out, ignore_errors=True)  # a finished folder would be skipped as done
    corpus_args = build_parser().parse_args(corpus_argv(args, model_dir, out, prepare_ahead))
    times = StageTimes()
    start = time.perf_counter()
    encode_corpus(corpus_args, Distributed(0, 1, 0, args.device), model=model, times=times)
    synchronize(args.device)
    return time.perf_counter() - start, times, out


def read_vectors(out: Path) -> np.ndarray:
    """The single vectors of an encode-corpus output, in input order."""
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.stack(pq.read_table(out / shard["file"]).column("vector").to_numpy(zero_copy_only=False))
                           for shard in manifest["shards"]])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def warm_comparison(args: argparse.Namespace, model_dir: Path, texts: list[str]) -> None:
    """Both sides on one warmed-up model; prints rates, ratio and encode-corpus's breakdown."""
    rows = len(texts)
    model = load_model(str(model_dir), dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    print(f"model {model_dir.name}, {model.dtype}, {args.device}; warmup {model.warmup():.1f} s", flush=True)

    start = time.perf_counter()
    reference = model.encode(texts, adapter=None, **encode_kwargs(args))
    synchronize(args.device)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    prepared = model.prepare_items(texts, adapter=None)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    model.encode(prepared, **encode_kwargs(args))
    synchronize(args.device)
    model_s = time.perf_counter() - start
    del prepared

    runs = [args.prepare_ahead] + ([0] if args.serial and args.prepare_ahead != 0 else [])
    print(f"{rows} texts, batch_size {args.batch_size}, max_batch_tokens {args.max_batch_tokens}, chunks of "
          f"{args.chunk_size}, shards of {args.shard_size}, after warmup:")
    print(f"  encode(): {rows / encode_s:.1f} items/s ({encode_s:.2f} s) = prepare_items {prepare_s:.2f} s (CPU, one "
          f"thread) + model {model_s:.2f} s ({rows / model_s:.1f} items/s, measured as encode(prepared))")
    for prepare_ahead in runs:
        corpus_s, times, out = timed_corpus_run(model, args, model_dir, prepare_ahead)
        cosine = min_cosine(read_vectors(out), np.asarray(reference))
        print(f"  encode-corpus --prepare-ahead {prepare_ahead}: {rows / corpus_s:.1f} items/s ({corpus_s:.2f} s); "
              f"ratio to encode() {encode_s / corpus_s:.3f}x; min cosine to encode() over all rows {cosine:.5f}")
        print_breakdown(corpus_s, encode_s, prepare_s, model_s, times)
    del model
    empty_cache(args.device)


def print_breakdown(corpus_s: float, encode_s: float, prepare_s: float, model_s: float, times: StageTimes) -> None:
    """Where encode-corpus's time goes, and its difference to encode() as a sum of named parts."""
    after_loop = corpus_s - times.setup - times.wall  # barrier, manifest
    gpu_stage_extra = times.encode - model_s  # chunked encode() calls vs one call (boundaries, contention)
    idle = times.wait_for_input + times.wait_for_writer
    residual = (corpus_s - encode_s) - (times.setup + after_loop + idle + gpu_stage_extra - prepare_s)
    print(f"    stages: {times.summary()}; after the loop (manifest) {after_loop:.2f} s")
    print(f"    corpus - encode() = {corpus_s - encode_s:+.2f} s = setup {times.setup:+.2f} + manifest {after_loop:+.2f} "
          f"+ GPU idle {idle:+.2f} (waiting for prepared rows {times.wait_for_input:.2f}, for the writer "
          f"{times.wait_for_writer:.2f}) + GPU stage vs one encode() call {gpu_stage_extra:+.2f} "
          f"- encode()'s own prepare_items {prepare_s:.2f} (hidden by the pipeline) + other {residual:+.2f}", flush=True)


def cold_comparison(args: argparse.Namespace, model_dir: Path) -> None:
    """Each side in a fresh process, timed from its start: interpreter, imports, model load, compilation included."""
    common = [sys.executable, "-m", "nova_embeddings.bench.corpus_speed", "--workdir", str(args.workdir),
              "--device", str(args.device), "--dtype", args.dtype, "--batch-size", str(args.batch_size),
              "--max-batch-tokens", str(args.max_batch_tokens)]
    start = time.perf_counter()
    subprocess.run([*common, "--cold-encode-child", str(model_dir)], check=True)
    encode_s = time.perf_counter() - start
    out = args.workdir / "out-cold"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nova_embeddings", "encode-corpus",
                    *corpus_argv(args, model_dir, out, args.prepare_ahead)], check=True)
    corpus_s = time.perf_counter() - start
    rows = args.rows
    print(f"cold (each in a fresh process, load and compilation included): encode() {rows / encode_s:.1f} items/s "
          f"({encode_s:.1f} s); encode-corpus {rows / corpus_s:.1f} items/s ({corpus_s:.1f} s); ratio "
          f"{encode_s / corpus_s:.3f}x", flush=True)


def cold_encode_child(args: argparse.Namespace, model_dir: Path) -> None:
    """The cold encode() side: load, read the texts, encode them in one call."""
    model = load_model(str(model_dir), dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    with (args.workdir / "corpus.jsonl").open() as handle:
        texts = [json.loads(line)["text"] for line in handle]
    model.encode(texts, adapter=None, **encode_kwargs(args))
    synchronize(args.device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="auto", help="auto: cuda if present, else cpu")
    parser.add_argument("--model", choices=["auto", "random-full", "tiny"], default="auto",
                        help="auto: the full-size random model on CUDA, the tiny checkpoint on CPU")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU (both sides)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--prepare-ahead", type=int, default=2)
    parser.add_argument("--serial", action="store_true", help="also time encode-corpus with --prepare-ahead 0")
    parser.add_argument("--cold", action="store_true", help="also time both sides from a cold start, each in a new process")
    parser.add_argument("--cold-encode-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.model == "auto":
        args.model = "random-full" if args.device.type == "cuda" else "tiny"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cold_encode_child is not None:
        cold_encode_child(args, args.cold_encode_child)
        return 0
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corpus_speed_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, args.device, args.workdir)
    texts = write_corpus(args.workdir / "corpus.jsonl", args.rows, seed=0)
    warm_comparison(args, model_dir, texts)
    if args.cold:
        cold_comparison(args, model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
