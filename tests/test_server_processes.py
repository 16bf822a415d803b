"""The server with HTTP in processes of its own (``serve --http-processes N``), on the tiny checkpoint.

The HTTP processes are real spawned processes on 127.0.0.1, talking to the model's process over its Unix socket;
clients are the official ``openai`` client and httpx, as users run them. Every vector is compared with a
direct ``encode()`` of the same items.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
from test_server import (  # noqa: F401 - fixtures
    ATOL,
    MODEL_NAME,
    EncodeGate,
    app_for,
    assert_vectors_equal,
    b64_png,
    clean_adapters,
    lora_dir,
    make_image,
    model,
    vectors_of,
)
from helpers import png_bytes
from test_server_conveniences import health_once_draining

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from nova_embeddings.server import create_app  # noqa: E402
from nova_embeddings.server.errors import ApiError  # noqa: E402
from nova_embeddings.server.frontend import HttpProcesses, serving_http_processes  # noqa: E402
from nova_embeddings.server.settings import ServerSettings  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN = "admin-secret"


def wait_ready(url: str, timeout_s: float = 120.0) -> httpx.Response:
    """/health once it says ok (or its last answer); a `serve` process refuses connections until it has bound."""
    health = None
    for _ in range(int(timeout_s / 0.05)):
        try:
            health = httpx.get(f"{url}/health", timeout=30)
        except httpx.ConnectError:  # not bound yet: asked again
            health = None
        if health is not None and health.status_code == 200:
            return health
        threading.Event().wait(0.05)
    return health


def test_api_errors_cross_processes_whole():
    error = ApiError(409, "input[2]: adapter 'x' was unloaded", param="input[2]", code="adapter_unloaded",
                     headers={"Retry-After": "5"})
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.message, copy.param, copy.code, copy.headers) == \
        (409, "input[2]: adapter 'x' was unloaded", "input[2]", "adapter_unloaded", {"Retry-After": "5"})


def test_openai_client_through_two_http_processes(model):
    openai = pytest.importorskip("openai")
    texts = ["first text", "second, longer text about rivers", "third"]
    dims = model.config.matryoshka_dims[0]
    app = app_for(lambda: model, api_key="k")  # loaded in the background, as `serve` does
    with serving_http_processes(app, 2) as url:
        health = wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
        default = client.embeddings.create(model=MODEL_NAME, input=texts)  # the client asks for base64
        floats = client.embeddings.create(model=MODEL_NAME, input=texts[0], encoding_format="float")
        short = client.embeddings.create(model=MODEL_NAME, input=texts, dimensions=dims)
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model=MODEL_NAME, input=["ok", ""])
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="gpt-4", input="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(
                model=MODEL_NAME, input="x")
        listed = [entry.id for entry in client.models.list()]
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k"}).text
        keyless = [httpx.get(f"{url}{path}").status_code for path in ("/metrics", "/v1/models", f"/v1/models/{MODEL_NAME}")]
        keyless_health = httpx.get(f"{url}/health").status_code
    assert health.json() == {"status": "ok"}
    assert keyless == [401, 401, 401] and keyless_health == 200  # every endpoint but /health needs the key
    expected = model.encode(texts)
    torch.testing.assert_close(torch.tensor([d.embedding for d in default.data]), expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), expected[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([d.embedding for d in short.data]), model.encode(texts, dimensions=dims),
                               atol=ATOL, rtol=1e-4)
    assert default.usage.prompt_tokens > 0 and default.model == MODEL_NAME
    assert bad.value.body["param"] == "input[1]" and "empty" in bad.value.body["message"]
    assert listed == [MODEL_NAME]
    # the HTTP processes' responses are counted in the model's process, whichever process answered
    assert 'nova_http_responses_total{path="/v1/embeddings",status="200"} 3' in metrics
    assert 'nova_http_responses_total{path="/v1/embeddings",status="400"} 1' in metrics
    assert 'nova_http_responses_total{path="/v1/embeddings",status="401"} 1' in metrics
    assert 'nova_http_responses_total{path="/v1/embeddings",status="404"} 1' in metrics
    assert "nova_items_total 7" in metrics


def test_concurrent_requests_share_batches_and_each_gets_its_own_vectors(model, monkeypatch):
    """Requests of both HTTP processes queued behind a busy batch join one batch, and each gets its own vectors."""
    bodies = [{"input": [f"text {i} of request {r}" for i in range(1 + r % 3)],
               "task": ["retrieval.query", "text-matching", "code.query"][r % 3]} for r in range(24)]
    items = sum(len(body["input"]) for body in bodies)
    gate = EncodeGate(model, monkeypatch)
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), inflight_batches=1, max_wait_ms=0))
    batcher = lambda: app.state.nova.batcher  # noqa: E731 - made when the server starts
    post = lambda body: httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)  # noqa: E731
    with serving_http_processes(app, 2) as url, ThreadPoolExecutor(len(bodies) + 1) as pool:
        first = pool.submit(post, {"input": "holds the only batch slot"})
        assert gate.entered.wait(30)
        queued = [pool.submit(post, body) for body in bodies]
        for _ in range(2000):  # until every request is prepared and queued behind the busy batch (the gate waits 30 s)
            if batcher().queue_items == items:  # counts prepared requests only
                break
            threading.Event().wait(0.01)
        waiting = batcher().queue_items
        gate.release.set()
        responses = [future.result() for future in queued]
        assert first.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    monkeypatch.undo()
    assert waiting == items
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        assert_vectors_equal(vectors_of(response), list(model.encode(body["input"], task=body["task"])))
    assert gate.calls == [1, items]  # the 24 requests made one batch
    assert "nova_batches_total 2" in metrics


def test_images_and_multivectors_through_an_http_process(model, monkeypatch):
    """An inline image is decoded in the HTTP process and crosses decoded: the model's process checks it (limits,
    budgets) without decoding it. One that fails there (over a limit, unreadable) is left to the model's process,
    which refuses the request with the error the single-process server gives."""
    from nova_embeddings.server import images as images_module

    decodes = []  # what this process (the model's) decodes; the HTTP processes are spawned apart
    decode = images_module.decode_image
    monkeypatch.setattr(images_module, "decode_image", lambda image: decodes.append(image.size) or decode(image))
    body = {"input": [{"image": b64_png(5)}, {"text": "caption", "image": b64_png(6)}, "plain"],
            "encoding_format": "float"}
    truncated = base64.b64encode(png_bytes(make_image(8))[:300]).decode("ascii")  # a header, then too little data
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), max_image_pixels=1200))
    with serving_http_processes(app, 1) as url:
        response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
        multi = httpx.post(f"{url}/v1/embeddings", json={**body, "return_multivector": True}, timeout=60)
        decoded_here = list(decodes)
        too_big = httpx.post(f"{url}/v1/embeddings", json={"input": ["x", {"image": b64_png(7, width=50, height=40)}]},
                             timeout=60)
        unreadable = httpx.post(f"{url}/v1/embeddings", json={"input": [{"image": truncated}, {"image": b64_png(5)}]},
                                timeout=60)
    items = [{"image": make_image(5)}, {"text": "caption", "image": make_image(6)}, "plain"]
    assert response.status_code == 200, response.text
    assert_vectors_equal(vectors_of(response), list(model.encode(items)))
    assert multi.status_code == 200, multi.text
    assert_vectors_equal(vectors_of(multi), list(model.encode(items, return_multivector=True)))
    assert decoded_here == []  # every image of the two requests was decoded in the HTTP process
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "input[1]"
    assert "over the limit of 1200 pixels" in too_big.json()["error"]["message"]
    assert unreadable.status_code == 400 and unreadable.json()["error"]["param"] == "input[0]"
    assert unreadable.json()["error"]["message"].startswith("input[0]: unreadable image")
    assert decodes == [(40, 30)]  # the model's process decoded the truncated one (only) itself, and failed as before


def test_a_dead_http_process_is_replaced_and_a_crash_loop_stops_the_server(model, monkeypatch):
    from nova_embeddings.server import frontend

    monkeypatch.setattr(frontend, "MAX_RESTARTS", 1)
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,)))
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    processes = HttpProcesses(app.state.nova, 2, [sock])
    processes.start()
    try:
        first = processes.processes[0]
        first.kill()
        first.join(30)
        replaced = processes.replace_dead()
        served = [httpx.post(f"{url}/v1/embeddings", json={"input": "still here"}, timeout=60) for _ in range(6)]
        new = processes.processes[0]
        new.kill()
        new.join(30)
        second = processes.replace_dead()
    finally:
        processes.stop()
        sock.close()
    assert replaced and new is not first and new.pid != first.pid
    assert all(response.status_code == 200 for response in served)
    assert_vectors_equal(vectors_of(served[-1]), list(model.encode(["still here"])))
    assert not second  # two deaths within the window, over the bound of 1: the server is to stop
    assert all(not process.is_alive() for process in processes.processes)


def test_adapters_loaded_through_one_process_serve_through_every_process(model, lora_dir, clean_adapters):
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), admin_token=ADMIN))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with serving_http_processes(app, 2) as url:
        refused = httpx.post(f"{url}/v1/internal/lora/load", json={"lora_name": "mine", "lora_path": lora_dir})
        loaded = httpx.post(f"{url}/v1/internal/lora/load", json={"lora_name": "mine", "lora_path": lora_dir},
                            headers=admin, timeout=60)
        # new connections spread over both processes: every one of them routes to the new adapter
        routed = [httpx.post(f"{url}/v1/embeddings", json={"input": "legal text", "model": "mine"}, timeout=60)
                  for _ in range(6)]
        listed = httpx.get(f"{url}/v1/models").json()
        unloaded = httpx.post(f"{url}/v1/internal/lora/unload", json={"lora_name": "mine"}, headers=admin, timeout=60)
        gone = httpx.post(f"{url}/v1/embeddings", json={"input": "legal text", "model": "mine"}, timeout=60)
    assert refused.status_code == 403
    assert loaded.status_code == 200 and "mine" in loaded.json()["adapters"]
    assert [entry["id"] for entry in listed["data"]] == [MODEL_NAME, "mine"]
    assert unloaded.status_code == 200 and "mine" not in unloaded.json()["adapters"]
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    model.load_adapter(lora_dir, adapter_name="mine")
    expected = model.encode([{"text": "legal text", "adapter": "mine"}])
    assert not torch.allclose(expected, model.encode(["legal text"]), atol=1e-3)  # the adapter shows
    for response in routed:
        assert response.status_code == 200, response.text
        assert_vectors_equal(vectors_of(response), list(expected))


def test_stop_drains_requests_in_flight_and_refuses_new_ones(model, monkeypatch):
    gate = EncodeGate(model, monkeypatch)
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), max_wait_ms=0))
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    processes = HttpProcesses(app.state.nova, 1, [sock])
    processes.start()
    try:
        in_flight: dict = {}
        thread = threading.Thread(target=lambda: in_flight.update(
            response=httpx.post(f"{url}/v1/embeddings", json={"input": "in flight"}, timeout=60)))
        thread.start()
        assert gate.entered.wait(30)
        stopper = threading.Thread(target=processes.stop)
        stopper.start()
        health = health_once_draining(url)  # the HTTP process drains: 503 for new requests, the one in flight waits
        late = httpx.post(f"{url}/v1/embeddings", json={"input": "too late"}, timeout=10)
        gate.release.set()
        thread.join(60)
        stopper.join(120)
    finally:
        gate.release.set()
        processes.stop()
        sock.close()
    assert health.json() == {"status": "stopping"}
    assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
    assert in_flight["response"].status_code == 200
    assert not stopper.is_alive() and all(not process.is_alive() for process in processes.processes)
    assert app.state.nova.phase == "stopping"
    monkeypatch.undo()
    assert_vectors_equal(vectors_of(in_flight["response"]), list(model.encode(["in flight"])))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, list[str], int]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "nova_embeddings", "serve", "--port", str(port), "--log-level", "info", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    return process, lines, port


def port_closed(port: int, timeout_s: float = 60.0) -> bool:
    for _ in range(int(timeout_s / 0.1)):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        except httpx.TransportError:
            return True
        threading.Event().wait(0.1)
    return False


def test_serve_with_http_processes_answers_and_stops_on_sigterm(tmp_path):
    """`nova-embeddings serve --http-processes 2` as users run it: it answers, and SIGTERM stops every process."""
    process, lines, port = start_serve(tmp_path, "--http-processes", "2")
    try:
        health = wait_ready(f"http://127.0.0.1:{port}", timeout_s=600)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["a", "b"]}, timeout=60)
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = "".join(lines)
    assert health.status_code == 200, log
    assert response.status_code == 200 and len(response.json()["data"]) == 2, log
    assert code == 0, log
    assert "serving HTTP from 2 processes" in log
    assert port_closed(port), log  # no HTTP process outlived the server
    assert "Traceback" not in log, log


def test_http_processes_stop_when_the_model_process_dies(tmp_path):
    """A killed model process (SIGKILL: no clean-up) leaves no HTTP process behind answering on the port."""
    process, lines, port = start_serve(tmp_path, "--http-processes", "2")
    try:
        health = wait_ready(f"http://127.0.0.1:{port}", timeout_s=600)
        process.kill()
        process.wait(30)
        closed = port_closed(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert health.status_code == 200, "".join(lines)
    assert closed, "".join(lines)


def test_http_processes_default_to_two_on_a_gpu_and_none_on_a_cpu(monkeypatch):
    from nova_embeddings import serve

    parse = serve.build_parser().parse_args
    assert serve.http_process_count(parse([]).http_processes, "cpu") == 0
    assert serve.http_process_count(parse([]).http_processes, "cuda:1") == serve.GPU_HTTP_PROCESSES == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serve.http_process_count(parse([]).http_processes, "auto") == 2
    assert serve.http_process_count(parse(["--http-processes", "0"]).http_processes, "cuda") == 0
    assert serve.http_process_count(parse(["--http-processes", "3"]).http_processes, "cpu") == 3
    with pytest.raises(SystemExit):
        parse(["--http-processes", "-1"])
    monkeypatch.setattr(sys, "platform", "win32")  # no Unix sockets: none by default, a clear error if asked for
    assert serve.http_process_count(None, "cuda") == 0
    with pytest.raises(ValueError, match="Unix sockets"):
        serve.http_process_count(2, "cuda")


def test_http_processes_say_loading_then_failed_as_the_model_process_does(model):
    """While the model loads, and after its load failed, every HTTP process answers as the single-process server:
    /health 503 with the phase, embeddings 503 ``not_ready`` naming the reason."""
    release = threading.Event()

    def failing_loader():
        assert release.wait(60)
        raise RuntimeError("no weights here")

    app = app_for(failing_loader)
    with serving_http_processes(app, 2) as url:
        loading = httpx.get(f"{url}/health", timeout=30)
        early = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=30)
        release.set()
        for _ in range(600):
            failed = httpx.get(f"{url}/health", timeout=30)
            if failed.json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        late = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=30)
        entry = httpx.get(f"{url}/v1/models/{MODEL_NAME}", timeout=30)
    assert loading.status_code == 503 and loading.json() == {"status": "loading"}
    assert early.status_code == 503 and early.json()["error"]["message"] == "the model is still loading"
    assert early.headers["retry-after"] == "5"
    assert failed.status_code == 503 and failed.json() == {"status": "failed"}
    assert late.status_code == 503 and "failed to load" in late.json()["error"]["message"]
    assert entry.status_code == 200 and entry.json()["id"] == MODEL_NAME  # the listing does not need the model


def test_the_socket_folder_fits_a_unix_socket_address(monkeypatch):
    from nova_embeddings.server import frontend

    monkeypatch.setattr(frontend.tempfile, "gettempdir", lambda: "/scratch/tmp")
    assert frontend.socket_folder_parent() == "/scratch/tmp"
    deep = "/var/folders/" + "x" * 90 + "/T"
    monkeypatch.setattr(frontend.tempfile, "gettempdir", lambda: deep)
    assert frontend.socket_folder_parent() == "/tmp"


def send_and_abandon(url: str, body: dict, until: Callable[[], bool]) -> bool:
    """POST ``body`` on a raw connection, wait until ``until()`` (say, the request is queued), then close the
    connection without reading the answer, as a client that timed out does. Whether ``until()`` came true."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head + data)
        return wait_for(until)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        threading.Event().wait(0.01)
    return condition()


@pytest.mark.parametrize("http_processes", [0, 2])
def test_a_request_whose_client_goes_away_is_never_encoded(model, monkeypatch, http_processes):
    """A client that disconnects while its request waits behind a busy batch gets the request cancelled, in the
    model's process too when HTTP is served by processes of its own: it leaves the queue at once, its items are
    never encoded, /metrics counts a 499 (nginx's "client closed request"), and the server serves on."""
    from nova_embeddings.serve import serve_in_thread

    gate = EncodeGate(model, monkeypatch)
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), inflight_batches=1, max_wait_ms=0))
    batcher = lambda: app.state.nova.batcher  # noqa: E731 - made when the server starts
    serving = serving_http_processes(app, http_processes) if http_processes else serve_in_thread(app)
    with serving as url, ThreadPoolExecutor(1) as pool:
        post = lambda body: httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)  # noqa: E731
        first = pool.submit(post, {"input": "holds the only batch slot"})
        assert gate.entered.wait(30)
        queued = send_and_abandon(url, {"input": ["never encoded", "nor this"]}, lambda: batcher().queue_items == 2)
        left_queue = wait_for(lambda: batcher().queue_requests == 0)
        counted = wait_for(lambda: 'path="/v1/embeddings",status="499"} 1' in httpx.get(f"{url}/metrics").text)
        gate.release.set()
        assert first.result().status_code == 200
        after = post({"input": "served after"})
    monkeypatch.undo()
    assert queued and left_queue and counted
    assert gate.calls == [1, 1]  # the first request, then the one after: the abandoned one never reached encode()
    assert after.status_code == 200
    assert_vectors_equal(vectors_of(after), list(model.encode(["served after"])))


class Pixels:
    """A stand-in for a decoded image sent to the model's process (picklable, weakly referenceable)."""


def test_a_sent_call_does_not_hold_its_arguments_while_it_waits(tmp_path):
    """Once a call's frame is written, the HTTP process lets go of its arguments: a request's decoded images (raw
    pixels, 18 MB for a 6-megapixel page) are not held there for as long as the request waits for its batch."""
    import asyncio
    import gc
    import weakref

    from nova_embeddings.server.frontend import EngineClient

    async def scenario() -> bool:
        received = asyncio.Event()

        async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            received.set()
            await asyncio.sleep(30)

        server = await asyncio.start_unix_server(never_answers, str(tmp_path / "engine.sock"))
        client = EngineClient(str(tmp_path / "engine.sock"), on_lost=lambda: None)
        await client.connect()
        pixels = Pixels()
        alive = weakref.ref(pixels)
        waiting = asyncio.get_running_loop().create_task(client.call("embed", None, {0: pixels}))
        del pixels
        await received.wait()
        await asyncio.sleep(0)
        gc.collect()
        released = alive() is None
        waiting.cancel()
        server.close()
        return released

    assert asyncio.run(scenario())


def test_a_lost_model_process_is_a_503_with_retry_after(tmp_path):
    """An HTTP process whose connection to the model's process is gone (never made, or closed while a call waits)
    answers as every other not-ready 503 does, with Retry-After, and stops itself (``on_lost``)."""
    import asyncio

    from nova_embeddings.server.frontend import EngineClient

    async def scenario() -> tuple[ApiError, ApiError, list[int]]:
        lost: list[int] = []
        with pytest.raises(ApiError) as unconnected:
            await EngineClient(str(tmp_path / "none.sock"), on_lost=lambda: lost.append(1)).call("health")

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # the call's first byte: the model's process "dies" while the call waits
            writer.close()

        server = await asyncio.start_unix_server(hang_up, str(tmp_path / "engine.sock"))
        client = EngineClient(str(tmp_path / "engine.sock"), on_lost=lambda: lost.append(1))
        await client.connect()
        with pytest.raises(ApiError) as dropped:
            await client.call("embed", None)
        await client.close()
        server.close()
        return unconnected.value, dropped.value, lost

    unconnected, dropped, lost = asyncio.run(scenario())
    for error in (unconnected, dropped):
        assert (error.status, error.code, error.headers) == (503, "not_ready", {"Retry-After": "5"})
    assert lost == [1]
