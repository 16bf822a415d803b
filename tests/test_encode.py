"""encode() on the tiny checkpoint: jina-equivalence, instructions, item kinds, outputs, batching, errors.

The expected vectors are computed independently: jina's own recipe (prefix + text with no chat markup,
or the fixed image prompt expanded by the image processor's grid), run through transformers' stock
``Qwen2_5_VLForConditionalGeneration`` with ``output_hidden_states=True``, pooled as jina pools.
"""

from __future__ import annotations

import base64
import http.server
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from helpers import make_image, png_bytes  # noqa: E402

JINA_IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)


@pytest.fixture(scope="module")
def reference(tiny_nova_dir):
    """Stock transformers Qwen2.5-VL on the same weights: jina's forward path."""
    config = Qwen2_5_VLConfig.from_dict(AutoConfig.from_pretrained(tiny_nova_dir, trust_remote_code=True).to_dict())
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_nova_dir, config=config).eval()
    return ref


@pytest.fixture(scope="module")
def tokenizer(tiny_nova_dir):
    return AutoTokenizer.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def jina_text_inputs(tokenizer, prefix: str, text: str) -> dict:
    return {k: torch.tensor([v]) for k, v in tokenizer(prefix + text, add_special_tokens=False).items()}


def jina_image_inputs(model, tokenizer, image: Image.Image) -> dict:
    """Jina's image prompt with the placeholder expanded to the image processor's token count."""
    image_processor = model.processor.image_processor
    pixels = image_processor(images=[image], return_tensors="pt")
    count = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    text = JINA_IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * count)
    inputs = {k: torch.tensor([v]) for k, v in tokenizer(text, add_special_tokens=False).items()}
    inputs["pixel_values"] = pixels["pixel_values"]
    inputs["image_grid_thw"] = pixels["image_grid_thw"]
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    return inputs


@torch.no_grad()
def jina_reference_vectors(reference, model, inputs: dict, image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Jina's pooling: mean over all tokens (text) or vision_start..vision_end inclusive (image)."""
    out = reference(**inputs, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][0]  # (seq, hidden)
    ids = inputs["input_ids"][0]
    if image:
        start = int((ids == model.config.vision_start_token_id).nonzero()[0])
        end = int((ids == model.config.vision_end_token_id).nonzero()[0])
        pooled = hidden[start : end + 1].mean(0)
    else:
        pooled = hidden.mean(0)
    multi = F.normalize(model.multi_vector_projector(hidden), dim=-1)
    return F.normalize(pooled, dim=-1), multi


# ---------------------------------------------------------------------- token sequences
@pytest.mark.parametrize(
    "task,prefix",
    [("retrieval", "Query: "), ("retrieval.query", "Query: "), ("retrieval.passage", "Passage: "),
     ("text-matching", "Query: "), ("code", "Query: "), ("code.query", "Query: "), ("code.passage", "Passage: ")],
)
def test_text_tokens_are_jinas(model, tokenizer, task, prefix):
    processor = model.processor
    items = processor.normalize_items([{"text": "what is late interaction?", "task": task}], config=model.config)
    (tokenized,) = processor.tokenize_items(items, config=model.config)
    assert tokenized.input_ids == tokenizer(prefix + "what is late interaction?", add_special_tokens=False)["input_ids"]
    assert all(tokenized.pooling_mask) and all(tokenized.output_mask)


def test_image_tokens_are_jinas(model, tokenizer):
    image = make_image(1)
    processor = model.processor
    items = processor.normalize_items([{"image": image}], config=model.config)
    (tokenized,) = processor.tokenize_items(items, config=model.config)
    expected = jina_image_inputs(model, tokenizer, image)["input_ids"][0].tolist()
    assert tokenized.input_ids == expected
    pooled = [t for t, p in zip(tokenized.input_ids, tokenized.pooling_mask) if p]
    assert pooled[0] == model.config.vision_start_token_id and pooled[-1] == model.config.vision_end_token_id
    assert all(t == model.config.image_token_id for t in pooled[1:-1])
    assert all(tokenized.output_mask)


def test_instruction_is_a_system_turn_that_is_not_pooled(model, tokenizer):
    processor = model.processor
    items = processor.normalize_items(["hello world"], instructions="Find physics papers", config=model.config)
    (tokenized,) = processor.tokenize_items(items, config=model.config)
    expected = "<|im_start|>system\nFind physics papers<|im_end|>\n<|im_start|>user\nQuery: hello world<|im_end|>\n"
    assert tokenized.input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    decode = lambda mask: tokenizer.decode([t for t, m in zip(tokenized.input_ids, mask) if m])
    assert decode(tokenized.pooling_mask) == "Query: hello world"
    assert decode(tokenized.output_mask) == "<|im_start|>user\nQuery: hello world<|im_end|>\n"


def test_image_instruction_goes_before_jinas_prompt(model, tokenizer):
    processor = model.processor
    items = processor.normalize_items([{"image": make_image(2)}], instructions="Charts only", config=model.config)
    (tokenized,) = processor.tokenize_items(items, config=model.config)
    text = tokenizer.decode(tokenized.input_ids)
    assert text.startswith("<|im_start|>system\nCharts only<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|vision_end|>Describe the image.<|im_end|>\n")
    output = tokenizer.decode([t for t, m in zip(tokenized.input_ids, tokenized.output_mask) if m])
    assert output.startswith("<|im_start|>user\n<|vision_start|>")


# ---------------------------------------------------------------------- vectors equal jina's
def test_text_vectors_equal_jina_reference(model, reference, tokenizer):
    texts = ["what is late interaction?", "the cat sat on the mat", "hello"]
    ours = model.encode([{"text": t, "task": "retrieval.passage"} for t in texts])
    ours_multi = model.encode([{"text": t, "task": "retrieval.passage"} for t in texts], return_multivector=True)
    for i, text in enumerate(texts):
        single, multi = jina_reference_vectors(reference, model, jina_text_inputs(tokenizer, "Passage: ", text), image=False)
        torch.testing.assert_close(ours[i], single, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours_multi[i], multi, atol=2e-5, rtol=1e-4)


def test_image_vectors_equal_jina_reference(model, reference, tokenizer):
    images = [make_image(3), make_image(4, width=200, height=50), make_image(5, width=30, height=30)]
    ours = model.encode([{"image": im} for im in images])
    ours_multi = model.encode([{"image": im} for im in images], return_multivector=True)
    for i, image in enumerate(images):
        inputs = jina_image_inputs(model, tokenizer, image)
        single, multi = jina_reference_vectors(reference, model, inputs, image=True)
        torch.testing.assert_close(ours[i], single, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours_multi[i], multi, atol=2e-5, rtol=1e-4)


def test_fused_item_pools_image_and_text_spans(model, reference, tokenizer):
    image = make_image(6)
    processor = model.processor
    items = processor.normalize_items([{"image": image, "text": "a red chart", "task": "retrieval.passage"}], config=model.config)
    (tokenized,) = processor.tokenize_items(items, config=model.config)
    ids = torch.tensor([tokenized.input_ids])
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                        mm_token_type_ids=(ids == model.config.image_token_id).int(), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    text = tokenizer.decode(tokenized.input_ids)
    assert text.endswith("<|vision_end|>Passage: a red chart<|im_end|>\n")
    start = tokenized.input_ids.index(model.config.vision_start_token_id)
    end = tokenized.input_ids.index(model.config.vision_end_token_id)
    n_text = len(tokenizer("Passage: a red chart", add_special_tokens=False)["input_ids"])
    span = list(range(start, end + 1)) + list(range(end + 1, end + 1 + n_text))
    expected = F.normalize(hidden[span].mean(0), dim=-1)
    ours = model.encode([{"image": image, "text": "a red chart", "task": "retrieval.passage"}])[0]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_instructions_change_vectors_but_keep_the_item_pooled(model):
    plain = model.encode(["hello world", {"image": make_image(7)}])
    instructed = model.encode(["hello world", {"image": make_image(7)}], instructions="Find physics papers")
    assert (plain - instructed).abs().max() > 1e-3
    per_item = model.encode([{"text": "hello world", "instructions": "Find physics papers"}, {"image": make_image(7)}])
    torch.testing.assert_close(per_item[0], instructed[0])
    torch.testing.assert_close(per_item[1], plain[1])
    multi = model.encode(["hello world"], instructions="Find physics papers", return_multivector=True)
    (user_turn,) = model.processor.tokenize_items(
        model.processor.normalize_items(["hello world"], instructions="Find physics papers", config=model.config), config=model.config
    )
    assert multi[0].shape[0] == sum(user_turn.output_mask) < len(user_turn)


def test_pool_instruction_tokens_switch(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False, pool_instruction_tokens=True)
    items = model.processor.normalize_items(["hello"], instructions="Be brief", config=model.config)
    (tokenized,) = model.processor.tokenize_items(items, config=model.config)
    assert all(tokenized.output_mask)
    count = lambda text: len(model.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert sum(tokenized.pooling_mask) == count("<|im_start|>system\nBe brief<|im_end|>\n") + count("Query: hello")


# ---------------------------------------------------------------------- item kinds and image sources
def test_every_image_source_gives_the_same_vector(model, tmp_path):
    image = make_image(8)
    data = png_bytes(image)
    path = tmp_path / "page.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    handler = type("Handler", (http.server.BaseHTTPRequestHandler,), {
        "do_GET": lambda self: (self.send_response(200), self.send_header("Content-Type", "image/png"),
                                self.end_headers(), self.wfile.write(data)),
        "log_message": lambda self, *args: None,
    })
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/page.png"
        wrapped = base64.encodebytes(data).decode()  # MIME base64, 76 columns a line (what the `base64` tool prints)
        sources = [image, str(path), path, data, b64, f"data:image/png;base64,{b64}", url, wrapped,
                   f"data:image/png;base64,{wrapped}", url.replace("http://", "HTTP://"),  # schemes ignore case
                   f"DATA:image/png;BASE64,{b64}"]
        vectors = model.encode([{"image": s} for s in sources])
    finally:
        server.shutdown()
    for row in vectors[1:]:
        torch.testing.assert_close(row, vectors[0])


def test_precomputed_image_embeds_equal_the_image(model):
    images = [make_image(9), make_image(10, width=120, height=40)]
    embeds = model.get_image_embeddings(images)
    assert embeds[0]["image_embeds"].shape[1] == model.config.text_config.hidden_size
    direct = model.encode([{"image": im, "task": "retrieval.passage", "text": "caption"} for im in images] + [{"image": images[1]}])
    reused = model.encode(
        [{"image_embeds": e, "task": "retrieval.passage", "text": "caption"} for e in embeds]
        + [{"image_embeds": embeds[1]["image_embeds"], "image_grid_thw": embeds[1]["image_grid_thw"]}]
    )
    torch.testing.assert_close(reused, direct, atol=1e-6, rtol=1e-5)
    mixed = model.encode([{"image": images[0]}, {"image_embeds": embeds[1]}, "text"])
    torch.testing.assert_close(mixed[1], direct[2], atol=1e-6, rtol=1e-5)


def test_each_images_embeds_own_their_memory(model):
    """Keeping or saving one image's embeds (torch.save writes a view's whole storage) must not carry its batch."""
    embeds = model.get_image_embeddings([make_image(11), make_image(12), make_image(13)])
    for entry in embeds:
        for tensor in entry.values():
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_get_image_embeddings_names_an_image_that_cannot_be_resized(model):
    """As encode(): the error names the image, and comes before any batch runs."""
    images = [make_image(15), Image.new("RGB", (2, 900))]
    with pytest.raises(ValueError, match="item 1: image of 2x900 px cannot be resized"):
        model.get_image_embeddings(images, batch_size=1)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, None])
def test_get_image_embeddings_refuses_a_bad_batch_size(model, batch_size):
    """As encode(): a negative batch_size must not return no embeddings at all (every image dropped)."""
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
        model.get_image_embeddings([make_image(14)], batch_size=batch_size)


def test_one_image_given_alone_is_one_image(model, tmp_path):
    """get_image_embeddings(image), as encode(item): a lone path is one image, not a sequence of characters."""
    image = make_image(11)
    path = tmp_path / "page.png"
    image.save(path)
    (expected,) = model.get_image_embeddings([image])
    for alone in (image, str(path), path, path.read_bytes()):
        (got,) = model.get_image_embeddings(alone)
        torch.testing.assert_close(got["image_embeds"], expected["image_embeds"], rtol=0, atol=0)
        assert got["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()


def test_image_processor_pixel_attributes_are_refused_with_the_right_knobs(tiny_nova_dir):
    """jina's code limits pixels on the image processor; here that would be ignored or contradict the token count,
    so it is refused with the knobs that work."""
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    model.processor.image_processor.max_pixels = 28 * 28 * 4
    with pytest.raises(ValueError, match=r"image_processor.max_pixels is set; .* model.config.min_pixels / max_pixels"):
        model.encode([{"image": make_image(5)}])
    del model.processor.image_processor.max_pixels
    model.config.max_pixels = 28 * 28 * 4
    assert model.encode([{"image": make_image(5)}]).shape == (1, model.config.embedding_dim)


def test_pixel_limit_override_is_per_call(model):
    image = make_image(11, width=300, height=300)
    before = model.processor.image_processor.size
    small = model.encode([{"image": image}], return_multivector=True, max_pixels=3136)
    default = model.encode([{"image": image}], return_multivector=True)
    assert small[0].shape[0] < default[0].shape[0]
    assert model.processor.image_processor.size == before
    assert model.config.max_pixels == AutoConfig.from_pretrained(model.config._name_or_path, trust_remote_code=True).max_pixels


# ---------------------------------------------------------------------- outputs
def test_matryoshka_truncates_then_renormalises(model):
    full = model.encode(["hello world", "the cat"])
    for dim in model.config.matryoshka_dims:
        cut = model.encode(["hello world", "the cat"], dimensions=dim)
        assert cut.shape == (2, dim)
        torch.testing.assert_close(cut, F.normalize(full[:, :dim], dim=-1))
    with pytest.raises(ValueError, match="dimensions=5 is not allowed"):
        model.encode(["x"], dimensions=5)


def test_output_formats_agree(model):
    items = ["hello world", {"image": make_image(12)}]
    tensor = model.encode(items)
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.shape == (2, 64)
    torch.testing.assert_close(norms := tensor.norm(dim=-1), torch.ones_like(norms))
    np.testing.assert_allclose(model.encode(items, output="numpy"), tensor.numpy())
    np.testing.assert_allclose(np.array(model.encode(items, output="list")), tensor.numpy())
    decoded = [np.frombuffer(base64.b64decode(s), dtype="<f4") for s in model.encode(items, output="base64")]
    np.testing.assert_array_equal(np.stack(decoded), tensor.numpy())
    multi = model.encode(items, return_multivector=True, output="numpy")
    assert all(m.shape[1] == model.config.multi_vector_projector_dim for m in multi)
    np.testing.assert_allclose(np.linalg.norm(multi[1], axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="output must be one of"):
        model.encode(items, output="arrow")


def test_maxsim_scores_match_a_plain_loop(model):
    queries = model.encode(["late interaction", "cats"], return_multivector=True)
    docs = model.encode(["the cat sat on the mat", {"image": make_image(13)}, "hello"], return_multivector=True)
    scores = model.score_multi_vector(queries, docs, batch_size=2)
    expected = torch.tensor([[float((q @ d.T).max(dim=1).values.sum()) for d in docs] for q in queries])
    torch.testing.assert_close(scores, expected)


def test_maxsim_scores_of_no_queries_or_no_documents_are_empty(model):
    """encode([]) gives [] for multi vectors; scoring it gives an empty matrix, as score_single_vector does."""
    queries = model.encode(["late interaction", "cats"], return_multivector=True)
    assert model.score_multi_vector(queries, []).shape == (2, 0)
    assert model.score_multi_vector([], queries).shape == (0, 2)
    assert model.score_multi_vector([], model.encode([], return_multivector=True)).shape == (0, 0)


# ---------------------------------------------------------------------- batching
def test_results_do_not_depend_on_batch_neighbours_or_order(model):
    items = ["short", "a much longer text about late interaction and retrieval of pages", {"image": make_image(14)},
             {"image": make_image(15, width=150), "text": "fused"}, {"text": "with instruction", "instructions": "Be brief"}]
    together = model.encode(items)
    alone = torch.stack([model.encode([item])[0] for item in items])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    tiny_batches = model.encode(items, batch_size=1)
    torch.testing.assert_close(together, tiny_batches, atol=1e-6, rtol=1e-5)
    budget = model.encode(items, max_batch_tokens=40)
    torch.testing.assert_close(together, budget, atol=1e-6, rtol=1e-5)
    order = [3, 0, 4, 2, 1]
    shuffled = model.encode([items[i] for i in order])
    torch.testing.assert_close(shuffled, together[order], atol=1e-6, rtol=1e-5)


def test_plan_batches_respects_budget_and_covers_every_item(model):
    processor = model.processor
    items = processor.normalize_items(["a " * n for n in (1, 30, 5, 12, 2, 40)], config=model.config)
    tokenized = processor.tokenize_items(items, config=model.config)
    batches = model.plan_batches(tokenized, batch_size=3, max_batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(len(tokenized[i]) for i in batch) <= 60


def test_attention_implementations_and_bf16_agree(tiny_nova_dir, model):
    items = ["hello world", {"image": make_image(16)}, {"text": "x", "instructions": "Be brief"}]
    fp32 = model.encode(items)
    eager = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False, attn_implementation="eager")
    torch.testing.assert_close(eager.encode(items), fp32, atol=1e-5, rtol=1e-4)
    bf16 = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False, dtype=torch.bfloat16)
    out = bf16.encode(items)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out, fp32).min() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_nova_dir, model):
    items = ["hello world", {"image": make_image(17)}, {"text": "x", "instructions": "Be brief"}]
    gpu = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False).to("cuda")
    gpu.gpu_image_preprocessing = "off"  # the same pixels as the CPU model (test_image_preprocessing compares them)
    out = gpu.encode(items)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, model.encode(items), atol=1e-4, rtol=1e-3)
    half = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, dtype=torch.bfloat16).to("cuda")
    assert half.use_packed_attention()  # varlen flash attention on CUDA in bf16
    packed = half.encode(items + [{"image": make_image(18, width=200, height=120), "text": "fused"}])
    half.attention_packing = "off"
    padded = half.encode(items + [{"image": make_image(18, width=200, height=120), "text": "fused"}])
    assert F.cosine_similarity(packed, padded).min() > 0.999


def packed_attention_module():
    """The module whose ``packed_attention_forward`` transformers calls: the last copy of the remote code imported
    registers it, and a test run imports the code from several checkpoint folders, so patch that copy's globals."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return sys.modules[ALL_ATTENTION_FUNCTIONS["nova_flash_varlen"].__module__]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dense_attention_for_long_equal_length_items(tiny_nova_dir, monkeypatch):
    """On CUDA in bf16, equal-length items of DENSE_MIN_LENGTH tokens and more run cuDNN's dense attention;
    their vectors agree with the varlen flash kernel's; unequal lengths keep the varlen kernel."""
    half = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, dtype=torch.bfloat16).to("cuda")
    half.compile_blocks = "off"  # count the kernel's calls (a compiled block would have traced the original)
    modeling = packed_attention_module()
    calls = []
    cudnn = modeling._cudnn_attention
    monkeypatch.setattr(modeling, "_cudnn_attention", lambda *args: calls.append(args[0].shape) or cudnn(*args))
    body = " ".join(["word"] * modeling.DENSE_MIN_LENGTH)
    texts = [f"{letter} {body}" for letter in "abc"]
    lengths = {len(item) for item in half.prepare_items(texts).tokenized}
    assert len(lengths) == 1 and lengths.pop() >= modeling.DENSE_MIN_LENGTH
    dense = half.encode(texts)
    assert calls and all(shape[0] == 3 for shape in calls)
    monkeypatch.setattr(modeling, "DENSE_ATTENTION", False)
    varlen = half.encode(texts)
    assert F.cosine_similarity(dense, varlen).min() > 0.999
    calls.clear()
    monkeypatch.setattr(modeling, "DENSE_ATTENTION", True)
    half.encode(texts + [body + " and more words"])
    assert not calls


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "items,kwargs,message",
    [
        (["ok", {"text": "x", "task": "search"}], {}, "item 1: unknown task 'search'"),
        (["ok", {"txt": "x"}], {}, r"item 1: unknown key\(s\) \['txt'\]"),
        (["ok", {}], {}, "item 1: empty item"),
        (["ok", "   "], {}, "item 1: 'text' is empty"),
        ([{"image": b"not an image"}], {}, "item 0: unreadable image"),
        ([{"image": "no/such/file.png"}], {}, "item 0: 'image' string is neither"),
        ([{"image": 3}], {}, "item 0: 'image' must be"),
        ([{"text": 5}], {}, "item 0: 'text' must be a str"),
        ([42], {}, "item 0: expected a str or a dict"),
        (["ok", {"text": "x", "adapter": "nope"}], {}, "item 1: unknown adapter 'nope'"),
        (["ok", {"text": "x", "instructions": ""}], {}, "item 1: instructions is empty"),
        ([{"image_embeds": torch.zeros(4, 64)}], {}, "item 0: 'image_embeds' needs its 'image_grid_thw'"),
        ([{"image_embeds": torch.zeros(3, 64), "image_grid_thw": [1, 4, 4]}], {}, r"item 0: 'image_embeds' has shape"),
        ([{"image_embeds": {"image_embeds": torch.zeros(4, 64), "image_grid_thw": [1, 4, 4]}, "image_grid_thw": [1, 2, 8]}],
         {}, r"item 0: 'image_grid_thw' \[1, 2, 8\] differs from the grid in 'image_embeds' \[1, 4, 4\]"),
        (["ok"], {"task": "nope"}, "unknown task 'nope'"),
        (["ok"], {"dimensions": 7}, "dimensions=7 is not allowed"),
        (["ok"], {"adapter": 3}, "adapter must be a loaded adapter's name or None, got int 3"),
        (["ok"], {"dimensions": 16, "return_multivector": True}, "single vectors only"),
    ],
)
def test_bad_input_is_named(model, items, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.encode(items, **kwargs)


def test_oversized_image_and_long_text(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False, max_length=12, max_image_pixels=10_000)
    with pytest.raises(ValueError, match="item 1: image of 200x100 px is over the limit"):
        model.encode(["ok", {"image": make_image(18, width=200, height=100)}])
    long_text = "the cat sat on the mat " * 10
    with pytest.raises(ValueError, match="item 0: .* over the maximum of 12"):
        model.encode([long_text])
    with pytest.warns(UserWarning, match="item 0: truncated"):
        cut = model.encode([long_text], truncate=True, return_multivector=True)
    assert cut[0].shape[0] == 12
    with pytest.warns(UserWarning, match="truncated"):
        instructed = model.processor.tokenize_items(
            model.processor.normalize_items([long_text], instructions="Be", config=model.config),
            config=model.config, truncate=True, max_length=40,
        )
    assert len(instructed[0]) == 40 and model.processor.tokenizer.decode(instructed[0].input_ids).endswith("<|im_end|>\n")


@pytest.mark.parametrize("truncate", [False, True])
def test_an_image_over_the_token_limit_is_told_to_use_fewer_pixels(model, monkeypatch, truncate):
    """An image item has no text to cut: its error names max_pixels, never "pass truncate=True to cut the text"."""
    image = make_image(19, width=300, height=200)
    tokens = len(model.prepare_items([image]).tokenized[0])
    monkeypatch.setattr(model.config, "max_length", tokens - 1)
    with pytest.raises(ValueError, match="item 1: .*no text to cut.*max_pixels") as error:
        model.encode(["ok", image], truncate=truncate)
    assert "pass truncate=True" not in str(error.value)
    assert model.encode([image], max_pixels=model.config.min_pixels).shape == (1, model.config.text_config.hidden_size)


@pytest.mark.parametrize("instructions", [None, "Find rivers"])
def test_truncation_never_cuts_into_the_task_prefix(model, monkeypatch, instructions):
    """truncate=True cuts the text only: an item whose overshoot is as long as its text is refused, not embedded as
    its prefix alone ("Query:")."""
    item = {"text": "hello", "instructions": instructions}
    prepared = model.prepare_items([item]).tokenized[0]
    text_tokens = len(model.processor.tokenizer("hello", add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(model.config, "max_length", len(prepared) - text_tokens)
    with pytest.raises(ValueError, match="item 0: .* its text is too short to cut"):
        model.encode([item], truncate=True)
    monkeypatch.setattr(model.config, "max_length", len(prepared) - text_tokens + 1)  # one text token is left
    with pytest.warns(UserWarning, match="item 0: truncated"):
        cut = model.prepare_items([item], truncate=True).tokenized[0]
    pooled = model.processor.tokenizer.decode([t for t, p in zip(cut.input_ids, cut.pooling_mask) if p])
    assert pooled == "Query: " + model.processor.tokenizer.decode(
        model.processor.tokenizer("hello", add_special_tokens=False)["input_ids"][:1])


# ---------------------------------------------------------------------- packed (variable-length) attention
def test_pictures_are_batched_a_few_at_a_time_with_the_same_vectors(model):
    """A batch holds at most PICTURES_PER_BATCH pictures (their preprocessing pipelines with the GPU); precomputed
    image embeddings are not pictures; vectors equal one-by-one encodes, in order."""
    PICTURES_PER_BATCH = sys.modules[type(model).__module__].PICTURES_PER_BATCH  # the remote-code module
    pages = [{"image": make_image(40 + i, width=60 + 4 * i)} for i in range(PICTURES_PER_BATCH * 2 + 3)]
    embeds = model.get_image_embeddings([make_image(70)])
    items = pages[:5] + ["a text between pages", {"image_embeds": embeds[0]}] + pages[5:]
    prepared = model.prepare_items(items)
    batches = model.plan_batches(prepared.tokenized, batch_size=64, max_batch_tokens=10**6)
    pictures = [sum(prepared.tokenized[i].item.image is not None for i in batch) for batch in batches]
    assert max(pictures) == PICTURES_PER_BATCH and sum(pictures) == len(pages)
    assert sorted(i for batch in batches for i in batch) == list(range(len(items)))
    together = model.encode(items)
    alone = torch.stack([model.encode([item])[0] for item in items])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def test_packed_and_padded_paths_agree(model):
    """attention_packing="on" runs the packed path (per-sequence SDPA on CPU, varlen flash on CUDA)."""
    items = ["short", "a much longer text about late interaction and retrieval of pages", {"image": make_image(30)},
             {"image": make_image(31, width=150), "text": "fused", "task": "retrieval.passage"},
             {"text": "with instruction", "instructions": "Be brief"}]
    model.attention_packing = "off"
    padded, padded_multi = model.encode(items), model.encode(items, return_multivector=True)
    try:
        model.attention_packing = "on"
        packed, packed_multi = model.encode(items), model.encode(items, return_multivector=True)
        budget = model.encode(items, max_batch_tokens=40)
        embeds = model.get_image_embeddings([make_image(30)])
    finally:
        model.attention_packing = "auto"
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(budget, padded, atol=1e-5, rtol=1e-4)
    for a, b in zip(packed_multi, padded_multi):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode([{"image_embeds": embeds[0]}])[0], padded[2], atol=1e-5, rtol=1e-4)


def sdpa_kernel(q, k, v, causal, scaling):
    """What cuDNN's dense attention computes, on the CPU."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_dense_attention_of_equal_length_items_equals_per_sequence(model, causal, kv_heads):
    """A packed row of equal-length items viewed as a dense batch (grouped KV heads repeated) gives what each
    sequence gives alone, in the (1, tokens, heads, dim) layout of the varlen path."""
    modeling = sys.modules[type(model).__module__]
    torch.manual_seed(0)
    items, length, heads, dim = 3, 7, 4, 8
    # transformers' layout: projections viewed (1, tokens, heads, dim) then transposed to (1, heads, tokens, dim)
    query, key, value = (torch.randn(1, items * length, h, dim).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
    dense = modeling.dense_attention(query, key, value, items, causal, 0.3, sdpa_kernel)
    bounds = list(range(0, items * length + 1, length))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    expected = modeling._attention_per_sequence(q, k, v, bounds, causal, 0.3)
    assert dense.shape == (1, items * length, heads, dim)
    torch.testing.assert_close(dense[0], expected, atol=1e-6, rtol=1e-5)


def test_long_rows_take_dense_attention_only_when_their_items_have_one_length(model, monkeypatch):
    """The model's packed path, with every row treated as long (as on CUDA past DENSE_MIN_LENGTH): equal-length
    items run the dense kernel, a row of unequal lengths the varlen one; both give the padded path's vectors."""
    modeling = packed_attention_module()
    candidates = [f"text number {n} about retrieval" for n in range(40)]
    by_length: dict[int, list[str]] = {}
    for text, item in zip(candidates, model.prepare_items(candidates).tokenized):
        by_length.setdefault(len(item), []).append(text)
    equal = max(by_length.values(), key=len)[:3]  # distinct texts, one token count
    assert len(equal) == 3
    unequal = equal[:2] + ["a longer text than the others, with quite a few more words in it"]
    model.attention_packing = "off"
    try:
        expected = {"equal": model.encode(equal), "unequal": model.encode(unequal)}
        model.attention_packing = "on"
        dense_calls = []
        monkeypatch.setattr(modeling, "_may_run_dense", lambda query, max_length: True)
        monkeypatch.setattr(modeling, "_cudnn_attention",
                            lambda q, *args: dense_calls.append(q.shape[0]) or sdpa_kernel(q, *args))
        got_equal = model.encode(equal)
        assert dense_calls and set(dense_calls) == {3}
        dense_calls.clear()
        got_unequal = model.encode(unequal)
        assert not dense_calls
    finally:
        model.attention_packing = "auto"
    torch.testing.assert_close(got_equal, expected["equal"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_unequal, expected["unequal"], atol=1e-5, rtol=1e-4)


def test_packed_batches_count_real_tokens(model):
    processor = model.processor
    tokenized = processor.tokenize_items(processor.normalize_items(["a " * n for n in (1, 30, 5, 12, 2, 40)], config=model.config),
                                         config=model.config)
    batches = model.plan_batches(tokenized, batch_size=64, max_batch_tokens=60, padded=False)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or sum(len(tokenized[i]) for i in batch) <= 60


def test_compiled_layers_give_the_same_vectors(tiny_nova_dir, model):
    """Regional compilation wiring (dynamo tracing, eager backend to keep CPU tests fast)."""
    items = ["hello world", {"image": make_image(32)}, {"text": "x", "instructions": "Be brief"}]
    expected = model.encode(items)
    compiled = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    compiled.compile_layers(backend="eager")
    torch.testing.assert_close(compiled.encode(items), expected, atol=1e-5, rtol=1e-4)
    compiled.attention_packing = "on"
    torch.testing.assert_close(compiled.encode(items), expected, atol=1e-5, rtol=1e-4)


def test_compiling_by_default_only_on_cuda_in_half_precision(tiny_nova_dir):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    assert model.compile_blocks == "auto" and not model.should_compile()  # CPU float32: eager
    model.encode(["x"])
    assert not any(getattr(block, "_compiled_call_impl", None) for block in model.model.language_model.layers)
    bf16 = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False, dtype=torch.bfloat16)
    assert not bf16.should_compile()  # half precision, but not on CUDA
    model.compile_blocks = "bogus"
    with pytest.raises(ValueError, match="compile_blocks must be"):
        model.should_compile()


def test_compile_blocks_on_compiles_once_and_keeps_vectors(tiny_nova_dir, model):
    items = ["hello world", {"text": "x", "instructions": "Be brief"}]
    expected = model.encode(items)
    compiled = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    compiled.compile_blocks = "on"
    calls = []
    original = compiled.compile_layers
    compiled.compile_layers = lambda **kw: (calls.append(kw), original(backend="eager"))[1]
    assert compiled.warmup(text_lengths=(4, 9), images=1) > 0
    torch.testing.assert_close(compiled.encode(items), expected, atol=1e-5, rtol=1e-4)
    assert len(calls) == 1
    assert all(getattr(block, "_compiled_call_impl", None) for block in compiled.model.language_model.layers)


def test_first_calls_from_several_threads_compile_once(tiny_nova_dir, model):
    """A server's first requests arrive together: the blocks are compiled by one of them, not by each."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    compiled = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    compiled.compile_blocks = "on"
    calls, original = [], compiled.compile_layers
    compiled.compile_layers = lambda **kw: (calls.append(kw), time.sleep(0.3), original(backend="eager"))[2]
    texts = [f"text number {i}" for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        vectors = list(pool.map(lambda text: compiled.encode([text]), texts))
    assert len(calls) == 1
    plain = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    torch.testing.assert_close(torch.cat(vectors), plain.encode(texts), atol=1e-5, rtol=1e-4)


def test_prepared_items_give_the_same_vectors_and_join(model):
    """prepare_items + encode (a server's or corpus pipeline's split) equals encode on the raw items, joined or not."""
    items = [{"text": "alpha beta", "task": "retrieval.query"}, {"image": make_image(2), "text": "page"},
             {"text": "gamma", "instructions": "Find code."}]
    expected = model.encode(items, task="text-matching")
    first = model.prepare_items(items[:1], task="text-matching")
    rest = model.prepare_items(items[1:], task="text-matching")
    assert len(first) == 1 and len(rest) == 2
    torch.testing.assert_close(model.encode(first + rest), expected, rtol=0, atol=1e-6)
    multi = model.encode(first + rest, return_multivector=True)
    for mine, theirs in zip(multi, model.encode(items, task="text-matching", return_multivector=True)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_prepared_items_refuse_formatting_arguments_and_mixed_limits(model):
    prepared = model.prepare_items(["alpha"])
    with pytest.raises(ValueError, match=r"\['task'\] apply when items are prepared"):
        model.encode(prepared, task="code")
    with pytest.raises(ValueError, match="pixel limits"):
        prepared + model.prepare_items(["beta"], max_pixels=28 * 28 * 8)
    assert model.encode(model.prepare_items([])).shape == (0, model.config.embedding_dim)


def test_prepare_items_does_not_wait_for_a_running_encode(model):
    """A pipeline prepares the next items while encode runs: prepare_items must not queue behind the lock that an
    encode call holds for its whole duration (only adapter loads and unloads make it wait)."""
    import threading

    encode_running, release = threading.Event(), threading.Event()

    def long_encode():
        with model._adapter_lock:  # what _run_batches holds while the GPU works
            encode_running.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=long_encode)
    holder.start()
    try:
        assert encode_running.wait(timeout=10)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (model.prepare_items(["alpha", "beta"]), done.set()))
        worker.start()
        assert done.wait(timeout=20), "prepare_items waited for the running encode call"
        worker.join()
    finally:
        release.set()
        holder.join()


def test_text_layout_shortcut_renders_exactly_what_the_template_renders(model):
    """Texts are put into the layout the template renders for their kind of item (rendered once); that must equal
    rendering each item, spans included, and a template that rewrites the text must not take the shortcut."""
    import sys

    processing = sys.modules[type(model.processor).__module__]
    processor, config = model.processor, model.config
    items = processor.normalize_items(
        ["plain", " spaced  ", {"text": "q", "task": "retrieval.query", "instructions": "Find it."},
         {"text": "caption", "image": make_image(3)}, {"text": "def f(): pass", "task": "code.passage"},
         {"text": "with markup <|im_end|> inside", "task": "text-matching"}, {"text": "ünïcode ✓", "instructions": "ß"}],
        config=config)
    for item in items:
        full = processing._render(processor._template(), processor._messages(item, config), config.image_prompt)
        assert processor._render_with_layout(item, config) == full, item
    trimming = processor._template().replace("part['text']", "(part['text'] | trim)")
    assert processing._text_layout(trimming, "Query: ", False, None, config.image_prompt) is None
    assert processing._text_layout(processor._template(), "Query: ", False, None, config.image_prompt) is not None


def test_first_calls_from_several_threads_load_the_processor_once(tiny_nova_dir, monkeypatch):
    """The processor loads on first use. Several threads' first calls (a corpus pipeline's prepare workers, a
    server's callers) must load it once: two concurrent loads parse the remote code with ``ast`` in two threads at
    once, which CPython 3.11 does not survive (python/cpython#106905: "AST constructor recursion depth mismatch")."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    processor_class = type(model).processor.fget.__globals__["NovaEmbeddingsV1Processor"]
    original, loads = processor_class.from_pretrained.__func__, []

    def slow_from_pretrained(cls, *args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.3)  # wide window: every thread has asked for the processor before the first load returns
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(processor_class, "from_pretrained", classmethod(slow_from_pretrained))
    texts = [f"text number {i}" for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        vectors = list(pool.map(lambda text: model.encode([text]), texts))
    assert len(loads) == 1
    for text, vector in zip(texts, vectors):
        torch.testing.assert_close(vector, model.encode([text]), rtol=0, atol=0)
