"""nova-embeddings-v1 in mteb (2.x): an encoder following mteb's protocol and the ``ModelMeta`` that loads it.

    import mteb
    from nova_embeddings.mteb_model import nova_model_meta

    model = nova_model_meta("path/to/nova-embeddings-v1").load_model()  # mteb checks its "image" extra (torchvision)
    model = nova_encoder("path/to/nova-embeddings-v1")                   # the same, without that check
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["NFCorpus"]))

Each mteb input row becomes one ``model.encode`` item: text, image, or both fused in one item. The task follows
the side and the domain, as jina's own mteb wrapper chooses it: queries ``retrieval.query``, documents
``retrieval.passage`` (``code.query``/``code.passage`` for programming tasks), symmetric tasks (STS,
classification, clustering) ``text-matching``. A query's own instruction (mteb's instruction-retrieval tasks) becomes
the item's ``instructions`` (the system turn), not text glued to the query; ``task_instructions=True`` also gives every
query the task's description as instructions. ``vector_type="multi_vector"`` scores by MaxSim.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_implementations.jina_models import get_programming_task_override
from mteb.types import PromptType
from transformers import AutoModel

VECTOR_TYPES = ("single_vector", "multi_vector")


class NovaEmbeddingsEncoder(AbsEncoder):
    """mteb's encoder protocol over ``model.encode``."""

    def __init__(self, model_name: str, revision: str | None = None, *,
                 vector_type: Literal["single_vector", "multi_vector"] = "single_vector",
                 dimensions: int | None = None, task_instructions: bool = False, device: str | None = None,
                 dtype: torch.dtype | None = None, **model_kwargs: Any):
        if vector_type not in VECTOR_TYPES:
            raise ValueError(f"vector_type must be one of {VECTOR_TYPES}, got {vector_type!r}")
        self.model = AutoModel.from_pretrained(model_name, trust_remote_code=True, revision=revision, dtype=dtype,
                                               **model_kwargs)
        if device is not None:
            self.model.to(device)
        self.vector_type = vector_type
        self.dimensions = dimensions
        self.task_instructions = task_instructions

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any):
        """All rows of mteb's data loader, encoded in one ``model.encode`` call (it batches by length)."""
        items = [item for batch in inputs for item in self.batch_items(batch)]
        task = self.nova_task(task_metadata, prompt_type)
        if self.task_instructions and prompt_type == PromptType.query:
            instruction = self.get_instruction(task_metadata, prompt_type)
            for item in items:
                item.setdefault("instructions", instruction or None)
        multi = self.vector_type == "multi_vector"
        vectors = self.model.encode(items, task=task, return_multivector=multi, dimensions=self.dimensions,
                                    batch_size=kwargs.get("batch_size", 64), truncate=True)
        return [v.numpy() for v in vectors] if multi else vectors.numpy()

    @staticmethod
    def batch_items(batch: dict[str, list]) -> list[dict[str, Any]]:
        """One item per row: ``text`` and/or ``image``; a query with its own instruction keeps it apart."""
        texts = batch.get("query") if "instruction" in batch and "query" in batch else batch.get("text")
        size = len(texts if texts is not None else batch["image"])
        items: list[dict[str, Any]] = [{} for _ in range(size)]
        for row, item in enumerate(items):
            if texts is not None and texts[row]:
                item["text"] = texts[row]
            if batch.get("image") is not None and batch["image"][row] is not None:
                item["image"] = batch["image"][row]
            if "instruction" in batch and batch["instruction"][row]:
                item["instructions"] = batch["instruction"][row]
        return items

    def nova_task(self, task_metadata, prompt_type: PromptType | None) -> str:
        """retrieval/code side for queries and documents, text-matching for symmetric tasks."""
        if prompt_type is None:
            return "text-matching"
        family = get_programming_task_override(task_metadata, "retrieval") or "retrieval"
        return f"{family}.query" if prompt_type == PromptType.query else f"{family}.passage"

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        if self.vector_type == "multi_vector":
            return self.model.score_multi_vector(embeddings1, embeddings2)
        return self.model.score_single_vector(np.asarray(embeddings1), np.asarray(embeddings2))

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        if self.vector_type == "multi_vector":
            return torch.stack([self.model.score_multi_vector([a], [b])[0, 0] for a, b in zip(embeddings1, embeddings2)])
        return (torch.as_tensor(np.asarray(embeddings1)) * torch.as_tensor(np.asarray(embeddings2))).sum(-1)


def nova_model_meta(model_name: str, revision: str | None = None, *,
                    vector_type: Literal["single_vector", "multi_vector"] = "single_vector", **loader_kwargs: Any
                    ) -> ModelMeta:
    """The ModelMeta to hand to mteb (``meta.load_model()``, ``mteb.evaluate``) for a converted repository."""
    multi = vector_type == "multi_vector"
    return ModelMeta(
        loader=NovaEmbeddingsEncoder,
        loader_kwargs={"vector_type": vector_type, **loader_kwargs},
        name=model_name, revision=revision, release_date=None, languages=None, n_parameters=None,
        memory_usage_mb=None, max_tokens=32768, embed_dim=128 if multi else 2048, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch", "Transformers"],
        similarity_fn_name="MaxSim" if multi else "cosine", use_instructions=True, training_datasets=None,
        adapted_from="jinaai/jina-embeddings-v4", modalities=["image", "text"],
        model_type=["late-interaction"] if multi else ["dense"],
    )


def nova_encoder(model_name: str, revision: str | None = None, **kwargs: Any) -> NovaEmbeddingsEncoder:
    """The encoder with its ModelMeta attached, as ``load_model`` returns it, without mteb's check of its "image"
    extra (torchvision, which mteb asks of every image model; nova's processor does not need it)."""
    meta = nova_model_meta(model_name, revision, **kwargs)
    encoder = NovaEmbeddingsEncoder(model_name, revision, **meta.loader_kwargs)
    encoder.mteb_model_meta = meta
    return encoder
