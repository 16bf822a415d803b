"""GPU benchmark of nova-embeddings-v1 against jina-embeddings-v4's way of running the same weights.

Why this shape: the question is how much faster ``encode()`` is than jina's path on the same model, and
whether it still computes the same vectors. So every workload times, in the same run and on the same
weights, (a) the reference path -- transformers' stock ``Qwen2_5_VLForConditionalGeneration``, the full
causal-LM forward with ``output_hidden_states=True``, ``hidden_states[-1]``, batch 8 in input order, right
padding, jina's pooling -- and (b) our ``encode()``, and reports tokens/s, items/s, latency, peak GPU memory,
the speed ratio and the cosine between the two outputs (>= 0.999 required: an optimisation that changes
results is a bug).

The model is the full-size one (the repository's ``config.json``) with random weights made directly on the
device (N(0, 0.02), norms 1): nothing is downloaded or read from disk but the config. The tokenizer
is the tiny byte-level BPE of ``nova_embeddings/tiny.py`` (Qwen's added tokens, a small vocabulary);
the config's special-token ids are set to that tokenizer's ids. Texts are cut to exact token counts with it.

Workloads (``--workloads``, run in the order 1,2,3,5,6,4: loading adapters for 4 wraps the model's layers):
    1  256 texts of 32-512 tokens, retrieval.passage, throughput
    2  one 16-token query at a time, 200 calls, latency
    3  64 pages of 1050x1400 px at the default pixel limit (768 image tokens each) and 8 pages of
       3000x2000 px with the limit raised to let them through whole (~7.6k tokens each)
    4  workload 1's texts spread over the three task adapters and a custom one (random r=32 LoRA), one call,
       with adapter_batching "group" and "mixed"
    5  workload 1 with multi-vector output
    6  16 texts of 8192 tokens, plus a single-text memory probe at 1k-8k tokens

Usage (repository root; results also go to $OUT/benchmark.json when $OUT is set):
    nova-embeddings bench [--workloads 1,2,3,4,5,6] [--repeats 3] [--profile]
    nova-embeddings bench --tiny --device cpu --dtype float32     # seconds on a CPU (tests)

Exit status: 0 when every workload ran (OOMs are reported as rows, not failures) and every cosine is
>= 0.999; 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

from ..tiny import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_CORPUS,
    build_tiny_tokenizer,
    write_tokenizer_files,
)
from ..model_attrs import parse_model_attr, set_model_attrs

COSINE_MIN = 0.999
REF_BATCH = 8  # jina's encode_text / encode_image default batch size
PASSAGE_TASK, QUERY_TASK = "retrieval.passage", "retrieval.query"
PASSAGE_PREFIX, QUERY_PREFIX = "Passage: ", "Query: "
JINA_IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
INIT_STD = 0.02
LORA_RELATIVE = 0.03  # a random adapter adds ~3% to each projection's output: visible, not dominant
LORA_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
                r"|.*multi_vector_projector$")
ADAPTERS = ("retrieval", "text-matching", "code", "custom")
RUN_ORDER = (1, 2, 3, 5, 6, 4)
MODEL_KNOBS = ("adapter_batching", "attention_packing")  # recorded in the JSON when the model has them
GIB = 1024**3

# The tiny checkpoint's numbers (nova_embeddings/tiny.py): every structural rule of Qwen2.5-VL, tiny sizes.
# The full-size model reads the repository's config.json instead.
TINY_TEXT = dict(
    vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
    rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default"}, max_position_embeddings=32768,
    initializer_range=INIT_STD, tie_word_embeddings=True,
)
TINY_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
    in_chans=3, hidden_act="silu", initializer_range=INIT_STD,
)
TINY_EMBEDDING = dict(multi_vector_projector_dim=16, matryoshka_dims=[16, 32, 64],
                      task_names=["retrieval", "text-matching", "code"], min_pixels=56 * 56, max_pixels=28 * 28 * 16)

# Config fields holding special-token ids -> the token; set to the bench tokenizer's ids.
TOP_TOKEN_FIELDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
TEXT_TOKEN_FIELDS = {"bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"}


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: the issue's numbers, or a CPU-sized copy for --tiny."""

    texts: int = 256
    text_tokens: tuple[int, int] = (32, 512)  # whole item, task prefix included
    queries: int = 200
    query_tokens: int = 16
    pages: int = 64
    page_px: tuple[int, int] = (1050, 1400)  # width, height: exactly 768 image tokens at the default limit
    big_pages: int = 8
    big_page_px: tuple[int, int] = (3000, 2000)
    long_texts: int = 16
    long_tokens: int = 8192
    probe_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    lora_rank: int = 32
    warmup_pages: int = 8


FULL = Sizes()
TINY = Sizes(texts=24, text_tokens=(8, 64), queries=10, pages=6, page_px=(200, 280), big_pages=2,
             big_page_px=(600, 400), long_texts=3, long_tokens=512, probe_tokens=(64, 128, 256, 512),
             lora_rank=8, warmup_pages=2)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    """One path of one workload: its timings, memory and agreement with its baseline."""

    path: str
    tokens: int = 0
    items: int = 0
    seconds: list[float] = field(default_factory=list)  # wall-clock per timed call
    per_item_calls: bool = False  # seconds are one call per item (latency), else one call for all items
    peak_bytes: int | None = None
    ratio: float | None = None  # throughput over the baseline row's
    cosines: list[float] | None = None  # per item, against the baseline's outputs
    baseline: str | None = None
    note: str = ""
    error: str | None = None

    @property
    def call_seconds(self) -> float:
        """Time for all items: the sum of per-item calls, or the median of repeated whole calls."""
        return float(np.sum(self.seconds)) if self.per_item_calls else float(np.median(self.seconds))

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.call_seconds if self.seconds else None

    @property
    def items_per_s(self) -> float | None:
        return self.items / self.call_seconds if self.seconds else None

    def percentile_ms(self, q: float) -> float | None:
        """Latency percentile over calls; p99 only where there are enough calls to mean something."""
        if not self.seconds or (q > 50 and len(self.seconds) < 20):
            return None
        return float(np.percentile(self.seconds, q)) * 1000

    def summary(self) -> dict[str, Any]:
        """Everything for the JSON file, derived numbers included."""
        out = asdict(self)
        cos = self.cosines or []
        out.update(tokens_per_s=self.tokens_per_s, items_per_s=self.items_per_s, p50_ms=self.percentile_ms(50),
                   p99_ms=self.percentile_ms(99), peak_gib=None if self.peak_bytes is None else self.peak_bytes / GIB,
                   cos_min=min(cos) if cos else None, cos_mean=float(np.mean(cos)) if cos else None)
        return out


@dataclass
class Workload:
    """A workload's table: its rows, notes, goal checks and anything else worth keeping."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    goals: list[tuple[str, bool | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, prefix: str) -> Row | None:
        """The first successful row whose path starts with ``prefix``."""
        return next((r for r in self.rows if r.path.startswith(prefix) and r.error is None and r.seconds), None)


@dataclass
class Bench:
    """Everything a workload needs: both models, the processor, the data and the run settings."""

    model: nn.Module
    reference: nn.Module
    ref_projector: nn.Module
    processor: Any
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    repeats: int
    seed: int
    tiny: bool
    workdir: Path
    fail_stages: tuple[str, ...] = ()
    results: dict[str, Workload] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.processor.tokenizer


# ---------------------------------------------------------------------------------------------- set-up
def load_classes() -> tuple[type, type]:
    """Our model and processor classes, imported the way trust_remote_code imports them (relative imports work)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model_cls = get_class_from_dynamic_module("modeling_nova_embeddings_v1.NovaEmbeddingsV1Model", str(REPO_ROOT))
    # The processor class from the model's own package: a second dynamic import would be another copy of the
    # module, with its own sentinels (``_UNSET``) that the model would not recognise.
    processor_cls = sys.modules[model_cls.__module__].NovaEmbeddingsV1Processor
    return model_cls, processor_cls


def build_config(config_cls: type, tiny: bool, tokenizer, config_json: Path = REPO_ROOT / "config.json") -> Any:
    """The full-size config from the repository's config.json, or the tiny one.

    Special-token ids are set to the bench tokenizer's (the vocabulary size stays the config's).
    """
    top_ids, text_ids = token_ids(tokenizer, TOP_TOKEN_FIELDS), token_ids(tokenizer, TEXT_TOKEN_FIELDS)
    if tiny:
        config = config_cls(text_config=dict(TINY_TEXT, **text_ids), vision_config=dict(TINY_VISION),
                            **TINY_EMBEDDING, **top_ids)
    elif config_json.is_file():
        config = config_cls.from_dict(json.loads(config_json.read_text()))
    else:
        raise FileNotFoundError(f"{config_json} not found: the full-size benchmark reads the repository's config.json")
    for holder, ids in ((config, top_ids), (config.text_config, text_ids)):
        for name, token_id in ids.items():
            setattr(holder, name, token_id)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"bench tokenizer has {len(tokenizer)} tokens, vocab_size is {config.text_config.vocab_size}")
    return config


def token_ids(tokenizer, fields: dict[str, str]) -> dict[str, int]:
    """Config field -> the bench tokenizer's id of that field's token."""
    ids = {}
    for name, token in fields.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"bench tokenizer lacks {token}")
        ids[name] = token_id
    return ids


def bench_tokenizer(workdir: Path):
    """The tiny byte-level BPE tokenizer (Qwen's added tokens), written where the processor will be loaded from."""
    from transformers import AutoTokenizer

    folder = workdir / "processor"
    write_tokenizer_files(build_tiny_tokenizer(), folder)
    return AutoTokenizer.from_pretrained(str(folder))


def build_processor(processor_cls: type, workdir: Path, min_pixels: int, max_pixels: int):
    """Our processor over the bench tokenizer, Qwen2-VL's image processor (jina's settings) and our chat template,
    loaded with from_pretrained as users load it (the fast image processor where torchvision is installed)."""
    folder = workdir / "processor"
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "merge_size": 2,
        "patch_size": 14, "temporal_patch_size": 2, "resample": 3, "rescale_factor": 1 / 255,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (folder / "chat_template.json").write_text((REPO_ROOT / "chat_template.json").read_text())
    return processor_cls.from_pretrained(str(folder))


def build_model(model_cls: type, config, device: torch.device, dtype: torch.dtype, attn: str) -> nn.Module:
    """Random weights made directly on the device (N(0, 0.02), norms 1): seconds, not minutes, for 3.75B params."""
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype, attn_implementation=attn)
    model.requires_grad_(False)
    return model.eval()


def build_reference(model: nn.Module, attn: str) -> tuple[nn.Module, nn.Module]:
    """Stock Qwen2_5_VLForConditionalGeneration (+ a stock projector) whose tensors ARE our model's.

    Built on the meta device, then every parameter and buffer is pointed at our model's tensor of the same
    name: no copy, and the reference keeps transformers' own modules even after adapters wrap ours.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_dict(model.config.to_dict())
    config._attn_implementation = attn
    with torch.device("meta"):
        reference = Qwen2_5_VLForConditionalGeneration(config)
        projector = nn.Linear(model.multi_vector_projector.in_features, model.multi_vector_projector.out_features)
    share_tensors(reference, model, {"lm_head.weight": "model.language_model.embed_tokens.weight"})
    share_tensors(projector, model, prefix="multi_vector_projector.")
    return reference.eval(), projector.eval()


def share_tensors(target: nn.Module, source: nn.Module, renames: dict[str, str] | None = None,
                  prefix: str = "") -> None:
    """Make each parameter/buffer of ``target`` the tensor of ``source`` with the same name (``prefix`` + name)."""
    renames = renames or {}
    tensors = dict(source.named_parameters(remove_duplicate=False))
    tensors.update(source.named_buffers(remove_duplicate=False))
    tensors = {_unwrap_lora_name(k): v for k, v in tensors.items()}
    kinds = [("_parameters", n) for n, _ in target.named_parameters(remove_duplicate=False)]
    kinds += [("_buffers", n) for n, _ in target.named_buffers(remove_duplicate=False)]
    missing = []
    for slot, name in kinds:
        source_name = renames.get(name, prefix + name)
        if source_name not in tensors:
            missing.append(source_name)
            continue
        module_name, _, leaf = name.rpartition(".")
        getattr(target.get_submodule(module_name), slot)[leaf] = tensors[source_name]
    if missing:
        raise ValueError(f"our model has no tensor for {len(missing)} reference tensors (e.g. {missing[:3]}): "
                         "its module layout no longer matches transformers' Qwen2.5-VL")


def _unwrap_lora_name(name: str) -> str:
    """A PEFT-wrapped layer keeps its base weight under ``.base_layer``: map it back to the plain name."""
    return name.replace(".base_layer.", ".")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as jina runs), fp32 on CPUs unless asked."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


# ---------------------------------------------------------------------------------------------- data
def corpus_words() -> np.ndarray:
    """Words of the tiny tokenizer's own corpus: texts tokenise the way the tokenizer was trained for."""
    return np.array(sorted(set(re.findall(r"\S+", TINY_CORPUS))))


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_of_tokens(tokenizer, prefix: str, n: int, rng: np.random.Generator, words: np.ndarray) -> str:
    """Random words cut so that ``prefix + text`` is exactly ``n`` tokens (what the model sees for the item)."""
    body = " ".join(rng.choice(words, size=n))  # every word is >= 1 token: n words are enough
    full = prefix + body
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = offsets[n - 1][1]
    text, rest = full[len(prefix):cut], full[cut:]
    for _ in range(32):  # a cut inside a word can merge differently: move the cut a character at a time
        have = token_count(tokenizer, prefix + text)
        if have == n and text.strip():
            return text
        if have > n:
            text, rest = text[:-1], text[-1] + rest
        else:
            text, rest = text + rest[0], rest[1:]
    raise ValueError(f"could not make a text of exactly {n} tokens")


def make_texts(bench: Bench, prefix: str, lengths: Sequence[int], salt: int) -> list[str]:
    """Texts whose items (prefix + text) have exactly the given token counts; seeded."""
    rng = np.random.default_rng([bench.seed, salt])
    words = corpus_words()
    return [text_of_tokens(bench.tokenizer, prefix, int(n), rng, words) for n in lengths]


def make_page(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A white page with dark word-shaped blocks in lines: what a scanned document looks like to a resizer."""
    page = np.full((height, width, 3), 255, dtype=np.uint8)
    line_height = max(4, height // 60)
    margin = width // 12
    for top in range(margin, height - margin - line_height, 2 * line_height):
        x = margin
        while x < width - margin:
            word = int(rng.integers(2, 10)) * line_height // 2
            page[top : top + line_height, x : min(x + word, width - margin)] = int(rng.integers(0, 90))
            x += word + line_height
    return Image.fromarray(page)


def cached(bench: Bench, key: str, make: Callable[[], Any]) -> Any:
    """Workload data made once per run (workloads 1, 4 and 5 share their texts)."""
    if key not in bench.cache:
        bench.cache[key] = make()
    return bench.cache[key]


def passages(bench: Bench) -> list[str]:
    low, high = bench.sizes.text_tokens
    lengths = np.random.default_rng([bench.seed, 1]).integers(low, high + 1, bench.sizes.texts)
    return cached(bench, "passages", lambda: make_texts(bench, PASSAGE_PREFIX, lengths, salt=1))


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    """Return cached blocks after a workload (and after an OOM) so the next one starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(bench: Bench, run: Callable[[], Any], warmup: Callable[[], Any] | None,
            repeats: int) -> tuple[Any, list[float], int | None]:
    """One untimed warm-up, then ``repeats`` wall-clock calls with the device synchronised around each.

    Peak memory is reset after the warm-up, so it is the timed calls' peak (weights included).
    """
    (warmup or run)()
    sync(bench.device)
    reset_peak(bench.device)
    times, out = [], None
    for _ in range(repeats):
        sync(bench.device)
        start = time.perf_counter()
        out = run()
        sync(bench.device)
        times.append(time.perf_counter() - start)
    return out, times, peak_bytes(bench.device)


def guarded(bench: Bench, workload: Workload, stage: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; an OOM or an error becomes a row of the workload's table and the run goes on."""
    try:
        if any(tag in stage for tag in bench.fail_stages):  # test hook: --fail-stage simulates an OOM here
            raise torch.cuda.OutOfMemoryError(f"simulated OOM (--fail-stage) at {stage}")
        return fn()
    except torch.cuda.OutOfMemoryError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        workload.rows.append(Row(stage, error=f"OOM at {stage}: {message[:160]}"))
        print(f"[{workload.key}] OOM at {stage}: {message}", flush=True)
    except Exception as error:  # any other failure: report it with its traceback and go on
        traceback.print_exc()
        workload.rows.append(Row(stage, error=f"error at {stage}: {type(error).__name__}: {str(error)[:200]}"))
    free_memory(bench.device)
    return None


def timed_row(bench: Bench, workload: Workload, label: str, run: Callable[[], Any], *, tokens: int, items: int,
              warmup: Callable[[], Any] | None = None, note: str = "") -> tuple[Row | None, Any]:
    """Time a whole-workload call: a row with its timings and peak memory, and the call's output."""

    def go():
        out, times, peak = measure(bench, run, warmup, bench.repeats)
        return Row(label, tokens=tokens, items=items, seconds=times, peak_bytes=peak, note=note), out

    result = guarded(bench, workload, label, go)
    if result is None:
        return None, None
    workload.rows.append(result[0])
    return result


def latency_row(bench: Bench, workload: Workload, label: str, call: Callable[[Any], Any], inputs: Sequence[Any],
                *, tokens: int, warmup_calls: int = 5) -> tuple[Row | None, Any]:
    """Time one call per input (the device synchronised around each): a latency row and the stacked outputs."""

    def go():
        for item in inputs[:warmup_calls]:
            call(item)
        sync(bench.device)
        reset_peak(bench.device)
        times, outs = [], []
        for item in inputs:
            sync(bench.device)
            start = time.perf_counter()
            outs.append(call(item))
            sync(bench.device)
            times.append(time.perf_counter() - start)
        row = Row(label, tokens=tokens, items=len(inputs), seconds=times, per_item_calls=True,
                  peak_bytes=peak_bytes(bench.device))
        return row, torch.cat(outs)

    result = guarded(bench, workload, label, go)
    if result is None:
        return None, None
    workload.rows.append(result[0])
    return result


# ---------------------------------------------------------------------------------------------- reference path
def autocast(bench: Bench):
    """jina's forward runs under bf16 autocast; in an fp32 run (tests) the reference stays fp32."""
    return torch.autocast(bench.device.type, dtype=bench.dtype, enabled=bench.dtype != torch.float32)


def reference_hidden(bench: Bench, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """jina's forward: 3D rope positions from get_rope_index, the full causal LM with every hidden state,
    logits included; returns hidden_states[-1] (after the final norm): (batch, seq, hidden)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    mm_types = inputs.get("mm_token_type_ids")
    if mm_types is None:
        mm_types = torch.zeros_like(ids, dtype=torch.int32)
    positions, _ = bench.reference.model.get_rope_index(
        ids, mm_token_type_ids=mm_types, image_grid_thw=inputs.get("image_grid_thw"), attention_mask=mask
    )
    kwargs = dict(inputs, mm_token_type_ids=mm_types, position_ids=positions)
    with autocast(bench):
        out = bench.reference(**kwargs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def reference_pool(bench: Bench, hidden: torch.Tensor, mask: torch.Tensor, multivector: bool) -> list[torch.Tensor]:
    """jina's heads: masked mean + L2 (in the hidden dtype, as jina), or the projector per attended token."""
    with autocast(bench):
        if multivector:
            vectors = F.normalize(bench.ref_projector(hidden), dim=-1)
            return [vectors[row][mask[row].bool()].float().cpu() for row in range(len(hidden))]
        mask = mask.long()  # jina: (hidden * mask).sum(1) / mask.sum(1, keepdim=True), in the hidden dtype
        pooled = F.normalize((hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True), dim=-1)
    return list(pooled.float().cpu())


@torch.inference_mode()
def reference_texts(bench: Bench, texts: Sequence[str], prefix: str, multivector: bool = False,
                    batch_size: int = REF_BATCH) -> Any:
    """jina's encode_text: ``prefix + text``, batches in input order, right padding, no chat markup."""
    outs: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        batch = [prefix + text for text in texts[start : start + batch_size]]
        encoded = bench.tokenizer(batch, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = {key: encoded[key].to(bench.device) for key in ("input_ids", "attention_mask")}
        hidden = reference_hidden(bench, inputs)
        outs.extend(reference_pool(bench, hidden, inputs["attention_mask"], multivector))
    return outs if multivector else torch.stack(outs)


@torch.inference_mode()
def reference_images(bench: Bench, images: Sequence[Image.Image], max_pixels: int,
                     batch_size: int = REF_BATCH) -> torch.Tensor:
    """jina's encode_image: its fixed image prompt expanded to each image's token count, mean over the
    vision_start..vision_end span."""
    processor, config = bench.processor, bench.model.config
    image_processor = processor.image_processor
    outs: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = image_processor(images=batch, size={"shortest_edge": config.min_pixels, "longest_edge": max_pixels},
                                 return_tensors="pt")
        counts = (pixels["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
        prompts = [JINA_IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * count) for count in counts]
        encoded = bench.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = {key: encoded[key] for key in ("input_ids", "attention_mask")}
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                      mm_token_type_ids=(inputs["input_ids"] == config.image_token_id).int())
        inputs = {k: v.to(bench.device) for k, v in inputs.items()}
        hidden = reference_hidden(bench, inputs)
        ids = inputs["input_ids"]
        first = (ids == config.vision_start_token_id).int().argmax(dim=1, keepdim=True)
        last = (ids == config.vision_end_token_id).int().argmax(dim=1, keepdim=True)
        position = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        outs.extend(reference_pool(bench, hidden, (position >= first) & (position <= last), multivector=False))
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------------- our path
def encode(bench: Bench, items: Sequence[Any], **kwargs: Any) -> Any:
    """Our encode() as a user calls it (no progress bar: it would print into the tables)."""
    return bench.model.encode(items, show_progress_bar=False, **kwargs)


def our_token_count(bench: Bench, items: Sequence[Any], task: str | None = None, **limits: Any) -> int:
    """Tokens our processor feeds the model for these items (prompt and image tokens included, no padding)."""
    processor, config = bench.processor, bench.model.config
    normalized = processor.normalize_items(list(items), task=task, config=config)
    low, high = processor.pixel_limits(config, limits.get("min_pixels"), limits.get("max_pixels"))
    return sum(len(t) for t in processor.tokenize_items(normalized, config=config, min_pixels=low, max_pixels=high))


# ---------------------------------------------------------------------------------------------- comparing
def cosines(ours: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Cosine per item between two (items, dim) stacks."""
    return F.cosine_similarity(ours.float(), reference.float(), dim=-1).tolist()


def multi_cosines(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[list[float], float]:
    """Per item, the mean over tokens of the per-token cosine; and the lowest single-token cosine."""
    per_item, lowest = [], 1.0
    for mine, theirs in zip(ours, reference):
        if mine.shape != theirs.shape:
            raise ValueError(f"multi-vector shapes differ: ours {tuple(mine.shape)}, reference {tuple(theirs.shape)}")
        token_cos = F.cosine_similarity(mine.float(), theirs.float(), dim=-1)
        per_item.append(float(token_cos.mean()))
        lowest = min(lowest, float(token_cos.min()))
    return per_item, lowest


def compare(row: Row | None, baseline: Row | None, cos: list[float] | None = None) -> None:
    """Fill a row's speed ratio and cosines against its baseline row."""
    if row is None or baseline is None:
        return
    row.baseline = baseline.path
    if row.tokens_per_s and baseline.tokens_per_s:
        row.ratio = row.tokens_per_s / baseline.tokens_per_s
    row.cosines = cos


def cosine_context(w: Workload, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """How telling the cosines are with random weights: if every vector points roughly the same way, 0.999
    is easy. Reports the mean cosine between DIFFERENT items and the matched cosine with the mean removed."""
    if len(ours) < 2:
        return
    cross = float(np.mean(cosines(ours, reference.roll(1, dims=0))))
    mean = reference.float().mean(dim=0)
    centered = min(cosines(ours.float() - mean, reference.float() - mean))
    w.extra.update(cross_item_cosine=cross, centered_cosine_min=centered)
    w.notes.append(f"with random weights, different items' vectors have cosine {cross:.4f} on average; matched "
                   f"cosine with the mean vector removed (a stricter check): min {centered:.5f}")


def goal(workload: Workload, text: str, met: bool | None) -> None:
    workload.goals.append((text, met))


def cosine_goal(workload: Workload) -> None:
    """Every compared row must agree with its baseline: cosine >= 0.999."""
    compared = [r for r in workload.rows if r.cosines]
    if compared:
        lowest = min(min(r.cosines) for r in compared)
        goal(workload, f"cosine >= {COSINE_MIN} (lowest {lowest:.5f})", lowest >= COSINE_MIN)


# ---------------------------------------------------------------------------------------------- workloads
def w1_texts(bench: Bench, w: Workload) -> None:
    """256 mixed-length passages: throughput of jina's path vs encode(), bare backbone on both sides."""
    texts = passages(bench)
    tokens = our_token_count(bench, texts, PASSAGE_TASK)
    ref, ref_out = timed_row(bench, w, "reference (jina path, batch 8, no adapter)",
                             lambda: reference_texts(bench, texts, PASSAGE_PREFIX), tokens=tokens, items=len(texts))
    ours, our_out = timed_row(bench, w, "ours encode(adapter=None)",
                              lambda: encode(bench, texts, task=PASSAGE_TASK, adapter=None),
                              tokens=tokens, items=len(texts))
    if ref_out is not None and our_out is not None:
        compare(ours, ref, cosines(our_out, ref_out))
        cosine_context(w, our_out, ref_out)
    w.notes.append(f"{len(texts)} texts, {tokens:,} tokens ('Passage: ' prefix included); reference runs without "
                   "adapters (jina's would add LoRA on every projection), ours with adapter=None")
    if ours is not None:
        goal(w, f">= 110k tokens/s ({ours.tokens_per_s:,.0f})", ours.tokens_per_s >= 110_000)
    if ours is not None and ours.ratio is not None:
        goal(w, f">= 2.8x the reference ({ours.ratio:.2f}x)", ours.ratio >= 2.8)
    cosine_goal(w)


def w2_latency(bench: Bench, w: Workload) -> None:
    """One 16-token query per call: p50/p99 latency of jina's path vs encode()."""
    n = bench.sizes.query_tokens
    queries = cached(bench, "queries", lambda: make_texts(bench, QUERY_PREFIX, [n] * bench.sizes.queries, salt=2))
    tokens = our_token_count(bench, queries, QUERY_TASK)
    ref, ref_out = latency_row(bench, w, "reference (jina path, batch 1, no adapter)",
                               lambda q: reference_texts(bench, [q], QUERY_PREFIX), queries, tokens=tokens)
    ours, our_out = latency_row(bench, w, "ours encode([query], adapter=None)",
                                lambda q: encode(bench, [q], task=QUERY_TASK, adapter=None), queries, tokens=tokens)
    if ref_out is not None and our_out is not None:
        compare(ours, ref, cosines(our_out, ref_out))
    graphs_setting = getattr(bench.model, "cuda_graphs", None)
    if graphs_setting is not None and bench.model.graphs_enabled():  # what the replay saves
        bench.model.cuda_graphs = "off"
        try:
            plain, plain_out = latency_row(bench, w, "ours, cuda_graphs='off'",
                                           lambda q: encode(bench, [q], task=QUERY_TASK, adapter=None), queries,
                                           tokens=tokens)
        finally:
            bench.model.cuda_graphs = graphs_setting
        if ref_out is not None and plain_out is not None:
            compare(plain, ref, cosines(plain_out, ref_out))
    if ours is not None and ref is not None:
        ours.ratio = ref.percentile_ms(50) / ours.percentile_ms(50)  # latency: speed-up of the median call
        ours.note = "vs ref = reference p50 / ours p50"
    w.notes.append(f"{len(queries)} distinct queries of {n} tokens each ('Query: ' included), one call each, "
                   "5 warm-up calls per path")
    if ours is not None:
        goal(w, f"p50 <= 5 ms ({ours.percentile_ms(50):.2f} ms)", ours.percentile_ms(50) <= 5.0)
    cosine_goal(w)


def w3_pages(bench: Bench, w: Workload) -> None:
    """Document pages at the default pixel limit, then huge pages with the limit raised."""
    sizes, config = bench.sizes, bench.model.config
    rng = np.random.default_rng([bench.seed, 3])
    pages = [make_page(rng, *sizes.page_px) for _ in range(sizes.pages)]
    image_pages(bench, w, "default", pages, config.max_pixels)
    goal_row = w.row("ours default")
    if goal_row is not None:
        goal(w, f">= 50 pages/s at the default limit ({goal_row.items_per_s:.1f})", goal_row.items_per_s >= 50)
    del pages
    big = [make_page(rng, *sizes.big_page_px) for _ in range(sizes.big_pages)]
    width, height = sizes.big_page_px
    image_pages(bench, w, "big", big, max(config.max_pixels, width * height), fallback_batches=(2,), warmup_pages=2)
    big_ours = [r for r in w.rows if r.path.startswith("ours big")]
    goal(w, f"no OOM at {width * height / 1e6:.1f} MP", bool(big_ours) and all(r.error is None for r in big_ours))
    cosine_goal(w)


def image_pages(bench: Bench, w: Workload, part: str, pages: list[Image.Image], max_pixels: int,
                fallback_batches: tuple[int, ...] = (), warmup_pages: int | None = None) -> None:
    """Reference (batch 8, smaller on OOM if allowed) and ours on one set of pages, in one table.

    The warm-up runs the first few pages only: a full reference pass over big pages takes seconds.
    """
    items = [{"image": page} for page in pages]
    tokens = our_token_count(bench, items, max_pixels=max_pixels)
    width, height = pages[0].size
    label = f"{len(pages)} pages {width}x{height}, {tokens // len(pages):,} tokens each, max_pixels={max_pixels:,}"
    warm = pages[: warmup_pages or bench.sizes.warmup_pages]
    ref, ref_out = None, None
    for batch in (REF_BATCH, *fallback_batches):
        ref, ref_out = timed_row(bench, w, f"reference {part} (jina path, batch {batch})",
                                 lambda b=batch: reference_images(bench, pages, max_pixels, b),
                                 warmup=lambda b=batch: reference_images(bench, warm[:b], max_pixels, b),
                                 tokens=tokens, items=len(pages))
        if ref is not None:
            break
    ours, our_out = timed_row(bench, w, f"ours {part} encode(max_pixels={max_pixels:,})",
                              lambda: encode(bench, items, adapter=None, max_pixels=max_pixels),
                              warmup=lambda: encode(bench, items[: len(warm)], adapter=None, max_pixels=max_pixels),
                              tokens=tokens, items=len(pages))
    if ref_out is not None and our_out is not None:
        compare(ours, ref, cosines(our_out, ref_out))
    w.notes.append(f"{part}: {label}; warm-up on the first {len(warm)} pages")


def w4_adapters(bench: Bench, w: Workload) -> None:
    """Workload 1's texts over four LoRA adapters in one call, grouped and mixed, against one call per adapter."""
    texts = passages(bench)
    load_bench_adapters(bench, w)
    items = adapter_items(texts)
    tokens = our_token_count(bench, items)
    groups = {name: [i for i, item in enumerate(items) if item_adapter(item) == name] for name in ADAPTERS}
    bare_items = [{key: value for key, value in item.items() if key != "adapter"} for item in items]
    bare, bare_out = timed_row(bench, w, "ours same items, adapter=None (adapters loaded)",
                               lambda: encode(bench, bare_items, adapter=None), tokens=tokens, items=len(items))
    per_adapter, per_out = timed_row(bench, w, "ours one call per adapter (4 calls)",
                                     lambda: encode_per_adapter(bench, items, groups), tokens=tokens, items=len(items))
    model = bench.model
    try:
        for mode in ("group", "mixed"):
            model.adapter_batching = mode
            row, out = timed_row(bench, w, f"ours one call, adapter_batching={mode!r}", lambda: encode(bench, items),
                                 tokens=tokens, items=len(items))
            if row is not None and per_out is not None:
                compare(row, per_adapter, cosines(out, per_out))
    finally:
        model.adapter_batching = "group"
    adapters_change_outputs(bench, w, per_out, bare_out, groups)
    baseline = (bench.results.get("w1") or Workload("", "")).row("ours")
    baseline_name = "workload 1 (ours, no adapters loaded)" if baseline else "the adapter=None row above"
    baseline = baseline or bare
    for mode in ("group", "mixed"):
        row = w.row(f"ours one call, adapter_batching={mode!r}")
        if row is not None and baseline is not None:
            share = row.tokens_per_s / baseline.tokens_per_s
            row.note = f"{share:.2f}x of {baseline_name}"
            goal(w, f"{mode}: >= 0.9x of {baseline_name} ({share:.2f}x)", share >= 0.9)
    w.notes.append(f"{len(items)} texts, {tokens:,} tokens; item i uses adapter {ADAPTERS}[i % 4] (task prompts: "
                   "retrieval.passage, text-matching, code.passage, retrieval.passage); random LoRA r="
                   f"{bench.sizes.lora_rank} on every language-model projection and the projector; cosines compare "
                   "one call with one call per adapter")
    cosine_goal(w)


def adapter_items(texts: Sequence[str]) -> list[dict[str, Any]]:
    """Item i goes to ADAPTERS[i % 4]: the three task adapters through their task, the custom one by name."""
    kinds = [{"task": PASSAGE_TASK}, {"task": "text-matching"}, {"task": "code.passage"},
             {"task": PASSAGE_TASK, "adapter": "custom"}]
    return [{"text": text, **kinds[i % len(kinds)]} for i, text in enumerate(texts)]


def item_adapter(item: dict[str, Any]) -> str:
    return item.get("adapter") or item["task"].split(".")[0]


def encode_per_adapter(bench: Bench, items: list[dict[str, Any]], groups: dict[str, list[int]]) -> torch.Tensor:
    """What a user does without mixed batches: one encode() per adapter, results put back in input order."""
    out = torch.empty(len(items), bench.model.config.text_config.hidden_size)
    for indices in groups.values():
        out[indices] = encode(bench, [items[i] for i in indices])
    return out


def adapters_change_outputs(bench: Bench, w: Workload, per_out: Any, bare_out: Any,
                            groups: dict[str, list[int]]) -> None:
    """An adapter that is silently ignored would pass every cosine check: show that each one moves the vectors
    (against the same items, same prompts, with adapter=None)."""
    if per_out is None or bare_out is None:
        return
    moved = {name: float(np.mean(cosines(per_out[idx], bare_out[idx]))) for name, idx in groups.items()}
    w.extra["cosine_to_bare_backbone"] = moved
    w.notes.append("mean cosine to the bare backbone per adapter (must be < 1: the adapters are live): "
                   + ", ".join(f"{k} {v:.4f}" for k, v in moved.items()))
    goal(w, "every adapter changes the vectors", all(v < 0.9999 for v in moved.values()))


def load_bench_adapters(bench: Bench, w: Workload) -> None:
    """Write four random r=32 PEFT LoRA adapters (standard layout) and load them with model.load_adapter."""
    model = bench.model
    if all(name in model.list_adapters() for name in ADAPTERS):
        return
    targets = lora_targets(model)
    start = time.perf_counter()
    for index, name in enumerate(ADAPTERS):
        folder = write_random_adapter(bench, targets, bench.workdir / "adapters" / name, seed=bench.seed + 100 + index)
        model.load_adapter(str(folder), adapter_name=name, as_task_adapter=name in model.config.task_names)
    sync(bench.device)
    lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
    w.notes.append(f"4 adapters written and loaded in {time.perf_counter() - start:.1f} s; "
                   f"{len(targets)} target modules; LoRA weights held in {str(lora.dtype).removeprefix('torch.')}")


def lora_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every Linear the LoRA config targets (all LM projections + the projector)."""
    pattern = re.compile(LORA_TARGETS)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and pattern.fullmatch(name)}


def write_random_adapter(bench: Bench, targets: dict[str, tuple[int, int]], folder: Path, seed: int) -> Path:
    """A standard PEFT LoRA folder: adapter_config.json + adapter_model.safetensors (bf16 like jina's), made on
    the device. A and B are both random (non-zero), scaled so that B @ A @ x is about LORA_RELATIVE of W @ x
    for weights of std INIT_STD: large enough to show, small enough to keep activations like the base model's."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    rank = bench.sizes.lora_rank
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    config.save_pretrained(str(folder))
    generator = torch.Generator(bench.device).manual_seed(seed)
    dtype = torch.bfloat16 if bench.dtype == torch.bfloat16 else torch.float32
    tensors = {}
    for name, (fan_in, fan_out) in sorted(targets.items()):
        stds = {"lora_A": fan_in**-0.5, "lora_B": LORA_RELATIVE * INIT_STD * (fan_in / rank) ** 0.5}
        for part, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
            weight = torch.randn(shape, generator=generator, device=bench.device) * stds[part]
            tensors[f"base_model.model.{name}.{part}.weight"] = weight.to(dtype).cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def w5_multivector(bench: Bench, w: Workload) -> None:
    """Workload 1 with one 128-d vector per token."""
    texts = passages(bench)
    tokens = our_token_count(bench, texts, PASSAGE_TASK)
    ref, ref_out = timed_row(bench, w, "reference (jina path, batch 8, no adapter)",
                             lambda: reference_texts(bench, texts, PASSAGE_PREFIX, multivector=True),
                             tokens=tokens, items=len(texts))
    ours, our_out = timed_row(bench, w, "ours encode(return_multivector=True, adapter=None)",
                              lambda: encode(bench, texts, task=PASSAGE_TASK, adapter=None, return_multivector=True),
                              tokens=tokens, items=len(texts))
    if ref_out is not None and our_out is not None:
        per_item, lowest = multi_cosines(our_out, ref_out)
        compare(ours, ref, per_item)
        w.extra["lowest_token_cosine"] = lowest
        w.notes.append(f"cosines: per text, the mean over its tokens; lowest single token {lowest:.5f}")
    w.notes.append(f"{len(texts)} texts, {tokens:,} tokens, one vector per token returned to the CPU")
    cosine_goal(w)


def w6_long(bench: Bench, w: Workload) -> None:
    """Long texts: no OOM, and activation memory that grows linearly with tokens."""
    sizes = bench.sizes
    texts = make_texts(bench, PASSAGE_PREFIX, [sizes.long_tokens] * sizes.long_texts, salt=6)
    tokens = our_token_count(bench, texts, PASSAGE_TASK)
    ref, ref_out = None, None
    for batch in (REF_BATCH, 2):
        ref, ref_out = timed_row(bench, w, f"reference (jina path, batch {batch}, no adapter)",
                                 lambda b=batch: reference_texts(bench, texts, PASSAGE_PREFIX, batch_size=b),
                                 warmup=lambda b=batch: reference_texts(bench, texts[:b], PASSAGE_PREFIX, batch_size=b),
                                 tokens=tokens, items=len(texts))
        if ref is not None:
            break
    ours, our_out = timed_row(bench, w, "ours encode(adapter=None)",
                              lambda: encode(bench, texts, task=PASSAGE_TASK, adapter=None),
                              warmup=lambda: encode(bench, texts[:4], task=PASSAGE_TASK, adapter=None),
                              tokens=tokens, items=len(texts))
    if ref_out is not None and our_out is not None:
        compare(ours, ref, cosines(our_out, ref_out))
    w.notes.append(f"{len(texts)} texts of {sizes.long_tokens:,} tokens; reference at batch 8 (jina's default), "
                   "batch 2 if that runs out of memory")
    goal(w, "ours runs without OOM", ours is not None)
    if ours is not None:
        goal(w, f">= 80k tokens/s ({ours.tokens_per_s:,.0f})", ours.tokens_per_s >= 80_000)
    memory_probe(bench, w)
    cosine_goal(w)


def memory_probe(bench: Bench, w: Workload) -> None:
    """One text at each probe length: activation memory (peak minus what was allocated before) per token."""
    if bench.device.type != "cuda":
        w.notes.append("memory probe skipped: no CUDA memory statistics on this device")
        return
    lengths = bench.sizes.probe_tokens
    texts = make_texts(bench, PASSAGE_PREFIX, lengths, salt=7)
    probe = {}

    def run() -> None:
        for n, text in zip(lengths, texts):
            encode(bench, [text], task=PASSAGE_TASK, adapter=None)  # warm-up for this shape
            sync(bench.device)
            before = allocated_bytes(bench.device)
            reset_peak(bench.device)
            encode(bench, [text], task=PASSAGE_TASK, adapter=None)
            sync(bench.device)
            probe[n] = peak_bytes(bench.device) - before

    # a CUDA-graph replay (texts up to 2,048 tokens) runs in memory its capture reserved: nothing to measure there
    graphs, bench.model.cuda_graphs = bench.model.cuda_graphs, "off"
    try:
        guarded(bench, w, "memory probe (ours, one text, CUDA graphs off)", run)
    finally:
        bench.model.cuda_graphs = graphs
    if not probe:
        return
    per_token = {n: b / n for n, b in probe.items()}
    w.extra["probe_activation_bytes"] = probe
    w.notes.append("memory probe (peak minus allocated before, CUDA graphs off), one text: "
                   + ", ".join(f"{n:,} tokens {b / 2**20:,.0f} MiB ({per_token[n] / 1024:.0f} KiB/token)"
                               for n, b in probe.items()))
    shortest, longest = min(lengths), max(lengths)
    growth = per_token[longest] / per_token[shortest]  # > 1: memory grows faster than the token count
    goal(w, f"memory roughly linear in tokens (KiB/token at {longest:,} over at {shortest:,}: {growth:.2f}; "
            "<= 1.5)", growth <= 1.5)


WORKLOADS: dict[int, Callable[[Bench, Workload], None]] = {
    1: w1_texts, 2: w2_latency, 3: w3_pages, 4: w4_adapters, 5: w5_multivector, 6: w6_long,
}


def workload_title(number: int, s: Sizes) -> str:
    """What a workload does, with this run's sizes."""
    low, high = s.text_tokens
    big_mp = s.big_page_px[0] * s.big_page_px[1] / 1e6
    return {
        1: f"{s.texts} texts of {low}-{high} tokens, retrieval.passage (throughput)",
        2: f"one {s.query_tokens}-token query at a time, {s.queries} calls (latency)",
        3: f"document pages: {s.pages} of {s.page_px[0]}x{s.page_px[1]} px at the default pixel limit, "
           f"{s.big_pages} of {s.big_page_px[0]}x{s.big_page_px[1]} px ({big_mp:.1f} MP) with the limit raised",
        4: f"workload 1's {s.texts} texts over 3 task adapters + a custom one, one call",
        5: "workload 1 with multi-vector output",
        6: f"long context: {s.long_texts} texts of {s.long_tokens:,} tokens",
    }[number]


def run_workload(bench: Bench, number: int) -> Workload:
    """Run one workload; whatever it raises becomes a row, and the next workload still runs."""
    title = workload_title(number, bench.sizes) + (" [tiny]" if bench.tiny else "")
    workload = Workload(f"w{number}", title)
    workload.extra["static_bytes"] = allocated_bytes(bench.device)
    start = time.perf_counter()
    guarded(bench, workload, f"workload {number}", lambda: WORKLOADS[number](bench, workload))
    workload.extra["wall_s"] = time.perf_counter() - start
    free_memory(bench.device)
    return workload


# ---------------------------------------------------------------------------------------------- profiling
def profile_w1(bench: Bench, out_dir: Path) -> dict[str, Any]:
    """One of our workload-1 calls under torch.profiler: top-25 kernels by total time and a chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    texts = passages(bench)
    encode(bench, texts, task=PASSAGE_TASK, adapter=None)  # warm
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        encode(bench, texts, task=PASSAGE_TASK, adapter=None)
        sync(bench.device)
        call_s = time.perf_counter() - started
    kind, rows = kernels_by_time(prof, cuda)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "benchmark_trace_w1.json.gz"
    prof.export_chrome_trace(str(trace))
    tokens = our_token_count(bench, texts, PASSAGE_TASK)
    return {"kind": kind, "top": rows[:25], "trace": str(trace), "time": time_split(rows, call_s, tokens)}


GEMM_MARKS = ("gemm", "nvjet", "cutlass", "cublas", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def is_gemm(name: str) -> bool:
    """A matrix-multiply kernel (cuBLAS/CUTLASS/nvjet on CUDA; aten's mm ops on a CPU run)."""
    lowered = name.lower()
    return any(mark in lowered for mark in GEMM_MARKS)


def time_split(rows: list[dict[str, Any]], call_s: float, tokens: int) -> dict[str, float]:
    """Where one profiled call's time went (``rows``: every kernel, from ``kernels_by_time``): its wall time, the kernels'
    total time and the GEMMs' part of it, and the tokens/s each would allow alone. The GEMMs' figure bounds what
    kernel work beyond them can gain (on the H200, workload 1's GEMMs alone were 114k tokens/s against a 110k goal)."""
    kernel_ms = sum(row["total_ms"] for row in rows)
    gemm_ms = sum(row["total_ms"] for row in rows if is_gemm(row["name"]))
    per_s = lambda ms: tokens / (ms / 1000) if ms > 0 else None  # noqa: E731
    return {"tokens": tokens, "call_ms": call_s * 1000, "kernel_ms": kernel_ms, "gemm_ms": gemm_ms,
            "gemm_share": gemm_ms / kernel_ms if kernel_ms else 0.0, "tokens_per_s": per_s(call_s * 1000),
            "kernel_only_tokens_per_s": per_s(kernel_ms), "gemm_only_tokens_per_s": per_s(gemm_ms)}


def profile_small_calls(bench: Bench, calls: int = 50, limit: int = 30) -> str:
    """Host time of workload 2's one-query calls under cProfile (short calls are host-bound): the top functions
    by cumulative time, as text, and the mean milliseconds per call under the profiler."""
    import cProfile
    import io
    import pstats

    queries = make_texts(bench, QUERY_PREFIX, [bench.sizes.query_tokens] * calls, salt=7)
    for query in queries[:5]:
        encode(bench, [query], task=QUERY_TASK, adapter=None)
    sync(bench.device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for query in queries:
        encode(bench, [query], task=QUERY_TASK, adapter=None)
        sync(bench.device)
    profiler.disable()
    per_call = (time.perf_counter() - start) / calls * 1e3
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(limit)
    return f"{calls} one-query calls, {per_call:.2f} ms per call under cProfile\n" + text.getvalue()


def kernels_by_time(prof, cuda: bool) -> tuple[str, list[dict[str, Any]]]:
    """Every CUDA kernel (device events) by total time; on a CPU run, CPU ops by self time."""
    from torch.autograd import DeviceType

    def self_us(event) -> float:
        if cuda:
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        return event.self_cpu_time_total

    averages = list(prof.key_averages())
    kind = "CUDA kernels" if cuda else "CPU ops"
    events = [e for e in averages if e.device_type == DeviceType.CUDA] if cuda else averages
    if cuda and not events:  # a profiler build that does not list kernels apart: ops by their own GPU time
        kind, events = "ops by self CUDA time", averages
    events = sorted(events, key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1.0
    return kind, [{"name": e.key, "calls": e.count, "total_ms": self_us(e) / 1000, "share": self_us(e) / total}
                  for e in events]


def print_profile(profile: dict[str, Any]) -> None:
    print(f"\n### profile: one of our workload-1 calls, top {len(profile['top'])} {profile['kind']} by total time")
    print("| # | kernel | calls | total ms | share |\n|--:|:--|--:|--:|--:|")
    for i, row in enumerate(profile["top"], 1):
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        print(f"| {i} | {name} | {row['calls']} | {row['total_ms']:.2f} | {row['share']:.1%} |")
    split = profile.get("time")
    if split:
        print(f"one call: {split['call_ms']:.1f} ms, {split['tokens']:,} tokens ({fmt(split['tokens_per_s'], ',.0f')} "
              f"tokens/s); {profile['kind']} {split['kernel_ms']:.1f} ms ({fmt(split['kernel_only_tokens_per_s'], ',.0f')} "
              f"tokens/s alone), of which GEMMs {split['gemm_ms']:.1f} ms = {split['gemm_share']:.0%} "
              f"({fmt(split['gemm_only_tokens_per_s'], ',.0f')} tokens/s alone)")
    print(f"chrome trace: {profile['trace']}")


# ---------------------------------------------------------------------------------------------- reporting
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def row_cells(r: Row) -> list[str]:
    """A row's table cells; a failed row shows its OOM or error across the table."""
    if r.error:
        return [r.path, r.error] + [""] * 7
    cos = r.cosines or []
    peak = None if r.peak_bytes is None else r.peak_bytes / GIB
    return [r.path, fmt(r.tokens_per_s, ",.0f"), fmt(r.items_per_s, ",.1f"), fmt(r.percentile_ms(50), ",.2f"),
            fmt(r.percentile_ms(99), ",.2f"), fmt(peak, ".2f"), fmt(r.ratio, ".2f") + "x" if r.ratio else "-",
            fmt(min(cos) if cos else None, ".5f"), fmt(float(np.mean(cos)) if cos else None, ".5f")]


def format_table(w: Workload, tiny: bool, notes: bool = True) -> str:
    """A markdown table of the workload's rows, then its notes (unless asked not to) and goal checks."""
    lines = [f"### {w.key}: {w.title}",
             "| path | tokens/s | items/s | p50 ms | p99 ms | peak GiB | vs ref | cos min | cos mean |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in w.rows]
    if notes:
        lines += table_notes(w)
    for text, met in w.goals:
        verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
        tiny_scope = tiny and not text.startswith("cosine")
        scope = " (issue 11's goal is for the full-size model on an H200; tiny run)" if tiny_scope else ""
        lines.append(f"- goal: {text}: {verdict}{scope}")
    return "\n".join(lines)


def table_notes(w: Workload) -> list[str]:
    """What the table's numbers mean and what they were measured on."""
    lines = []
    calls = next((len(r.seconds) for r in w.rows if r.seconds and not r.per_item_calls), None)
    if calls:
        lines.append(f"- timing: median of {calls} timed call(s) after one warm-up; p50 = that call's time")
    lines += [f"- {note}" for note in w.notes]
    lines += [f"- {r.path}: {r.note}" for r in w.rows if r.note and not r.error]
    lines += [f"- {r.path}: 'vs ref' and cosines are against '{r.baseline}'" for r in w.rows
              if r.baseline and not r.baseline.startswith("reference") and not r.error]
    return lines


def failures(results: dict[str, Workload]) -> list[str]:
    """What makes the exit status 1: errors other than OOM, and cosines under the bar."""
    problems = []
    for w in results.values():
        problems += [f"{w.key}: {r.error}" for r in w.rows if r.error and not r.error.startswith("OOM")]
        problems += [f"{w.key}: {r.path}: cosine {min(r.cosines):.5f} < {COSINE_MIN}"
                     for r in w.rows if r.cosines and min(r.cosines) < COSINE_MIN]
    return problems


def environment(args: argparse.Namespace, bench: Bench, config_source: str, startup_s: float) -> dict[str, Any]:
    """What the numbers were measured on."""
    import peft
    import transformers

    config = bench.model.config
    meta = {
        "device": str(bench.device), "dtype": str(bench.dtype).removeprefix("torch."), "tiny": bench.tiny,
        "repeats": bench.repeats, "seed": bench.seed, "attn_implementation": args.attn_implementation,
        "config_source": config_source, "startup_s": startup_s, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "text_layers": config.text_config.num_hidden_layers, "hidden_size": config.text_config.hidden_size,
        "parameters": sum(p.numel() for p in bench.model.parameters()),
        "git_commit": _git_commit(), "argv": sys.argv[1:],
        "model_knobs": {k: getattr(bench.model, k) for k in MODEL_KNOBS if hasattr(bench.model, k)},
        "image_processor": type(bench.processor.image_processor).__name__,
    }
    if bench.device.type == "cuda":
        properties = torch.cuda.get_device_properties(bench.device)
        meta.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / GIB, cuda=torch.version.cuda)
    return meta


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, meta: dict[str, Any], results: dict[str, Workload], profile: dict[str, Any] | None) -> None:
    data = {
        "meta": meta,
        "workloads": {k: {"title": w.title, "rows": [r.summary() for r in w.rows], "notes": w.notes,
                          "goals": [{"goal": t, "met": m} for t, m in w.goals], "extra": w.extra}
                      for k, w in results.items()},
        "profile": profile,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- main
def parse_workloads(text: str) -> list[int]:
    numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    unknown = [n for n in numbers if n not in WORKLOADS]
    if unknown or not numbers:
        raise argparse.ArgumentTypeError(f"workloads are 1-6, got {text!r}")
    return numbers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_out = os.environ.get("OUT")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", type=parse_workloads, default=parse_workloads("1,2,3,4,5,6"), help="e.g. 1,2,5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny config and small workloads: seconds on a CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per throughput path (median reported)")
    parser.add_argument("--profile", action="store_true", help="profile one of our workload-1 calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn-implementation", default="sdpa", help="attention of both paths (default: sdpa)")
    parser.add_argument("--out-dir", type=Path, default=Path(default_out) if default_out else REPO_ROOT / ".bench",
                        help="where the JSON and the trace go (default: $OUT, else .bench/)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: OUT_DIR/benchmark.json)")
    parser.add_argument("--model-attr", action="append", default=[], metavar="NAME=VALUE", type=parse_model_attr,
                        help="set an attribute of our model before the run, e.g. attention_packing=off (repeatable)")
    parser.add_argument("--fail-stage", action="append", default=[], help=argparse.SUPPRESS)  # tests: simulated OOM
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.json = args.json or args.out_dir / "benchmark.json"
    return args


def setup(args: argparse.Namespace, workdir: Path) -> tuple[Bench, str]:
    """Processor, config, random model on the device, and the weight-sharing reference."""
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: threads only fight over shared CPUs (tests run in parallel)
    model_cls, processor_cls = load_classes()
    tokenizer = bench_tokenizer(workdir)
    config = build_config(model_cls.config_class, args.tiny, tokenizer)
    processor = build_processor(processor_cls, workdir, config.min_pixels, config.max_pixels)
    if token_ids(processor.tokenizer, TOP_TOKEN_FIELDS) != {k: getattr(config, k) for k in TOP_TOKEN_FIELDS}:
        raise ValueError("the processor's special-token ids differ from the config's")
    torch.manual_seed(args.seed)
    model = build_model(model_cls, config, device, dtype, args.attn_implementation)
    model.processor = processor
    set_model_attrs(model, args.model_attr)
    reference, projector = build_reference(model, args.attn_implementation)
    source = "tiny config" if args.tiny else "config.json"
    bench = Bench(model=model, reference=reference, ref_projector=projector, processor=processor, device=device,
                  dtype=dtype, sizes=TINY if args.tiny else FULL, repeats=args.repeats, seed=args.seed,
                  tiny=args.tiny, workdir=workdir, fail_stages=tuple(args.fail_stage))
    sync(device)
    return bench, source


def run_all(bench: Bench, args: argparse.Namespace, meta: dict[str, Any]) -> tuple[dict[str, Workload], Any]:
    """Every requested workload in RUN_ORDER, each table printed when done and the JSON rewritten after each
    (a run cut short still leaves its results). The profile, if asked, runs before workload 4 loads adapters,
    so that it shows the same model as workload 1."""
    profile = None
    for number in [n for n in RUN_ORDER if n in args.workloads]:
        if number == 4 and args.profile:
            profile = run_profile(bench, args.out_dir)
        workload = run_workload(bench, number)
        bench.results[workload.key] = workload
        print("\n" + format_table(workload, bench.tiny), flush=True)
        write_json(args.json, dict(meta, partial=True), bench.results, profile)
    if args.profile and 4 not in args.workloads:
        profile = run_profile(bench, args.out_dir)
    return {f"w{n}": bench.results[f"w{n}"] for n in sorted(args.workloads)}, profile


def run_profile(bench: Bench, out_dir: Path) -> dict[str, Any] | None:
    """profile_w1, with a failure printed rather than raised."""
    holder = Workload("profile", "torch.profiler")
    profile = guarded(bench, holder, "profile", lambda: profile_w1(bench, out_dir))
    if profile:
        print_profile(profile)
        profile["small_calls_host"] = guarded(bench, holder, "profile small calls", lambda: profile_small_calls(bench))
        print(f"### host profile of workload-2 calls\n{profile['small_calls_host']}", flush=True)
    for row in holder.rows:
        print(f"profile: {row.error}")
    return profile


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a network the GPU box lacks
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nova-bench-") as tmp:
        bench, source = setup(args, Path(tmp))
        meta = environment(args, bench, source, time.perf_counter() - started)
        print(f"start-up {meta['startup_s']:.1f} s: {meta['parameters'] / 1e9:.2f}B parameters, {bench.dtype}, "
              f"{bench.device}, config from {source}, model {meta['model_knobs']}", flush=True)
        results, profile = run_all(bench, args, meta)
        meta.update(parameters_after=sum(p.numel() for p in bench.model.parameters()))
    meta["total_s"] = time.perf_counter() - started
    write_json(args.json, meta, results, profile)
    shown = ("gpu", "dtype", "tiny", "model_knobs", "total_s")
    print("\n## summary (" + ", ".join(f"{k}={meta[k]}" for k in shown if k in meta) + ")")
    for workload in results.values():
        print("\n" + format_table(workload, bench.tiny, notes=False))
    problems = failures(results)
    print(f"\nresults (notes, every timing and cosine) written to {args.json}")
    print("CHECKS: " + ("all cosines >= 0.999, no errors" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
