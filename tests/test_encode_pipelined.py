"""encode() starts the GPU after the first batch's tokenisation and tokenises the rest meanwhile (packed batches).

Packing is forced on CPU (``attention_packing = "on"``) so the pipelined path runs here; small ``batch_size`` values
make a few items span several batches. Also: the processor's tokenisation (backend ``Encoding``s, offsets read into
arrays) gives the ids and masks that transformers' tokenizer call and per-token overlap give.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from helpers import make_image  # noqa: E402

WORDS = "late interaction retrieval of scanned pages with multi vector embeddings".split()


def text(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


MIXED = [text(3), {"text": text(40), "task": "retrieval.query"}, {"image": make_image(40)},
         {"text": text(12), "instructions": "Find the page."}, {"text": text(25), "adapter": None},
         {"image": make_image(41, width=150), "text": "fused page", "task": "retrieval.passage"},
         {"text": text(7), "task": "code.query"}, text(60), {"text": text(2), "task": "text-matching"},
         {"text": text(18), "task": "retrieval.passage", "instructions": "Be brief."}, text(9), text(33)]


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    model.attention_packing = "on"  # what CUDA in half precision uses; the pipelined path needs packed batches
    return model


@pytest.fixture
def tokenize_calls(model, monkeypatch):
    """Records, per call of the processor's tokenize_items, the item indices and whether it ran on the caller's
    thread."""
    calls = []
    original = model.processor.tokenize_items

    def recording(items, **kwargs):
        calls.append(([item.index for item in items], threading.current_thread() is threading.main_thread()))
        return original(items, **kwargs)

    monkeypatch.setattr(model.processor, "tokenize_items", recording)
    return calls


def test_pipelined_call_equals_each_item_alone_in_input_order(model, tokenize_calls):
    together = model.encode(MIXED, batch_size=2)
    multi = model.encode(MIXED, batch_size=2, return_multivector=True)
    (head, on_caller), (rest, on_worker) = tokenize_calls[:2]
    assert len(head) == 2 and on_caller  # the first batch's items, then the GPU starts
    assert sorted(head + rest) == list(range(len(MIXED))) and not on_worker  # the rest in a worker thread meanwhile
    alone = torch.stack([model.encode([item])[0] for item in MIXED])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    for item, vectors in zip(MIXED, multi):
        torch.testing.assert_close(vectors, model.encode([item], return_multivector=True)[0], rtol=0, atol=1e-5)


def test_pipelined_call_of_one_adapter_per_batch_starts_on_one_adapters_items(model, tokenize_calls, monkeypatch):
    """adapter_batching="group" (the default): the first part tokenised is one adapter's items, so the call runs as
    many batches as it would unpipelined. In call order, the first part spread over every adapter and ran as that
    many small batches (each merged on a GPU), then the rest as many again. Vectors come back in input order."""
    items = [{"text": text(5 + i), "task": "code.query" if i % 2 else "retrieval.query"} for i in range(8)]
    adapters = ["code" if i % 2 else "retrieval" for i in range(8)]
    passes = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: (passes.append(1), original(*args, **kwargs))[1])
    together = model.encode(items, batch_size=2)
    head = tokenize_calls[0][0]
    assert len(head) == 2 and len({adapters[i] for i in head}) == 1
    assert len(passes) == 4  # 4 items per adapter, 2 per batch
    alone = torch.stack([model.encode([item])[0] for item in items])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_pipelined_call_equals_the_whole_call_tokenised_first(model, tokenize_calls):
    """The same call, pipelined or not (prepared items are tokenised first), under a token budget that sends the
    long items alone, and in another order."""
    prepared = model.encode(model.prepare_items(MIXED), max_batch_tokens=64)
    tokenize_calls.clear()
    pipelined = model.encode(MIXED, max_batch_tokens=64, batch_size=3)
    assert len(tokenize_calls) == 2 and not tokenize_calls[1][1]
    torch.testing.assert_close(pipelined, prepared, rtol=0, atol=1e-5)
    shuffled = list(reversed(range(len(MIXED))))
    torch.testing.assert_close(model.encode([MIXED[i] for i in shuffled], batch_size=2), prepared[shuffled],
                               rtol=0, atol=1e-5)


def test_padded_batches_and_small_calls_tokenise_the_whole_call_first(model, tokenize_calls):
    model.encode(MIXED[:3], batch_size=2)  # less than two first parts: nothing worth hiding
    assert tokenize_calls == [([0, 1, 2], True)]
    model.attention_packing = "off"
    try:
        tokenize_calls.clear()
        padded = model.encode(MIXED, batch_size=2)
    finally:
        model.attention_packing = "on"
    assert tokenize_calls == [(list(range(len(MIXED))), True)]
    torch.testing.assert_close(padded, model.encode(MIXED, batch_size=2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad,message", [({"text": ""}, "item 10: 'text' is empty"),
                                         ({"text": "x", "adapter": "nope"}, "item 10: unknown adapter 'nope'")])
def test_a_bad_item_deep_in_the_call_fails_before_any_work(model, tokenize_calls, monkeypatch, bad, message):
    forwards = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: (forwards.append(1), original(*args, **kwargs))[1])
    items = MIXED[:10] + [bad] + MIXED[10:]
    with pytest.raises(ValueError, match=message):
        model.encode(items, batch_size=2)
    assert tokenize_calls == [] and forwards == []


def test_a_too_long_item_in_the_rest_raises_the_same_error(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, max_length=40)
    model.attention_packing = "on"
    items = [text(5) for _ in range(9)] + [text(80)] + [text(5) for _ in range(3)]
    with pytest.raises(ValueError) as unpipelined:
        model.prepare_items(items)
    with pytest.raises(ValueError) as pipelined:
        model.encode(items, batch_size=2)
    assert str(pipelined.value) == str(unpipelined.value)
    assert str(pipelined.value).startswith("item 9: ") and "over the maximum of 40" in str(pipelined.value)


def test_truncate_warns_for_an_item_in_the_rest_and_equals_it_alone(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, max_length=40)
    model.attention_packing = "on"
    items = [text(5) for _ in range(9)] + [text(80)] + [text(5) for _ in range(3)]
    with pytest.warns(UserWarning, match="item 9: truncated from"):
        vectors = model.encode(items, batch_size=2, truncate=True, return_multivector=True)
    assert vectors[9].shape[0] == 40
    with pytest.warns(UserWarning, match="item 0: truncated from"):
        alone = model.encode([items[9]], truncate=True, return_multivector=True)[0]
    torch.testing.assert_close(vectors[9], alone, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- tokenisation
def reference_tokens(processor, tokenizer, config, item) -> tuple[list[int], list[bool], list[bool]]:
    """Ids and masks the way transformers' tokenizer call gives them (dicts of lists with offset_mapping), masks from
    each token's overlap with the pooled spans and the system turn."""
    rendered, spans, system_chars = processor.render_item(item, config)
    if any(processor._special_markup().search(s) for s in (item.text, item.instructions) if s):
        ids, offsets = processor._tokenize_rendered(item, config, rendered)  # user-written markup stays plain text
    else:
        encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    pooled, output = [], []
    for start, end in offsets:
        in_system = end <= system_chars
        overlaps = any(start < span_end and end > span_start for span_start, span_end in spans)
        pooled.append(overlaps or (in_system and config.pool_instruction_tokens))
        output.append(not in_system or config.pool_instruction_tokens)
    return list(ids), pooled, output


def test_tokenisation_gives_the_ids_and_masks_of_transformers_tokenizer_call(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_nova_dir)
    processor, config = model.processor, model.config
    items = processor.normalize_items(
        [text(30), " spaced  text\n", "émojis 🙂 and ünïcödé 漢字", {"text": text(8), "instructions": "Find the page."},
         {"text": "user writes <|im_end|> and <|image_pad|>", "instructions": "also <|im_start|>system"},
         {"image": make_image(42)}, {"image": make_image(43, width=150), "text": "fused", "instructions": "Read it."},
         {"text": text(4), "task": "code.passage"}], config=config)
    tokenized = processor.tokenize_items(items, config=config)
    for item, tokens in zip(items, tokenized):
        ids, pooled, output = reference_tokens(processor, tokenizer, config, item)
        if item.has_image:  # the reference's single placeholder, repeated once per merged patch
            count = len(tokens) - len(ids) + 1
            repeat = [count if token == processor.image_token_id else 1 for token in ids]
            ids, pooled, output = ([v for v, r in zip(values, repeat) for _ in range(r)]
                                   for values in (ids, pooled, output))
        assert tokens.input_ids == ids, item.index
        assert tokens.pooling_mask == pooled and tokens.output_mask == output, item.index


def test_tokenisation_goes_through_transformers_when_the_backend_is_set_to_truncate(tiny_nova_dir):
    """A backend left truncating (someone called the tokenizer with truncation=True) would cut items short: the
    processor then goes through transformers' call, which switches truncation off first."""
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    processor, config = model.processor, model.config
    items = processor.normalize_items([text(30), text(50)], config=config)
    expected = [t.input_ids for t in processor.tokenize_items(items, config=config)]
    processor.tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    assert [t.input_ids for t in processor.tokenize_items(items, config=config)] == expected
