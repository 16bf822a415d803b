"""transformers pipeline of nova-embeddings-v1: ``pipeline("feature-extraction", model=repo, trust_remote_code=True)``.

config.json registers it under ``custom_pipelines``, so the stock feature-extraction pipeline (which would return the
raw hidden states of every token, chat markup included) never runs on this model: each input gives what
``model.encode`` gives for it, a pooled, L2-normalised vector (or its multi vectors with ``return_multivector=True``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

# the keyword arguments of model.encode that a pipeline call may pass through
ENCODE_KWARGS = ("task", "instructions", "adapter", "dimensions", "return_multivector", "truncate", "min_pixels",
                 "max_pixels", "batch_size", "max_batch_tokens")


class NovaEmbeddingsPipeline(Pipeline):
    """Inputs are ``model.encode`` items: a text, or a dict with ``text`` and/or ``image`` (plus ``task``,
    ``instructions``, ``adapter``). One input gives one result; a list gives a list, encoded in one ``encode`` call.
    Results are Python lists of floats (``return_tensors=True``: float32 tensors)."""

    _load_processor = False  # the model loads its own processor (model.processor)
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, return_tensors: bool | None = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(ENCODE_KWARGS))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; valid: {sorted(ENCODE_KWARGS) + ['return_tensors']}")
        postprocess = {} if return_tensors is None else {"return_tensors": return_tensors}
        return {}, kwargs, postprocess

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any):
        """A list is encoded in one call (encode batches it by length and token budget); anything else item by item."""
        if not isinstance(inputs, list) or args:
            # item by item, transformers' own batching (it pads with a tokenizer this pipeline does not load) stays off;
            # encode's batch_size changes nothing in a one-item call
            kwargs.pop("batch_size", None)
            return super().__call__(inputs, *args, batch_size=1, **kwargs)
        _, encode_kwargs, postprocess = self._sanitize_parameters(**kwargs)
        return [self.postprocess(vector, **postprocess) for vector in self.model.encode(inputs, **encode_kwargs)]

    def preprocess(self, inputs: Any) -> dict[str, list]:
        return {"items": [inputs]}

    def _forward(self, model_inputs: dict[str, list], **encode_kwargs: Any) -> torch.Tensor:
        return self.model.encode(model_inputs["items"], **encode_kwargs)[0]

    def postprocess(self, model_outputs: torch.Tensor, return_tensors: bool = False):
        return model_outputs if return_tensors else model_outputs.tolist()
