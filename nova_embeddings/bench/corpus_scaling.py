"""encode-corpus on 1 and on N processes (one GPU each): items/s, tokens/s, per-GPU utilisation, the scaling, and
whether the N-process output equals the 1-process one (same ids exactly once, vectors' cosine).

    python3 -m nova_embeddings.bench.corpus_scaling --rows 20000 --nproc 8      # on a machine with 8 GPUs

The corpus is mixed: texts of 32-512 words and a share of document pages (PNG files). Both runs are
``torchrun --standalone --nproc-per-node K -m nova_embeddings.corpus`` from a cold start (process start, model
load and compilation included, as a user runs it), on the same rows and settings. On CUDA the model is the
full-size architecture with random weights; on CPU the tiny checkpoint with gloo (a smoke test of the tool).
GPU utilisation is ``nvidia-smi``'s, sampled twice a second during each run. Keep NVLink multicast off on the
device machines (the device notes say why): ``NCCL_NVLS_ENABLE=0`` is set for the children.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .benchmark import make_page
from .corpus_speed import build_model_dir, min_cosine, read_vectors

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = ["alpha", "beta", "gamma", "delta", "page", "model", "vector", "query", "table", "figure"]


def write_mixed_corpus(workdir: Path, rows: int, page_fraction: float, page_size: tuple[int, int], seed: int) -> Path:
    """JSONL rows: texts of 32-512 words, and pages (PNG files beside it) for ``page_fraction`` of the rows."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    pages = workdir / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    n_pages = min(rows, max(1, round(rows * page_fraction))) if page_fraction > 0 else 0
    page_rows = set(rng.sample(range(rows), n_pages))
    page_files = [pages / f"page{i}.png" for i in range(min(n_pages, 64))]  # a few distinct pages, reused
    for path in page_files:
        make_page(np_rng, *page_size).save(path)
    path = workdir / "corpus.jsonl"
    with path.open("w") as handle:
        for index in range(rows):
            if index in page_rows:
                row = {"id": f"r{index}", "image": str(page_files[index % len(page_files)])}
            else:
                row = {"id": f"r{index}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(32, 512)))}
            handle.write(json.dumps(row) + "\n")
    return path


def count_tokens(model_dir: Path, corpus: Path) -> int:
    """Tokens the model sees for the corpus (prompts and image tokens included), from our processor."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    items = []
    with corpus.open() as handle:
        for line in handle:
            row = json.loads(line)
            items.append({"text": row["text"]} if "text" in row else {"image": Image.open(row["image"])})
    total = 0
    for start in range(0, len(items), 1024):
        normalized = processor.normalize_items(items[start : start + 1024], config=config)
        total += sum(len(t) for t in processor.tokenize_items(normalized, config=config))
    return total


class GpuSampler:
    """nvidia-smi's utilisation per GPU, sampled every ``interval`` seconds in a thread (nothing without CUDA)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuSampler":
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        command = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.interval):
            out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
            self.samples.append({int(i): float(u) for i, u in (line.split(",") for line in out.strip().splitlines())})

    def mean_per_gpu(self) -> dict[int, float]:
        gpus = sorted({gpu for sample in self.samples for gpu in sample})
        return {gpu: round(float(np.mean([s[gpu] for s in self.samples if gpu in s])), 1) for gpu in gpus}


def run_corpus(args: argparse.Namespace, model_dir: Path, corpus: Path, nproc: int) -> dict[str, Any]:
    """One cold torchrun of encode-corpus on ``nproc`` processes: wall seconds, utilisation, output folder."""
    out = args.workdir / f"out-{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "NCCL_NVLS_ENABLE": "0"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "nova_embeddings.corpus", str(corpus), "--model", str(model_dir), "--output-dir", str(out),
               "--no-adapter", "--shard-size", str(args.shard_size), "--chunk-size", str(args.chunk_size),
               "--device", "auto" if args.device == "cuda" else "cpu"]
    with GpuSampler() as sampler:
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"encode-corpus on {nproc} process(es) failed:\n{result.stderr[-4000:]}")
    return {"nproc": nproc, "seconds": seconds, "gpu_utilisation": sampler.mean_per_gpu(), "out": out}


def compare_outputs(one: Path, many: Path, expected_ids: list[str]) -> dict[str, Any]:
    """Same ids, in input order, each once, in both manifests; then the lowest cosine between matching vectors
    (both outputs hold their vectors in manifest order)."""
    problems = []
    for name, out in (("1 process", one), ("N processes", many)):
        ids = json.loads((out / "manifest.json").read_text())["ids"]
        if ids != expected_ids:
            problems.append(f"{name}: manifest ids differ from the input's ({len(ids)} vs {len(expected_ids)}, "
                            f"{len(set(ids))} distinct)")
    cosine = None if problems else min_cosine(read_vectors(one), read_vectors(many))
    return {"ids_equal": not problems, "problems": problems, "min_cosine": cosine}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--page-fraction", type=float, default=0.05, help="share of rows that are document pages")
    parser.add_argument("--page-size", default=None, help="WxH of the pages (default: 1050x1400 on CUDA, 64x80 on CPU)")
    parser.add_argument("--nproc", type=int, default=None, help="processes of the second run (default: every GPU; 2 on CPU)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.nproc < 2:
        parser.error(f"--nproc must be at least 2 (this machine has {torch.cuda.device_count()} GPU(s))")
    size = args.page_size or ("1050x1400" if args.device == "cuda" else "64x80")
    args.page_size = tuple(int(v) for v in size.lower().split("x"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corpus_scaling_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir("random-full" if args.device == "cuda" else "tiny", torch.device(args.device), args.workdir)
    corpus = write_mixed_corpus(args.workdir, args.rows, args.page_fraction, args.page_size, seed=0)
    tokens = count_tokens(model_dir, corpus)
    with corpus.open() as handle:
        expected_ids = [json.loads(line)["id"] for line in handle]
    runs = [run_corpus(args, model_dir, corpus, n) for n in (1, args.nproc)]
    for run in runs:
        print(f"{run['nproc']} process(es): {args.rows / run['seconds']:.1f} items/s, {tokens / run['seconds']:,.0f} "
              f"tokens/s ({run['seconds']:.1f} s, cold); GPU utilisation {run['gpu_utilisation'] or 'n/a'}", flush=True)
    scaling = runs[0]["seconds"] / runs[1]["seconds"]
    check = compare_outputs(runs[0]["out"], runs[1]["out"], expected_ids)
    agreement = (f"ids equal, each once; min cosine 1 vs {args.nproc} processes {check['min_cosine']:.6f}"
                 if check["ids_equal"] else "ids DIFFER: " + "; ".join(check["problems"]))
    print(f"scaling: {scaling:.2f}x on {args.nproc} processes ({scaling / args.nproc:.2f} of linear); {agreement}",
          flush=True)
    result = {"rows": args.rows, "tokens": tokens, "device": args.device, "nproc": args.nproc, "scaling": scaling,
              "runs": [{k: v for k, v in run.items() if k != "out"} for run in runs], **check}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if check["ids_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
