"""What users of other engines expect from the server: model lookup and echo, token-id hints, whitespace text,
multi-vector shapes, one pixel limit, start-up and shutdown behaviour, a quiet log and a complete --help.

In-process like tests/test_server.py (whose helpers this file reuses); the start-up/shutdown tests run uvicorn
on 127.0.0.1 only, one of them as a child process of ``nova-embeddings serve``.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_server import (
    EncodeGate,
    MODEL_NAME,
    assert_vectors_equal,
    b64_png,
    create_app,
    make_image,
    model,  # noqa: F401 - the shared module fixture
    post,
    run,
    serving,
    vectors_of,
)

from nova_embeddings.server import ServerSettings

httpx = pytest.importorskip("httpx")
REPO_ROOT = Path(__file__).resolve().parent.parent
ALIAS = "alias-name"


def app_with_alias(model, **settings):
    return create_app(model, ServerSettings(served_model_names=(MODEL_NAME, ALIAS), **settings))


def openai_client(app, api_key: str = "k"):
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")
    http_client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://nova.test")
    return openai, openai.AsyncOpenAI(base_url="http://nova.test/v1", api_key=api_key, http_client=http_client,
                                      max_retries=0)


# ---------------------------------------------------------------------- models and names
def test_model_lookup_and_echo_with_the_openai_client(model):
    app = app_with_alias(model)

    async def scenario():
        async with app.router.lifespan_context(app):
            openai, client = openai_client(app)
            found = [await client.models.retrieve(name) for name in (MODEL_NAME, ALIAS)]
            with pytest.raises(openai.NotFoundError) as missing:
                await client.models.retrieve("gpt-4")
            by_alias = await client.embeddings.create(model=ALIAS, input="x")
            by_name = await client.embeddings.create(model=MODEL_NAME, input="x")
            return found, missing.value, by_alias, by_name

    found, missing, by_alias, by_name = run(scenario())
    assert [m.id for m in found] == [MODEL_NAME, ALIAS] and all(m.object == "model" for m in found)
    assert missing.status_code == 404 and missing.body["code"] == "model_not_found"
    assert "gpt-4" in missing.body["message"]
    assert by_alias.model == ALIAS and by_name.model == MODEL_NAME


def test_model_field_defaults_to_the_first_served_name(model):
    async def scenario():
        async with serving(app_with_alias(model)) as client:
            return await post(client, {"input": "x"})

    assert run(scenario()).json()["model"] == MODEL_NAME


# ---------------------------------------------------------------------- input conveniences
def test_token_id_input_says_how_to_turn_it_off(model):
    app = app_with_alias(model)

    async def scenario():
        async with app.router.lifespan_context(app):
            openai, client = openai_client(app)
            errors = []
            for tokens in ([[1, 2, 3], [4, 5]], [1, 2, 3]):
                with pytest.raises(openai.BadRequestError) as bad:
                    await client.embeddings.create(model=MODEL_NAME, input=tokens)
                errors.append(bad.value.body)
            return errors

    nested, flat = run(scenario())
    assert nested["param"] == "input[0]" and flat["param"] == "input"
    for error in (nested, flat):
        assert "token-id input is not supported" in error["message"]
        assert "check_embedding_ctx_length=False" in error["message"]


@pytest.mark.parametrize("text", ["   ", "\n\t "])
def test_whitespace_text_gets_the_librarys_verdict(model, text):
    """OpenAI and vLLM embed whitespace-only text. The server passes it through as it is: it embeds it exactly as
    encode() does, or refuses it for the item with the library's reason, never differently."""
    try:
        expected = model.encode(["ok", text])
        library_error = None
    except ValueError as error:
        expected, library_error = None, getattr(error, "problem", str(error))

    async def scenario():
        async with serving(app_with_alias(model)) as client:
            return await post(client, {"input": ["ok", text]})

    response = run(scenario())
    if library_error is None:
        assert response.status_code == 200, response.text
        assert_vectors_equal(vectors_of(response), list(expected))
    else:
        assert response.status_code == 400 and response.json()["error"]["param"] == "input[1]"
        assert library_error in response.json()["error"]["message"]


def test_multi_vectors_carry_their_shape(model):
    items = ["short", "a longer text with more tokens", {"image": b64_png(4)}]

    async def scenario():
        async with serving(app_with_alias(model)) as client:
            return (await post(client, {"input": items, "return_multivector": True, "encoding_format": "base64"}),
                    await post(client, {"input": items, "return_multivector": True}),
                    await post(client, {"input": items}))

    b64, floats, single = run(scenario())
    expected = model.encode(items, return_multivector=True)
    for entry, f_entry, vectors in zip(b64.json()["data"], floats.json()["data"], expected):
        assert entry["shape"] == list(vectors.shape) == f_entry["shape"]
        decoded = np.frombuffer(base64.b64decode(entry["embedding"]), dtype="<f4").reshape(entry["shape"])
        torch.testing.assert_close(torch.from_numpy(decoded.copy()), vectors, atol=1e-5, rtol=1e-4)
    assert all("shape" not in entry for entry in single.json()["data"])


def test_the_openai_client_reads_the_shape_as_the_readme_shows(model):
    app = app_with_alias(model)

    async def scenario():
        async with app.router.lifespan_context(app):
            _, client = openai_client(app)
            return await client.embeddings.create(model=MODEL_NAME, input=["a query"], encoding_format="base64",
                                                  extra_body={"return_multivector": True})

    entry = run(scenario()).data[0]
    vectors = np.frombuffer(base64.b64decode(entry.embedding), dtype="<f4").reshape(entry.shape)  # (tokens, dim)
    expected = model.encode(["a query"], return_multivector=True)[0]
    torch.testing.assert_close(torch.from_numpy(vectors.copy()), expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- one pixel limit
def test_max_image_pixels_above_the_configs_takes_effect(model, monkeypatch):
    monkeypatch.setattr(model.config, "max_image_pixels", 1000)
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), max_image_pixels=5000))

    async def scenario():
        async with serving(app) as client:
            return await post(client, {"input": [{"image": b64_png(2, width=40, height=30)}]})  # 1200 px

    response = run(scenario())
    assert response.status_code == 200, response.text
    assert model.config.max_image_pixels == 1000  # the model's own limit is back once the server stopped
    monkeypatch.undo()
    assert_vectors_equal(vectors_of(response), list(model.encode([{"image": make_image(2, width=40, height=30)}])))


# ---------------------------------------------------------------------- start-up and shutdown
def test_sigterm_answers_503_while_draining_in_flight_requests(model, monkeypatch):
    pytest.importorskip("uvicorn")
    from nova_embeddings.serve import running_server

    gate = EncodeGate(model, monkeypatch)
    app = create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), max_wait_ms=0))
    with running_server(app, host="127.0.0.1", port=0) as (server, url):
        with httpx.Client(base_url=url, timeout=30) as client:
            in_flight: dict = {}
            thread = threading.Thread(target=lambda: in_flight.update(
                response=client.post("/v1/embeddings", json={"input": "in flight"})))
            thread.start()
            assert gate.entered.wait(30)
            server.handle_exit(signal.SIGTERM, None)
            health = health_once_draining(url)
            late = httpx.post(f"{url}/v1/embeddings", json={"input": "too late"}, timeout=10)
            gate.release.set()
            thread.join(30)
        stopped = server_thread_stops(server)
    assert health.status_code == 503 and health.json() == {"status": "stopping"}
    assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
    assert in_flight["response"].status_code == 200
    assert stopped
    monkeypatch.undo()
    assert_vectors_equal(vectors_of(in_flight["response"]), list(model.encode(["in flight"])))


def health_once_draining(url: str) -> httpx.Response:
    """/health polled until it answers 503 (the drain has begun), or its last answer."""
    for _ in range(1000):
        health = httpx.get(f"{url}/health", timeout=10)
        if health.status_code == 503:
            break
        threading.Event().wait(0.01)
    return health


def server_thread_stops(server) -> bool:
    """After the drain, uvicorn exits by itself (no second signal needed)."""
    for _ in range(3000):
        if server.should_exit:
            return True
        threading.Event().wait(0.01)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_binds_first_logs_quietly_and_stops_on_sigterm(tmp_path):
    """`nova-embeddings serve` as users run it (the tiny checkpoint): the port answers before the model is built; the log
    holds no library noise; SIGTERM ends it cleanly."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "nova_embeddings", "serve", "--port", str(port), "--log-level", "info"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        for _ in range(6000):  # the tiny checkpoint builds and loads in seconds; bounded at about 10 minutes
            if any("ready: serving" in line for line in lines) or process.poll() is not None:
                break
            threading.Event().wait(0.1)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    reader.join(10)
    log = "".join(lines)
    assert health.status_code == 200, log
    order = [next(i for i, line in enumerate(lines) if marker in line)
             for marker in ("Uvicorn running on", "built the tiny checkpoint", "ready: serving")]
    assert order == sorted(order), log
    for noise in ("rope", "peft_config", "note:", "Loading weights", "Traceback", "warn"):
        assert noise not in log, (noise, log)


def test_serve_on_a_busy_port_fails_before_loading_the_model(monkeypatch):
    """A port already in use ends `serve` at once, not after a full model load and warm-up."""
    from nova_embeddings import serve

    loads: list[str] = []
    monkeypatch.setattr(serve, "make_loader", lambda args, workdir: lambda: loads.append("loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit) as exit_info:
            serve.main(["--port", str(busy.getsockname()[1]), "--log-level", "error"])
    assert exit_info.value.code != 0
    assert loads == []


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_a_usage_error(port, capsys):
    from nova_embeddings import serve

    with pytest.raises(SystemExit) as exit_info:
        serve.build_parser().parse_args(["--port", port])
    assert exit_info.value.code == 2
    assert f"--port: {port} is not a port number (0 to 65535)" in capsys.readouterr().err


def test_every_flag_has_help_with_its_default_once(monkeypatch):
    from nova_embeddings.serve import build_parser

    monkeypatch.setenv("NOVA_API_KEY", "secret-key-value")
    monkeypatch.setenv("COLUMNS", "200")
    text = build_parser().format_help()
    entries = re.split(r"\n(?=  \S)", text.split("positional arguments:", 1)[1])  # one entry per argument
    entries = [entry.replace("\n\noptions:", "") for entry in entries if entry.strip()]
    entries = [entry for entry in entries if not entry.lstrip().startswith("-h")]
    assert len(entries) >= 30  # MODEL and every flag
    for entry in entries:
        flag, _, help_text = entry.strip().partition("  ")
        assert help_text.strip(), f"{flag} has no help text"
        assert entry.count("(default: ") == 1, entry
    assert "secret-key-value" not in text
    for flag in ("--max-request-pixels", "--max-request-image-tokens", "--request-read-timeout", "--decode-workers"):
        assert flag in text
