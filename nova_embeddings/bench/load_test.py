"""Load test of the embeddings server: requests/s, items/s and latency percentiles, loopback only.

By default it starts the server in-process on 127.0.0.1 (a free port) with the given model, sends a bounded
number of requests with bounded concurrency, stops at a time cap whatever happens, and also times a direct
``encode()`` of the same items, so the server's overhead can be read off beside the model's own speed.

    nova-embeddings load-test [--model PATH|none|random-full] [--device cuda] [--dtype bfloat16]
        [--requests 500] [--concurrency 32] [--items-per-request 4] [--words 48] [--image-fraction 0]
    nova-embeddings load-test --url http://127.0.0.1:8000 [--api-key KEY] ...   # a running server

``--stub-encode`` replaces the served model's ``encode()`` with one that returns constant unit vectors at once
(validation, tokenising and routing stay real): the server's own ceiling, what its Python costs per request.
In-process runs also report each server thread's CPU time per request (from the threads' CPU clocks), which
shows where the interpreter lock goes; with ``--http-processes N``, the HTTP processes' CPU time is given beside
them, summed ("nova-http processes", Linux only).

``--model none`` (the default) is the tiny checkpoint; ``random-full`` is the full-size architecture
(jina-embeddings-v4 = Qwen2.5-VL-3B) with random weights made on the device, on the tiny tokenizer: nothing
is downloaded. Results are printed and written as JSON (``--json``, and $OUT/load_test.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from ..model_attrs import parse_model_attr, set_model_attrs

WORDS = ("vector search index query passage model token image batch server latency retrieval document embedding "
         "matrix layer adapter cache memory network signal river mountain city garden history science music").split()

# jina-embeddings-v4 (Qwen2.5-VL-3B) sizes for --model random-full; token ids stay the tiny tokenizer's.
FULL_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000)
FULL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
FULL_EMBEDDING = dict(multi_vector_projector_dim=128, matryoshka_dims=[128, 256, 512, 1024, 2048], min_pixels=3136,
                      max_pixels=602112)
FULL_MROPE_SECTION = [16, 24, 24]
BATCH_SERIES = ("nova_batch_items_sum", "nova_batch_items_count", "nova_batch_requests_sum",
                "nova_encode_seconds_total", "nova_encode_busy_seconds_total")


# ---------------------------------------------------------------------- model
def random_full_size_model(tiny_dir: Path, device: str, dtype: Any) -> Any:
    """The full-size architecture with random weights made on ``device``, processor from the tiny repository."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(tiny_dir), trust_remote_code=True)
    for name, value in FULL_TEXT.items():
        setattr(config.text_config, name, value)
    if getattr(config.text_config, "layer_types", None) is not None:  # one entry per layer
        config.text_config.layer_types = [config.text_config.layer_types[0]] * FULL_TEXT["num_hidden_layers"]
    rope = dict(getattr(config.text_config, "rope_parameters", None) or {})
    rope["mrope_section"] = FULL_MROPE_SECTION
    config.text_config.rope_parameters = rope
    for name, value in FULL_VISION.items():
        setattr(config.vision_config, name, value)
    for name, value in FULL_EMBEDDING.items():
        setattr(config, name, value)
    with torch.device(device):
        model = AutoModel.from_config(config, trust_remote_code=True, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def load_model(spec: str | None, device: str, dtype: str, workdir: Path) -> tuple[Any, str]:
    """(model, description) for --model PATH | none | random-full."""
    from ..serve import build_tiny_checkpoint, load_model as load_repository, resolve_device, resolve_dtype

    if spec not in (None, "none", "random-full"):
        return load_repository(spec, device=device, dtype=dtype), spec
    tiny = build_tiny_checkpoint(workdir)
    if spec == "random-full":
        resolved = resolve_device(device)
        return random_full_size_model(tiny, resolved, resolve_dtype(dtype, resolved)), "random-full (Qwen2.5-VL-3B size)"
    return load_repository(tiny, device=device, dtype=dtype), "tiny"


# ---------------------------------------------------------------------- payloads
def png_base64(rng: np.random.Generator, size: int) -> str:
    from PIL import Image

    pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_payloads(args: argparse.Namespace, model_name: str) -> list[dict]:
    """``--requests`` request bodies: texts of about ``--words`` words, a fraction of images, mixed tasks."""
    rng = np.random.default_rng(args.seed)
    tasks = ["retrieval.query", "retrieval.passage", "text-matching", "code.query"]
    images = [png_base64(rng, args.image_size) for _ in range(8)] if args.image_fraction > 0 else []
    payloads = []
    for _ in range(args.requests):
        items: list[Any] = []
        for _ in range(args.items_per_request):
            if images and rng.random() < args.image_fraction:
                items.append({"image": images[int(rng.integers(len(images)))]})
            else:
                words = max(1, int(rng.normal(args.words, args.words / 4)))
                items.append({"text": " ".join(rng.choice(WORDS, size=words)), "task": tasks[int(rng.integers(4))]})
        payloads.append({"model": model_name, "input": items, "encoding_format": args.encoding_format})
    return payloads


# ---------------------------------------------------------------------- load
@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    items: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped_by_time_cap: bool = False
    errors: list[str] = field(default_factory=list)


async def run_load(url: str, payloads: list[dict], concurrency: int, time_cap_s: float, headers: dict) -> LoadResult:
    """Send ``payloads`` with at most ``concurrency`` in flight; stop issuing at the time cap."""
    result = LoadResult()
    next_index = 0
    deadline = time.monotonic() + time_cap_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(payloads) and time.monotonic() < deadline:
            body = payloads[next_index]
            next_index += 1
            await send(client, body, result)

    started = time.monotonic()
    client = httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=time_cap_s, trust_env=False)
    async with client:
        workers = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(workers, timeout=time_cap_s + 5)
        for task in pending:
            task.cancel()
        result.stopped_by_time_cap = bool(pending) or next_index < len(payloads)
    result.seconds = time.monotonic() - started
    return result


async def send(client: httpx.AsyncClient, body: dict, result: LoadResult) -> None:
    started = time.monotonic()
    try:
        response = await client.post("/v1/embeddings", json=body)
    except httpx.HTTPError as error:
        result.statuses[0] = result.statuses.get(0, 0) + 1
        result.errors.append(f"{type(error).__name__}: {error}")
        return
    result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
    if response.status_code != 200:
        result.errors.append(response.text[:300])
        return
    result.latencies.append(time.monotonic() - started)
    result.items += len(body["input"])
    result.tokens += response.json()["usage"]["prompt_tokens"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(result: LoadResult, concurrency: int) -> dict:
    ok = len(result.latencies)
    seconds = max(result.seconds, 1e-9)
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    return {
        "requests_ok": ok, "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "seconds": round(result.seconds, 3), "concurrency": concurrency,
        "requests_per_s": round(ok / seconds, 2), "items_per_s": round(result.items / seconds, 2),
        "tokens_per_s": round(result.tokens / seconds, 1),
        "latency_ms": {"p50": ms(percentile(result.latencies, 0.5)), "p90": ms(percentile(result.latencies, 0.9)),
                       "p99": ms(percentile(result.latencies, 0.99)), "max": ms(max(result.latencies, default=None))},
        "stopped_by_time_cap": result.stopped_by_time_cap, "first_errors": result.errors[:3],
    }


def read_batch_series(url: str, headers: dict) -> dict[str, float]:
    """The server's batch counters now, from /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10, trust_env=False).text
    values = dict.fromkeys(BATCH_SERIES, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in BATCH_SERIES:
            values[name] = float(value)
    return values


def server_batch_stats(url: str, headers: dict, before: dict[str, float]) -> dict:
    """Mean items and requests per encode() call since ``before`` (this run's requests, warm-up included; a running
    server's earlier traffic is not counted)."""
    now = read_batch_series(url, headers)
    values = {name: now[name] - before[name] for name in BATCH_SERIES}
    batches = values["nova_batch_items_count"] or 1
    return {"batches": int(values["nova_batch_items_count"]),
            "mean_items_per_batch": round(values["nova_batch_items_sum"] / batches, 2),
            "mean_requests_per_batch": round(values["nova_batch_requests_sum"] / batches, 2),
            "encode_seconds": round(values["nova_encode_seconds_total"], 3),  # summed over batches: overlaps twice
            "encode_busy_seconds": round(values["nova_encode_busy_seconds_total"], 3)}  # >= 1 batch in encode()


# ---------------------------------------------------------------------- direct encode() baseline
def encode_baseline(
    model: Any, payloads: list[dict], max_batch_items: int, max_batch_tokens: int, cap_s: float
) -> dict:
    """Direct ``encode()`` on the same items: in calls of ``max_batch_items`` (throughput, the server's budget),
    and one call per request, one after another (latency without a server). One untimed pass first, so the
    timed one pays no CUDA-graph capture (the server captured its shapes at start-up and during its warm-up)."""
    import torch

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    items = [item for body in payloads for item in body["input"]]
    for start in range(0, len(items), max_batch_items):  # warm-up: every call shape the timed pass makes
        model.encode(items[start : start + max_batch_items], batch_size=max_batch_items,
                     max_batch_tokens=max_batch_tokens)
    synchronize()
    started, done = time.monotonic(), 0
    for start in range(0, len(items), max_batch_items):
        if time.monotonic() - started > cap_s / 2:
            break
        chunk = items[start : start + max_batch_items]
        model.encode(chunk, batch_size=max_batch_items, max_batch_tokens=max_batch_tokens)
        done += len(chunk)
    synchronize()
    seconds = time.monotonic() - started
    calls = []
    for body in payloads[:100]:
        call_started = time.monotonic()
        model.encode(body["input"], batch_size=max_batch_items, max_batch_tokens=max_batch_tokens)
        synchronize()
        calls.append(time.monotonic() - call_started)
    return {"items": done, "seconds": round(seconds, 3), "items_per_s": round(done / max(seconds, 1e-9), 2),
            "per_request_call_ms": {"p50": round(1000 * percentile(calls, 0.5), 2),
                                    "p99": round(1000 * percentile(calls, 0.99), 2)}}


# ---------------------------------------------------------------------- the server's own cost
def stub_encode(model: Any) -> None:
    """Replace ``model.encode`` with one that returns constant unit vectors of the model's widths (from its config)
    at once; prepared items are still validated, tokenised and routed by the server as usual."""
    single, multi = model.config.embedding_dim, model.config.multi_vector_projector_dim

    def encode(prepared: Any, return_multivector: bool = False, **_: Any) -> Any:  # the server asks for numpy
        if return_multivector:
            return [np.full((len(item), multi), multi ** -0.5, dtype=np.float32) for item in prepared.tokenized]
        return np.full((len(prepared), single), single ** -0.5, dtype=np.float32)

    model.encode = encode


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's Python threads (each one's own CPU clock), by name with the pool index dropped
    ("nova-prep_0" -> "nova-prep"); {} where threads have no CPU clock. A thread that ended during the run is not
    counted (e.g. ``encode()``'s per-call collate workers)."""
    if not hasattr(time, "pthread_getcpuclockid"):
        return {}
    seconds: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            spent = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, TypeError):  # the thread ended meanwhile, or never started
            continue
        name = thread.name.rsplit("_", 1)[0]
        seconds[name] = seconds.get(name, 0.0) + spent
    return seconds


HTTP_PROCESSES = "nova-http processes"


def http_process_cpu_seconds() -> dict[str, float]:
    """CPU seconds of each of the server's HTTP processes (``--http-processes``; this process's children named
    ``nova-http-N``), keyed ``"nova-http processes/<pid>"`` (``cpu_per_request`` sums them); {} without them or
    without Linux's /proc."""
    seconds = {}
    for child in multiprocessing.active_children():
        stat = Path(f"/proc/{child.pid}/stat")
        if not child.name.startswith("nova-http") or not stat.exists():
            continue
        fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        seconds[f"{HTTP_PROCESSES}/{child.pid}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def server_cpu_seconds() -> dict[str, float]:
    """The server's CPU seconds: this process's threads by name, and its HTTP processes."""
    return {**thread_cpu_seconds(), **http_process_cpu_seconds()}


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request each server thread (group) spent during the run, largest first. The HTTP
    processes count together, each only if it ran through the whole run: a process that started during it would
    bring its start-up, and one that ended (an earlier server's, still stopping) would count negative."""
    spent: dict[str, float] = {}
    for name, value in after.items():
        group, _, pid = name.partition("/")
        if pid and name not in before:
            continue
        spent[group] = spent.get(group, 0.0) + value - before.get(name, 0.0)
    return {name: round(1000 * value / max(requests, 1), 3)
            for name, value in sorted(spent.items(), key=lambda kv: -kv[1]) if value > 0}


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="nova repository, 'none' (tiny, default) or 'random-full'")
    parser.add_argument("--url", default=None, help="target a running server instead (loopback addresses only)")
    parser.add_argument("--api-key", default=os.environ.get("NOVA_API_KEY"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--requests", type=int, default=500, help="requests to send (at most)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--items-per-request", type=int, default=4)
    parser.add_argument("--words", type=int, default=48, help="mean words per text item")
    parser.add_argument("--image-fraction", type=float, default=0.0, help="share of items that are images")
    parser.add_argument("--image-size", type=int, default=448, help="side of the random test images, px")
    parser.add_argument("--encoding-format", choices=["float", "base64"], default="base64")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-items", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--preprocess-workers", type=int, default=1)
    parser.add_argument("--inflight-batches", type=int, default=None,
                        help="batches in encode() at once (the server's --inflight-batches; default: the server's)")
    parser.add_argument("--http-processes", type=int, default=None,
                        help="serve HTTP from this many processes apart from the model's (the server's "
                             "--http-processes; default: the server's, 2 on a GPU, 0 on a CPU)")
    parser.add_argument("--model-attr", action="append", default=[], metavar="NAME=VALUE", type=parse_model_attr,
                        help="set an attribute of the model the run serves, e.g. adapter_batching=mixed (repeatable)")
    parser.add_argument("--time-cap", type=float, default=240.0, help="seconds; the run stops by itself after it")
    parser.add_argument("--no-baseline", action="store_true", help="skip the direct encode() timing")
    parser.add_argument("--stub-encode", action="store_true",
                        help="serve with encode() replaced by one returning constant unit vectors at once: the "
                             "server's own ceiling (no baseline)")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes sharing the requests and the concurrency (one tops out near 100 requests/s)")
    parser.add_argument("--warmup", type=int, default=8, help="requests sent (and not counted) before measuring")
    parser.add_argument("--then", action="append", default=[], metavar="NAME=VALUE ...",
                        help="after the run, measure again against the same server (same model, warm-up and "
                             "settings) with some load flags changed, e.g. --then \"concurrency=1 clients=1 "
                             "items-per-request=1 requests=300\" (repeatable; names: THEN_FLAGS). It saves a model "
                             "load and warm-up per load shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def check_loopback(url: str) -> None:
    from ..serve import is_loopback

    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        raise SystemExit(f"error: --url must point at a loopback address (127.0.0.1, ::1, localhost), got {host!r}")


def first_served_name(url: str, headers: dict) -> str:
    """The model name requests will carry: the first one the running server lists. A server that refuses (a
    wrong or missing key) or is not ours stops the run with its answer rather than a traceback."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=10, trust_env=False)
    except httpx.HTTPError as error:
        raise SystemExit(f"error: cannot reach {url}: {error}") from error
    if response.status_code != 200:
        hint = " (pass --api-key, or set $NOVA_API_KEY)" if response.status_code in (401, 403) else ""
        raise SystemExit(f"error: {url}/v1/models answered {response.status_code}: {response.text[:300]}{hint}")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise SystemExit(f"error: {url} is not an embeddings server of this kind: /v1/models lists no model") from error


def start_watchdog(seconds: float) -> None:
    """Whatever hangs, the process ends: a bounded run is a promise of this script."""
    def expire() -> None:
        print(f"load_test: hard time cap of {seconds:.0f} s reached; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def client_run(url: str, payloads: list[dict], concurrency: int, warmup: int, time_cap: float,
               headers: dict) -> LoadResult:
    """Warm up, then measure (in a client process)."""
    if warmup:
        asyncio.run(run_load(url, payloads[:warmup], min(concurrency, warmup), time_cap, headers))
    return asyncio.run(run_load(url, payloads, concurrency, time_cap, headers))


def measure(url: str, payloads: list[dict], args: argparse.Namespace, headers: dict) -> dict:
    """Run the client in ``--clients`` processes of their own, the requests and the concurrency split between them.

    Why processes: one httpx client process tops out near 100 requests/s of 4 small texts (measured on the H200
    machine: 1 process 391 items/s, 2 processes 1,217, 4 processes 1,279 against the same server), so a single
    client measures itself; and sharing the server's interpreter lock would slow both."""
    import concurrent.futures

    clients = max(1, min(args.clients, args.concurrency, len(payloads)))
    shares = [payloads[index::clients] for index in range(clients)]
    concurrencies = [args.concurrency // clients + (index < args.concurrency % clients) for index in range(clients)]
    warmups = [args.warmup // clients + (index < args.warmup % clients) for index in range(clients)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=clients, mp_context=context) as pool:
        futures = [pool.submit(client_run, url, share, concurrency, warmup, args.time_cap, headers)
                   for share, concurrency, warmup in zip(shares, concurrencies, warmups)]
        results = [future.result(timeout=args.time_cap * 2 + 60) for future in futures]
    return combine(results, args.concurrency)


def combine(results: list[LoadResult], concurrency: int) -> dict:
    """One summary of the client processes' results (they ran at the same time: the longest run is the time)."""
    total = LoadResult(seconds=max(result.seconds for result in results))
    for result in results:
        total.latencies += result.latencies
        total.items += result.items
        total.tokens += result.tokens
        total.errors += result.errors
        total.stopped_by_time_cap |= result.stopped_by_time_cap
        for status, count in result.statuses.items():
            total.statuses[status] = total.statuses.get(status, 0) + count
    summary = summarize(total, concurrency)
    summary["client_processes"] = len(results)
    return summary


# what a --then measurement may change: the shape of the load, never the server or the model it serves
THEN_FLAGS = ("requests", "concurrency", "items_per_request", "words", "image_fraction", "image_size",
              "encoding_format", "clients", "warmup", "seed", "time_cap")


def then_args(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> list[argparse.Namespace]:
    """The arguments of each ``--then``: the run's own, with that entry's NAME=VALUE pairs parsed over them as
    flags. Only load flags (``THEN_FLAGS``) may change: a later measurement serves what the first one did."""
    runs = []
    for entry in args.then:
        flags = []
        for pair in shlex.split(entry):
            name, sep, value = pair.partition("=")
            if not sep or name.replace("-", "_") not in THEN_FLAGS:
                raise SystemExit(f"error: --then {entry!r}: {pair!r} is not NAME=VALUE with NAME one of "
                                 + ", ".join(flag.replace("_", "-") for flag in THEN_FLAGS))
            flags += ["--" + name.replace("_", "-"), value]
        runs.append(parser.parse_args([*argv, *flags]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.then_runs = then_args(parser, argv, args)
    # model loading and the baseline are bounded by this too; each --then adds what its clients may take
    start_watchdog(args.time_cap * 3 + 600 + sum(then.time_cap * 2 + 60 for then in args.then_runs))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    report: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                           if k not in ("api_key", "then_runs")}}
    if args.url:
        if args.model_attr or args.stub_encode:
            raise SystemExit("error: --model-attr and --stub-encode change the model this run loads; a server at --url "
                             "runs its own")
        check_loopback(args.url)
        name = first_served_name(args.url, headers)
        report.update(measure_run(args.url, make_payloads(args, name), args, headers, in_process=False))
        report["then"] = [measure_again(args.url, name, then, headers, in_process=False) for then in args.then_runs]
    else:
        report.update(run_in_process(args, headers))
    print(json.dumps(report, indent=2))
    write_report(report, args.json)
    return 0 if all(run["load"]["requests_ok"] > 0 for run in [report, *report["then"]]) else 1


def run_in_process(args: argparse.Namespace, headers: dict) -> dict:
    """Load the model, serve it on 127.0.0.1 in a thread, measure, then time encode() on the same items."""
    from ..server import ServerSettings, create_app
    from ..serve import http_process_count, serve_in_thread
    from ..server.frontend import serving_http_processes

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nova-load-") as workdir:
        started = time.monotonic()
        model, description = load_model(args.model, args.device, args.dtype, Path(workdir))
        set_model_attrs(model, args.model_attr)
        if hasattr(model, "warmup") and not args.stub_encode:  # after the attributes: the captures depend on them
            out["warmup_seconds"] = round(model.warmup(), 1)
            print(f"warm-up (compilation, as the server does at start-up): {out['warmup_seconds']} s", flush=True)
        out["model"] = {"name": description, "device": str(model.device), "dtype": str(model.dtype),
                        "load_seconds": round(time.monotonic() - started, 1)}
        settings = ServerSettings(
            served_model_names=("load-test",), max_batch_tokens=args.max_batch_tokens,
            max_batch_items=args.max_batch_items, max_wait_ms=args.max_wait_ms, api_key=args.api_key,
            preprocess_workers=args.preprocess_workers,
            max_queue_requests=max(1024, 2 * max(run.concurrency for run in [args, *args.then_runs])),
            **({} if args.inflight_batches is None else {"inflight_batches": args.inflight_batches}),
        )
        payloads = make_payloads(args, "load-test")
        if args.stub_encode:
            stub_encode(model)
            out["stub_encode"] = True
        app = create_app(model, settings)
        http_processes = http_process_count(args.http_processes, str(model.device))
        out["http_processes"] = http_processes
        serving = serving_http_processes(app, http_processes) if http_processes else serve_in_thread(app)
        with serving as url:
            out.update(measure_run(url, payloads, args, headers, in_process=True))
            out["then"] = [measure_again(url, "load-test", then, headers, in_process=True) for then in args.then_runs]
        if not args.no_baseline and not args.stub_encode:
            out["encode_baseline"] = encode_baseline(model, payloads, args.max_batch_items, args.max_batch_tokens,
                                                     args.time_cap)
    return out


def measure_run(url: str, payloads: list[dict], args: argparse.Namespace, headers: dict, in_process: bool) -> dict:
    """One measurement: the load, then the server's batches (and, in process, each server thread's CPU time per
    request) during it."""
    before = read_batch_series(url, headers)
    cpu_before = server_cpu_seconds() if in_process else None
    out: dict[str, Any] = {"load": measure(url, payloads, args, headers)}
    if cpu_before is not None:
        out["server_threads_cpu_ms_per_request"] = cpu_per_request(cpu_before, server_cpu_seconds(),
                                                                   out["load"]["requests_ok"])
    out["server_batches"] = server_batch_stats(url, headers, before)
    return out


def measure_again(url: str, name: str, args: argparse.Namespace, headers: dict, in_process: bool) -> dict:
    """One ``--then`` measurement: its load flags and ``measure_run``'s figures."""
    return {"flags": {flag: getattr(args, flag) for flag in THEN_FLAGS},
            **measure_run(url, make_payloads(args, name), args, headers, in_process)}


def write_report(report: dict, path: Path | None) -> None:
    targets = [path] if path else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "load_test.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
