"""Serve nova-embeddings-v1 over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    pip install -e ".[server]"
    nova-embeddings serve [MODEL] [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype auto]
        [--chat-template PATH] [--load-lora NAME=PATH ...] [--max-loras N] [--max-batch-tokens N]
        [--max-wait-ms MS] [--api-key KEY] [--admin-token TOKEN] [--allow-image-urls] [--http-processes N] ...

With no MODEL it builds the tiny random-weight checkpoint in a temporary folder and serves that, so the
API can be tried on a laptop (its vectors mean nothing). See the README's "Serving" section for the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .model_attrs import apply_model_attrs, parse_model_attr
from .server import ServerSettings, create_app
from .server.settings import MIB

logger = logging.getLogger("nova_server")

TINY_MODEL_NAME = "nova-embeddings-v1-tiny"
LIBRARY_NOISE = ("got `key=rope_scaling` in kwargs", "Unrecognized keys in `rope_parameters`")
DRAIN_TIMEOUT_S = 30.0
GPU_HTTP_PROCESSES = 2  # run W (README): 2 and 4 gave the same throughput
DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------- command line
def lora_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def port_number(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535: an error at parse time, not a traceback after start-up."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0 to 65535)")
    return port


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def http_process_count(requested: int | None, device: str) -> int:
    """``--http-processes``, or its default: on a GPU, HTTP apart from the model's process (at concurrency 64 on the
    H200 that took the server from 0.87x to 0.97x of ``encode()``'s throughput); on a CPU, which runs the model
    itself, none."""
    if sys.platform == "win32":  # the processes talk over a Unix socket
        if requested:
            raise ValueError("--http-processes needs Unix sockets, which this platform (Windows) lacks; use 0")
        return 0
    if requested is not None:
        return requested
    return GPU_HTTP_PROCESSES if resolve_device(device).startswith("cuda") else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag's help states its default once (secrets by their variable, not their value)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("model", nargs="?", default=None, help="model folder or Hub id (default: the tiny random-weight checkpoint)")
    add("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server, so set --api-key "
                                            "(default: %(default)s)")
    add("--port", type=port_number, default=8000, help="port to bind (default: %(default)s)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: %(default)s)")
    add("--dtype", choices=DTYPES, default="auto", help="auto is bfloat16 on GPU, float32 on CPU (default: %(default)s)")
    add("--attn-implementation", default=None, help="sdpa, eager or flash_attention_2 (default: the model's)")
    add("--served-model-name", action="append", default=None,
        help="a name accepted as `model`, repeatable; the first is reported when a request names none "
             "(default: MODEL as given)")
    add("--chat-template", type=Path, default=None,
        help="a chat_template.json (or a Jinja file) replacing the model's (default: the model's)")
    add("--load-lora", type=lora_spec, action="append", default=[], metavar="NAME=PATH",
        help="adapter to load at start: its folder or adapter_model.safetensors; a task's name (retrieval=PATH) "
             "fills a missing task adapter; repeatable (default: none)")
    add("--max-loras", type=int, default=4,
        help="custom adapters loaded at once, task adapters not counted (default: %(default)s)")
    add("--max-batch-tokens", type=int, default=16384, help="token budget of one batch (default: %(default)s)")
    add("--max-batch-items", type=int, default=256, help="item budget of one batch (default: %(default)s)")
    add("--max-wait-ms", type=float, default=5.0,
        help="how long a batch waits for requests still being prepared, in ms (default: %(default)s)")
    add("--max-queue", type=int, default=1024, help="queued requests before a 429 (default: %(default)s)")
    add("--max-items-per-request", type=int, default=2048,
        help="items in one request; more get a 400 (default: %(default)s)")
    add("--max-request-mb", type=float, default=64.0, help="largest request body in MiB (default: %(default)s)")
    add("--max-request-pixels", type=int, default=ServerSettings.max_request_pixels,
        help="decoded pixels of all the images of one request, checked from their headers; more get a 413 "
             "(default: %(default)s)")
    add("--max-request-image-tokens", type=int, default=ServerSettings.max_request_image_tokens,
        help="image tokens of all the images of one request; more get a 413 (default: %(default)s)")
    add("--request-read-timeout", type=float, default=ServerSettings.request_read_timeout_s,
        help="seconds allowed to receive a request body; slower bodies get a 408 (default: %(default)s)")
    add("--api-key", default=os.environ.get("NOVA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $NOVA_API_KEY)")
    add("--admin-token", default=os.environ.get("NOVA_ADMIN_TOKEN"),
        help="turn on /v1/internal/lora/* for this bearer token (default: $NOVA_ADMIN_TOKEN)")
    add("--allow-image-urls", action="store_true", help="fetch http(s) image URLs, public hosts only (default: off)")
    add("--allow-private-image-urls", action="store_true",
        help="with --allow-image-urls, also fetch from private, loopback and link-local addresses (default: off)")
    add("--image-url-timeout", type=float, default=10.0, help="seconds per image download (default: %(default)s)")
    add("--image-url-max-mb", type=float, default=20.0, help="largest image download in MiB (default: %(default)s)")
    add("--max-image-pixels", type=int, default=None,
        help="pixel limit of one decoded image, replacing the config's (default: the config's max_image_pixels)")
    add("--multivector-default", "--is-multi-vector-embeddings", dest="multivector_default", action="store_true",
        help="requests that do not set return_multivector get multi vectors (default: off)")
    add("--preprocess-workers", type=int, default=1,
        help="threads of the model's process that tokenise (and, without HTTP processes, write large responses) "
             "(default: %(default)s)")
    add("--inflight-batches", type=int, default=ServerSettings.inflight_batches,
        help="batches in encode() at once: the next one's GPU work is queued while one waits for its vectors "
             "(default: %(default)s; 1: one at a time)")
    add("--http-processes", type=non_negative_int, default=None,
        help="processes that serve HTTP (check keys, parse requests, write responses) apart from the model's "
             "process, which then prepares items and runs the model; 0: the model's process serves HTTP itself "
             f"(default: {GPU_HTTP_PROCESSES} when the model runs on a GPU, else 0)")
    add("--decode-workers", type=int, default=ServerSettings.decode_workers,
        help="threads that decode images, apart from the preprocessing ones (default: %(default)s)")
    add("--model-attr", action="append", default=[], metavar="NAME=VALUE", type=parse_model_attr,
        help="set one of the model's speed knobs before the warm-up, e.g. adapter_batching=mixed or "
             "cuda_graphs=off (the README's table of model attributes); repeatable (default: none)")
    add("--log-level", default="info", help="debug, info, warning or error (default: %(default)s)")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    names = tuple(args.served_model_name or [args.model or TINY_MODEL_NAME])
    return ServerSettings(
        served_model_names=names, max_batch_tokens=args.max_batch_tokens, max_batch_items=args.max_batch_items,
        max_wait_ms=args.max_wait_ms, max_queue_requests=args.max_queue,
        max_items_per_request=args.max_items_per_request,
        max_request_bytes=int(args.max_request_mb * MIB), api_key=args.api_key or None,
        admin_token=args.admin_token or None, max_loras=args.max_loras, allow_image_urls=args.allow_image_urls,
        allow_private_image_urls=args.allow_private_image_urls, image_url_timeout_s=args.image_url_timeout,
        image_url_max_bytes=int(args.image_url_max_mb * MIB), max_image_pixels=args.max_image_pixels,
        default_multivector=args.multivector_default, preprocess_workers=args.preprocess_workers,
        max_request_pixels=args.max_request_pixels, max_request_image_tokens=args.max_request_image_tokens,
        decode_workers=args.decode_workers, request_read_timeout_s=args.request_read_timeout,
        inflight_batches=args.inflight_batches,
    )


# ---------------------------------------------------------------------- model
def build_tiny_checkpoint(workdir: str | Path) -> Path:
    """The tiny random-weight jina checkpoint, converted: a servable nova repository in ``workdir/nova``.

    What the converter prints goes to the debug log, not to the server's output.
    """
    from .convert import convert
    from .tiny import make_tiny_checkpoint

    workdir = Path(workdir)
    printed = io.StringIO()
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the converter's config checks repeat transformers' rope notices
    try:
        with contextlib.redirect_stdout(printed):
            jina = make_tiny_checkpoint(workdir / "jina", seed=0, dtype="float32")
            convert(jina, workdir / "nova")
    finally:
        transformers_logging.set_verbosity(verbosity)
    if printed.getvalue().strip():
        logger.debug("converter output: %s", printed.getvalue().strip())
    return workdir / "nova"


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_logs() -> None:
    """A start-up log without library noise: transformers' RoPE-config warnings (repeated for every config it
    builds, harmless for Qwen2.5-VL's mrope), its weight-loading progress bar, and PEFT's warning when a second
    adapter is added to a model (which is what loading several adapters means)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    noise = DropMessages(LIBRARY_NOISE)
    for handler in hf_logging.get_logger("transformers").handlers:
        handler.addFilter(noise)
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def read_chat_template(path: Path) -> str:
    """A chat_template.json ({"chat_template": ...}) or a plain Jinja file."""
    import json

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        template = json.loads(text).get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{path} has no 'chat_template' string")
        return template
    return text


def load_model(
    path: str | Path, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None,
    chat_template: Path | None = None, loras: list[tuple[str, str]] = (), max_loras: int | None = None,
    model_attrs: Sequence[tuple[str, Any]] = (),
) -> Any:
    """Load the model for serving: weights, then the chat template override, the startup adapters, and the
    ``--model-attr`` knobs (before the server's warm-up, whose captures depend on them)."""
    from transformers import AutoModel

    device = resolve_device(device)
    kwargs: dict[str, Any] = {"trust_remote_code": True, "dtype": resolve_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(str(path), **kwargs).to(device).eval()
    if chat_template is not None:
        model.processor.chat_template = read_chat_template(chat_template)
    load_startup_adapters(model, loras, max_loras)
    apply_model_attrs(model, model_attrs)
    return model


def load_startup_adapters(model: Any, loras: list[tuple[str, str]], max_loras: int | None) -> None:
    """``--load-lora`` adapters (a folder or its adapter_model.safetensors file).

    A task's name (``retrieval=PATH``, as in the model card) loads that task's adapter when the repository
    has none; custom names count toward ``--max-loras``.
    """
    if not loras:
        return
    if not hasattr(model, "load_adapter") or not hasattr(model, "list_adapters"):
        raise ValueError("this model has no adapter support; --load-lora cannot be used")
    custom = [name for name, _ in loras if name not in model.config.task_names]
    if max_loras is not None and len(custom) > max_loras:
        raise ValueError(f"{len(custom)} custom adapters given with --load-lora, over --max-loras {max_loras}")
    for name, path in loras:
        if name in model.list_adapters():
            raise ValueError(f"adapter {name!r} is already loaded (a task adapter from the model's repository, or "
                             "given twice); --load-lora adds adapters, it does not replace them")
        folder = Path(path).expanduser()
        model.load_adapter(str(folder.parent if folder.is_file() else folder), adapter_name=name,
                           as_task_adapter=name in model.config.task_names)
        logger.info("loaded adapter %s from %s", name, folder)


# ---------------------------------------------------------------------- running
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def draining_server_class() -> type:
    """``DrainingServer``, defined on first use so that importing this module does not need uvicorn."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that the first SIGINT/SIGTERM drains the app before uvicorn stops.

        uvicorn alone closes its listening socket at once, so a load balancer sees refused connections rather
        than an answer. Here new requests get 503 and /health says "stopping" while the requests in flight
        finish (at most ``drain_timeout_s``); then uvicorn stops as usual. A second signal stops at once.
        """

        def __init__(self, config: uvicorn.Config, nova: Any, drain_timeout_s: float = DRAIN_TIMEOUT_S):
            super().__init__(config)
            self.nova = nova
            self.drain_timeout_s = drain_timeout_s
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain_task: asyncio.Task | None = None

        async def startup(self, sockets: list | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._drain_task is not None or self._loop is None or self.should_exit:
                super().handle_exit(sig, frame)
                return
            self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

        def _start_drain(self, sig: int, frame: Any) -> None:
            if self._drain_task is None:
                self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(sig, frame))
            else:
                super().handle_exit(sig, frame)

        async def _drain_then_exit(self, sig: int, frame: Any) -> None:
            await self.nova.drain(self.drain_timeout_s)
            super().handle_exit(sig, frame)

    return DrainingServer


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                   startup_timeout_s: float = 120.0) -> Iterator[tuple[Any, str]]:
    """Run ``app`` (from ``create_app``) under uvicorn in a background thread; yields (server, base URL).

    Port 0 picks a free port. Used by tests and nova_embeddings/bench/load_test.py. ``server.handle_exit(signal.SIGTERM, None)`` stops it as a signal would.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = draining_server_class()(config, app.state.nova)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start (see its log)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    startup_timeout_s: float = 120.0) -> Iterator[str]:
    """``running_server`` yielding only the base URL; stops (and drains) on exit. Used by tests and load_test.py."""
    with running_server(app, host, port, log_level, startup_timeout_s) as (_, url):
        yield url


def make_loader(args: argparse.Namespace, workdir: str | Path) -> Callable[[], Any]:
    """The model loader the server runs in the background once its port is bound (the tiny checkpoint is built
    there too, when no MODEL is given)."""
    def loader() -> Any:
        model_path = args.model
        if model_path is None:
            model_path = build_tiny_checkpoint(workdir)
            logger.info("built the tiny checkpoint in %s", model_path)
        return load_model(model_path, device=args.device, dtype=args.dtype,
                          attn_implementation=args.attn_implementation, chat_template=args.chat_template,
                          loras=args.load_lora, max_loras=args.max_loras, model_attrs=args.model_attr)

    return loader


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_logs()
    try:
        settings = settings_from_args(args)
        http_processes = http_process_count(args.http_processes, args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and settings.api_key is None:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="nova-tiny-") as workdir:
        if args.model is None:
            logger.info("no MODEL given: serving the tiny random-weight checkpoint (its vectors mean nothing)")
        app = create_app(make_loader(args, workdir), settings)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S))
        sockets = [config.bind_socket()]  # before the lifespan starts loading: a busy port exits at once
        if http_processes > 0:
            return serve_with_http_processes(app, http_processes, sockets, args.log_level)
        draining_server_class()(config, app.state.nova).run(sockets=sockets)
    return 0


def serve_with_http_processes(app: Any, count: int, sockets: list, log_level: str) -> int:
    """``--http-processes N``: this process runs the model; N spawned ones serve HTTP on ``sockets``. SIGINT or
    SIGTERM drains them, then the batcher; an HTTP process that dies is replaced, unless they keep dying (then the
    server stops with exit code 1)."""
    from .server.frontend import HttpProcesses

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    processes = HttpProcesses(app.state.nova, count, sockets, log_level)
    processes.start()
    logger.info("serving HTTP from %d processes on %s", count, sockets[0].getsockname())
    return processes.wait(stop)


if __name__ == "__main__":
    sys.exit(main())
