"""Micro-benchmark of the vision tower: transformers' stock forward against FastVisionTower, same weights.

Why: the fast tower (vision_nova_embeddings_v1.py) claims the stock result for less time; this measures both
on one model in one run and checks that they agree. The model is the full-size one from the repository's
config.json with random weights made on the device (built by nova_embeddings/bench/benchmark.py's own functions); inputs
are random pixel rows for pages of the given sizes (768 image tokens each by default, jina's pixel cap), so
no processor time is included. Each attention mode is timed for both paths: "packed" is the model's CUDA
path (``nova_flash_varlen``: one varlen call per layer), "sdpa" the per-window SDPA path.

Usage (repository root; results also go to $OUT/bench_vision[_compile].json when $OUT is set):
    python scripts/bench_vision.py [--images 16] [--size 896x672[,1008x588,...]] [--repeats 10] [--compile]
    python scripts/bench_vision.py --tiny --device cpu --dtype float32      # seconds on a CPU (proves it runs)

Exit status 0 when every fast output matches the stock one (cosine >= 0.999 per token in half precision,
max abs diff <= 1e-4 in float32), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .benchmark import bench_tokenizer, build_config, build_model, load_classes, resolve_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

ATTENTIONS = {"packed": "nova_flash_varlen", "sdpa": "sdpa"}
COSINE_MIN = 0.999
FP32_MAX_DIFF = 1e-4
TINY_SIZES = "112x168,56x84"
TINY_IMAGES = 3


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'896x672,1008x588' -> [(896, 672), (1008, 588)] (height x width in pixels, multiples of 28)."""
    sizes = []
    for part in text.split(","):
        height, width = (int(v) for v in part.lower().split("x"))
        if height % 28 or width % 28 or height <= 0 or width <= 0:
            raise argparse.ArgumentTypeError(f"size {part!r}: height and width must be positive multiples of 28")
        sizes.append((height, width))
    return sizes


def page_inputs(visual, n_images: int, sizes: list[tuple[int, int]], device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel rows and grids for ``n_images`` pages cycling through ``sizes``, laid out as the processor
    lays them out: (patches, channels*time*patch*patch) float32, grid (images, 3) on the device."""
    config = visual.config
    patch = config.patch_size
    grids = [(1, sizes[i % len(sizes)][0] // patch, sizes[i % len(sizes)][1] // patch) for i in range(n_images)]
    grid_thw = torch.tensor(grids, device=device)
    width = config.in_channels * config.temporal_patch_size * patch**2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), width, generator=generator).to(device)
    return pixels, grid_thw


def time_calls(run: Callable[[], torch.Tensor], device: torch.device, warmup: int,
               repeats: int) -> tuple[torch.Tensor, list[float]]:
    """Seconds of each of ``repeats`` calls after ``warmup`` calls (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        out = run()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            out = run()
            seconds.append(time.perf_counter() - started)
    return out, seconds


def agreement(fast: torch.Tensor, stock: torch.Tensor) -> dict[str, float]:
    """Max abs difference and the lowest per-token cosine, in float32."""
    fast, stock = fast.float(), stock.float()
    return {"max_abs_diff": (fast - stock).abs().max().item(),
            "min_cosine": F.cosine_similarity(fast, stock, dim=-1).min().item()}


def benchmark_vision(model, n_images: int = 16, size: str | list[tuple[int, int]] = "896x672", *,
                     attentions: tuple[str, ...] = ("packed", "sdpa"), warmup: int = 3, repeats: int = 10,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Time stock ``visual(...)`` and the fast tower on ``n_images`` pages of ``size`` for each attention mode.

    Returns one row per attention mode: pages/s of both paths (median call), the speed-up, peak memory
    (CUDA) and how closely the outputs agree. Prints each row as it is done.
    """
    visual = model.model.visual
    vision = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".vision_nova_embeddings_v1")
    tower = vision.fast_vision_tower(visual)
    device, dtype = visual.device, visual.dtype
    sizes = parse_sizes(size) if isinstance(size, str) else size
    pixels, grid_thw = page_inputs(visual, n_images, sizes, device, seed)
    pixels = pixels.to(dtype)
    rows = []
    for mode in attentions:
        row: dict[str, Any] = {"attention": mode, "images": n_images, "patches": pixels.shape[0],
                               "sizes": [f"{h}x{w}" for h, w in sizes], "dtype": str(dtype).removeprefix("torch.")}
        with torch.inference_mode(), vision.attention_implementation(visual, ATTENTIONS[mode]):
            for name, run in (("stock", lambda: visual(pixels, grid_thw=grid_thw).pooler_output),
                              ("fast", lambda: tower(pixels, grid_thw=grid_thw).pooler_output)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                out, seconds = time_calls(run, device, warmup, repeats)
                row[name] = out
                median = statistics.median(seconds)
                row[f"{name}_ms"] = median * 1000
                row[f"{name}_pages_per_s"] = n_images / median
                if device.type == "cuda":
                    row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
        row.update(agreement(row.pop("fast"), row.pop("stock")))
        row["speedup"] = row["stock_ms"] / row["fast_ms"]
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def format_row(row: dict[str, Any]) -> str:
    return (f"{row['attention']:>6} | {row['images']} pages, {row['patches']} patches, {row['dtype']} | "
            f"stock {row['stock_ms']:.2f} ms ({row['stock_pages_per_s']:.1f} pages/s) | "
            f"fast {row['fast_ms']:.2f} ms ({row['fast_pages_per_s']:.1f} pages/s) | x{row['speedup']:.2f} | "
            f"max abs diff {row['max_abs_diff']:.3g}, min cosine {row['min_cosine']:.6f}")


def acceptable(row: dict[str, Any]) -> bool:
    """The fast tower must compute the stock result: float32 to rounding, half precision to a cosine bound."""
    if row["dtype"] == "float32":
        return row["max_abs_diff"] <= FP32_MAX_DIFF
    return row["min_cosine"] >= COSINE_MIN


def build_bench_model(tiny: bool, device: torch.device, dtype: torch.dtype, workdir: Path):
    """The full-size (or tiny) model with random weights on the device, as nova_embeddings/bench/benchmark.py builds it."""
    model_cls, _ = load_classes()
    config = build_config(model_cls.config_class, tiny, bench_tokenizer(workdir))
    return build_model(model_cls, config, device, dtype, attn="sdpa")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--tiny", action="store_true", help=f"tiny config, {TINY_IMAGES} small pages: seconds on a CPU")
    parser.add_argument("--images", type=int, default=None, help="pages per call (default 16; tiny 3)")
    parser.add_argument("--size", default=None, help="HxW pixels, comma list cycles (default 896x672 = 768 tokens)")
    parser.add_argument("--attention", default="packed,sdpa", help="comma list of: " + ", ".join(ATTENTIONS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per path (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision blocks (model.compile_layers)")
    args = parser.parse_args(argv)
    modes = tuple(args.attention.split(","))
    unknown = [mode for mode in modes if mode not in ATTENTIONS]
    if unknown:
        parser.error(f"unknown --attention {unknown}: choose from {sorted(ATTENTIONS)}")
    args.attention = modes
    args.images = args.images or (TINY_IMAGES if args.tiny else 16)
    args.size = args.size or (TINY_SIZES if args.tiny else "896x672")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(prefix="nova-bench-vision-") as tmp:
        model = build_bench_model(args.tiny, device, dtype, Path(tmp))
    if args.compile:
        model.compile_layers(vision=True)
    print(f"vision tower: depth {model.config.vision_config.depth}, hidden {model.config.vision_config.hidden_size}, "
          f"{dtype}, {device}, compile={args.compile}", flush=True)
    rows = benchmark_vision(model, args.images, args.size, attentions=args.attention, warmup=args.warmup,
                            repeats=args.repeats)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / ("bench_vision_compile.json" if args.compile else "bench_vision.json")
        path.write_text(json.dumps({"compile": args.compile, "device": str(device), "rows": rows}, indent=2))
        print(f"results written to {path}")
    bad = [row["attention"] for row in rows if not acceptable(row)]
    print("CHECKS: " + ("fast output equals stock" if not bad else f"FAILED for {bad}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
