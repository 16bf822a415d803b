"""Small calls through CUDA graphs (graphs_nova_embeddings_v1): the padded static-buffer body equals the plain
packed path, on CPU (``cuda_graphs="on"`` runs the body eagerly) and, captured and replayed, on CUDA.

What would make a replay silently wrong, and which test pins it: padding tokens pooled or attended
(bucket padding, every length), frozen Python numbers and rebound buffers (many distinct inputs through one
graph), a graph kept across an adapter load or a weight swap, outputs overwritten by the next replay; for the
stacked graphs of mixed-adapter batches, each token's adapter read from its static buffer (mixed calls of task
adapters, a custom one and none, equal to the eager stacked pass and to each item alone).
"""

from __future__ import annotations

import random
import sys

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModel

from graphs_nova_embeddings_v1 import (
    MAX_ITEMS, SMALL_EAGER_PASS_TOKENS, SPLIT_MAX_TOKENS, STACKED, TOKEN_BUCKETS, bucket_filling_lengths, graph_sized_limits, token_bucket,
)

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
TASKS = ["retrieval.query", "retrieval.passage", "text-matching", "code.query", "code.passage"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def load(path, **kwargs):
    return AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)


def random_items(rng: random.Random, count: int, max_words: int) -> list[dict]:
    return [{"text": " ".join(rng.choices(WORDS, k=rng.randint(1, max_words))), "task": rng.choice(TASKS)}
            for _ in range(count)]


def items_filling(model, rng: random.Random, tokens: int) -> tuple[list[dict], int]:
    """Random retrieval queries and passages (one adapter: one packed batch) added while their packed length stays
    within ``tokens``, at most MAX_ITEMS of them; returns them and that length."""
    items, total = [], 0
    while len(items) < MAX_ITEMS:
        item = {"text": " ".join(rng.choices(WORDS, k=rng.randint(1, max(2, tokens // 128)))),
                "task": rng.choice(["retrieval.query", "retrieval.passage"])}
        length = len(model.prepare_items([item]).tokenized[0])
        if total + length > tokens:
            break
        items.append(item)
        total += length
    return items, total


def packed(model, graphs: str):
    model.attention_packing, model.cuda_graphs = "on", graphs
    return model


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    return load(tiny_nova_dir)


def assert_same_vectors(got, expected, multi: bool) -> None:
    if multi:
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_static_buffer_body_equals_the_packed_path_on_cpu(model):
    """Short calls of 1..8 items over every task adapter, then one-adapter calls of 30..MAX_ITEMS items filling the
    large buckets (each replays exactly the graph of its bucket); single and multi vectors."""
    rng = random.Random(0)
    for round_ in range(8):
        items = random_items(rng, rng.randint(1, 8), max_words=rng.choice([2, 8, 30]))
        multi = round_ % 3 == 0
        expected = packed(model, "off").encode(items, return_multivector=multi)
        assert_same_vectors(packed(model, "on").encode(items, return_multivector=multi), expected, multi)
    assert {key[0] for key in model._graphs.graphs} >= {TOKEN_BUCKETS[0], TOKEN_BUCKETS[1]}
    for round_, target in enumerate((700, 1000, 1400, 1900, TOKEN_BUCKETS[-1])):
        items, tokens = items_filling(model, rng, target)
        assert 30 <= len(items) <= MAX_ITEMS and TOKEN_BUCKETS[5] < tokens <= TOKEN_BUCKETS[-1]
        multi = round_ % 2 == 1
        expected = packed(model, "off").encode(items, return_multivector=multi)
        model._graphs.graphs.clear()
        got = packed(model, "on").encode(items, return_multivector=multi)
        assert set(model._graphs.graphs) == {(token_bucket(tokens), "retrieval", multi)}
        assert_same_vectors(got, expected, multi)


def test_calls_too_big_for_graphs_take_the_plain_path(model):
    """An item longer than the largest bucket, and a call of more than SPLIT_MAX_TOKENS tokens in one batch, run
    eagerly (the large call's GPU work dwarfs its launches)."""
    packed(model, "on")
    model._graphs.graphs.clear()
    long_text = " ".join(["word"] * (TOKEN_BUCKETS[-1] + 10))
    model.encode([long_text])
    large = [" ".join(["word"] * 300)] * (SPLIT_MAX_TOKENS // 300 + 1)
    assert sum(len(t) for t in model.prepare_items(large).tokenized) > SPLIT_MAX_TOKENS
    model.encode(large, batch_size=len(large), max_batch_tokens=10 * SPLIT_MAX_TOKENS)
    assert model._graphs.graphs == {}


@pytest.mark.parametrize("adapter_batching", ["group", "mixed"])
def test_a_small_call_of_many_texts_replays_graph_sized_batches(tiny_nova_dir, adapter_batching):
    """A server's batch: more short texts than one graph holds (items and tokens), over several adapters, is
    planned into balanced graph-sized batches, all replayed, none eager; vectors equal the plain path's."""
    model = packed(load(tiny_nova_dir), "on")
    model.adapter_batching = adapter_batching
    rng = random.Random(9)
    items = random_items(rng, 3 * MAX_ITEMS, max_words=12)
    lengths = [len(t) for t in model.prepare_items(items).tokenized]
    assert sum(lengths) <= SPLIT_MAX_TOKENS
    eager_passes = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: eager_passes.append(1), with_kwargs=True)
    got = model.encode(items, batch_size=256, max_batch_tokens=16384)  # the server's limits
    handle.remove()
    assert not eager_passes and model._graphs.graphs
    expected = packed(model, "off").encode(items, batch_size=256, max_batch_tokens=16384)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    size, tokens = graph_sized_limits(lengths, 256, 16384)
    assert size == MAX_ITEMS and tokens <= TOKEN_BUCKETS[-1]


def test_a_large_call_of_short_prepared_texts_replays_graph_sized_batches(model):
    """Over SPLIT_MAX_TOKENS, short texts that encode()'s default limits would cut into small eager passes (64 items)
    are planned into graph-sized batches instead; none runs eagerly, and the vectors equal the plain path's."""
    packed(model, "on")
    rng = random.Random(21)
    items = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(8, 14))), "task": "retrieval.passage"} for _ in range(300)]
    prepared = model.prepare_items(items)
    lengths = [len(t) for t in prepared.tokenized]
    assert sum(lengths) > SPLIT_MAX_TOKENS and 64 * sum(lengths) / len(lengths) <= SMALL_EAGER_PASS_TOKENS
    eager_passes = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: eager_passes.append(1), with_kwargs=True)
    got = model.encode(prepared)
    handle.remove()
    assert not eager_passes
    torch.testing.assert_close(got, packed(model, "off").encode(prepared), rtol=0, atol=1e-5)


def test_graph_sized_limits_balance_the_batches():
    assert graph_sized_limits([40] * 117, 256, 16384) == (MAX_ITEMS, 1560 + 40)  # 4,680 tokens: 3 batches
    assert graph_sized_limits([100] * 10, 256, 16384) == (MAX_ITEMS, 1100)  # fits one graph
    assert graph_sized_limits([40] * 117, 16, 500) == (16, 500)  # the caller's smaller limits stay
    assert graph_sized_limits([1000] * 9, 256, 16384) == (256, 16384)  # over SPLIT_MAX_TOKENS: unchanged
    assert graph_sized_limits([300] * 30, 64, 32768) == (64, 32768)  # ... in eager passes of 9,000 tokens
    assert graph_sized_limits([40] * 256, 64, 32768) == (MAX_ITEMS, 2048)  # ... but not in passes of 2,560
    assert graph_sized_limits([40] * 256, 256, 16384) == (256, 16384)  # (a server's one pass of 10,240: unchanged)


def test_graphs_follow_adapter_loads_and_weight_changes(tiny_nova_dir):
    """A new adapter under a name, changed LoRA weights (in place and swapped) and a changed scaling all show."""
    model = packed(load(tiny_nova_dir), "on")
    items = [{"text": "some words", "adapter": "legal"}]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    model.add_adapter(config, adapter_name="legal")
    first = model.encode(items)
    layer = next(m for m in model.modules() if hasattr(m, "lora_B") and "legal" in m.lora_B)
    with torch.no_grad():
        layer.lora_B["legal"].weight.mul_(3.0)  # in place: the same storage
    statics = lambda: {key: static for key, (_, static) in model._graphs.graphs.items()}  # noqa: E731
    kept = statics()
    second = model.encode(items)
    assert all(statics()[key] is static for key, static in kept.items())  # in place: the recorded graph stays and reads the new values
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, packed(model, "off").encode(items), rtol=0, atol=1e-5)
    packed(model, "on")
    layer.lora_B["legal"].weight = torch.nn.Parameter(layer.lora_B["legal"].weight * 0.5)  # a new storage
    third = model.encode(items)
    assert all(statics()[key] is not static for key, static in kept.items())  # a swapped storage drops every recorded graph
    torch.testing.assert_close(third, packed(model, "off").encode(items), rtol=0, atol=1e-5)
    packed(model, "on")
    layer.scaling["legal"] = 7.0
    before_scaling = statics()
    model.encode(items)
    assert all(statics()[key] is not static for key, static in before_scaling.items())
    torch.testing.assert_close(model.encode(items), packed(model, "off").encode(items), rtol=0, atol=1e-5)


def add_custom_adapter(model, name: str = "legal", **config) -> None:
    """A LoRA adapter with jina's dropout and random non-zero A and B, added through PEFT's own API."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False, **config)
    torch.manual_seed(11)
    model.add_adapter(config, adapter_name=name)


def mixed_items(rng: random.Random, count: int, max_words: int) -> list[dict]:
    """Items over every task adapter, a custom adapter and the bare backbone."""
    items = random_items(rng, count, max_words)
    for item in items:
        choice = rng.random()
        if choice < 0.2:
            item["adapter"] = "legal"
        elif choice < 0.3:
            item["adapter"] = None
    return items


def test_mixed_batches_replay_one_stacked_graph_per_bucket(tiny_nova_dir):
    """adapter_batching="mixed": a batch of several adapters (task ones, a custom one, none) replays the bucket's
    stacked graph, which routes each token to its adapter from a static buffer; every vector equals the eager
    mixed pass and the item encoded alone."""
    model = packed(load(tiny_nova_dir), "on")
    add_custom_adapter(model)
    model.adapter_batching = "mixed"
    rng = random.Random(3)
    calls = [(mixed_items(rng, rng.randint(2, 8), max_words=rng.choice([2, 8, 40])), i % 4 == 0) for i in range(30)]
    for items, multi in calls:
        expected = packed(model, "off").encode(items, return_multivector=multi)
        assert_same_vectors(packed(model, "on").encode(items, return_multivector=multi), expected, multi)
    stacked = {key for key in model._graphs.graphs if key[1] == STACKED}
    assert len(stacked) >= 3 and {multi for _, _, multi in stacked} == {True, False}
    assert model._graphs.stacked_names == ["code", "legal", "retrieval", "text-matching"]
    items = calls[1][0]
    model.adapter_batching = "group"
    alone = torch.stack([model.encode([item])[0] for item in items])
    model.adapter_batching = "mixed"
    torch.testing.assert_close(model.encode(items), alone, rtol=0, atol=1e-5)


def test_a_stacked_graph_follows_a_new_adapter_and_refuses_what_cannot_stack(tiny_nova_dir):
    """Loading an adapter drops the stacked graphs (the next one carries it too); a call with an adapter that does
    not stack (DoRA) is grouped, one adapter's graph per batch, and stays exact."""
    model = packed(load(tiny_nova_dir), "on")
    model.adapter_batching = "mixed"
    items = [{"text": "one two", "task": "code.query"}, {"text": "three", "task": "text-matching"}]
    model.encode(items)
    assert model._graphs.stacked_names == ["code", "retrieval", "text-matching"]
    add_custom_adapter(model)
    items.append({"text": "four five six", "adapter": "legal"})
    got = model.encode(items)
    assert model._graphs.stacked_names == ["code", "legal", "retrieval", "text-matching"]
    assert [key[1] for key in model._graphs.graphs] == [STACKED]
    torch.testing.assert_close(got, packed(model, "off").encode(items), rtol=0, atol=1e-5)
    packed(model, "on")
    add_custom_adapter(model, "dora", use_dora=True)
    items.append({"text": "seven", "adapter": "dora"})
    got = model.encode(items)
    assert "dora" not in model._graphs.stacked_names  # the call is grouped: one adapter's graph per batch
    assert STACKED not in {key[1] for key in model._graphs.graphs} and ("dora" in {key[1] for key in model._graphs.graphs})
    torch.testing.assert_close(got, packed(model, "off").encode(items), rtol=0, atol=1e-5)


def test_cuda_graphs_setting_is_checked(model):
    model.cuda_graphs = "always"
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        model.encode(["x"])
    model.cuda_graphs = "auto"


# ---------------------------------------------------------------------- CUDA: captured and replayed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("adapter_batching", ["group", "mixed"])
def test_replays_equal_eager_for_many_distinct_inputs(tiny_nova_dir, adapter_batching):
    """>= 200 distinct calls (lengths across every bucket, 1..8 items, every task adapter; then one-adapter calls of
    30..MAX_ITEMS items in the large buckets; single and multi vectors) replayed from captured graphs equal the eager
    packed path in bf16; "mixed": batches of several adapters replay the stacked graphs."""
    model = load(tiny_nova_dir, dtype=torch.bfloat16).to("cuda")
    model.adapter_batching = adapter_batching
    rng = random.Random(1)
    calls = [(random_items(rng, rng.randint(1, 8), max_words=rng.choice([2, 6, 20, 60])), i % 4 == 0)
             for i in range(200)]
    calls += [(items_filling(model, rng, rng.randint(600, TOKEN_BUCKETS[-1]))[0], i % 4 == 0) for i in range(24)]
    model.cuda_graphs = "off"
    expected = [model.encode(items, return_multivector=multi) for items, multi in calls]
    model.cuda_graphs = "auto"
    got = [model.encode(items, return_multivector=multi) for items, multi in calls]
    assert model._graphs is not None and model._graphs.capture and len(model._graphs.graphs) >= 10
    assert max(key[0] for key in model._graphs.graphs) > 512
    assert (STACKED in {key[1] for key in model._graphs.graphs}) == (adapter_batching == "mixed")
    lowest = 1.0
    for (items, multi), mine, theirs in zip(calls, got, expected):
        if multi:
            for a, b in zip(mine, theirs):
                assert a.shape == b.shape
                lowest = min(lowest, float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()))
        else:
            assert mine.shape == theirs.shape
            lowest = min(lowest, float(torch.nn.functional.cosine_similarity(mine, theirs, dim=-1).min()))
    assert lowest >= 0.999, lowest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replay_follows_a_new_adapter_and_keeps_earlier_outputs(tiny_nova_dir):
    model = load(tiny_nova_dir, dtype=torch.bfloat16).to("cuda")
    first = model.encode(["one query"])
    kept = first.clone()
    model.encode(["another query entirely"])  # same bucket: the next replay must not overwrite `first`
    assert torch.equal(first, kept)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config, adapter_name="legal")
    replayed = model.encode([{"text": "one query", "adapter": "legal"}])
    model.cuda_graphs = "off"
    eager = model.encode([{"text": "one query", "adapter": "legal"}])
    assert float(torch.nn.functional.cosine_similarity(replayed, eager).min()) >= 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_back_to_back_replays_of_one_graph_read_their_own_inputs(tiny_nova_dir, monkeypatch):
    """One call of many one-item batches in one bucket: each replay's inputs come from pinned host buffers of their
    own, queued without a sync in between; none may be overwritten before its copy has read it."""
    model = load(tiny_nova_dir, dtype=torch.bfloat16).to("cuda")
    texts = [f"query {i}: " + " ".join(random.Random(i).choices(WORDS, k=3)) for i in range(48)]
    model.cuda_graphs = "off"
    expected = model.encode(texts, task="retrieval.query", batch_size=1)
    model.cuda_graphs = "auto"
    staged = spy_on_staging(model, monkeypatch)
    got = model.encode(texts, task="retrieval.query", batch_size=1)
    assert len(model._graphs.graphs) == 1 and len(staged) == 48
    assert all(batch.input_ids.is_pinned() and batch.pooling.is_pinned() for batch in staged)
    assert float(torch.nn.functional.cosine_similarity(got, expected).min()) >= 0.999


def spy_on_staging(model, monkeypatch) -> list:
    """Record every batch ``StaticBatch.staged`` writes, and the thread that wrote it (as ``batch.thread``)."""
    import threading

    graphs_module = sys.modules[type(model.small_call_graphs()).__module__]
    original, staged = graphs_module.StaticBatch.staged.__func__, []

    def staged_and_recorded(cls, inputs, device):
        batch = original(cls, inputs, device)
        batch.thread = threading.current_thread().name
        staged.append(batch)
        return batch

    monkeypatch.setattr(graphs_module.StaticBatch, "staged", classmethod(staged_and_recorded))
    return staged


def test_replayed_batches_are_staged_by_the_collate_workers(model, monkeypatch):
    """The thread that issues a call's replays only queues copies: every batch's inputs were padded into the graph's
    layout by the worker that collated it (a server's encode thread shares the interpreter with the request
    handlers, and each small host op there can wait for the lock). Prepared items, as a server passes them (a call
    of raw items runs its first batch alone while the rest is tokenised: one batch, no worker)."""
    packed(model, "on")
    rng = random.Random(11)
    items = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))), "task": "retrieval.query"} for _ in range(40)]
    expected = packed(model, "off").encode(items)
    packed(model, "on")
    staged = spy_on_staging(model, monkeypatch)
    got = model.encode(model.prepare_items(items), batch_size=8)
    assert len(staged) == 5 and {batch.thread.split("_")[0] for batch in staged} == {"nova-collate"}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_threads_share_the_static_buffers_safely(model):
    """Replays from several threads at once (a server's callers): each call gets its own vectors, as serially."""
    from concurrent.futures import ThreadPoolExecutor

    packed(model, "on")
    rng = random.Random(5)
    calls = [random_items(rng, rng.randint(1, 4), max_words=rng.choice([3, 12])) for _ in range(24)]
    expected = [model.encode(items) for items in calls]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(model.encode, calls))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calls_from_two_threads_on_cuda_get_their_own_vectors(tiny_nova_dir):
    """A server's two in-flight batches: one thread queues its GPU work while the other waits for its vectors to be
    copied to the host (an event, outside the adapter lock); every call still gets exactly its own vectors."""
    from concurrent.futures import ThreadPoolExecutor

    model = load(tiny_nova_dir, dtype=torch.bfloat16).to("cuda")
    rng = random.Random(9)
    calls = [model.prepare_items(random_items(rng, rng.randint(1, 40), max_words=rng.choice([3, 12, 40])))
             for _ in range(32)]
    expected = [model.encode(prepared) for prepared in calls]
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(model.encode, calls))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_warmup_captures_every_bucket_for_every_task_adapter(tiny_nova_dir):
    """The server's start-up warm-up: a graph per token bucket for each adapter that tasks route to (a server
    batch groups items by adapter), so no request pays a capture."""
    model = packed(load(tiny_nova_dir), "on")
    model.warmup()
    adapters = {model.config.adapter_task(task) for task in model.config.task_prompts}
    assert len(adapters) == 3
    assert set(model._graphs.graphs) == {(bucket, adapter, False) for bucket in TOKEN_BUCKETS for adapter in adapters}
    model.adapter_batching = "mixed"  # a server's batches mix tasks: the stacked graphs too
    model.warmup()
    stacked = {key for key in model._graphs.graphs if key[1] == STACKED}
    reachable = {bucket for bucket in TOKEN_BUCKETS if bucket >= sum(len(t) for t in model.prepare_items(
        [{"text": "warm", "task": task} for task in model._one_task_per_adapter()]).tokenized)}
    assert stacked == {(bucket, STACKED, False) for bucket in reachable}


def test_bucket_filling_lengths_land_in_every_bucket_once():
    """Whatever the prompt and the tokens per word, each length is the most words that fit its bucket, and a
    bucket no text can land in is left out rather than filled twice."""
    for prompt, per_word in ((2, 3), (7, 1), (40, 2), (5, 300)):
        tokens_of = lambda n: prompt + per_word * n  # noqa: E731
        lengths = bucket_filling_lengths(tokens_of)
        buckets = [token_bucket(tokens_of(n)) for n in lengths]
        assert len(set(buckets)) == len(buckets)
        reachable = {token_bucket(tokens_of(n)) for n in range(1, TOKEN_BUCKETS[-1] + 1)} - {None}
        assert set(buckets) == reachable
        for n, bucket in zip(lengths, buckets):
            assert tokens_of(n + 1) > bucket
