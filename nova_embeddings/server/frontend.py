"""HTTP in processes of its own (``nova-embeddings serve --http-processes N``).

One process that both serves HTTP and drives the GPU is bound by its interpreter lock under load: at
concurrency 64 on the H200 the event loop's HTTP parsing, JSON and response writing held it most of the time,
and the thread that launches the GPU work waited for it (README, "Server at concurrency 64"). With
``--http-processes N`` the model's process keeps the model, the batcher, item preparation (validation,
tokenising, routing: they need the model's processor and adapters) and the adapter administration; N spawned
processes accept the connections on the same listening socket, check keys and body limits, parse and validate
the JSON, decode inline images (under the model's process's image rules, which checks them again), and write the
responses (base64 or float JSON, Matryoshka truncation). Every rule and every error of the single-process server
holds, since both run the same ``NovaServer`` methods.

The processes talk over one Unix socket in a private temporary folder (mode 0700: only this user can connect);
a frame is a 4-byte length and a pickle. Each HTTP process keeps one connection and multiplexes its requests
over it by call id. If the model's process goes away, the HTTP processes stop; a SIGTERM to the model's process
drains the HTTP processes first (their requests in flight finish), then the batcher. An HTTP process that dies is
replaced (the model stays loaded), unless they keep dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .app import (
    ADMIN_BODY_BYTES,
    BodyReadTimeout,
    Embedded,
    InFlight,
    NovaServer,
    ResponseCounter,
    access_checks,
    health_response,
    not_ready_error,
    json_unless_client_gone,
    read_body,
)
from .errors import ApiError, install_error_handlers
from .images import ImageRules, decode_concurrently, has_image_strings, inline_image_headers
from .schemas import EmbeddingRequest, LoraLoadRequest, LoraUnloadRequest, parse_body
from .settings import ServerSettings

logger = logging.getLogger("nova_server")

FRAME_HEADER = struct.Struct("!I")
SOCKET_NAME = "engine.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 104 (macOS) or 108 (Linux) bytes
CONNECT_TIMEOUT_S = 60.0
LISTEN_BACKLOG = 2048  # uvicorn's default
STOP_TIMEOUT_S = 40.0  # an HTTP process's drain (30 s) and uvicorn's own stop
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # HTTP processes replaced when they die, at most this often
INTERNAL_ERROR = ApiError(500, "internal server error (see the server log)", code="internal_error")
CANCEL = "cancel"  # an HTTP process's message: stop the call with this id (no answer)


# ---------------------------------------------------------------------- frames
def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; ``asyncio.IncompleteReadError`` when the other side closed the connection."""
    size = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))[0]
    return pickle.loads(await reader.readexactly(size))


# ---------------------------------------------------------------------- the model's process
def fast_event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (the server extra installs it; uvicorn uses it too), else
    asyncio's: the model's process's loop costs interpreter-lock time per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def socket_folder_parent() -> str:
    """Where the private socket folder goes: the temporary folder, unless its path is too long for a Unix socket
    address (about 100 bytes; macOS's per-user temporary folders come close), then /tmp."""
    parent = tempfile.gettempdir()
    return parent if len(os.path.join(parent, "nova-http-12345678", SOCKET_NAME)) <= MAX_SOCKET_PATH else "/tmp"


class EngineEndpoint:
    """Runs the ``NovaServer`` calls that HTTP processes send: one task per call, answered in any order."""

    def __init__(self, server: NovaServer):
        self.server = server
        self.connections = 0  # HTTP processes connected so far (start-up waits for all of them)
        self._tasks: set[asyncio.Task] = set()

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        calls: dict[int, asyncio.Task] = {}  # this connection's calls in progress, by id
        try:
            while True:
                try:
                    call_id, method, args = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the HTTP process stopped
                if method == CANCEL:  # its client went away (``unless_client_gone``)
                    cancelled = calls.get(args[0])
                    if cancelled is not None:
                        cancelled.cancel()
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(writer, call_id, method, args))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if call_id is not None:
                    calls[call_id] = task
                    task.add_done_callback(lambda _, call_id=call_id: calls.pop(call_id, None))
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, call_id: int | None, method: str, args: tuple) -> None:
        try:
            reply = (call_id, True, await self.call(method, *args))
        except ApiError as error:
            reply = (call_id, False, error)
        except Exception:  # noqa: BLE001 - as the single-process server's handler: logged, a 500 for the client
            logger.exception("unexpected error in %s", method)
            reply = (call_id, False, INTERNAL_ERROR)
        if call_id is None or writer.is_closing():
            return
        try:
            data = frame(reply)
        except Exception:  # noqa: BLE001 - an answer that cannot cross must still end the call waiting for it
            logger.exception("the answer to %s could not be sent", method)
            data = frame((call_id, False, INTERNAL_ERROR))
        writer.write(data)

    async def call(self, method: str, *args: Any) -> Any:
        """One call of an HTTP process; the same checks as the single-process routes make."""
        server = self.server
        if method == "observe_http":
            return server.metrics.observe_http(*args)
        if method == "health":
            return server.phase
        if method == "models":
            return server.models_listing()
        if method == "model_entry":
            return server.model_entry(*args)
        if method == "metrics":
            return server.metrics_text()
        if method == "image_rules":
            server.require_ready()
            return server.image_rules()
        if method in ("embed", "load_lora", "unload_lora"):
            server.require_ready()
            with server.tracking():
                if method == "embed":
                    return await server.embedded(*args)
                if method == "load_lora":
                    return await server.load_lora(*args)
                return await server.unload_lora(*args)
        raise ApiError(500, f"unknown call {method!r}", code="internal_error")


class HttpProcesses:
    """The model's process side of ``--http-processes``: the ``NovaServer`` (its lifespan: loading, batcher) and
    the endpoint run on an event loop in a thread of their own; ``count`` spawned processes serve HTTP on
    ``sockets``. ``start()`` returns once every HTTP process is connected; ``stop()`` drains them, then the
    server."""

    def __init__(self, server: NovaServer, count: int, sockets: list[socket.socket], log_level: str = "warning"):
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.server = server
        self.count = count
        self.sockets = sockets
        self.log_level = log_level
        self.processes: list[multiprocessing.Process] = []
        self._folder = tempfile.TemporaryDirectory(prefix="nova-http-", dir=socket_folder_parent())
        os.chmod(self._folder.name, 0o700)
        self.socket_path = str(Path(self._folder.name) / SOCKET_NAME)
        self._endpoint = EngineEndpoint(server)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run_engine, name="nova-engine", daemon=True)
        self._engine_error: BaseException | None = None
        self._deaths: list[float] = []  # when HTTP processes died, for replace_dead's bound

    # ------------------------------------------------------------------ engine thread
    def _run_engine(self) -> None:
        try:
            loop = (fast_event_loop_factory() or asyncio.new_event_loop)()
            try:
                loop.run_until_complete(self._engine())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
        except BaseException as error:  # noqa: BLE001 - raised again by start(); later, the HTTP processes stop
            logger.exception("the model's server stopped with an error")
            self._engine_error = error
            self._listening.set()

    async def _engine(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.server.lifespan(None):
            endpoint = await asyncio.start_unix_server(self._endpoint.handle_connection, self.socket_path)
            self._listening.set()
            async with endpoint:
                await self._stop.wait()
                await self.server.drain(STOP_TIMEOUT_S)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self._thread.start()
        self._listening.wait()
        if self._engine_error is not None:
            raise RuntimeError("the model's server did not start") from self._engine_error
        for sock in self.sockets:  # connections wait in the backlog while the HTTP processes start
            sock.listen(LISTEN_BACKLOG)
        self.processes = [self._spawn(index) for index in range(self.count)]
        deadline = time.monotonic() + timeout_s
        while self._endpoint.connections < self.count:
            dead = [process.name for process in self.processes if not process.is_alive()]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"HTTP process(es) {dead or 'not connected in time'} did not start (see the log)")
            time.sleep(0.02)

    def _spawn(self, index: int) -> multiprocessing.Process:
        context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA
        process = context.Process(target=run_http_process, name=f"nova-http-{index}", daemon=False,
                                  args=(self.server.settings, self.socket_path, self.sockets, self.log_level))
        process.start()
        return process

    def replace_dead(self) -> bool:
        """Start a new HTTP process in place of each one that died (its requests in flight are lost; the others
        go on). False, and nothing started, once more than ``MAX_RESTARTS`` died within ``RESTART_WINDOW_S``: an
        HTTP process that keeps dying is a fault to report, not to hide."""
        now = time.monotonic()
        for index, process in enumerate(self.processes):
            if process.is_alive():
                continue
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(self._deaths) > MAX_RESTARTS:
                logger.error("HTTP process %s exited (code %s): %d deaths within %g s, stopping the server",
                             process.name, process.exitcode, len(self._deaths), RESTART_WINDOW_S)
                return False
            logger.error("HTTP process %s exited (code %s): starting another", process.name, process.exitcode)
            self.processes[index] = self._spawn(index)
        return True

    def wait(self, stop: threading.Event) -> int:
        """Block until ``stop`` is set (a signal), replacing HTTP processes that die; then stop everything. 0, or 1
        when HTTP processes kept dying."""
        while not stop.wait(0.2):
            if not self.replace_dead():
                self.stop()
                return 1
        self.stop()
        return 0

    def stop(self) -> None:
        """Drain the HTTP processes (SIGTERM: their requests in flight finish), then the model's server."""
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                logger.warning("HTTP process %s did not stop in time: killed", process.name)
                process.kill()
                process.join(5)
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(STOP_TIMEOUT_S + 30)
        self._folder.cleanup()


@contextlib.contextmanager
def serving_http_processes(app: FastAPI, count: int, host: str = "127.0.0.1", port: int = 0,
                           log_level: str = "warning") -> Iterator[str]:
    """``app``'s server (from ``create_app``) behind ``count`` HTTP processes on host:port; yields the base URL.
    Used by tests and the load test; ``nova-embeddings serve --http-processes N`` runs the same."""
    sock = socket.create_server((host, port), reuse_port=False)
    processes = HttpProcesses(app.state.nova, count, [sock], log_level)
    try:
        processes.start()
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        processes.stop()
        sock.close()


# ---------------------------------------------------------------------- an HTTP process
class EngineClient:
    """An HTTP process's connection to the model's process: calls multiplexed by id; a lost connection fails the
    calls waiting on it and runs ``on_lost``."""

    def __init__(self, socket_path: str, on_lost: Callable[[], None]):
        self.socket_path = socket_path
        self.on_lost = on_lost
        self._ids = itertools.count()
        self._calls: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await self._reader_task

    async def call(self, method: str, *args: Any) -> Any:
        """The model's process's answer; its ApiError raised here."""
        if self._writer is None or self._writer.is_closing():
            raise not_ready_error("stopping")
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._writer.write(frame((call_id, method, args)))
        del args  # sent: decoded images (raw pixels) are not held here while the answer is awaited
        try:
            await self._writer.drain()
            ok, value = await future
        except asyncio.CancelledError:  # the caller gave up (its client went away): so does the model's process
            self._calls.pop(call_id, None)
            self.notify(CANCEL, call_id)
            raise
        if not ok:
            raise value
        return value

    def notify(self, method: str, *args: Any) -> None:
        """A call without an answer (a metric)."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame((None, method, args)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, ok, value = await read_frame(reader)
                future = self._calls.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result((ok, value))
        except (asyncio.IncompleteReadError, ConnectionError):
            lost = not_ready_error("stopping")
            for future in self._calls.values():
                if not future.done():
                    future.set_result((False, lost))
            self._calls.clear()
            self.on_lost()


class HttpFrontEnd:
    """State of one HTTP process: its connection to the model's process and its own drain."""

    def __init__(self, settings: ServerSettings, socket_path: str):
        self.settings = settings
        self.stopping = False
        self.requests = InFlight()
        self.engine = EngineClient(socket_path, on_lost=self._engine_lost)
        self.image_rules: ImageRules | None = None  # asked of the model's process once it is ready
        self.decode_executor = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="nova-decode")

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.engine.connect()
        try:
            yield
        finally:
            await self.engine.close()
            self.decode_executor.shutdown(wait=False, cancel_futures=True)

    def _engine_lost(self) -> None:
        if not self.stopping:
            logger.error("the model's process closed the connection: stopping this HTTP process")
            os.kill(os.getpid(), signal.SIGTERM)

    async def drain(self, timeout_s: float) -> None:
        """As ``NovaServer.drain``: 503 for new requests while those in flight finish (at most ``timeout_s``)."""
        self.stopping = True
        await self.requests.until_idle(timeout_s)

    def require_serving(self) -> None:
        if self.stopping:
            raise not_ready_error("stopping")

    async def health(self) -> JSONResponse:
        return health_response("stopping" if self.stopping else await self.engine.call("health"))

    async def embed(self, request: EmbeddingRequest) -> bytes:
        embedded: Embedded = await self.engine.call("embed", request, await self.decoded_images(request))
        if embedded.is_small():
            return embedded.body()
        return await asyncio.get_running_loop().run_in_executor(None, embedded.body)

    async def decoded_images(self, request: EmbeddingRequest) -> dict[int, Any]:
        """The request's inline images opened (``inline_image_headers``) and decoded here, each in the decode pool:
        the model's process, whose interpreter lock also drives the GPU, then only checks them (5.8 ms of its CPU
        per request went to decoding one 448 x 448 PNG in run V2, README). An image that fails to decode is left
        out: the model's process decodes it again and gives the error."""
        items = request.input if isinstance(request.input, list) else [request.input]
        if not has_image_strings(items):
            return {}
        if self.image_rules is None:
            self.image_rules = await self.engine.call("image_rules")
        opened = await asyncio.get_running_loop().run_in_executor(self.decode_executor, inline_image_headers, items,
                                                                  self.image_rules)
        decoded = await decode_concurrently(self.decode_executor, opened)
        return {index: image for index, image in decoded.items() if not isinstance(image, BaseException)}


class RemoteHttpCounts:
    """``ResponseCounter``'s sink in an HTTP process: each response's (path, status) goes to the model's process,
    whose /metrics counts them all."""

    def __init__(self, front: HttpFrontEnd):
        self.front = front

    def observe_http(self, path: str, status: int) -> None:
        self.front.engine.notify("observe_http", path, status)


def create_frontend_app(settings: ServerSettings, socket_path: str) -> FastAPI:
    """The routes of ``create_app``, answered through the model's process at ``socket_path``."""
    front = HttpFrontEnd(settings, socket_path)
    app = FastAPI(title="nova-embeddings-v1", lifespan=front.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nova = front
    install_error_handlers(app)
    app.add_middleware(BodyReadTimeout, timeout_s=settings.request_read_timeout_s)
    app.add_middleware(ResponseCounter, metrics=RemoteHttpCounts(front))
    require_api_key, require_admin = access_checks(settings)

    @app.get("/health")
    async def health() -> JSONResponse:
        return await front.health()

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models() -> JSONResponse:
        return JSONResponse(await front.engine.call("models"))

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
    async def model_entry(model_id: str) -> JSONResponse:
        return JSONResponse(await front.engine.call("model_entry", model_id))

    @app.get("/metrics", dependencies=[Depends(require_api_key)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(await front.engine.call("metrics"), media_type="text/plain; version=0.0.4")

    async def embeddings(request: Request) -> Response:
        await require_api_key(request)
        front.require_serving()
        with front.requests.tracking():
            body = parse_body(await read_body(request, settings.max_request_bytes), EmbeddingRequest)
            return await json_unless_client_gone(request, front.embed(body))  # (cancelled: in the model's process too)

    app.add_route("/v1/embeddings", embeddings, methods=["POST"])  # a plain Starlette route, as in create_app

    @app.post("/v1/internal/lora/load", dependencies=[Depends(require_admin)])
    async def lora_load(request: Request) -> JSONResponse:
        front.require_serving()
        with front.requests.tracking():
            body = parse_body(await read_body(request, ADMIN_BODY_BYTES), LoraLoadRequest)
            return JSONResponse(await front.engine.call("load_lora", body.lora_name, body.lora_path))

    @app.post("/v1/internal/lora/unload", dependencies=[Depends(require_admin)])
    async def lora_unload(request: Request) -> JSONResponse:
        front.require_serving()
        with front.requests.tracking():
            body = parse_body(await read_body(request, ADMIN_BODY_BYTES), LoraUnloadRequest)
            return JSONResponse(await front.engine.call("unload_lora", body.lora_name))

    return app


def run_http_process(settings: ServerSettings, socket_path: str, sockets: list[socket.socket], log_level: str) -> None:
    """The target of a spawned HTTP process: uvicorn on the inherited listening socket(s)."""
    import uvicorn

    from ..serve import DRAIN_TIMEOUT_S, draining_server_class, quiet_library_logs

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    quiet_library_logs()
    os.setpgrp()  # a Ctrl-C in the terminal reaches the model's process only, which then drains this one
    app = create_frontend_app(settings, socket_path)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S))
    draining_server_class()(config, app.state.nova).run(sockets=sockets)
