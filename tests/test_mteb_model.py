"""nova_embeddings.mteb_model on mteb's offline mock tasks (no downloads), and its encode against model.encode."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

mteb = pytest.importorskip("mteb")
from datasets import Dataset  # noqa: E402
from mteb.mocks.mock_tasks import (  # noqa: E402
    MockAny2AnyRetrievalT2ITask, MockInstructionRetrieval, MockRetrievalTask, MockSTSTask,
)
from mteb.types import PromptType  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModel  # noqa: E402

from nova_embeddings.mteb_model import nova_encoder, nova_model_meta  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_image  # noqa: E402

TEXTS = ["what is late interaction?", "rivers of Europe", "sort a list in place"]


@pytest.fixture(scope="module")
def model(tiny_nova_dir: Path):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def loader(columns: dict[str, list]) -> DataLoader:
    return DataLoader(Dataset.from_dict(columns), batch_size=2, collate_fn=lambda rows: {
        key: [row[key] for row in rows] for key in rows[0]})


def encode(encoder, columns: dict[str, list], task, prompt_type):
    return encoder.encode(loader(columns), task_metadata=task.metadata, hf_split="test", hf_subset="default",
                          prompt_type=prompt_type)


def test_meta_describes_the_model(tiny_nova_dir: Path) -> None:
    meta = nova_model_meta(str(tiny_nova_dir))
    assert meta.loader_kwargs == {"vector_type": "single_vector"} and meta.similarity_fn_name == "cosine"
    assert nova_model_meta(str(tiny_nova_dir), vector_type="multi_vector").similarity_fn_name == "MaxSim"
    with pytest.raises(ValueError, match="vector_type"):
        nova_encoder(str(tiny_nova_dir), vector_type="colbert")


def test_encode_maps_sides_and_instructions_to_the_model(tiny_nova_dir: Path, model) -> None:
    encoder = nova_encoder(str(tiny_nova_dir))
    retrieval = MockRetrievalTask()
    got = encode(encoder, {"text": TEXTS}, retrieval, PromptType.query)
    torch.testing.assert_close(torch.from_numpy(got), model.encode(TEXTS, task="retrieval.query"), atol=1e-6, rtol=0)
    got = encode(encoder, {"text": TEXTS}, retrieval, PromptType.document)
    torch.testing.assert_close(torch.from_numpy(got), model.encode(TEXTS, task="retrieval.passage"), atol=1e-6, rtol=0)
    got = encode(encoder, {"text": TEXTS}, MockSTSTask(), None)
    torch.testing.assert_close(torch.from_numpy(got), model.encode(TEXTS, task="text-matching"), atol=1e-6, rtol=0)
    # an instruction-retrieval query: mteb's glued "text" is ignored, the instruction becomes the system turn
    instructions = ["Find rivers", "Find code", "Find physics"]
    columns = {"text": [f"{t} {i}" for t, i in zip(TEXTS, instructions)], "query": TEXTS, "instruction": instructions}
    got = encode(encoder, columns, MockInstructionRetrieval(), PromptType.query)
    want = model.encode([{"text": t, "instructions": i} for t, i in zip(TEXTS, instructions)], task="retrieval.query")
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-6, rtol=0)
    images = [make_image(1), make_image(2)]
    got = encode(encoder, {"image": images}, MockAny2AnyRetrievalT2ITask(), PromptType.document)
    want = model.encode([{"image": image} for image in images], task="retrieval.passage")
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-6, rtol=0)


def test_multi_vectors_score_by_maxsim(tiny_nova_dir: Path, model) -> None:
    encoder = nova_encoder(str(tiny_nova_dir), vector_type="multi_vector")
    queries = encode(encoder, {"text": TEXTS[:2]}, MockRetrievalTask(), PromptType.query)
    documents = encode(encoder, {"text": TEXTS}, MockRetrievalTask(), PromptType.document)
    want = model.score_multi_vector(model.encode(TEXTS[:2], task="retrieval.query", return_multivector=True),
                                    model.encode(TEXTS, task="retrieval.passage", return_multivector=True))
    torch.testing.assert_close(encoder.similarity(queries, documents), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("vector_type", ["single_vector", "multi_vector"])
def test_mock_tasks_run_end_to_end(tiny_nova_dir: Path, vector_type: str) -> None:
    encoder = nova_encoder(str(tiny_nova_dir), vector_type=vector_type)
    tasks = [MockRetrievalTask(), MockInstructionRetrieval(), MockAny2AnyRetrievalT2ITask()]
    tasks += [MockSTSTask()] if vector_type == "single_vector" else []
    results = mteb.evaluate(encoder, tasks, cache=None)
    scores = {result.task_name: result.get_score() for result in results.task_results}
    assert sorted(scores) == sorted(task.metadata.name for task in tasks)
    assert all(math.isfinite(score) for score in scores.values())
