"""The server under hostile or malformed input: resource budgets, slow bodies, and no 500s.

In-process like tests/test_server.py (whose helpers this file reuses); the slow-body test talks to uvicorn
on 127.0.0.1 through a raw socket. After each bad request a normal one must still succeed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from test_server import (
    app_for,
    assert_vectors_equal,
    b64_png,
    make_image,
    model,  # noqa: F401 - the shared module fixture (loaded once per file)
    post,
    run,
    serving,
    vectors_of,
)

httpx = pytest.importorskip("httpx")


def encoded(image: Image.Image, fmt: str, **save: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_header_only(width: int, height: int) -> str:
    """A PNG whose header says width x height but whose pixel data is cut short: it can be sized, not decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode("ascii")


async def assert_still_serving(client: httpx.AsyncClient, model) -> None:
    """A normal request after a bad one: 200 with the right vector."""
    response = await post(client, {"input": "still fine"})
    assert response.status_code == 200, response.text
    assert_vectors_equal(vectors_of(response), list(model.encode(["still fine"])))


def refused_then_still_serving(app, model, body: dict) -> httpx.Response:
    """Post ``body`` (a request to refuse), then check a normal request still gets its vector; the first response."""

    async def scenario():
        async with serving(app) as client:
            refused = await post(client, body)
            await assert_still_serving(client, model)
            return refused

    return run(scenario())


def assert_openai_error(response: httpx.Response, status: int, param: str | None, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert fragment in error["message"], error["message"]


# ---------------------------------------------------------------------- 1. resource budgets
def test_request_pixel_budget_is_checked_from_headers_before_decoding(model):
    """Two 6000x6000 headers: 72 MP, over a 70 MP budget. Their pixel data is broken, so a 413 naming the
    second item (not a 400 'unreadable image' for the first) shows nothing was decoded."""
    app = app_for(model, max_image_pixels=50_000_000, max_request_pixels=70_000_000)
    items = [{"image": png_header_only(6000, 6000)}, "text", {"image": png_header_only(6000, 6000)}]

    response = refused_then_still_serving(app, model, {"input": items})
    assert_openai_error(response, 413, "input[2]", "over the per-request limit of 70000000 decoded pixels")
    assert "--max-request-pixels" in response.json()["error"]["message"]


def test_request_image_token_budget(model):
    app = app_for(model, max_request_image_tokens=1)

    response = refused_then_still_serving(app, model, {"input": ["text", {"image": b64_png(1)}]})
    assert_openai_error(response, 413, "input[1]", "--max-request-image-tokens")


def test_images_within_the_budgets_are_served(model):
    items = [{"image": b64_png(i, width=40, height=30)} for i in range(3)]
    app = app_for(model, max_request_pixels=3 * 40 * 30)

    async def scenario():
        async with serving(app) as client:
            return await post(client, {"input": items})

    response = run(scenario())
    assert response.status_code == 200, response.text
    expected = model.encode([{"image": make_image(i, width=40, height=30)} for i in range(3)])
    assert_vectors_equal(vectors_of(response), list(expected))


def test_decoding_never_holds_up_text_requests(model, monkeypatch):
    """While an image request's decode is stuck, a text-only request still gets through."""
    real_load = ImageFile.ImageFile.load
    entered, release = threading.Event(), threading.Event()

    def gated_load(image):
        entered.set()
        assert release.wait(30), "the test never released the decoder"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", gated_load)
    app = app_for(model)

    async def scenario():
        async with serving(app) as client:
            image_request = asyncio.create_task(post(client, {"input": [{"image": b64_png(3)}]}))
            assert await asyncio.to_thread(entered.wait, 30)
            text = await asyncio.wait_for(post(client, {"input": "meanwhile"}), 30)
            stuck = not image_request.done()
            release.set()
            return text, stuck, await image_request

    try:
        text, stuck, image = run(scenario())
    finally:
        release.set()
    assert text.status_code == 200 and stuck
    assert image.status_code == 200, image.text
    monkeypatch.undo()
    assert_vectors_equal(vectors_of(image), list(model.encode([{"image": make_image(3)}])))


def two_frame_gif() -> str:
    first, second = make_image(7, 32, 24), make_image(8, 32, 24)
    return encoded(first, "GIF", save_all=True, append_images=[second])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_image_formats(model, fmt):
    image = make_image(5, 32, 24)
    payload = two_frame_gif() if fmt == "GIF" else encoded(image, fmt)

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, {"input": [{"image": payload}]})

    response = run(scenario())
    assert response.status_code == 200, response.text
    reference = Image.open(io.BytesIO(base64.b64decode(payload)))  # the first frame, decoded as the library does
    assert_vectors_equal(vectors_of(response), list(model.encode([{"image": reference.convert("RGB")}])))


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "ICO", "TGA"])
def test_other_image_formats_are_refused(model, fmt):
    payload = encoded(make_image(5, 32, 24), fmt)

    response = refused_then_still_serving(app_for(model), model, {"input": ["ok", {"image": payload}]})
    assert_openai_error(response, 400, "input[1]", "unreadable image")
    assert "PNG, JPEG, WEBP, GIF, BMP or TIFF" in response.json()["error"]["message"]


# ---------------------------------------------------------------------- 2. slow bodies
def test_a_slow_body_is_cut_off_with_408(model):
    pytest.importorskip("uvicorn")
    from nova_embeddings.serve import serve_in_thread

    app = app_for(model, request_read_timeout_s=0.3)
    declared = 200
    with serve_in_thread(app, host="127.0.0.1", port=0) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {declared}\r\n\r\n{{".encode())
            answer, sent = b"", 1
            sock.settimeout(0.05)
            while sent < declared - 1 and not answer:  # trickle one byte every 50 ms; stop at the answer
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    sock.sendall(b" ")
                    sent += 1
            sock.settimeout(10)
            while answer and b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
        with httpx.Client(base_url=url, timeout=30) as client:
            after = client.post("/v1/embeddings", json={"input": "after the slow one"})
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert sent < declared - 1  # cut off before the body was complete
    assert after.status_code == 200


# ---------------------------------------------------------------------- 3. no 500s
def image_embeds_item(model, value: str) -> bytes:
    hidden = model.config.text_config.hidden_size
    row = "[" + ",".join([value] * hidden) + "]"
    return ('{"input": ["fine", {"image_embeds": [' + row + '], "image_grid_thw": [1, 2, 2]}]}').encode()


def malformed_bodies(model) -> list[tuple[str, str, bytes, int, str | None, str]]:
    """(id, path, raw body, status, param, message fragment)."""
    deep = b"[" * 5000 + b"]" * 5000
    return [
        ("surrogate_text", "/v1/embeddings", b'{"input": "a\\ud800b"}', 400, "input", "lone surrogate"),
        ("surrogate_item", "/v1/embeddings", b'{"input": ["ok", {"text": "x\\udfffy"}]}', 400, "input[1]",
         "lone surrogate"),
        ("surrogate_instructions", "/v1/embeddings", b'{"input": "ok", "instructions": "\\udc00"}', 400,
         "instructions", "lone surrogate"),
        ("surrogate_model", "/v1/embeddings", b'{"input": "ok", "model": "\\ud83d"}', 400, "model", "lone surrogate"),
        # "user" is read by nothing after parsing: only the body check can refuse these
        ("surrogate_raw_utf8", "/v1/embeddings", b'{"input": "ok", "user": "a\xed\xa0\x80b"}', 400, "user",
         "lone surrogate"),
        ("surrogate_utf16", "/v1/embeddings", '{"input": "ok", "user": "a'.encode("utf-16-le") + b"\x00\xd8" +
         '"}'.encode("utf-16-le"), 400, "user", "lone surrogate"),
        ("deep_input", "/v1/embeddings", b'{"input": ' + deep + b"}", 400, None, "nested too deeply"),
        ("just_too_deep", "/v1/embeddings", b'{"input": ' + b"[" * 32 + b'"x"' + b"]" * 32 + b"}", 400, None,
         "nested too deeply"),
        ("deep_top", "/v1/embeddings", deep, 400, None, "nested too deeply"),
        ("deep_admin", "/v1/internal/lora/load", b'{"lora_name": ' + deep + b"}", 400, None, "nested too deeply"),
        ("nan_embeds", "/v1/embeddings", image_embeds_item(model, "NaN"), 400, "input[1]", "not finite"),
        ("inf_embeds", "/v1/embeddings", image_embeds_item(model, "-Infinity"), 400, "input[1]", "not finite"),
        ("huge_embeds", "/v1/embeddings", image_embeds_item(model, "1e400"), 400, "input[1]", "not finite"),
    ]


def test_malformed_bodies_get_400s_and_the_server_stays_healthy(model):
    cases = malformed_bodies(model)
    app = app_for(model, admin_token="root")

    async def scenario():
        results = []
        async with serving(app, headers={"Authorization": "Bearer root"}) as client:
            for _, path, body, *_ in cases:
                results.append(await client.post(path, content=body, headers={"content-type": "application/json"}))
                await assert_still_serving(client, model)
        return results

    for (case_id, _, _, status, param, fragment), response in zip(cases, run(scenario())):
        assert response.status_code == status, (case_id, response.text[:300])
        assert_openai_error(response, status, param, fragment)


def test_a_corrupt_adapter_file_is_a_400_and_changes_nothing(model, tmp_path):
    if not hasattr(model, "list_adapters"):
        pytest.skip("no adapter API")
    source = Path(model.config._name_or_path) / "adapters" / model.config.task_names[0]
    if not source.is_dir():
        pytest.skip("the tiny checkpoint has no task adapter folder to copy the config from")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(source / "adapter_config.json", broken / "adapter_config.json")
    (broken / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all")
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = model.list_adapters()
    app = app_for(model, admin_token="root")

    async def scenario():
        responses = []
        async with serving(app, headers={"Authorization": "Bearer root"}) as client:
            for name, folder in (("broken", broken), ("truncated", truncated), ("broken", broken)):
                responses.append(await client.post("/v1/internal/lora/load",
                                                   json={"lora_name": name, "lora_path": str(folder)}))
                await assert_still_serving(client, model)
        return responses

    for response in run(scenario()):
        assert_openai_error(response, 400, "lora_path", "could not load adapter")
    assert model.list_adapters() == before


def test_non_finite_output_is_an_error_not_bare_nan(model, monkeypatch):
    real_encode = model.encode

    def poisoned(prepared, **kwargs):
        vectors = real_encode(prepared, **kwargs).copy()  # encode()'s numpy output views its inference tensors
        for index, tokenized in enumerate(prepared.tokenized):
            if tokenized.item.text == "poison":
                vectors[index] = float("nan")
        return vectors

    monkeypatch.setattr(model, "encode", poisoned)
    app = app_for(model)

    async def scenario():
        async with serving(app) as client:
            return await post(client, {"input": ["fine", "poison"]}), await post(client, {"input": ["fine"]})

    bad, good = run(scenario())
    assert bad.status_code == 500
    json.loads(bad.text, parse_constant=lambda name: pytest.fail(f"bare {name} in the body"))
    error = bad.json()["error"]
    assert error["param"] == "input[1]" and "non-finite" in error["message"]
    assert good.status_code == 200
    assert torch.isfinite(vectors_of(good)[0]).all()
