"""nova-embeddings-v1: Qwen2.5-VL as a multimodal, instruction-aware embedding model.

The model holds transformers' ``Qwen2_5_VLModel`` (vision tower + language model, no LM head) and a
``multi_vector_projector``. ``forward`` maps a padded batch from the processor to the final-norm hidden
states, one L2-normalised mean-pooled vector per item and L2-normalised per-token vectors.
``encode`` is the user-facing loop: validate -> tokenise -> sort by length -> batch by a token budget
-> forward -> unsort -> convert.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2_5_VLModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

from .configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config
from .processing_nova_embeddings_v1 import _UNSET, ItemError, NovaEmbeddingsV1Processor, TokenizedItem

OUTPUT_FORMATS = ("torch", "numpy", "list", "base64")


@dataclass
class NovaEmbeddingsV1Output(ModelOutput):
    """What ``forward`` returns.

    last_hidden_state: (batch, seq, hidden) final-norm hidden states.
    single_vector: (batch, hidden) mean over the pooling mask, L2-normalised, float32.
    multi_vector: (batch, seq, projector_dim) per-token vectors, L2-normalised, float32, zero outside output_mask.
    """

    last_hidden_state: torch.Tensor | None = None
    single_vector: torch.Tensor | None = None
    multi_vector: torch.Tensor | None = None


class NovaEmbeddingsV1Model(Qwen2_5_VLPreTrainedModel):
    config_class = NovaEmbeddingsV1Config
    config: NovaEmbeddingsV1Config
    base_model_prefix = ""
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: NovaEmbeddingsV1Config):
        super().__init__(config)
        self.model = Qwen2_5_VLModel(config)
        self.multi_vector_projector = nn.Linear(config.text_config.hidden_size, config.multi_vector_projector_dim)
        self._processor: NovaEmbeddingsV1Processor | None = None
        self.post_init()

    # ------------------------------------------------------------------ processor
    @property
    def processor(self) -> NovaEmbeddingsV1Processor:
        """The processor saved beside the weights, loaded on first use."""
        if self._processor is None:
            self._processor = NovaEmbeddingsV1Processor.from_pretrained(self.config._name_or_path, trust_remote_code=True)
        return self._processor

    @processor.setter
    def processor(self, processor: NovaEmbeddingsV1Processor) -> None:
        self._processor = processor

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pooling_mask: torch.Tensor | None = None,
        output_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_is_precomputed: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_multivector: bool = True,
        **kwargs: Any,
    ) -> NovaEmbeddingsV1Output:
        """Embed a padded batch as built by ``NovaEmbeddingsV1Processor.collate``.

        Without ``pooling_mask`` every attended token is pooled; without ``output_mask`` every attended
        token is kept as a multi vector. Extra processor keys (``mm_token_type_ids``) are accepted.
        """
        kwargs.pop("mm_token_type_ids", None)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_grid_thw is not None:
            features = self.image_features(pixel_values, image_grid_thw, image_embeds, image_is_precomputed)
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            if int(image_mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features")
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, features.to(inputs_embeds.dtype))
        if position_ids is None:
            position_ids = self.rope_position_ids(input_ids, attention_mask, image_grid_thw)
        hidden = self.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        ).last_hidden_state  # (batch, seq, hidden), after the final RMSNorm
        pooling_mask = attention_mask.bool() if pooling_mask is None else pooling_mask.bool()
        output_mask = attention_mask.bool() if output_mask is None else output_mask.bool()
        return NovaEmbeddingsV1Output(
            last_hidden_state=hidden,
            single_vector=self.pool_single_vector(hidden, pooling_mask),
            multi_vector=self.project_multi_vector(hidden, output_mask) if return_multivector else None,
        )

    def rope_position_ids(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, image_grid_thw: torch.LongTensor | None
    ) -> torch.LongTensor:
        """Qwen2.5-VL's 3D rope positions, counted over attended tokens only: (3, batch, seq).

        Computed explicitly so that padding never shifts a position and images always get their 2D grid
        (transformers 5.x falls back to 1D positions when it is not given ``mm_token_type_ids``).
        """
        if image_grid_thw is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions.unsqueeze(0).expand(3, -1, -1)
        mm_token_type_ids = (input_ids == self.config.image_token_id).int()
        positions, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return positions

    def image_features(
        self,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor,
        image_embeds: torch.Tensor | None = None,
        image_is_precomputed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merged vision features of every image, in order: (image_tokens, hidden).

        Images given as pixels go through the vision tower; precomputed ones are taken as they are.
        """
        if image_is_precomputed is None:
            image_is_precomputed = torch.zeros(len(image_grid_thw), dtype=torch.bool)
        precomputed = image_is_precomputed.bool().tolist()
        tokens_per_image = (image_grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        computed = iter(())
        if pixel_values is not None:
            grid = image_grid_thw[~image_is_precomputed.bool().to(image_grid_thw.device)]
            computed = iter(self.vision_tower(pixel_values, grid))
        given = iter(())
        if image_embeds is not None:
            sizes = [n for n, pre in zip(tokens_per_image, precomputed) if pre]
            given = iter(torch.split(image_embeds, sizes))
        return torch.cat([next(given) if pre else next(computed) for pre in precomputed])

    def vision_tower(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> list[torch.Tensor]:
        """Run the vision tower; one (image_tokens, hidden) tensor per image."""
        visual = self.model.visual
        merged = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw).pooler_output
        sizes = (image_grid_thw.prod(-1) // visual.spatial_merge_size**2).tolist()
        return list(torch.split(merged, sizes))

    @staticmethod
    def pool_single_vector(hidden: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
        """Mean over the pooled tokens, in float32, then L2-normalised: (batch, hidden)."""
        weights = pooling_mask.unsqueeze(-1).to(torch.float32)
        summed = (hidden.to(torch.float32) * weights).sum(dim=1)
        return F.normalize(summed / weights.sum(dim=1).clamp(min=1.0), dim=-1)

    def project_multi_vector(self, hidden: torch.Tensor, output_mask: torch.Tensor) -> torch.Tensor:
        """Per-token projector output, L2-normalised, zeroed outside the output mask: (batch, seq, dim)."""
        projected = self.multi_vector_projector(hidden).to(torch.float32)
        return F.normalize(projected, dim=-1) * output_mask.unsqueeze(-1)

    # ------------------------------------------------------------------ encode
    @torch.inference_mode()
    def encode(
        self,
        items: Sequence[str | dict] | str | dict,
        *,
        task: str | None = None,
        instructions: str | None = None,
        return_multivector: bool = False,
        dimensions: int | None = None,
        batch_size: int = 64,
        max_batch_tokens: int = 32768,
        output: str = "torch",
        show_progress_bar: bool | None = None,
        truncate: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        """Embed mixed items (text, image, text+image), each with its own task and instructions.

        Args:
            items: a str, a dict, or a list of them. A dict has ``text``, ``image`` (PIL image, path, URL,
                base64 string, data URI or bytes) or ``image_embeds`` (from ``get_image_embeddings``), and
                optional ``task``, ``instructions`` and ``adapter``, which override the call's arguments.
            task: default task: retrieval[.query|.passage], text-matching, code[.query|.passage].
            instructions: a system turn the item attends to; never pooled.
            return_multivector: per-token 128-d vectors instead of one pooled vector per item.
            dimensions: Matryoshka size of single vectors (one of ``config.matryoshka_dims``).
            batch_size / max_batch_tokens: at most this many items and padded tokens per forward pass.
            output: "torch" (float32 on CPU), "numpy", "list" or "base64" (little-endian float32).
            truncate: cut over-long texts (with a warning) instead of raising.
            min_pixels / max_pixels: image resize limits for this call (default: the config's).

        Returns single vectors as one (N, D) tensor/array (a list for "list"/"base64"), multi vectors as a
        list of (tokens_i, dim) tensors/arrays, in input order.
        """
        self._check_encode_args(return_multivector, dimensions, batch_size, max_batch_tokens, output)
        processor, config = self.processor, self.config
        limits = processor.pixel_limits(config, min_pixels, max_pixels)
        normalized = processor.normalize_items(items, task=task, instructions=instructions, config=config)
        self._check_adapters(normalized)
        tokenized = processor.tokenize_items(
            normalized, config=config, min_pixels=limits[0], max_pixels=limits[1], truncate=truncate
        )
        results: list[torch.Tensor | None] = [None] * len(tokenized)
        batches = self.plan_batches(tokenized, batch_size, max_batch_tokens)
        for batch in _progress(batches, show_progress_bar, len(tokenized)):
            vectors = self._embed_batch([tokenized[i] for i in batch], limits, return_multivector)
            for index, vector in zip(batch, vectors):
                results[index] = vector
        return _convert(self._finish(results, return_multivector, dimensions), return_multivector, output)

    def encode_query(self, items, **kwargs):
        """``encode`` with the retrieval query prompt (the task can still be given per item)."""
        return self.encode(items, task=kwargs.pop("task", "retrieval.query"), **kwargs)

    def encode_document(self, items, **kwargs):
        """``encode`` with the retrieval passage prompt (the task can still be given per item)."""
        return self.encode(items, task=kwargs.pop("task", "retrieval.passage"), **kwargs)

    def _check_encode_args(self, return_multivector, dimensions, batch_size, max_batch_tokens, output) -> None:
        if output not in OUTPUT_FORMATS:
            raise ValueError(f"output must be one of {OUTPUT_FORMATS}, got {output!r}")
        if dimensions is not None:
            if return_multivector:
                raise ValueError("dimensions applies to single vectors only (return_multivector=False)")
            if dimensions not in self.config.matryoshka_dims:
                raise ValueError(f"dimensions={dimensions} is not allowed; choose one of {self.config.matryoshka_dims}")
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"batch_size and max_batch_tokens must be positive, got {batch_size}, {max_batch_tokens}")

    def _check_adapters(self, items) -> None:
        """Until adapters are loaded, an item may only ask for the bare backbone (adapter=None)."""
        for item in items:
            if item.adapter is not _UNSET and item.adapter is not None:
                raise ItemError(item.index, f"unknown adapter {item.adapter!r}; loaded adapters: []")

    @staticmethod
    def plan_batches(tokenized: Sequence[TokenizedItem], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
        """Longest first, cut when the padded size (items x longest) would pass the token budget.

        An item longer than the budget runs alone.
        """
        order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i]), reverse=True)
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = len(tokenized[current[0]]) if current else len(tokenized[index])
            if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def _embed_batch(self, batch: list[TokenizedItem], limits: tuple[int, int], return_multivector: bool) -> list[torch.Tensor]:
        inputs = self.processor.collate(batch, min_pixels=limits[0], max_pixels=limits[1])
        inputs = inputs.to(self.device)
        out = self(**inputs, return_multivector=return_multivector)
        if not return_multivector:
            return list(out.single_vector.cpu())
        multi = out.multi_vector.cpu()
        masks = inputs["output_mask"].cpu()
        return [multi[row][masks[row]] for row in range(len(batch))]

    def _finish(self, results: list[torch.Tensor], return_multivector: bool, dimensions: int | None):
        if return_multivector:
            return results
        vectors = torch.stack(results)
        if dimensions is not None and dimensions < vectors.shape[-1]:
            vectors = F.normalize(vectors[:, :dimensions], dim=-1)
        return vectors

    # ------------------------------------------------------------------ precomputed images
    @torch.inference_mode()
    def get_image_embeddings(
        self, images: Sequence[Any], *, min_pixels: int | None = None, max_pixels: int | None = None, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Vision-tower output per image, to reuse across tasks, instructions and adapters.

        Each entry is ``{"image_embeds": (image_tokens, hidden), "image_grid_thw": (3,)}`` and can be given
        to ``encode`` as an item's ``image_embeds`` (the dict itself, or its two fields).
        """
        processor = self.processor
        low, high = processor.pixel_limits(self.config, min_pixels, max_pixels)
        items = processor.normalize_items([{"image": image} for image in images], config=self.config)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels = processor.image_processor(
                images=[item.image for item in chunk], size={"shortest_edge": low, "longest_edge": high}, return_tensors="pt"
            )
            grid = pixels["image_grid_thw"].to(self.device)
            for embeds, thw in zip(self.vision_tower(pixels["pixel_values"].to(self.device), grid), grid.cpu()):
                results.append({"image_embeds": embeds.cpu(), "image_grid_thw": thw})
        return results

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def score_multi_vector(
        queries: Sequence[torch.Tensor], documents: Sequence[torch.Tensor], batch_size: int = 128
    ) -> torch.Tensor:
        """Late-interaction (MaxSim) scores: for each query token, the best document token, summed.

        Returns a float32 (n_queries, n_documents) tensor; documents are scored in blocks to bound memory.
        """
        queries = [torch.as_tensor(q, dtype=torch.float32) for q in queries]
        documents = [torch.as_tensor(d, dtype=torch.float32) for d in documents]
        padded_queries = nn.utils.rnn.pad_sequence(queries, batch_first=True)  # (nq, tq, dim), zero rows add 0
        scores = []
        for start in range(0, len(documents), batch_size):
            block = documents[start : start + batch_size]
            padded = nn.utils.rnn.pad_sequence(block, batch_first=True)  # (nd, td, dim)
            valid = nn.utils.rnn.pad_sequence([torch.ones(len(d), dtype=torch.bool) for d in block], batch_first=True)
            sims = torch.einsum("qid,njd->qnij", padded_queries, padded)  # (nq, nd, tq, td)
            sims = sims.masked_fill(~valid[None, :, None, :], float("-inf"))
            scores.append(sims.max(dim=-1).values.sum(dim=-1))
        return torch.cat(scores, dim=1)

    @staticmethod
    def score_single_vector(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of normalised single vectors: (n_queries, n_documents)."""
        return torch.as_tensor(queries, dtype=torch.float32) @ torch.as_tensor(documents, dtype=torch.float32).T


# ---------------------------------------------------------------------- helpers
def _progress(batches: list, show: bool | None, n_items: int) -> Iterable:
    """A tqdm bar over batches: shown when asked, or by default for long inputs (256+ items)."""
    if show is None:
        show = n_items >= 256 and len(batches) > 1
    if not show:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="encode", unit="batch")


def _convert(vectors, multi: bool, output: str):
    """torch (float32, CPU) -> the requested output format."""
    if output == "torch":
        return vectors
    if output == "numpy":
        return [v.numpy() for v in vectors] if multi else vectors.numpy()
    if output == "list":
        return [v.tolist() for v in vectors]
    return [base64.b64encode(np.ascontiguousarray(v.numpy(), dtype="<f4").tobytes()).decode("ascii") for v in vectors]


__all__ = ["NovaEmbeddingsV1Model", "NovaEmbeddingsV1Output"]
