"""The README's vector-database example: output="numpy" vectors in a local usearch index, queried by cosine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel

usearch_index = pytest.importorskip("usearch.index")

DOCUMENTS = ["The Danube flows into the Black Sea.", "Late interaction scores every query token.",
             "Paris is the capital of France.", "Sorting a list in place with xs.sort()."]
QUERIES = ["which river ends in the Black Sea?", "how do I sort a Python list?"]


def test_usearch_index_returns_the_exact_cosine_ranking(tiny_nova_dir: Path, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    vectors = model.encode_document(DOCUMENTS, output="numpy")  # (4, dim) float32, L2-normalised
    index = usearch_index.Index(ndim=vectors.shape[1], metric="cos", dtype="f32")
    index.add(np.arange(len(DOCUMENTS)), vectors)
    index.save(str(tmp_path / "documents.usearch"))
    restored = usearch_index.Index.restore(str(tmp_path / "documents.usearch"))

    queries = model.encode_query(QUERIES, output="numpy")
    exact = queries @ vectors.T  # cosine: the vectors are normalised
    for query, scores in zip(queries, exact):
        matches = restored.search(query, len(DOCUMENTS))
        assert list(matches.keys) == list(np.argsort(-scores, kind="stable"))
        np.testing.assert_allclose(1 - matches.distances, np.sort(scores)[::-1], atol=1e-5)
