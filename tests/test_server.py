"""The embeddings server on the tiny checkpoint, in-process: wire format, batching, errors, security, admin.

Requests go through httpx's ASGI transport into the app, with the app's lifespan running (no network); the
official ``openai`` clients are tested in-process too, and once against uvicorn on 127.0.0.1 (loopback
only). Every vector a response carries is compared with a direct ``encode()`` of the request's items.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import threading
import warnings
from pathlib import Path
from typing import Any, AsyncIterator

import helpers
import numpy as np
import pytest
import torch
from helpers import png_bytes
from PIL import Image
from transformers import AutoModel

pytest.importorskip("fastapi", reason="the server's optional extra (requirements-server.txt) is not installed")
httpx = pytest.importorskip("httpx", reason="the server's optional extra (requirements-server.txt) is not installed")

from nova_embeddings.server import ServerSettings, create_app  # noqa: E402
from nova_embeddings.server.images import ImageRules, inline_image_headers, is_public_address  # noqa: E402

MODEL_NAME = "tiny"
ATOL = 1e-5
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|.*multi_vector_projector$"


# ---------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def make_image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    """The server tests' images are smaller than the shared default."""
    return helpers.make_image(seed, width, height)


def b64_png(seed: int, **size: int) -> str:
    return base64.b64encode(png_bytes(make_image(seed, **size))).decode("ascii")


def app_for(model, **settings: Any):
    return create_app(model, ServerSettings(served_model_names=(MODEL_NAME,), **settings))


@contextlib.asynccontextmanager
async def serving(app, headers: dict | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client that talks to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nova.test", headers=headers) as client:
            yield client


def run(coro):
    return asyncio.run(coro)


async def post(client: httpx.AsyncClient, body: dict, **kwargs: Any) -> httpx.Response:
    return await client.post("/v1/embeddings", json=body, **kwargs)


def vectors_of(response: httpx.Response, dim: int | None = None) -> list[torch.Tensor]:
    """The response's vectors as float32 tensors, decoding base64 ones."""
    out = []
    for entry in response.json()["data"]:
        value = entry["embedding"]
        if isinstance(value, str):
            array = np.frombuffer(base64.b64decode(value), dtype="<f4")
            out.append(torch.from_numpy((array.reshape(-1, dim) if dim else array).copy()))
        else:
            out.append(torch.tensor(value, dtype=torch.float32))
    return out


def encode_settings(body: dict) -> dict:
    """The encode() arguments a request's settings stand for."""
    kwargs = {k: body[k] for k in ("task", "instructions", "dimensions", "adapter") if k in body}
    kwargs["return_multivector"] = body.get("return_multivector", False)
    return kwargs


def request_items_of(body: dict) -> list:
    return body["input"] if isinstance(body["input"], list) else [body["input"]]


def expected_vectors(model, body: dict) -> list[torch.Tensor]:
    """A direct encode() of a request's items, with the request's settings."""
    return list(model.encode(request_items_of(body), **encode_settings(body)))


def expected_for_requests(model, bodies: list[dict]) -> list[list[torch.Tensor]]:
    """``expected_vectors`` of many requests, with one encode() per distinct setting (encode is batch-invariant,
    which tests/test_encode.py checks; this keeps the test fast on two CPU cores)."""
    groups: dict[str, list[int]] = {}
    for index, body in enumerate(bodies):
        groups.setdefault(repr(sorted(encode_settings(body).items())), []).append(index)
    out: list[list[torch.Tensor]] = [[] for _ in bodies]
    for indices in groups.values():
        items = [item for i in indices for item in request_items_of(bodies[i])]
        vectors = list(model.encode(items, **encode_settings(bodies[indices[0]])))
        for i in indices:
            count = len(request_items_of(bodies[i]))
            out[i], vectors = vectors[:count], vectors[count:]
    return out


def assert_vectors_equal(got: list[torch.Tensor], expected: list[torch.Tensor], atol: float = ATOL) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.reshape(g.shape), atol=atol, rtol=1e-4)


class EncodeGate:
    """Replaces model.encode: blocks every call until released, so tests can hold the batcher busy (with
    ``inflight_batches=1``: the first request's batch then holds the only slot, and the next requests queue)."""

    def __init__(self, model, monkeypatch):
        self.encode = model.encode
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []
        monkeypatch.setattr(model, "encode", self)

    def __call__(self, items, **kwargs):
        self.calls.append(len(items))
        self.entered.set()
        assert self.release.wait(30), "test never released the encode gate"
        return self.encode(items, **kwargs)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------- wire format
def test_single_string_wire_format(model):
    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, {"input": "hello world", "model": MODEL_NAME, "user": "u1"})

    response = run(scenario())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == MODEL_NAME
    (entry,) = body["data"]
    assert entry["object"] == "embedding" and entry["index"] == 0
    assert len(entry["embedding"]) == model.config.embedding_dim
    assert all(isinstance(v, float) for v in entry["embedding"])
    tokens = len(model.processor.tokenize_items(model.processor.normalize_items(["hello world"], config=model.config),
                                                config=model.config)[0])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert_vectors_equal(vectors_of(response), list(model.encode(["hello world"])))


MIXED_ITEMS = [
    "plain text",
    {"text": "a passage about cats", "task": "retrieval.passage"},
    {"image": b64_png(1)},
    {"text": "caption", "image": "data:image/png;base64," + b64_png(2, width=20, height=50)},
    {"text": "code question", "task": "code.query", "instructions": "Find Python answers"},
    {"text": "same meaning", "task": "text-matching", "instructions": None},
]


def test_mixed_items_keep_order_index_and_values(model):
    body = {"input": MIXED_ITEMS, "model": MODEL_NAME, "instructions": "Be precise"}

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, body)

    response = run(scenario())
    assert response.status_code == 200, response.text
    assert [e["index"] for e in response.json()["data"]] == list(range(len(MIXED_ITEMS)))
    assert_vectors_equal(vectors_of(response), expected_vectors(model, body))
    tokenized = model.processor.tokenize_items(
        model.processor.normalize_items(MIXED_ITEMS, instructions="Be precise", config=model.config), config=model.config)
    assert response.json()["usage"]["prompt_tokens"] == sum(len(t) for t in tokenized)


def test_request_level_task_applies_to_items_without_one(model):
    body = {"input": ["q1", {"text": "p1", "task": "retrieval.passage"}], "task": "code.query"}

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, body)

    response = run(scenario())
    assert_vectors_equal(vectors_of(response), expected_vectors(model, body))
    assert not torch.allclose(vectors_of(response)[0], model.encode(["q1"])[0], atol=1e-4)


def test_base64_decodes_to_the_same_floats(model):
    items = ["alpha", "beta gamma", {"image": b64_png(3)}]

    async def scenario():
        async with serving(app_for(model)) as client:
            floats = await post(client, {"input": items, "encoding_format": "float"})
            b64 = await post(client, {"input": items, "encoding_format": "base64"})
            multi_f = await post(client, {"input": items, "return_multivector": True})
            multi_b = await post(client, {"input": items, "return_multivector": True, "encoding_format": "base64"})
            return floats, b64, multi_f, multi_b

    floats, b64, multi_f, multi_b = run(scenario())
    assert all(isinstance(e["embedding"], str) for e in b64.json()["data"])
    for f, b in zip(vectors_of(floats), vectors_of(b64)):
        assert torch.equal(f, b)  # JSON floats round-trip float32 exactly
    dim = model.config.multi_vector_projector_dim
    for f, b in zip(vectors_of(multi_f), vectors_of(multi_b, dim=dim)):
        assert torch.equal(f, b)


def test_line_wrapped_base64_images_are_accepted(model):
    """MIME base64 (76 columns a line, what `base64` prints and many clients send) is base64 too."""
    data = png_bytes(make_image(6))
    wrapped = base64.encodebytes(data).decode("ascii")
    items = [{"image": wrapped}, {"image": "data:image/png;base64," + wrapped}]

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, {"input": items})

    response = run(scenario())
    assert response.status_code == 200, response.text
    assert_vectors_equal(vectors_of(response), list(model.encode([{"image": data}] * 2)))


def test_multivector_shape_and_values(model):
    body = {"input": ["short", "a somewhat longer text here", {"image": b64_png(4)}], "return_multivector": True}

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, body)

    response = run(scenario())
    expected = expected_vectors(model, body)
    for entry, vectors in zip(response.json()["data"], expected):
        assert np.asarray(entry["embedding"]).shape == tuple(vectors.shape)
        assert vectors.shape[1] == model.config.multi_vector_projector_dim
    assert_vectors_equal(vectors_of(response), expected)


def test_dimensions_equal_encode_dimensions(model):
    items = ["one", "two three", {"image": b64_png(5)}]
    dims = model.config.matryoshka_dims[0]

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, {"input": items, "dimensions": dims})

    got = vectors_of(run(scenario()))
    expected = model.encode(items, dimensions=dims)
    assert all(v.shape == (dims,) for v in got)
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack(got).norm(dim=-1), torch.ones(len(items)), atol=1e-5, rtol=0)


def test_precomputed_image_embeds(model):
    image = make_image(6)
    (precomputed,) = model.get_image_embeddings([image])
    item = {"image_embeds": precomputed["image_embeds"].tolist(), "image_grid_thw": precomputed["image_grid_thw"].tolist()}

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, {"input": [item, {"image": b64_png(6)}]})

    got = vectors_of(run(scenario()))
    expected = model.encode([{"image": image}])[0]
    torch.testing.assert_close(got[0], expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got[1], expected, atol=ATOL, rtol=1e-4)


def test_models_health_and_metrics(model):
    async def scenario():
        async with serving(app_for(model)) as client:
            await post(client, {"input": ["a", "b"]})
            return await client.get("/v1/models"), await client.get("/health"), await client.get("/metrics")

    models, health, metrics = run(scenario())
    assert models.json()["object"] == "list"
    assert models.json()["data"][0]["id"] == MODEL_NAME and models.json()["data"][0]["object"] == "model"
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    text = metrics.text
    for line in ('nova_http_responses_total{path="/v1/embeddings",status="200"} 1', "nova_items_total 2",
                 "nova_queue_requests 0", "nova_batches_total 1", 'nova_request_latency_seconds{quantile="0.99"}',
                 'nova_batch_items_bucket{le="2"} 1', "nova_tokens_total"):
        assert line in text, line


# ---------------------------------------------------------------------- batching
def mixed_request(i: int, dims: int) -> dict:
    """Request i of the concurrency test: texts, tasks, instructions, images, all output settings."""
    kinds = [
        {"input": f"text number {i}"},
        {"input": [f"query {i}", {"text": f"passage {i} " * (1 + i % 5), "task": "retrieval.passage"}]},
        {"input": [{"image": b64_png(i % 7, width=20 + i % 9, height=24)}], "encoding_format": "base64"},
        {"input": [f"code {i}", "x" * (1 + i % 30)], "task": "code.query", "dimensions": dims},
        {"input": [f"multi {i}", {"text": "t", "instructions": f"instruction {i % 3}"}], "return_multivector": True},
        {"input": [f"with instructions {i}"], "instructions": "Match paraphrases", "task": "text-matching"},
    ]
    return kinds[i % len(kinds)]


def test_concurrent_mixed_requests_each_get_their_own_vectors(model):
    n_requests = 200
    dims = model.config.matryoshka_dims[1]
    bodies = [mixed_request(i, dims) for i in range(n_requests)]
    app = app_for(model, max_wait_ms=20, max_batch_items=64, max_batch_tokens=4096)

    async def scenario():
        async with serving(app) as client:
            return await asyncio.gather(*(post(client, body) for body in bodies))

    responses = run(scenario())
    assert [r.status_code for r in responses] == [200] * n_requests
    dim = model.config.multi_vector_projector_dim
    for body, response, expected in zip(bodies, responses, expected_for_requests(model, bodies)):
        got = vectors_of(response, dim=dim if body.get("return_multivector") else None)
        assert [e["index"] for e in response.json()["data"]] == list(range(len(got)))
        assert_vectors_equal(got, expected)
    metrics = app.state.nova.metrics
    assert metrics.max_batch_requests > 1  # items of several requests shared an encode() call
    assert metrics.batches < n_requests
    assert metrics.items == sum(len(b["input"]) if isinstance(b["input"], list) else 1 for b in bodies)


def test_bad_request_in_a_shared_batch_fails_alone(model, monkeypatch):
    """A failure inside encode() (not caught up front) is retried per request: only its request fails."""
    real_encode = model.encode

    def encode(prepared, **kwargs):
        for index, tokenized in enumerate(prepared.tokenized):
            if tokenized.item.text == "boom":
                raise type_of_item_error(model)(index, "simulated failure")
        return real_encode(prepared, **kwargs)

    gate = EncodeGate(model, monkeypatch)
    gate.encode = encode
    bodies = [{"input": ["first"]}, {"input": ["ok", "boom"]}, {"input": ["fine", "also fine"]}]

    app = app_for(model, max_wait_ms=50, inflight_batches=1)  # the gate holds the only slot

    async def scenario():
        async with serving(app) as client:
            first = asyncio.create_task(post(client, bodies[0]))
            await gate.wait_entered()
            rest = [asyncio.create_task(post(client, b)) for b in bodies[1:]]
            await wait_until(lambda: app.state.nova.batcher.queue_requests == 2)
            gate.release.set()
            return [await first] + [await task for task in rest]

    first, bad, good = run(scenario())
    assert first.status_code == 200 and good.status_code == 200
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[1]"
    assert "simulated failure" in bad.json()["error"]["message"]
    assert gate.calls[1] == 4  # the two queued requests were tried together first
    monkeypatch.undo()
    assert_vectors_equal(vectors_of(good), list(model.encode(["fine", "also fine"])))


def type_of_item_error(model):
    import sys

    return sys.modules[type(model.processor).__module__].ItemError


def test_each_item_is_tokenised_once_across_prep_and_encode(model, monkeypatch):
    """The prep thread tokenises; encode() runs the prepared items as they are (no second pass on its thread)."""
    processor = model.processor
    real_tokenize, real_prepare = processor.tokenize_items, model.prepare_items
    tokenised: list[int] = []
    prepared_calls: list[int] = []

    def counting_tokenize(items, **kwargs):
        tokenised.append(len(items))
        return real_tokenize(items, **kwargs)

    def counting_prepare(items, **kwargs):
        prepared_calls.append(len(items))
        return real_prepare(items, **kwargs)

    monkeypatch.setattr(processor, "tokenize_items", counting_tokenize)
    monkeypatch.setattr(model, "prepare_items", counting_prepare)
    body = {"input": MIXED_ITEMS, "instructions": "Be precise", "truncate": True}

    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, body)

    response = run(scenario())
    monkeypatch.undo()
    assert response.status_code == 200, response.text
    assert tokenised == [len(MIXED_ITEMS)]  # one pass over the request's items, none in encode()
    assert prepared_calls == [len(MIXED_ITEMS)]
    assert_vectors_equal(vectors_of(response), expected_vectors(model, body))


JOINED_REQUESTS = [
    {"input": ["joined one", "joined two"]},
    {"input": "a lone string", "task": "code.query", "instructions": "Find Python answers"},
    {"input": ["x " * 200], "truncate": True},
    {"input": [{"image": b64_png(5)}, {"text": "passage", "task": "retrieval.passage"}], "encoding_format": "base64"},
    {"input": ["bare backbone"], "adapter": None},
    {"input": ["matching"], "task": "text-matching", "dimensions": 0},  # dimensions: the smallest allowed
]


def test_joined_requests_get_exactly_their_own_vectors(model, monkeypatch):
    """Requests with different tasks, instructions, truncation, adapters and outputs join one encode() call; each
    gets the vectors of an encode() of its items alone, through the official client."""
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")  # the HTTP library of openai 3.x
    monkeypatch.setattr(model.config, "max_length", 64)  # so that the truncating request is cut
    dims = model.config.matryoshka_dims[0]
    bodies = [{**b, "dimensions": dims} if "dimensions" in b else b for b in JOINED_REQUESTS]
    gate = EncodeGate(model, monkeypatch)
    app = app_for(model, api_key="k", max_wait_ms=50, inflight_batches=1)  # the gate holds the only slot

    def create(client, body: dict):
        extra = {k: body[k] for k in ("task", "instructions", "truncate", "adapter") if k in body}
        return client.embeddings.create(model=MODEL_NAME, input=body["input"], extra_body=extra,
                                        **{k: body[k] for k in ("encoding_format", "dimensions") if k in body})

    async def scenario():
        async with app.router.lifespan_context(app):
            http_client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://nova.test")
            client = openai.AsyncOpenAI(base_url="http://nova.test/v1", api_key="k", http_client=http_client)
            first = asyncio.create_task(create(client, {"input": "holds the encoder"}))
            await gate.wait_entered()
            joined = [asyncio.create_task(create(client, body)) for body in bodies]
            await wait_until(lambda: app.state.nova.batcher.queue_requests == len(bodies))
            gate.release.set()
            results = [await first] + [await task for task in joined]
            await http_client.aclose()
            return results

    first, *responses = run(scenario())
    assert gate.calls == [1, sum(len(request_items_of(b)) for b in bodies)]  # all of them in one call
    monkeypatch.undo()
    monkeypatch.setattr(model.config, "max_length", 64)
    for body, response in zip(bodies, responses):
        settings = encode_settings(body) | ({"truncate": True} if body.get("truncate") else {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning
            expected = model.encode(request_items_of(body), **settings)
        got = [torch.from_numpy(np.frombuffer(base64.b64decode(d.embedding), dtype="<f4").copy())
               if isinstance(d.embedding, str) else torch.tensor(d.embedding) for d in response.data]
        assert [d.index for d in response.data] == list(range(len(expected)))
        assert_vectors_equal(got, list(expected), atol=1e-6)


def test_queue_full_is_429_with_retry_after(model, monkeypatch):
    gate = EncodeGate(model, monkeypatch)
    app = app_for(model, max_queue_requests=2, max_wait_ms=0, inflight_batches=1)  # the gate holds the only slot

    async def scenario():
        async with serving(app) as client:
            running = asyncio.create_task(post(client, {"input": "in the encoder"}))
            await gate.wait_entered()
            queued = [asyncio.create_task(post(client, {"input": f"queued {i}"})) for i in range(2)]
            await wait_until(lambda: app.state.nova.batcher.queue_requests == 2)
            refused = await post(client, {"input": "one too many"})
            gate.release.set()
            return refused, [await running] + [await q for q in queued]

    refused, accepted = run(scenario())
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in accepted] == [200, 200, 200]


def test_shutdown_refuses_new_requests_and_drains_the_queue(model, monkeypatch):
    gate = EncodeGate(model, monkeypatch)
    app = app_for(model, max_wait_ms=0, inflight_batches=1)  # the gate holds the only slot
    texts = [f"draining {i}" for i in range(5)]

    async def scenario():
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nova.test") as client:
            first = asyncio.create_task(post(client, {"input": texts[0]}))
            await gate.wait_entered()
            rest = [asyncio.create_task(post(client, {"input": t})) for t in texts[1:]]
            await wait_until(lambda: app.state.nova.batcher.queue_requests == len(rest))
            stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
            await wait_until(lambda: app.state.nova.phase == "stopping")
            late = await post(client, {"input": "too late"})
            health = await client.get("/health")
            gate.release.set()
            await asyncio.wait_for(stopping, 30)
            return late, health, [await first] + [await task for task in rest]

    late, health, drained = run(scenario())
    assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable_error"
    assert health.status_code == 503 and health.json() == {"status": "stopping"}
    assert [r.status_code for r in drained] == [200] * len(texts)
    monkeypatch.undo()
    assert_vectors_equal([vectors_of(r)[0] for r in drained], list(model.encode(texts)))


def test_health_is_503_until_the_model_has_loaded(model):
    loaded = threading.Event()

    def loader():
        assert loaded.wait(30)
        return model

    app = app_for(loader)

    async def scenario():
        async with serving(app) as client:
            before = await client.get("/health"), await post(client, {"input": "x"})
            loaded.set()
            await wait_until(lambda: app.state.nova.phase == "ready")
            return before, (await client.get("/health"), await post(client, {"input": "x"}))

    (health_before, embed_before), (health_after, embed_after) = run(scenario())
    assert health_before.status_code == 503 and health_before.json() == {"status": "loading"}
    assert embed_before.status_code == 503 and embed_before.json()["error"]["code"] == "not_ready"
    assert health_after.status_code == 200 and embed_after.status_code == 200


def test_failed_load_is_reported_by_health():
    def loader():
        raise OSError("no weights here")

    app = create_app(loader, ServerSettings())

    async def scenario():
        async with serving(app) as client:
            await wait_until(lambda: app.state.nova.phase == "failed")
            return await client.get("/health"), await post(client, {"input": "x"})

    health, embed = run(scenario())
    assert health.status_code == 503 and health.json() == {"status": "failed"}
    assert embed.status_code == 503 and "failed to load or to run" in embed.json()["error"]["message"]


# ---------------------------------------------------------------------- bad input
def local_png(tmp_path: Path) -> str:
    path = tmp_path / "on-server.png"
    path.write_bytes(png_bytes(make_image(9)))
    return str(path)


ERROR_CASES = [
    # (id, body or raw bytes, status, param, message fragment)
    ("not_json", b"{nope", 400, None, "not valid JSON"),
    ("not_object", b"[1, 2]", 400, None, "must be a JSON object"),
    ("missing_input", {"model": MODEL_NAME}, 400, "input", "Field required"),
    ("unknown_field", {"input": "x", "colour": "red"}, 400, "colour", "Extra inputs"),
    ("empty_list", {"input": []}, 400, "input", "input is empty"),
    ("input_number", {"input": 5}, 400, "input", "must be a string, an object, or a list"),
    ("token_ids", {"input": [[1, 2, 3]]}, 400, "input[0]", "token-id input is not supported"),
    ("item_number", {"input": ["ok", 7]}, 400, "input[1]", "expected a string or an object, got number"),
    ("empty_text", {"input": ["ok", ""]}, 400, "input[1]", "'text' is empty"),
    ("empty_single", {"input": ""}, 400, "input", "'text' is empty"),
    ("text_not_string", {"input": [{"text": 3}]}, 400, "input[0]", "'text' must be a string"),
    ("empty_item", {"input": [{}]}, 400, "input[0]", "empty item"),
    ("unknown_item_key", {"input": [{"text": "x", "colour": 1}]}, 400, "input[0]", "unknown key(s) ['colour']"),
    ("unknown_task", {"input": "x", "task": "summarise"}, 400, "task", "unknown task 'summarise'"),
    ("unknown_item_task", {"input": ["a", "b", {"text": "c", "task": "nope"}]}, 400, "input[2]", "unknown task 'nope'"),
    ("task_not_string", {"input": [{"text": "c", "task": ["retrieval"]}]}, 400, "input[0]", "'task' must be a string"),
    ("unknown_adapter", {"input": [{"text": "x", "adapter": "ghost"}]}, 400, "input[0]", "unknown adapter 'ghost'"),
    ("unknown_request_adapter", {"input": ["x", "y"], "adapter": "ghost"}, 400, "input[0]", "unknown adapter 'ghost'"),
    ("dimensions_not_allowed", {"input": "x", "dimensions": 17}, 400, "dimensions", "dimensions=17 is not allowed"),
    ("dimensions_string", {"input": "x", "dimensions": "16"}, 400, "dimensions", "valid integer"),
    ("dimensions_multivector", {"input": "x", "dimensions": 16, "return_multivector": True}, 400, "dimensions",
     "single vectors only"),
    ("bad_encoding", {"input": "x", "encoding_format": "binary"}, 400, "encoding_format", "'float' or 'base64'"),
    ("empty_instructions", {"input": "x", "instructions": "  "}, 400, "instructions", "instructions is empty"),
    ("unknown_model", {"input": "x", "model": "gpt-4"}, 404, "model", "model 'gpt-4' is not served here"),
    ("image_not_base64", {"input": [{"image": "@@not base64@@"}]}, 400, "input[0]", "must be a data URI, a base64"),
    ("image_data_uri_not_base64", {"input": [{"image": "DATA:image/png,%89PNG"}]}, 400, "input[0]",
     "data URI must be base64-encoded"),
    ("image_not_an_image", {"input": [{"image": base64.b64encode(b"hello").decode()}]}, 400, "input[0]",
     "unreadable image"),
    ("image_number", {"input": [{"image": 12}]}, 400, "input[0]", "'image' must be a string"),
    ("image_file_url", {"input": [{"image": "file:///etc/passwd"}]}, 400, "input[0]", "must be http(s)"),
    ("image_url_not_allowed", {"input": ["ok", {"image": "http://example.com/cat.png"}]}, 400, "input[1]",
     "--allow-image-urls"),
    ("image_data_uri_not_base64", {"input": [{"image": "data:image/png,abc"}]}, 400, "input[0]", "base64-encoded"),
    ("image_embeds_without_grid", {"input": [{"image_embeds": [[0.0] * 64]}]}, 400, "input[0]", "image_grid_thw"),
    ("image_embeds_ragged", {"input": [{"image_embeds": [[0.0], [0.0, 1.0]], "image_grid_thw": [1, 2, 2]}]}, 400,
     "input[0]", "array of numbers"),
    ("image_embeds_wrong_shape", {"input": [{"image_embeds": [[0.0] * 64], "image_grid_thw": [1, 4, 4]}]}, 400,
     "input[0]", "has shape"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_requests_get_openai_errors(model, case):
    _, body, status, param, fragment = case

    async def scenario():
        async with serving(app_for(model)) as client:
            if isinstance(body, bytes):
                return await client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
            return await post(client, body)

    response = run(scenario())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert fragment in error["message"], error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_local_paths_are_never_opened(model, tmp_path):
    """An image string naming a file on the server is refused even when it exists and is an image."""
    async def scenario():
        async with serving(app_for(model)) as client:
            return await post(client, {"input": [{"image": local_png(tmp_path)}]})

    response = run(scenario())
    assert response.status_code == 400
    assert "local paths are refused" in response.json()["error"]["message"]


def test_limits_too_many_items_long_text_big_image_big_body(model, monkeypatch):
    monkeypatch.setattr(model.config, "max_length", 24)
    app = app_for(model, max_items_per_request=3, max_image_pixels=500, max_request_bytes=4096)

    async def scenario():
        async with serving(app) as client:
            return (
                await post(client, {"input": ["a", "b", "c", "d"]}),
                await post(client, {"input": ["short", "word " * 40]}),
                await post(client, {"input": ["short", "word " * 40], "truncate": True}),
                await post(client, {"input": [{"image": b64_png(1, width=30, height=20)}]}),
                await post(client, {"input": ["x" * 5000]}),
            )

    too_many, too_long, truncated, too_big, body_too_big = run(scenario())
    assert too_many.status_code == 400 and "over the limit of 3" in too_many.json()["error"]["message"]
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input[1]"
    assert "over the maximum of 24" in too_long.json()["error"]["message"]
    assert truncated.status_code == 200 and truncated.json()["usage"]["prompt_tokens"] <= 48
    assert too_big.status_code == 400 and "over the limit of 500 pixels" in too_big.json()["error"]["message"]
    assert body_too_big.status_code == 413


def test_unknown_routes_and_methods_use_the_error_format(model):
    async def scenario():
        async with serving(app_for(model)) as client:
            return await client.get("/v1/nothing"), await client.get("/v1/embeddings")

    missing, wrong_method = run(scenario())
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong_method.status_code == 405 and "message" in wrong_method.json()["error"]


# ---------------------------------------------------------------------- security
def test_api_key_guards_everything_but_health(model):
    app = app_for(model, api_key="sekret")

    async def scenario():
        async with serving(app) as client:
            good = {"Authorization": "Bearer sekret"}
            return {
                "health": await client.get("/health"),
                "no_key": await post(client, {"input": "x"}),
                "wrong_key": await post(client, {"input": "x"}, headers={"Authorization": "Bearer nope"}),
                "basic": await post(client, {"input": "x"}, headers={"Authorization": "Basic sekret"}),
                "good": await post(client, {"input": "x"}, headers=good),
                "models": await client.get("/v1/models"),
                "models_good": await client.get("/v1/models", headers=good),
                "metrics": await client.get("/metrics"),
                "metrics_good": await client.get("/metrics", headers=good),
            }

    r = run(scenario())
    assert r["health"].status_code == 200
    for name in ("no_key", "wrong_key", "basic", "models", "metrics"):
        assert r[name].status_code == 401, name
        assert r[name].headers["WWW-Authenticate"] == "Bearer"
        assert r[name].json()["error"]["code"] == "invalid_api_key"
    for name in ("good", "models_good", "metrics_good"):
        assert r[name].status_code == 200, name


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("172.16.5.4", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
    ("fe80::1%eth0", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
])
def test_public_address_check(address, public):
    assert is_public_address(address) is public


def test_http_processes_open_inline_images_until_one_fails_or_passes_a_limit():
    """What an HTTP process opens (then decodes) ahead of the model's process: inline images (data URI or base64)
    under the rules, in item order, stopping at the first one over the per-image limit, over the request's pixel
    budget or unreadable (the model's process gives that error); URLs, texts and other formats are left alone."""
    rules = ImageRules(("PNG",), max_image_pixels=40 * 30, max_request_pixels=3 * 40 * 30)
    png = b64_png(1)
    items = ["text", {"image": png}, {"text": "caption", "image": f"data:image/png;base64,{png}"},
             {"image": "https://example.com/a.png"}, {"image": png}]
    opened = inline_image_headers(items, rules)
    assert sorted(opened) == [1, 2, 4] and all(image.size == (40, 30) for image in opened.values())
    assert opened[1].tobytes() == make_image(1).tobytes()  # decodes to the pixels sent
    over_budget = inline_image_headers([{"image": png}] * 4, rules)
    assert sorted(over_budget) == [0, 1, 2]
    larger = b64_png(2, width=50, height=40)
    too_big = inline_image_headers([{"image": png}, {"image": larger}, {"image": png}], rules)
    assert sorted(too_big) == [0]
    jpeg = io.BytesIO()
    make_image(3).save(jpeg, format="JPEG")
    jpeg_b64 = base64.b64encode(jpeg.getvalue()).decode()
    not_allowed = inline_image_headers([{"image": jpeg_b64}, {"image": png}], rules)
    bad = inline_image_headers([{"image": png}, {"image": "not base64!"}, {"image": png}], rules)
    assert not_allowed == {} and sorted(bad) == [0]


class ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves /cat.png, /big.png (over the cap), /missing (404) and /moved (a redirect)."""

    png = png_bytes(make_image(11))
    seen_hosts: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen_hosts.append(self.headers.get("Host", ""))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        body = {"/cat.png": self.png, "/big.png": self.png + b"\0" * 5000}.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):  # keep test output quiet
        return


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_image_urls_follow_the_rules(model, image_server):
    port = image_server.rsplit(":", 1)[1]
    strict = app_for(model, allow_image_urls=True)
    loopback_ok = app_for(model, allow_image_urls=True, allow_private_image_urls=True,
                          image_url_max_bytes=len(ImageHandler.png) + 100)

    async def scenario():
        async with serving(strict) as client:
            refused = [await post(client, {"input": [{"image": url}]})
                       for url in (f"{image_server}/cat.png", f"http://localhost:{port}/cat.png")]
        async with serving(loopback_ok) as client:
            fetched = await post(client, {"input": ["text", {"image": f"http://localhost:{port}/cat.png"}]})
            other = {name: await post(client, {"input": [{"image": f"{image_server}/{name}"}]})
                     for name in ("big.png", "missing", "moved")}
        return refused, fetched, other

    refused, fetched, other = run(scenario())
    for response in refused:
        assert response.status_code == 400
        assert "private, loopback or link-local" in response.json()["error"]["message"]
    assert fetched.status_code == 200, fetched.text
    assert f"localhost:{port}" in ImageHandler.seen_hosts  # the Host header names the host, not the address
    expected = model.encode(["text", {"image": ImageHandler.png}])
    assert_vectors_equal(vectors_of(fetched), list(expected))
    assert "over the limit" in other["big.png"].json()["error"]["message"]
    assert "HTTP 404" in other["missing"].json()["error"]["message"]
    assert "HTTP 302" in other["moved"].json()["error"]["message"]
    assert all(r.status_code == 400 and r.json()["error"]["param"] == "input[0]" for r in other.values())


# ---------------------------------------------------------------------- adapters
def require_adapter_api(model) -> None:
    if not hasattr(model, "list_adapters"):
        pytest.skip("the model has no adapter API yet (load_adapter/unload_adapter/list_adapters)")


@pytest.fixture(scope="module")
def lora_dir(tiny_nova_dir, tmp_path_factory, model) -> str:
    """A standard PEFT LoRA adapter with random, non-zero weights, saved by stock PEFT."""
    require_adapter_api(model)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("server_lora")
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def clean_adapters(model):
    """Custom adapters a test loads are unloaded after it (the model fixture is shared)."""
    yield
    if hasattr(model, "list_adapters"):
        for name in model.list_adapters():
            if name not in model.config.task_names:
                model.unload_adapter(name)


def test_admin_endpoints_are_absent_without_a_token(model):
    async def scenario():
        async with serving(app_for(model)) as client:
            return (await client.post("/v1/internal/lora/load", json={"lora_name": "a", "lora_path": "/tmp"}),
                    await client.post("/v1/internal/lora/unload", json={"lora_name": "a"},
                                      headers={"Authorization": "Bearer anything"}))

    for response in run(scenario()):
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_admin_endpoints_need_the_right_token(model, lora_dir, clean_adapters):
    app = app_for(model, admin_token="root-token", api_key="user-key")
    load = {"lora_name": "mine", "lora_path": lora_dir}

    async def scenario():
        async with serving(app) as client:
            return (await client.post("/v1/internal/lora/load", json=load),
                    await client.post("/v1/internal/lora/load", json=load, headers={"Authorization": "Bearer user-key"}),
                    await client.post("/v1/internal/lora/unload", json={"lora_name": "mine"},
                                      headers={"Authorization": "Bearer wrong"}))

    for response in run(scenario()):
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    assert "mine" not in model.list_adapters()


def test_lora_load_use_and_unload(model, lora_dir, clean_adapters):
    app = app_for(model, admin_token="root-token", max_loras=1)
    admin = {"Authorization": "Bearer root-token"}

    async def scenario():
        async with serving(app) as client:
            async def load(name: str, path: str) -> httpx.Response:
                return await client.post("/v1/internal/lora/load", json={"lora_name": name, "lora_path": path},
                                         headers=admin)

            async def unload(name: str) -> httpx.Response:
                return await client.post("/v1/internal/lora/unload", json={"lora_name": name}, headers=admin)

            r = {"load": await load("mine", f"{lora_dir}/adapter_model.safetensors")}
            r["again"] = await load("mine", lora_dir)
            r["over_max"] = await load("other", lora_dir)
            r["models"] = await client.get("/v1/models")
            r["by_field"] = await post(client, {"input": ["hello", {"text": "item-level", "adapter": "mine"}],
                                                "adapter": "mine"})
            r["by_model"] = await post(client, {"input": ["hello"], "model": "mine"})
            r["bare"] = await post(client, {"input": ["hello"], "adapter": None})
            r["unload"] = await unload("mine")
            r["unload_again"] = await unload("mine")
            r["after"] = await post(client, {"input": ["hello"], "adapter": "mine"})
            r["bad_path"] = await load("broken", "/nonexistent/adapter")
            r["bad_name"] = await load("has space", lora_dir)
            r["bad_body"] = await client.post("/v1/internal/lora/load", json={"lora_name": "x"}, headers=admin)
            if model.list_adapters():
                r["task"] = await unload(model.list_adapters()[0])
            return r

    r = run(scenario())
    assert r["load"].status_code == 200 and "mine" in r["load"].json()["adapters"]
    assert r["again"].status_code == 409 and r["again"].json()["error"]["code"] == "adapter_exists"
    assert r["over_max"].status_code == 409 and "--max-loras 1" in r["over_max"].json()["error"]["message"]
    ids = [m["id"] for m in r["models"].json()["data"]]
    assert ids == [MODEL_NAME, "mine"]
    assert r["by_field"].status_code == 200 and r["by_model"].status_code == 200, (r["by_field"].text, r["by_model"].text)
    assert r["unload"].status_code == 200 and "mine" not in r["unload"].json()["adapters"]
    assert r["unload_again"].status_code == 404 and r["unload_again"].json()["error"]["code"] == "adapter_not_found"
    assert r["after"].status_code == 400 and "unknown adapter 'mine'" in r["after"].json()["error"]["message"]
    assert r["bad_path"].status_code == 400 and r["bad_path"].json()["error"]["param"] == "lora_path"
    assert r["bad_name"].status_code == 400 and r["bad_name"].json()["error"]["param"] == "lora_name"
    assert r["bad_body"].status_code == 400 and r["bad_body"].json()["error"]["param"] == "lora_path"
    if "task" in r:
        assert r["task"].status_code == 400 and "task adapter" in r["task"].json()["error"]["message"]

    model.load_adapter(lora_dir, adapter_name="mine")  # the expected vectors, straight from encode()
    with_adapter = model.encode(["hello", "item-level"], adapter="mine")
    bare = model.encode(["hello"], adapter=None)
    assert_vectors_equal(vectors_of(r["by_field"]), list(with_adapter))
    assert_vectors_equal(vectors_of(r["by_model"]), [with_adapter[0]])
    assert_vectors_equal(vectors_of(r["bare"]), [bare[0]])
    assert (with_adapter[0] - bare[0]).abs().max() > 1e-4  # the adapter really changed the output


def test_adapter_unloaded_between_prep_and_encode_is_a_409_for_its_requests_only(model, lora_dir, clean_adapters,
                                                                                   monkeypatch):
    """A request prepared (and routed) for an adapter that is unloaded before its batch runs gets a 409 naming the
    item; a request joined with it in the same batch still gets its vectors."""
    gate = EncodeGate(model, monkeypatch)
    app = app_for(model, admin_token="t", max_wait_ms=50, inflight_batches=1)  # the gate holds the only slot
    admin = {"Authorization": "Bearer t"}

    async def scenario():
        async with serving(app) as client:
            loaded = await client.post("/v1/internal/lora/load", json={"lora_name": "mine", "lora_path": lora_dir},
                                       headers=admin)
            first = asyncio.create_task(post(client, {"input": "holds the encoder"}))
            await gate.wait_entered()
            routed = asyncio.create_task(post(client, {"input": ["plain", {"text": "x", "adapter": "mine"}]}))
            other = asyncio.create_task(post(client, {"input": ["unaffected"]}))
            await wait_until(lambda: app.state.nova.batcher.queue_requests == 2)
            unload = asyncio.create_task(client.post("/v1/internal/lora/unload", json={"lora_name": "mine"},
                                                     headers=admin))
            await wait_until(app.state.nova.admin_lock.locked)  # the unload is queued on the encode thread first
            gate.release.set()
            return loaded, await first, await routed, await other, await unload

    loaded, first, routed, other, unload = run(scenario())
    assert loaded.status_code == 200 and unload.status_code == 200
    assert first.status_code == 200 and other.status_code == 200
    assert routed.status_code == 409, routed.text
    error = routed.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("input[1]", "adapter_unloaded", "conflict_error")
    assert "'mine' was unloaded" in error["message"]
    assert gate.calls[1] == 3  # the two queued requests were joined, after the unload
    monkeypatch.undo()
    assert_vectors_equal(vectors_of(other), list(model.encode(["unaffected"])), atol=1e-6)


def test_loading_never_disturbs_requests_in_flight(model, lora_dir, clean_adapters):
    app = app_for(model, admin_token="t", max_wait_ms=5)
    admin = {"Authorization": "Bearer t"}
    bodies = [{"input": [f"steady {i}", {"text": f"item {i}", "task": "retrieval.passage"}]} for i in range(40)]

    async def churn(client: httpx.AsyncClient) -> list[int]:
        statuses = []
        for i in range(3):
            load = {"lora_name": f"churn{i}", "lora_path": lora_dir}
            statuses.append((await client.post("/v1/internal/lora/load", json=load, headers=admin)).status_code)
            statuses.append((await client.post("/v1/internal/lora/unload", json={"lora_name": f"churn{i}"},
                                               headers=admin)).status_code)
        return statuses

    async def scenario():
        async with serving(app) as client:
            return await asyncio.gather(churn(client), *(post(client, b) for b in bodies))

    statuses, *responses = run(scenario())
    assert statuses == [200] * 6
    for response, expected in zip(responses, expected_for_requests(model, bodies)):
        assert response.status_code == 200
        assert_vectors_equal(vectors_of(response), expected)


# ---------------------------------------------------------------------- the official client
def test_openai_async_client_in_process(model):
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")  # the HTTP library of openai 3.x
    app = app_for(model, api_key="k")
    texts = ["first text", "second text"]
    dims = model.config.matryoshka_dims[0]

    async def scenario():
        async with app.router.lifespan_context(app):
            http_client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://nova.test")
            client = openai.AsyncOpenAI(base_url="http://nova.test/v1", api_key="k", http_client=http_client)
            default = await client.embeddings.create(model=MODEL_NAME, input=texts)
            floats = await client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
            b64 = await client.embeddings.create(model=MODEL_NAME, input="first text", encoding_format="base64")
            short = await client.embeddings.create(model=MODEL_NAME, input=texts, dimensions=dims)
            with pytest.raises(openai.BadRequestError) as bad:
                await client.embeddings.create(model=MODEL_NAME, input=["ok", ""])
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url="http://nova.test/v1", api_key="wrong",
                                         http_client=http_client).embeddings.create(model=MODEL_NAME, input="x")
            await http_client.aclose()
            return default, floats, b64, short, bad.value

    default, floats, b64, short, bad = run(scenario())
    expected = model.encode(texts)
    assert [d.index for d in default.data] == [0, 1] and default.model == MODEL_NAME
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    for response in (default, floats):
        torch.testing.assert_close(torch.tensor([d.embedding for d in response.data]), expected, atol=ATOL, rtol=1e-4)
    decoded = torch.from_numpy(np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4").copy())
    torch.testing.assert_close(decoded, expected[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([d.embedding for d in short.data]), model.encode(texts, dimensions=dims),
                               atol=ATOL, rtol=1e-4)
    assert bad.status_code == 400 and bad.body["param"] == "input[1]"


def test_openai_sync_client_against_uvicorn_on_loopback(model):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from nova_embeddings.serve import serve_in_thread

    app = app_for(lambda: model, api_key="k")  # loaded in the background, as serve.py does
    with serve_in_thread(app, host="127.0.0.1", port=0) as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=10) as plain:
            for _ in range(500):
                if plain.get("/health").status_code == 200:
                    break
                threading.Event().wait(0.02)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
        response = client.embeddings.create(model=MODEL_NAME, input=["over the wire", "twice"])
        floats = client.embeddings.create(model=MODEL_NAME, input="over the wire", encoding_format="float")
    expected = model.encode(["over the wire", "twice"])
    torch.testing.assert_close(torch.tensor([d.embedding for d in response.data]), expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), expected[0], atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------- command line
def test_serve_command_line_maps_to_settings():
    from nova_embeddings.serve import build_parser, settings_from_args

    args = build_parser().parse_args([
        "some/model", "--api-key", "k", "--admin-token", "a", "--load-lora", "mine=/x/adapter_model.safetensors",
        "--max-loras", "2", "--max-batch-tokens", "999", "--max-wait-ms", "7", "--allow-image-urls",
        "--is-multi-vector-embeddings", "--served-model-name", "nova", "--served-model-name", "other",
    ])
    settings = settings_from_args(args)
    assert settings.served_model_names == ("nova", "other") and settings.model_name == "nova"
    assert (settings.api_key, settings.admin_token, settings.max_loras) == ("k", "a", 2)
    assert (settings.max_batch_tokens, settings.max_wait_ms, settings.default_multivector) == (999, 7.0, True)
    assert settings.allow_image_urls and not settings.allow_private_image_urls
    assert args.load_lora == [("mine", "/x/adapter_model.safetensors")]
    assert settings_from_args(build_parser().parse_args([])).served_model_names == ("nova-embeddings-v1-tiny",)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--load-lora", "no-equals-sign"])
    with pytest.raises(ValueError, match="needs allow_image_urls"):
        ServerSettings(allow_private_image_urls=True)


def test_serve_model_attrs_are_set_before_the_warm_up(tiny_nova_dir, monkeypatch):
    """serve --model-attr sets the loaded model's knobs in the loader, so the server's warm-up (which captures
    graphs by adapter_batching) sees them; a misspelt knob fails the load, naming it."""
    from nova_embeddings import serve

    args = serve.build_parser().parse_args([str(tiny_nova_dir), "--device", "cpu", "--model-attr",
                                            "adapter_batching=mixed", "--model-attr", "cuda_graphs=on"])
    model = serve.make_loader(args, "unused")()
    assert (model.adapter_batching, model.cuda_graphs) == ("mixed", "on")
    seen = []
    monkeypatch.setattr(type(model), "warmup", lambda self: seen.append(self.adapter_batching) or 0.0)
    app = create_app(lambda: model, ServerSettings())

    async def scenario():
        async with serving(app) as client:
            await wait_until(lambda: app.state.nova.phase == "ready")
            return await client.get("/health")

    assert run(scenario()).status_code == 200 and seen == ["mixed"]
    args = serve.build_parser().parse_args([str(tiny_nova_dir), "--device", "cpu", "--model-attr", "adapter_batchin=mixed"])
    with pytest.raises(ValueError, match="no attribute 'adapter_batchin'"):
        serve.make_loader(args, "unused")()


def test_startup_adapters_from_the_command_line(model, lora_dir, clean_adapters):
    from nova_embeddings.serve import load_startup_adapters

    with pytest.raises(ValueError, match="over --max-loras 1"):
        load_startup_adapters(model, [("a", lora_dir), ("b", lora_dir)], max_loras=1)
    load_startup_adapters(model, [("startup", f"{lora_dir}/adapter_model.safetensors")], max_loras=1)
    assert "startup" in model.list_adapters()
    with pytest.raises(ValueError, match="already loaded"):
        load_startup_adapters(model, [("startup", lora_dir)], max_loras=2)


def test_startup_adapter_named_like_a_task_becomes_that_tasks_adapter(model, tiny_nova_dir):
    from nova_embeddings.serve import load_startup_adapters

    bare = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    load_startup_adapters(bare, [("retrieval", str(tiny_nova_dir / "adapters" / "retrieval"))], max_loras=0)
    assert bare.list_adapters() == ["retrieval"]
    torch.testing.assert_close(bare.encode(["a query"], task="retrieval"), model.encode(["a query"], task="retrieval"))


def test_a_fatal_device_error_turns_health_to_failed(model, monkeypatch):
    def broken_encode(items, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "encode", broken_encode)
    app = app_for(model)

    async def scenario():
        async with serving(app) as client:
            return await post(client, {"input": "x"}), await client.get("/health"), await post(client, {"input": "y"})

    failed, health, after = run(scenario())
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert health.status_code == 503 and health.json() == {"status": "failed"}
    assert after.status_code == 503


# ---------------------------------------------------------------------- the batcher's wait
def batcher_for_test(max_wait_s: float, max_inflight: int = 1, gate: threading.Event | None = None):
    """A Batcher over a recording encode function (that waits for ``gate`` when given); prepared items are plain
    lists (sized, joined with +)."""
    from concurrent.futures import ThreadPoolExecutor

    from nova_embeddings.server.batcher import Batcher
    from nova_embeddings.server.metrics import Metrics

    calls: list[list] = []

    def encode(prepared, return_multivector):
        calls.append(list(prepared))
        if gate is not None:
            assert gate.wait(30), "test never opened the gate"
        return list(prepared)

    batcher = Batcher(encode, ThreadPoolExecutor(max_workers=max(1, max_inflight)), Metrics(), max_batch_tokens=1000,
                      max_batch_items=100, max_wait_s=max_wait_s, max_queue_requests=10, max_inflight=max_inflight)
    return batcher, calls


@pytest.mark.parametrize("max_inflight", [1, 2, 3])
def test_batcher_keeps_up_to_max_inflight_batches_in_encode(max_inflight):
    """While a batch is still in encode() (waiting for its vectors), the next ones start, up to ``max_inflight``;
    the rest wait for a free slot and then go together. Each request still gets its own items back."""
    from nova_embeddings.server.batcher import Job

    gate = threading.Event()

    async def scenario():
        batcher, calls = batcher_for_test(max_wait_s=0.0, max_inflight=max_inflight, gate=gate)
        batcher.start()
        futures = []
        for name in "abcde":
            futures.append(batcher.submit(Job(prepared=[name], tokens=1), batcher.admit()))
            await wait_until(lambda: len(calls) == min(len(futures), max_inflight))
        started = [list(call) for call in calls]
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
        await batcher.close()
        return started, calls, results

    started, calls, results = run(scenario())
    assert started == [[name] for name in "abcde"[:max_inflight]]
    assert calls[max_inflight:] == [list("abcde"[max_inflight:])]  # the waiting requests, joined in one batch
    assert results == [[name] for name in "abcde"]


def test_busy_seconds_count_overlapping_batches_once():
    """``nova_encode_seconds_total`` sums every batch's time in encode(); with two batches in flight that counts their
    overlap twice, so ``nova_encode_busy_seconds_total`` counts the time with at least one batch in encode()."""
    from nova_embeddings.server.batcher import Job

    gate = threading.Event()

    async def scenario():
        batcher, calls = batcher_for_test(max_wait_s=0.0, max_inflight=2, gate=gate)
        batcher.start()
        futures = []
        for name in "ab":
            futures.append(batcher.submit(Job(prepared=[name], tokens=1), batcher.admit()))
            await wait_until(lambda: len(calls) == len(futures))
        await asyncio.sleep(0.3)  # both batches are in encode() all this time
        busy_while_running = batcher._metrics.busy_seconds()
        gate.set()
        await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
        await batcher.close()
        return batcher._metrics, busy_while_running

    metrics, busy_while_running = run(scenario())
    assert metrics.batches == 2
    assert busy_while_running >= 0.3  # a scrape during a batch counts the batch's time so far
    assert metrics.encode_seconds - metrics.busy_seconds() >= 0.3  # the 0.3 s overlap, counted once
    assert metrics.busy_seconds() >= 0.3
    assert "nova_encode_busy_seconds_total" in metrics.render(0, 0, [], True)


def test_batcher_refuses_no_inflight_batches():
    with pytest.raises(ValueError, match="max_inflight must be at least 1"):
        batcher_for_test(max_wait_s=0.0, max_inflight=0)


def test_batcher_runs_at_once_when_no_other_request_is_being_prepared():
    """max_wait is for requests on their way: a lone request (one client, concurrency 1) does not wait for it."""
    from nova_embeddings.server.batcher import Job

    async def scenario():
        batcher, calls = batcher_for_test(max_wait_s=3600.0)
        batcher.start()
        future = batcher.submit(Job(prepared=["a"], tokens=1), batcher.admit())
        result = await asyncio.wait_for(future, timeout=60)  # a hang guard: with the old wait this took an hour
        await batcher.close()
        return result, calls

    result, calls = run(scenario())
    assert result == ["a"] and calls == [["a"]]


def test_batcher_waits_for_a_request_still_being_prepared_and_joins_it():
    from nova_embeddings.server.batcher import Job

    async def scenario():
        batcher, calls = batcher_for_test(max_wait_s=3600.0)
        batcher.start()
        first_ticket, second_ticket = batcher.admit(), batcher.admit()  # two requests admitted, both preparing
        first = batcher.submit(Job(prepared=["a"], tokens=1), first_ticket)
        await asyncio.sleep(0.05)  # the second is still being prepared: the worker holds the first
        assert calls == []
        second = batcher.submit(Job(prepared=["b", "c"], tokens=2), second_ticket)
        results = await asyncio.wait_for(asyncio.gather(first, second), timeout=60)
        await batcher.close()
        return results, calls

    results, calls = run(scenario())
    assert results == [["a"], ["b", "c"]] and calls == [["a", "b", "c"]]
