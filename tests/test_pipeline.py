"""pipeline("feature-extraction", model=repo, trust_remote_code=True) runs encode(), never the stock pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_image  # noqa: E402

TEXTS = ["what is late interaction?", "rivers of Europe"]


@pytest.fixture(scope="module")
def pipe(tiny_nova_dir: Path):
    return pipeline("feature-extraction", model=str(tiny_nova_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def model(tiny_nova_dir: Path):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def test_the_repository_registers_its_pipeline(pipe, tiny_nova_dir: Path) -> None:
    assert type(pipe).__name__ == "NovaEmbeddingsPipeline"
    # without a task the repository's only custom pipeline is chosen
    assert type(pipeline(model=str(tiny_nova_dir), trust_remote_code=True)).__name__ == "NovaEmbeddingsPipeline"


def test_one_text_gives_its_encode_vector(pipe, model) -> None:
    vector = pipe(TEXTS[0])
    assert isinstance(vector, list) and len(vector) == 64  # a pooled vector, not per-token hidden states
    torch.testing.assert_close(torch.tensor(vector), model.encode(TEXTS[:1])[0], atol=1e-6, rtol=0)


def test_a_mixed_list_gives_encode_vectors_in_order(pipe, model) -> None:
    items = [TEXTS[0], {"image": make_image(1)}, {"text": "caption", "image": make_image(2), "task": "retrieval.passage"}]
    got = torch.stack(pipe(items, return_tensors=True))
    torch.testing.assert_close(got, model.encode(items), atol=1e-6, rtol=0)
    got = torch.stack(pipe(items, task="text-matching", instructions="Find rivers", return_tensors=True))
    torch.testing.assert_close(got, model.encode(items, task="text-matching", instructions="Find rivers"), atol=1e-6, rtol=0)


def test_multi_vectors_and_dimensions(pipe, model) -> None:
    got = pipe(TEXTS[1], return_multivector=True, return_tensors=True)
    torch.testing.assert_close(got, model.encode(TEXTS[1:], return_multivector=True)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(pipe(TEXTS[1], dimensions=16)), model.encode(TEXTS[1:], dimensions=16)[0],
                               atol=1e-6, rtol=0)


def test_a_generator_with_batch_size_gives_encode_vectors(pipe, model, tiny_nova_dir: Path) -> None:
    """transformers' way of running a pipeline over a stream (a generator or a dataset) with encode's batch_size."""
    want = model.encode(TEXTS, task="code.query")
    got = torch.tensor(list(pipe((text for text in TEXTS), batch_size=2, task="code.query")))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    batched = pipeline("feature-extraction", model=str(tiny_nova_dir), trust_remote_code=True, batch_size=2)
    torch.testing.assert_close(torch.tensor(list(batched((text for text in TEXTS), task="code.query"))), want,
                               atol=1e-6, rtol=0)


def test_unknown_arguments_and_untrusted_code_are_refused(pipe, tiny_nova_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['truncation'\]"):
        pipe(TEXTS[0], truncation=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("feature-extraction", model=str(tiny_nova_dir), trust_remote_code=False)
