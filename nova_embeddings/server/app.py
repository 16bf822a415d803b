"""The FastAPI app: routes, authentication, request preparation, adapter administration, lifecycle.

``create_app(model, settings)`` takes a loaded model, or a zero-argument callable that loads one (then
the server answers /health with 503 until loading is done). Work is spread so that the event loop never
waits on the model: tokenisation and response formatting run in a small thread pool; image decoding runs
in a pool of its own (so a large image never holds up a text request); ``encode()`` and adapter loads run
in the encode executor (``inflight_batches`` threads: a batch's GPU work is queued while the previous one waits for
its vectors); the model's adapter lock keeps a load from overlapping a batch's GPU work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .batcher import Batcher, Job, QueueFull, ShuttingDown, Ticket
from .errors import ApiError, as_item_error, install_error_handlers, item_error, item_param
from .images import (
    ImageFetcher,
    ImageRules,
    ImageSourceError,
    decode_concurrently,
    decode_inline_image,
    has_image_strings,
    is_url,
    open_image_header,
)
from .metrics import Metrics
from .schemas import (
    CheckedVectors,
    EmbeddingRequest,
    LoraLoadRequest,
    LoraUnloadRequest,
    OutputOptions,
    embedding_response,
    image_embeds_tensor,
    parse_body,
    request_items,
)
from .settings import ServerSettings

logger = logging.getLogger("nova_server")

ADMIN_BODY_BYTES = 64 * 1024
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
URL_FETCH_CONCURRENCY = 8
# base64 responses up to this many floats are written on the event loop (~0.1 ms per 2048 floats): for them a
# hop to the prep thread and back costs more than the work, and the prep thread stays free for tokenising.
INLINE_RESPONSE_FLOATS = 65536
NOT_READY_REASONS = {"loading": "the model is still loading",
                     "failed": "the model failed to load or to run (see the server log)",
                     "stopping": "the server is shutting down"}
KNOWN_PATHS = frozenset({"/v1/embeddings", "/v1/models", "/health", "/metrics", "/v1/internal/lora/load",
                         "/v1/internal/lora/unload"})


class InFlight:
    """The requests being answered, and a wait for there being none: what a graceful stop waits for."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def until_idle(self, timeout_s: float) -> None:
        """Return once no request is in flight, or after ``timeout_s``."""
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)


class NovaServer:
    """State of one server: the model, its executors, the batcher, the image fetcher and the metrics."""

    def __init__(self, model: Any, settings: ServerSettings):
        self.settings = settings
        self.model: Any = model if isinstance(model, torch.nn.Module) else None
        self._loader: Callable[[], Any] | None = None if self.model is not None else model
        if self.model is None and not callable(model):
            raise TypeError("model must be a loaded model or a callable that loads one")
        self.phase = "loading"  # -> ready -> stopping, or -> failed
        self.metrics = Metrics()
        self.created = int(time.time())
        self.encode_executor = ThreadPoolExecutor(settings.inflight_batches, thread_name_prefix="nova-encode")
        self.prep_executor = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="nova-prep")
        self.decode_executor = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="nova-decode")
        self._config_image_pixels: int | None = None  # the model config's own limit, restored at shutdown
        self.batcher: Batcher | None = None
        self.fetcher: ImageFetcher | None = None
        self.admin_lock = asyncio.Lock()
        self._load_task: asyncio.Task | None = None
        self.requests = InFlight()  # requests past the ready check and not answered yet: what a drain waits for

    # ------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """Start (or start loading) on entry; on exit stop accepting and finish every queued request."""
        s = self.settings
        self.fetcher = ImageFetcher(s.image_url_timeout_s, s.image_url_max_bytes, s.allow_private_image_urls)
        if self.model is not None:
            self._become_ready(self.model)
        else:
            self._load_task = asyncio.get_running_loop().create_task(self._load())
        try:
            yield
        finally:
            await self.shutdown()

    async def _load(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self.encode_executor, self._loader)
            warmup = getattr(model, "warmup", None)
            if warmup is not None:  # compile and pick kernels now, not in the first user's request
                seconds = await loop.run_in_executor(self.encode_executor, warmup)
                logger.info("warm-up took %.1f s", seconds)
        except Exception:  # noqa: BLE001 - reported by /health and the log; the process stays up to say so
            logger.exception("model loading failed")
            self.phase = "failed"
            return
        self._become_ready(model)

    def _become_ready(self, model: Any) -> None:
        s = self.settings
        self.model = model
        self._apply_image_pixel_limit()
        self.batcher = Batcher(
            self._encode, self.encode_executor, self.metrics, max_batch_tokens=s.max_batch_tokens,
            max_batch_items=s.max_batch_items, max_wait_s=s.max_wait_ms / 1000, max_queue_requests=s.max_queue_requests,
            max_inflight=s.inflight_batches,
        )
        self.batcher.start()
        self.phase = "ready"
        logger.info("ready: serving %s", ", ".join(s.served_model_names))

    async def shutdown(self) -> None:
        """Refuse new requests (503), finish the admitted ones, release the threads."""
        if self.phase == "ready":
            self.phase = "stopping"
        if self._load_task is not None and not self._load_task.done():
            await self._load_task  # a loading thread cannot be interrupted; let it finish
            self.phase = "stopping"
        if self.batcher is not None:
            await self.batcher.close()
        if self.fetcher is not None:
            await self.fetcher.aclose()
        self.encode_executor.shutdown(wait=False)
        self.prep_executor.shutdown(wait=False)
        self.decode_executor.shutdown(wait=False)
        if self._config_image_pixels is not None:
            self.model.config.max_image_pixels = self._config_image_pixels

    def _apply_image_pixel_limit(self) -> None:
        """One pixel limit: ``--max-image-pixels`` replaces the config's, which ``encode()`` checks again."""
        if self.settings.max_image_pixels is not None:
            self._config_image_pixels = self.model.config.max_image_pixels
            self.model.config.max_image_pixels = self.settings.max_image_pixels

    async def drain(self, timeout_s: float) -> None:
        """First step of a graceful stop (on SIGTERM): new requests get 503 and /health says "stopping" while the
        requests under way finish (at most ``timeout_s``); ``shutdown`` then releases everything."""
        if self.phase == "ready":
            self.phase = "stopping"
            logger.info("stopping: %d request(s) in flight", self.requests.count)
        await self.requests.until_idle(timeout_s)

    def tracking(self) -> contextlib.AbstractContextManager:
        """Count a request as in flight while it is being answered."""
        return self.requests.tracking()

    def require_ready(self) -> None:
        if self.phase != "ready":
            raise not_ready_error(self.phase)

    # ------------------------------------------------------------------ model access
    def _encode(self, prepared: Any, return_multivector: bool) -> CheckedVectors:
        """One batcher call (in the encode thread): the joined ``PreparedItems`` of its requests, tokenised already;
        the vectors come back checked for non-finite values, once for the batch."""
        s = self.settings
        return CheckedVectors.of(self.model.encode(
            prepared, return_multivector=return_multivector, batch_size=s.max_batch_items,
            max_batch_tokens=s.max_batch_tokens, output="numpy", show_progress_bar=False,
        ))

    def adapters(self) -> list[str]:
        """Every loaded adapter (task ones first); [] for a model without adapter support."""
        list_adapters = getattr(self.model, "list_adapters", None)
        return list(list_adapters()) if list_adapters is not None else []

    def custom_adapters(self) -> list[str]:
        """Loaded adapters that are not a task's: the ones ``--max-loras`` counts and /v1/models lists."""
        custom_adapters = getattr(self.model, "custom_adapters", None)
        return list(custom_adapters()) if custom_adapters is not None else []

    async def in_prep_thread(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.prep_executor, call)

    # ------------------------------------------------------------------ embeddings
    def admit(self) -> Ticket:
        try:
            return self.batcher.admit()
        except QueueFull as full:
            raise ApiError(429, f"too many requests queued ({self.settings.max_queue_requests}); retry later",
                           code="queue_full", headers={"Retry-After": str(full.retry_after_s)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", code="not_ready") from None

    def resolve_options(self, request: EmbeddingRequest) -> tuple[OutputOptions, tuple[bool, str | None]]:
        """Output settings, and the request-level adapter (given?, name) after reading ``model``."""
        config = self.model.config
        adapter = (request.adapter_given, request.adapter)
        if request.model is not None and request.model not in self.settings.served_model_names:
            if request.model not in self.custom_adapters():
                raise ApiError(404, f"model {request.model!r} is not served here; available: "
                                    f"{list(self.settings.served_model_names) + self.custom_adapters()}",
                               param="model", code="model_not_found")
            if request.adapter_given and request.adapter != request.model:
                raise ApiError(400, f"model {request.model!r} is an adapter, and adapter is {request.adapter!r}",
                               param="adapter", code="invalid_value")
            adapter = (True, request.model)
        multi = self.settings.default_multivector if request.return_multivector is None else request.return_multivector
        if request.dimensions is not None:
            if multi:
                raise ApiError(400, "dimensions applies to single vectors only (return_multivector is true)",
                               param="dimensions", code="invalid_value")
            if request.dimensions not in config.matryoshka_dims:
                raise ApiError(400, f"dimensions={request.dimensions} is not allowed; choose one of "
                                    f"{list(config.matryoshka_dims)}", param="dimensions", code="invalid_value")
        if request.task is not None and request.task not in config.task_prompts:
            raise ApiError(400, f"unknown task {request.task!r}; valid tasks: {sorted(config.task_prompts)}",
                           param="task", code="invalid_value")
        if request.instructions is not None and not request.instructions.strip():
            raise ApiError(400, "instructions is empty (leave it out for no instructions)", param="instructions",
                           code="invalid_value")
        return OutputOptions(multi, request.dimensions, request.encoding_format), adapter

    async def fetch_image_urls(self, raw_items: list[Any], single: bool) -> dict[int, bytes]:
        """Download the requests' http(s) images (only with --allow-image-urls), concurrently, under the rules."""
        urls = {i: item["image"] for i, item in enumerate(raw_items)
                if isinstance(item, dict) and isinstance(item.get("image"), str) and is_url(item["image"])}
        if not urls:
            return {}
        if not self.settings.allow_image_urls:
            index = min(urls)
            raise item_error(index, "image URLs are not fetched by this server (it was started without "
                                    "--allow-image-urls); send the image as base64 or a data URI", single)
        gate = asyncio.Semaphore(URL_FETCH_CONCURRENCY)

        async def fetch(url: str) -> bytes:
            async with gate:
                return await self.fetcher.fetch(url)

        results = await asyncio.gather(*(fetch(url) for url in urls.values()), return_exceptions=True)
        for index, result in zip(urls, results):
            if isinstance(result, ImageSourceError):
                raise item_error(index, str(result), single)
            if isinstance(result, BaseException):
                raise result
        return dict(zip(urls, results))

    def image_rules(self) -> ImageRules:
        """The rules ``open_images`` applies, for HTTP processes that decode inline images ahead of it."""
        formats = remote_code_constant(self.model.processor, "IMAGE_FORMATS")  # the processor's decoders, no others
        return ImageRules(formats, self.model.config.max_image_pixels, self.settings.max_request_pixels)

    def open_images(self, raw_items: list[Any], fetched: dict[int, bytes], single: bool,
                    decoded: dict[int, Any] | None = None) -> dict[int, Any]:
        """The request's images, opened lazily (prep thread): sizes checked against the per-image limit and the
        request's budgets from the headers alone, before anything is decoded. ``decoded``: the images an HTTP
        process decoded already (``inline_image_headers`` under ``image_rules``, then decoded), checked the same way."""
        s, rules, decoded = self.settings, self.image_rules(), decoded or {}
        images: dict[int, Any] = {}
        pixels = tokens = 0
        for index, raw in enumerate(raw_items):
            if not (isinstance(raw, dict) and isinstance(raw.get("image"), str)):
                continue
            try:
                if index in decoded:
                    image = decoded[index]
                else:
                    data = fetched[index] if index in fetched else decode_inline_image(raw["image"])
                    image = open_image_header(data, rules.formats)
            except ImageSourceError as error:
                raise item_error(index, str(error), single) from None
            width, height = image.size
            if width * height > rules.max_image_pixels:
                raise item_error(index, f"image of {width}x{height} px is over the limit of {rules.max_image_pixels} "
                                        "pixels", single)
            pixels += width * height
            tokens += self._image_tokens(index, image, single)
            if pixels > rules.max_request_pixels:
                raise request_budget_error(index, single, f"the request's images come to {pixels} decoded pixels up "
                                           f"to this one, over the per-request limit of {rules.max_request_pixels} "
                                           "decoded pixels (--max-request-pixels)")
            if tokens > s.max_request_image_tokens:
                raise request_budget_error(index, single, f"the request's images come to {tokens} image tokens up to "
                                           f"this one, over the per-request limit of {s.max_request_image_tokens} "
                                           "(--max-request-image-tokens)")
            images[index] = image
        return images

    def _image_tokens(self, index: int, image: Any, single: bool) -> int:
        """Image tokens an image of this size becomes, from the processor's own resize rule (header size only)."""
        processor = self.model.processor
        try:
            limits = processor.pixel_limits(self.model.config)
            t, h, w = processor.image_grid(SimpleNamespace(image=image, index=index), limits)  # reads .image.size only
        except ValueError as error:
            raise as_item_error(error, single) or item_error(index, str(error), single) from None
        return t * h * w // processor.image_processor.merge_size**2

    async def request_images(self, raw_items: list[Any], single: bool,
                             decoded: dict[int, Any] | None = None) -> dict[int, Any]:
        """The request's images, fetched, checked and decoded (unless in ``decoded``, see ``open_images``), by item
        index; a request without images costs no thread hop here."""
        if not has_image_strings(raw_items):
            return {}
        decoded = decoded or {}
        fetched = await self.fetch_image_urls(raw_items, single)
        headers = await self.in_prep_thread(self.open_images, raw_items, fetched, single, decoded)
        opened = await self.decode_images({i: image for i, image in headers.items() if i not in decoded}, single)
        return {i: opened.get(i, image) for i, image in headers.items()}

    async def decode_images(self, images: dict[int, Any], single: bool) -> dict[int, Any]:
        """Decode the request's images in the decode pool (bounded by ``decode_workers``), off the event loop."""
        results = await decode_concurrently(self.decode_executor, images)
        for index, result in results.items():
            if isinstance(result, ImageSourceError):
                raise item_error(index, str(result), single)
            if isinstance(result, BaseException):
                raise result
        return results

    def prepare_items(
        self, raw_items: list[Any], images: dict[int, Any], request: EmbeddingRequest,
        adapter: tuple[bool, str | None], single: bool,
    ) -> Any:
        """Validate, tokenise and route a request's items (prep thread), once: the ``PreparedItems`` that the
        batcher joins with other requests' and hands to ``encode()`` as they are.

        ``images`` holds the request's decoded images by item index. Every per-item problem (unknown adapter
        included) surfaces here as a 400 naming the item, before the request can join a batch.
        """
        items = [self._item_for_processor(i, raw, images.get(i), adapter, single) for i, raw in enumerate(raw_items)]
        low, high = self.model.processor.pixel_limits(self.model.config)  # the same for every request: they join
        try:
            return self.model.prepare_items(items, task=request.task, instructions=request.instructions,
                                            truncate=request.truncate, min_pixels=low, max_pixels=high)
        except ValueError as error:
            raise as_item_error(error, single) or ApiError(400, str(error), code="invalid_value") from None

    def _item_for_processor(
        self, index: int, raw: Any, image: Any, adapter: tuple[bool, str | None], single: bool
    ) -> dict:
        """A wire item as the processor takes it: images decoded, embeds as tensors, the request's adapter applied."""
        item = {"text": raw} if isinstance(raw, str) else dict(raw)
        if image is not None:
            item["image"] = image
        if item.get("image_embeds") is not None:
            item["image_embeds"], item["image_grid_thw"] = image_embeds_tensor(index, item, single)
        if adapter[0] and "adapter" not in item:
            item["adapter"] = adapter[1]
        return item

    def encode_error(self, error: Exception, prepared: Any, single: bool) -> ApiError:
        """A failure of this request's own encode() call: its fault (400), an adapter unloaded while it waited
        (409), or ours (500)."""
        api = as_item_error(error, single)
        if api is not None:
            return api
        unloaded = self.unloaded_adapter(prepared) if isinstance(error, ValueError) else None
        if unloaded is not None:
            index, name = unloaded
            param = item_param(index, single)
            return ApiError(409, f"{param}: adapter {name!r} was unloaded while this request waited to be encoded; "
                                 f"loaded adapters: {self.adapters()}", param=param, code="adapter_unloaded")
        logger.error("encode failed", exc_info=error)
        if is_fatal_device_error(error) and self.phase == "ready":
            logger.critical("the accelerator is in an unrecoverable state: /health now reports 'failed'")
            self.phase = "failed"
        return ApiError(500, f"embedding failed: {type(error).__name__}", code="internal_error")

    def unloaded_adapter(self, prepared: Any) -> tuple[int, str] | None:
        """(item index, adapter) of the first item routed to an adapter that is no longer loaded, else None."""
        loaded = set(self.adapters()) | {remote_code_constant(self.model, "BASE")}
        return next(((index, name) for index, name in enumerate(prepared.adapters) if name not in loaded), None)

    async def embedded(self, request: EmbeddingRequest, decoded: dict[int, Any] | None = None) -> "Embedded":
        """Prepare, queue, wait for the batcher, check: a request's vectors, not yet written out (what an HTTP
        process gets back from this one, with the inline images it ``decoded``: see ``frontend.py``)."""
        started = time.monotonic()
        options, adapter = self.resolve_options(request)
        raw_items, single = request_items(request, self.settings.max_items_per_request)
        ticket = self.admit()
        try:
            images = await self.request_images(raw_items, single, decoded)
            prepared = await self.in_prep_thread(self.prepare_items, raw_items, images, request, adapter, single)
            tokens = sum(len(t) for t in prepared.tokenized)
            future = self.batcher.submit(Job(prepared, tokens, options.return_multivector), ticket)
        finally:
            self.batcher.release(ticket)
        try:
            vectors = await future
        except Exception as error:  # noqa: BLE001 - mapped to 400/409/500 below
            raise self.encode_error(error, prepared, single) from None
        bad = vectors.first_non_finite()
        if bad is not None:
            raise non_finite_error(bad, prepared.tokenized[bad].item, single)
        echoed = request.model if request.model is not None else self.settings.model_name  # as vLLM: the name used
        self.metrics.observe_embedding(len(prepared), tokens, time.monotonic() - started)
        return Embedded(vectors, options, echoed, tokens)

    async def embed(self, request: EmbeddingRequest) -> bytes:
        """The body of a /v1/embeddings response: written on the event loop when small, else in the prep thread."""
        embedded = await self.embedded(request)
        return embedded.body() if embedded.is_small() else await self.in_prep_thread(embedded.body)

    # ------------------------------------------------------------------ adapters
    def _require_adapter_api(self) -> None:
        if not all(hasattr(self.model, name) for name in ("load_adapter", "unload_adapter", "list_adapters")):
            raise ApiError(501, "this model has no adapter support (load_adapter/unload_adapter/list_adapters)",
                           code="not_implemented")

    async def load_lora(self, name: str, path: str) -> dict:
        """Load a custom adapter between batches; at most ``max_loras`` of them."""
        self._require_adapter_api()
        if not ADAPTER_NAME.match(name):
            raise ApiError(400, "lora_name must be 1-64 letters, digits, '_' or '-' (starting with a letter or digit)",
                           param="lora_name", code="invalid_value")
        async with self.admin_lock:
            if name in self.adapters() or name in self.settings.served_model_names:
                raise ApiError(409, f"an adapter or model named {name!r} already exists; unload it first",
                               param="lora_name", code="adapter_exists")
            if len(self.custom_adapters()) >= self.settings.max_loras:
                raise ApiError(409, f"already {len(self.custom_adapters())} custom adapters loaded (--max-loras "
                                    f"{self.settings.max_loras}); unload one first", code="too_many_adapters")
            folder = adapter_folder(path)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    self.encode_executor, functools.partial(self.model.load_adapter, str(folder), adapter_name=name)
                )
            except Exception as error:  # noqa: BLE001 - corrupt files raise many types (SafetensorError, KeyError...)
                if is_fatal_device_error(error):
                    raise
                raise ApiError(400, f"could not load adapter {name!r}: {type(error).__name__}: {error}",
                               param="lora_path", code="adapter_load_failed") from None
        logger.info("loaded adapter %s from %s", name, folder)
        return {"status": "loaded", "lora_name": name, "adapters": self.adapters()}

    async def unload_lora(self, name: str) -> dict:
        """Unload a custom adapter between batches; task adapters are refused by the model."""
        self._require_adapter_api()
        async with self.admin_lock:
            if name not in self.adapters():
                raise ApiError(404, f"no adapter named {name!r}; loaded adapters: {self.adapters()}",
                               param="lora_name", code="adapter_not_found")
            if name in getattr(self.model.config, "task_names", ()):
                raise ApiError(400, f"{name!r} is a task adapter: requests of task {name!r} route to it, so the server "
                                    "does not unload it", param="lora_name", code="adapter_unload_refused")
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.encode_executor, self.model.unload_adapter, name)
            except ValueError as error:
                raise ApiError(400, str(error), param="lora_name", code="adapter_unload_refused") from None
        logger.info("unloaded adapter %s", name)
        return {"status": "unloaded", "lora_name": name, "adapters": self.adapters()}

    # ------------------------------------------------------------------ listings
    def models_listing(self) -> dict:
        """OpenAI's model list: the served names, then custom adapters (selectable as ``model``, as in vLLM)."""
        entry = {"object": "model", "created": self.created, "owned_by": "nova-embeddings-v1"}
        data = [{"id": name, **entry} for name in self.settings.served_model_names]
        if self.model is not None:
            data += [{"id": name, **entry, "parent": self.settings.model_name} for name in self.custom_adapters()]
        return {"object": "list", "data": data}

    def model_entry(self, model_id: str) -> dict:
        """One entry of the model list (``GET /v1/models/{id}``); 404 for a name that is not served."""
        for entry in self.models_listing()["data"]:
            if entry["id"] == model_id:
                return entry
        raise ApiError(404, f"model {model_id!r} is not served here; available: "
                            f"{[entry['id'] for entry in self.models_listing()['data']]}", param="model",
                       code="model_not_found")

    def metrics_text(self) -> str:
        batcher = self.batcher
        return self.metrics.render(
            queue_requests=batcher.queue_requests if batcher else 0, queue_items=batcher.queue_items if batcher else 0,
            adapters=self.adapters() if self.model is not None else [], ready=self.phase == "ready",
        )


def remote_code_constant(obj: Any, name: str) -> Any:
    """A constant of the remote-code module that defines ``obj``'s class (the model's or the processor's): those
    modules are loaded dynamically by transformers, so they cannot be imported by name here."""
    return getattr(sys.modules[type(obj).__module__], name)


@dataclass
class Embedded:
    """A request's checked vectors and what its response says about them; ``body()`` writes the response."""

    vectors: CheckedVectors
    options: OutputOptions
    model_name: str
    tokens: int

    def body(self) -> bytes:
        return embedding_response(self.vectors.vectors, self.options, self.model_name, self.tokens)

    def is_small(self) -> bool:
        """A base64 response small enough to write on the event loop (float JSON is ~20x slower: never inline),
        with no Matryoshka truncation (a torch op: it would hand the interpreter lock away, see
        ``CheckedVectors``)."""
        return self.options.encoding_format == "base64" and self.options.dimensions is None and \
            self.vectors.floats <= INLINE_RESPONSE_FLOATS


def non_finite_error(index: int, item: Any, single: bool) -> ApiError:
    """NaN or infinity in an output vector: never sent. Out-of-range ``image_embeds`` are the request's fault (400);
    anything else is the model's (500, logged). ``item`` is the processor's validated item."""
    param = item_param(index, single)
    if item.image_embeds is not None:
        return ApiError(400, f"{param}: 'image_embeds' values are out of range for the model: its vector came out "
                             "non-finite (NaN or infinity)", param=param, code="invalid_input")
    logger.error("encode() returned a non-finite vector for %s", param)
    return ApiError(500, f"{param}: the model produced a non-finite vector (NaN or infinity) for this item; "
                         "see the server log (a float16 overflow? try --dtype bfloat16)", param=param,
                    code="non_finite_output")


def request_budget_error(index: int, single: bool, problem: str) -> ApiError:
    """A 413 naming the item at which the request went over one of its budgets."""
    error = item_error(index, f"{problem}; send fewer or smaller images per request", single)
    return ApiError(413, error.message, param=error.param, code="request_too_large")


def is_fatal_device_error(error: BaseException) -> bool:
    """A sticky CUDA error (illegal address, launch failure...): every later call would fail too, so the server
    should say so on /health and be restarted. Out-of-memory is not one: the next, smaller batch may fit."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in str(error)


def adapter_folder(path: str) -> Path:
    """A PEFT adapter folder, given as the folder or its adapter_model.safetensors file; local paths only."""
    candidate = Path(path).expanduser()
    if candidate.is_file() and candidate.suffix == ".safetensors":
        candidate = candidate.parent
    if not candidate.is_dir():
        raise ApiError(400, f"lora_path {path!r} is not an adapter folder (nor its adapter_model.safetensors) on "
                            "the server", param="lora_path", code="adapter_not_found")
    return candidate


# ---------------------------------------------------------------------- HTTP plumbing
def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, over the limit of {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_by(receive: Callable, deadline: float) -> dict:
    """``await receive()``, failing with ``TimeoutError`` at ``deadline`` (event-loop time). ``asyncio.timeout_at``
    where there is one (3.11+): ``wait_for`` wraps every read in a task of its own, a cost paid per request."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline):
            return await receive()
    return await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))


CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection": no one reads it, /metrics counts it


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected: after the body, an ASGI server's receive yields nothing but
    ``http.disconnect`` (when the client goes, or once the response has been sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or ``ClientGone`` with ``work`` cancelled when the client disconnects first: a request
    still waiting for its batch then costs no encoding (the batcher drops cancelled jobs), and one being prepared
    no more than its preparation. Nothing stops a batch already in ``encode()``; its vectors are dropped."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself cancelled (the server stopping): its work too
        task.cancel()
        raise
    finally:
        if not watcher.done():
            watcher.cancel()
    if task.done() or watcher.cancelled() or watcher.exception() is not None:  # (a failed watch: just wait)
        return await task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


async def json_unless_client_gone(request: Request, body: Awaitable[bytes]) -> Response:
    """The JSON response whose ``body`` is being made, or an empty 499 when the client disconnected first
    (``unless_client_gone``): the /v1/embeddings answer of every process that serves HTTP."""
    try:
        return Response(await unless_client_gone(request, body), media_type="application/json")
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)


class BodyReadTimeout:
    """ASGI middleware: a request's whole body must arrive within ``timeout_s`` of the app's first read, or the
    read fails with a 408 (uvicorn bounds neither the time nor the rate of a body, so one client trickling
    bytes could hold a connection open for ever)."""

    def __init__(self, app: Any, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        complete = False

        async def timed_receive() -> dict:
            nonlocal deadline, complete
            if complete:  # after the body, reads only wait for a disconnect: no deadline
                return await receive()
            deadline = deadline if deadline is not None else asyncio.get_running_loop().time() + self.timeout_s
            try:
                message = await receive_by(receive, deadline)
            except (asyncio.TimeoutError, TimeoutError):
                raise ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                    "(--request-read-timeout)", code="request_timeout",
                               headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class ResponseCounter:
    """ASGI middleware counting responses per (known) path and status for /metrics."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        if scope["path"].startswith("/v1/models/"):
            path = "/v1/models/{id}"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.observe_http(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def not_ready_error(phase: str) -> ApiError:
    """The 503 of a server that is loading, failed or stopping."""
    return ApiError(503, NOT_READY_REASONS[phase], code="not_ready", headers={"Retry-After": "5"})


def health_response(phase: str) -> JSONResponse:
    """/health: 200 ``{"status": "ok"}`` when ready, else 503 with the phase."""
    ready = phase == "ready"
    return JSONResponse({"status": "ok" if ready else phase}, status_code=200 if ready else 503)


def access_checks(settings: ServerSettings) -> tuple[Callable, Callable]:
    """(API key check, admin token check) of a request, as route dependencies: the same in every HTTP process."""

    async def require_api_key(request: Request) -> None:
        if settings.api_key is not None and not _token_matches(_bearer_token(request), settings.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def require_admin(request: Request) -> None:
        if settings.admin_token is None:
            raise ApiError(404, "Not Found", code="not_found")
        if not _token_matches(_bearer_token(request), settings.admin_token):
            raise ApiError(403, "admin endpoints need 'Authorization: Bearer <admin token>'", code="forbidden")

    return require_api_key, require_admin


def create_app(model: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The server as an ASGI app; its lifespan starts and drains it. ``app.state.nova`` is the NovaServer."""
    settings = settings or ServerSettings()
    server = NovaServer(model, settings)
    app = FastAPI(title="nova-embeddings-v1", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nova = server
    install_error_handlers(app)
    app.add_middleware(BodyReadTimeout, timeout_s=settings.request_read_timeout_s)
    app.add_middleware(ResponseCounter, metrics=server.metrics)

    require_api_key, require_admin = access_checks(settings)

    @app.get("/health")
    async def health() -> JSONResponse:
        return health_response(server.phase)

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models() -> JSONResponse:
        return JSONResponse(server.models_listing())

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
    async def model_entry(model_id: str) -> JSONResponse:
        return JSONResponse(server.model_entry(model_id))

    @app.get("/metrics", dependencies=[Depends(require_api_key)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    async def embeddings(request: Request) -> Response:
        await require_api_key(request)
        server.require_ready()
        with server.tracking():
            body = parse_body(await read_body(request, settings.max_request_bytes), EmbeddingRequest)
            return await json_unless_client_gone(request, server.embed(body))

    # A plain Starlette route: the hot path skips FastAPI's per-request dependency solving, which cost as much
    # event-loop time as the rest of the route (the server is bound by the interpreter lock under load).
    app.add_route("/v1/embeddings", embeddings, methods=["POST"])

    @app.post("/v1/internal/lora/load", dependencies=[Depends(require_admin)])
    async def lora_load(request: Request) -> JSONResponse:
        server.require_ready()
        with server.tracking():
            body = parse_body(await read_body(request, ADMIN_BODY_BYTES), LoraLoadRequest)
            return JSONResponse(await server.load_lora(body.lora_name, body.lora_path))

    @app.post("/v1/internal/lora/unload", dependencies=[Depends(require_admin)])
    async def lora_unload(request: Request) -> JSONResponse:
        server.require_ready()
        with server.tracking():
            body = parse_body(await read_body(request, ADMIN_BODY_BYTES), LoraUnloadRequest)
            return JSONResponse(await server.unload_lora(body.lora_name))

    return app
