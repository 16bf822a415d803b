"""Corpus encoder against encode() in one process, on the full-size random model (GPU figures for the README).

Saves the full-size random model with ``save_pretrained`` (so the run also checks that a full-size model
round-trips), writes a JSONL corpus of texts, then times, each from a cold start (model load and first-call
compilation included): ``encode()`` of every text in one call, and ``nova-embeddings encode-corpus`` as a
subprocess. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .load_test import random_full_size_model


def write_corpus(path: Path, rows: int, seed: int) -> list[str]:
    """Texts of 32-512 words of a small vocabulary, one JSONL row each."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "page", "model", "vector", "query", "table", "figure"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(32, 512))) for _ in range(rows)]
    with path.open("w") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"id": index, "text": text}) + "\n")
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoModel

    from ..serve import build_tiny_checkpoint

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corpus_speed_"))
    start = time.perf_counter()
    model = random_full_size_model(build_tiny_checkpoint(workdir / "tiny"), "cuda", torch.bfloat16)
    model.save_pretrained(workdir / "full")
    del model
    torch.cuda.empty_cache()
    print(f"full-size random model saved in {time.perf_counter() - start:.1f} s", flush=True)
    texts = write_corpus(workdir / "corpus.jsonl", args.rows, seed=0)

    start = time.perf_counter()
    model = AutoModel.from_pretrained(str(workdir / "full"), trust_remote_code=True, dtype=torch.bfloat16).to("cuda")
    vectors = model.encode(texts, adapter=None)
    torch.cuda.synchronize()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    model.encode(texts, adapter=None)
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nova_embeddings", "encode-corpus", str(workdir / "corpus.jsonl"),
                    "--model", str(workdir / "full"), "--output-dir", str(workdir / "out"), "--no-adapter",
                    "--shard-size", "1024"], check=True)
    corpus = time.perf_counter() - start
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((workdir / "out" / "shards").glob("*.parquet"))[0])
    first = torch.tensor(table.column("vector")[0].as_py())
    cosine = float(torch.nn.functional.cosine_similarity(first, vectors[0], dim=0))
    print(f"{args.rows} texts: encode() cold {args.rows / cold:.1f} items/s ({cold:.1f} s, load + compile included), "
          f"warm {args.rows / warm:.1f} items/s; encode-corpus cold {args.rows / corpus:.1f} items/s ({corpus:.1f} s); "
          f"ratio corpus/encode (cold) {cold / corpus:.2f}x; cosine of row 0 {cosine:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
