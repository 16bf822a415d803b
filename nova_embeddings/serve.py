"""Serve nova-embeddings-v1 over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    pip install -r requirements-server.txt
    python scripts/serve.py [MODEL] [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype auto]
        [--chat-template PATH] [--load-lora NAME=PATH ...] [--max-loras N] [--max-batch-tokens N]
        [--max-wait-ms MS] [--api-key KEY] [--admin-token TOKEN] [--allow-image-urls] ...

With no MODEL it builds the tiny random-weight checkpoint in a temporary folder and serves that, so the
API can be tried on a laptop (its vectors mean nothing). See the README's "Serving" section for the API.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `scripts.*` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts.nova_server import ServerSettings, create_app  # noqa: E402
from scripts.nova_server.settings import MIB  # noqa: E402

logger = logging.getLogger("nova_server")

TINY_MODEL_NAME = "nova-embeddings-v1-tiny"
DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------- command line
def lora_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model folder or Hub id (default: the tiny checkpoint)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 exposes the server: set --api-key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2 (default: model's)")
    parser.add_argument("--served-model-name", action="append", default=None,
                        help="name(s) accepted as `model` (repeatable; default: MODEL as given)")
    parser.add_argument("--chat-template", type=Path, default=None,
                        help="chat_template.json (or a Jinja file) replacing the model's")
    parser.add_argument("--load-lora", type=lora_spec, action="append", default=[], metavar="NAME=PATH",
                        help="custom adapter to load at start (folder or its adapter_model.safetensors; repeatable)")
    parser.add_argument("--max-loras", type=int, default=4, help="custom adapters loaded at once (task ones excluded)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of one batch")
    parser.add_argument("--max-batch-items", type=int, default=256, help="item budget of one batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    parser.add_argument("--max-queue", type=int, default=1024, help="queued requests before 429")
    parser.add_argument("--max-items-per-request", type=int, default=2048)
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body, MiB")
    parser.add_argument("--api-key", default=os.environ.get("NOVA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $NOVA_API_KEY)")
    parser.add_argument("--admin-token", default=os.environ.get("NOVA_ADMIN_TOKEN"),
                        help="enable /v1/internal/lora/* for this bearer token (default: $NOVA_ADMIN_TOKEN)")
    parser.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    parser.add_argument("--allow-private-image-urls", action="store_true",
                        help="with --allow-image-urls, also fetch from private/loopback/link-local addresses")
    parser.add_argument("--image-url-timeout", type=float, default=10.0, help="seconds per image download")
    parser.add_argument("--image-url-max-mb", type=float, default=20.0, help="largest image download, MiB")
    parser.add_argument("--max-image-pixels", type=int, default=None,
                        help="decoded pixel cap (default: model config's)")
    parser.add_argument("--multivector-default", "--is-multi-vector-embeddings", dest="multivector_default",
                        action="store_true", help="requests that do not say get multi vectors")
    parser.add_argument("--preprocess-workers", type=int, default=1, help="threads for decoding and tokenising")
    parser.add_argument("--log-level", default="info")
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
    )


# ---------------------------------------------------------------------- model
def build_tiny_checkpoint(workdir: str | Path) -> Path:
    """The tiny random-weight jina checkpoint, converted: a servable nova repository in ``workdir/nova``."""
    from scripts.convert_jina_v4 import convert
    from scripts.make_tiny_checkpoint import make_tiny_checkpoint

    workdir = Path(workdir)
    jina = make_tiny_checkpoint(workdir / "jina", seed=0, dtype="float32")
    convert(jina, workdir / "nova")
    return workdir / "nova"


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
) -> Any:
    """Load the model for serving: weights, then the chat template override, then the startup adapters."""
    from transformers import AutoModel

    device = resolve_device(device)
    kwargs: dict[str, Any] = {"trust_remote_code": True, "dtype": resolve_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(str(path), **kwargs).to(device).eval()
    if chat_template is not None:
        model.processor.chat_template = read_chat_template(chat_template)
    load_startup_adapters(model, loras, max_loras)
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
        model.load_adapter(str(folder.parent if folder.is_file() else folder), adapter_name=name)
        logger.info("loaded adapter %s from %s", name, folder)


# ---------------------------------------------------------------------- running
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL; stops (and drains) on exit.

    Port 0 picks a free port. Used by tests and scripts/load_test.py.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
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
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def make_loader(args: argparse.Namespace, model_path: str | Path) -> Callable[[], Any]:
    def loader() -> Any:
        return load_model(model_path, device=args.device, dtype=args.dtype,
                          attn_implementation=args.attn_implementation, chat_template=args.chat_template,
                          loras=args.load_lora, max_loras=args.max_loras)

    return loader


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and settings.api_key is None:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="nova-tiny-") as workdir:
        model_path = args.model
        if model_path is None:
            logger.info("no MODEL given: serving the tiny random-weight checkpoint (its vectors mean nothing)")
            model_path = build_tiny_checkpoint(workdir)
        app = create_app(make_loader(args, model_path), settings)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
