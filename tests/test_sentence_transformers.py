"""sentence-transformers loads the repository natively and gives what model.encode gives (float32, 1e-5).

The converted tiny repository (tiny_nova_dir) carries modules.json, config_sentence_transformers.json and the module
file as the converter writes them; saved copies (ST's save and the model's save_pretrained) load the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from transformers import AutoModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_image  # noqa: E402

ATOL = 1e-5
TEXTS = ["what is late interaction?", "rivers of Europe", "a much longer passage about the Danube and the Rhine"]


@pytest.fixture(scope="module")
def st_model(tiny_nova_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(tiny_nova_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def model(tiny_nova_dir: Path):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def mixed_items() -> tuple[list, list]:
    """The same mixed batch as ST inputs and as model.encode items."""
    image, other = make_image(1), make_image(2, width=56, height=84)
    st_inputs = ["a text", image, {"text": "a caption", "image": other}, "another text"]
    items = ["a text", {"image": image}, {"text": "a caption", "image": other}, "another text"]
    return st_inputs, items


def close(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=ATOL, rtol=0)


def test_the_repository_loads_as_one_nova_module(st_model: SentenceTransformer) -> None:
    assert [type(module).__name__ for module in st_model] == ["NovaEmbeddingsV1Module"]
    assert st_model.similarity_fn_name == "cosine"
    assert st_model.prompts == {"query": "Query: ", "document": "Passage: "}
    assert st_model.get_embedding_dimension() == 64


def test_untrusted_code_is_refused(tiny_nova_dir: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tiny_nova_dir))


def test_texts_images_fused_and_mixed_batches_equal_encode(st_model, model) -> None:
    st_inputs, items = mixed_items()
    close(st_model.encode(st_inputs, convert_to_tensor=True), model.encode(items))
    close(st_model.encode(st_inputs, batch_size=1, convert_to_tensor=True), model.encode(items))
    close(st_model.encode(TEXTS, convert_to_tensor=True), model.encode(TEXTS))
    assert st_model.encode(TEXTS[0]).shape == (64,)  # one input, one vector (numpy)


def test_encode_query_and_document_use_the_retrieval_tasks(st_model, model) -> None:
    st_inputs, items = mixed_items()
    close(st_model.encode_query(st_inputs, convert_to_tensor=True), model.encode_query(items))
    close(st_model.encode_document(st_inputs, convert_to_tensor=True), model.encode_document(items))
    # the two sides really differ (prefix and adapter), so the equalities above are not trivial
    assert not torch.allclose(model.encode_query(TEXTS), model.encode_document(TEXTS), atol=1e-3)


@pytest.mark.parametrize("task", ["text-matching", "code.query", "code.passage", "retrieval"])
def test_task_keyword_selects_the_task(st_model, model, task: str) -> None:
    close(st_model.encode(TEXTS, task=task, convert_to_tensor=True), model.encode(TEXTS, task=task))


def test_prompts_select_a_task_or_become_instructions(st_model, model) -> None:
    close(st_model.encode(TEXTS, prompt="Passage: ", convert_to_tensor=True), model.encode(TEXTS, task="retrieval.passage"))
    close(st_model.encode(TEXTS, prompt="Query: ", convert_to_tensor=True), model.encode(TEXTS, task="retrieval"))
    instructions = "Find passages about European geography"
    close(st_model.encode_query(TEXTS, prompt=instructions, convert_to_tensor=True),
          model.encode_query(TEXTS, instructions=instructions))
    close(st_model.encode(TEXTS, instructions=instructions, task="text-matching", convert_to_tensor=True),
          model.encode(TEXTS, instructions=instructions, task="text-matching"))
    with pytest.raises(ValueError, match="prefix of tasks"):
        st_model.encode_query(TEXTS, prompt="Passage: ")
    with pytest.raises(ValueError, match="one way only"):
        st_model.encode(TEXTS, prompt="Find things", instructions="Find other things")


def test_item_keys_and_chat_messages(st_model, model) -> None:
    items = [{"text": "q", "task": "code.query", "instructions": "Find Python"}, {"text": "d", "adapter": None}]
    close(st_model.encode(items, convert_to_tensor=True), model.encode(items))
    image = make_image(3)
    messages = [[{"role": "system", "content": "Find charts"},
                 {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "revenue"}]}],
                [{"role": "user", "content": "plain text"}]]
    close(st_model.encode(messages, convert_to_tensor=True),
          model.encode([{"text": "revenue", "image": image, "instructions": "Find charts"}, "plain text"]))


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                  {"type": "video", "video": "clip.mp4"}])
def test_a_message_part_the_model_cannot_embed_is_refused_not_dropped(st_model, part: dict) -> None:
    messages = [[{"role": "user", "content": [{"type": "text", "text": "revenue"}, part]}]]
    with pytest.raises(ValueError, match=f"item 0: .*{part['type']!r}"):
        st_model.encode(messages)


def test_a_second_system_turn_is_refused_not_dropped(st_model) -> None:
    messages = [[{"role": "system", "content": "Find charts"}, {"role": "system", "content": "Find tables"},
                 {"role": "user", "content": "revenue"}]]
    with pytest.raises(ValueError, match="item 0: messages must be an optional system turn"):
        st_model.encode(messages)


def test_adapter_keyword(st_model, model) -> None:
    close(st_model.encode(TEXTS, adapter=None, convert_to_tensor=True), model.encode(TEXTS, adapter=None))
    assert not torch.allclose(model.encode(TEXTS, adapter=None), model.encode(TEXTS), atol=1e-3)
    with pytest.raises(ValueError, match="unknown adapter"):
        st_model.encode(TEXTS, adapter="nope")


def test_similarity_is_cosine(st_model, model) -> None:
    queries, documents = st_model.encode_query(TEXTS), st_model.encode_document(TEXTS)
    close(st_model.similarity(queries, documents), model.encode_query(TEXTS) @ model.encode_document(TEXTS).T)


def test_matryoshka_truncation_is_renormalised(tiny_nova_dir: Path, st_model, model) -> None:
    close(st_model.encode(TEXTS, dimensions=32, convert_to_tensor=True), model.encode(TEXTS, dimensions=32))
    truncated = SentenceTransformer(str(tiny_nova_dir), trust_remote_code=True, truncate_dim=16)
    vectors = truncated.encode_query(TEXTS, convert_to_tensor=True)
    close(vectors, model.encode_query(TEXTS, dimensions=16))
    close(vectors.norm(dim=-1), torch.ones(len(TEXTS)))
    with truncated.truncate_embeddings(32):
        close(truncated.encode(TEXTS, convert_to_tensor=True), model.encode(TEXTS, dimensions=32))
    with pytest.raises(ValueError, match="dimensions=20 is not allowed"):
        st_model.encode(TEXTS, dimensions=20)


def test_token_embeddings_are_the_multi_vectors_without_the_system_turn(st_model, model) -> None:
    st_inputs, items = mixed_items()
    instructions = "Find pages about rivers"
    got = st_model.encode(st_inputs, output_value="token_embeddings", prompt=instructions)
    want = model.encode(items, return_multivector=True, instructions=instructions)
    longer = st_model.encode(st_inputs, output_value="token_embeddings", prompt=instructions + " and lakes " * 5)
    for g, w, other in zip(got, want, longer):
        assert g.shape == w.shape == other.shape  # the system turn adds no vectors, however long it is
        close(g, w)


def test_saved_models_load_in_sentence_transformers(st_model, model, tmp_path: Path) -> None:
    st_model.save(str(tmp_path / "st"))
    reloaded = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True)
    close(reloaded.encode_query(TEXTS, convert_to_tensor=True), model.encode_query(TEXTS))
    assert reloaded.prompts == st_model.prompts
    model.save_pretrained(tmp_path / "hf")
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_transformers_nova_embeddings_v1.py"):
        assert (tmp_path / "hf" / name).is_file()
    from_save_pretrained = SentenceTransformer(str(tmp_path / "hf"), trust_remote_code=True)
    close(from_save_pretrained.encode_document(TEXTS, convert_to_tensor=True), model.encode_document(TEXTS))


def test_multi_vector_encoder_built_on_the_module(st_model, model) -> None:
    """MultiVectorEncoder(repo) cannot convert a checkpoint without a stock Transformer module (and a repository has
    one ST model_type); built on the loaded module it scores by MaxSim exactly as score_multi_vector."""
    from sentence_transformers import MultiVectorEncoder

    mv = MultiVectorEncoder(modules=[st_model[0]], prompts=st_model.prompts)
    st_inputs, items = mixed_items()
    queries, documents = mv.encode_query(TEXTS), mv.encode_document(st_inputs)
    for got, want in zip(documents, model.encode_document(items, return_multivector=True)):
        close(got, want)
    want = model.score_multi_vector(model.encode_query(TEXTS, return_multivector=True),
                                    model.encode_document(items, return_multivector=True))
    close(mv.similarity(queries, documents), want)


def test_threads_mixing_st_and_encode_on_one_model_get_serial_results(st_model) -> None:
    """sentence-transformers' forward and the model's own encode, from several threads on the same model: each
    routes its rows to other adapters, and none sees the other's routing."""
    from concurrent.futures import ThreadPoolExecutor

    nova = st_model[0].model
    jobs = [("st", TEXTS), ("encode", [{"text": t, "task": "code.passage"} for t in TEXTS])] * 6

    def run(job):
        kind, inputs = job
        if kind == "st":
            return st_model.encode_query(inputs, convert_to_tensor=True, batch_size=1).cpu()
        return nova.encode(inputs)

    expected = [run(job) for job in jobs[:2]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    for index, result in enumerate(results):
        close(result, expected[index % 2])


def test_max_seq_length_cuts_longer_texts_with_a_warning(tiny_nova_dir: Path, model) -> None:
    """sentence-transformers' knob: `model.max_seq_length = N` cuts longer inputs to N tokens (encode's truncation,
    which warns), and the vectors are encode's with truncate=True at that length."""
    st = SentenceTransformer(str(tiny_nova_dir), trust_remote_code=True)
    assert st.max_seq_length == model.config.max_length
    long_text, short_text = " ".join(f"word{i}" for i in range(200)), "short"
    st.max_seq_length = 32
    assert st.max_seq_length == 32
    with pytest.warns(UserWarning, match=r"item 0: truncated from \d+ to 32 tokens"):
        vectors = st.encode([long_text, short_text], convert_to_tensor=True)
    processor = model.processor
    expected_items = processor.tokenize_items(processor.normalize_items([long_text, short_text], config=model.config),
                                              config=model.config, max_length=32, truncate=True)
    assert len(expected_items[0]) == 32
    with torch.no_grad():
        batch = processor.collate(expected_items, min_pixels=model.config.min_pixels, max_pixels=model.config.max_pixels)
        expected = model(**batch, adapter_names=[model.resolve_adapter(t.item) for t in expected_items]).single_vector
    close(vectors.cpu(), expected)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_seq_length must be a positive integer"):
            st.max_seq_length = bad
    with pytest.raises(ValueError, match="over the model's max_length"):
        st.max_seq_length = model.config.max_length + 1
