"""Encode mixed items and show what comes back.

    python scripts/demo.py                      # builds a tiny random checkpoint (seconds, CPU, no download)
    python scripts/demo.py --model PATH --device cuda --dtype bfloat16   # a converted nova repository

The tiny checkpoint has random weights: its similarities are meaningless, but every code path
(chat template, instructions, images, adapters, Matryoshka, multi vectors) is the real one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def tiny_model_dir(workdir: Path) -> Path:
    """Write a tiny jina-layout checkpoint and convert it, exactly as a user converts jina's repository."""
    from scripts.convert_jina_v4 import convert
    from scripts.make_tiny_checkpoint import make_tiny_checkpoint

    jina = make_tiny_checkpoint(workdir / "tiny-jina", layout="4x", seed=0, adapters=True)
    out = workdir / "tiny-nova"
    convert(jina, out)
    return out


def sample_page(width: int = 280, height: int = 392) -> Image.Image:
    """A synthetic 'document page': stripes of text-like blocks."""
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    rng = np.random.default_rng(0)
    for top in range(20, height - 20, 24):
        length = int(rng.integers(width // 3, width - 40))
        pixels[top : top + 10, 20 : 20 + length] = 40
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a nova-embeddings-v1 repository (default: build the tiny one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as workdir:
        path = args.model or tiny_model_dir(Path(workdir))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        print(f"model: {path if args.model else 'tiny random checkpoint'} on {args.device} ({args.dtype})")
        print(f"adapters loaded: {model.list_adapters()}")

        items = [
            "what is late interaction?",
            {"text": "Late interaction keeps one vector per token and scores with MaxSim.", "task": "retrieval.passage"},
            {"image": sample_page(), "task": "retrieval.passage"},
            {"image": sample_page(), "text": "Figure 2: throughput by batch size", "task": "retrieval.passage"},
            {"text": "def maxsim(q, d): return (q @ d.T).max(1).sum()", "task": "code.passage"},
        ]
        vectors = model.encode(items, instructions="Find passages that explain retrieval methods")
        norms = [f"{v:.4f}" for v in vectors.norm(dim=-1).tolist()]
        print(f"\nsingle vectors: {tuple(vectors.shape)}, norms {norms}")
        print("cosine of the query with each item:", [f"{v:.3f}" for v in (vectors[1:] @ vectors[0]).tolist()])

        small = model.encode(items[:2], dimensions=model.config.matryoshka_dims[0])
        print(f"Matryoshka {model.config.matryoshka_dims[0]}-d: {tuple(small.shape)}")

        plain = model.encode(items[:1])
        print("instruction moved the query by cosine", round(float(plain[0] @ vectors[0]), 4))

        multi = model.encode(items, return_multivector=True)
        print("multi vectors (tokens, dim):", [tuple(m.shape) for m in multi])
        scores = model.score_multi_vector(multi[:1], multi[1:])
        print("MaxSim of the query with each item:", [f"{v:.2f}" for v in scores[0].tolist()])

        embeds = model.get_image_embeddings([sample_page()])
        reused = model.encode([{"image_embeds": embeds[0], "task": "retrieval.passage"}])
        direct = model.encode([{"image": sample_page(), "task": "retrieval.passage"}])
        print("precomputed image embeddings vs the image, max |difference|:", float((reused - direct).abs().max()))
        print("\nbase64 output (OpenAI format), first item:", model.encode(items[:1], output="base64")[0][:48] + "...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
