"""nova-embeddings-v1: Qwen2.5-VL as a multimodal, instruction-aware embedding model.

The model holds transformers' ``Qwen2_5_VLModel`` (vision tower + language model, no LM head) and a
``multi_vector_projector``. ``forward`` maps a padded batch from the processor to the final-norm hidden
states, one L2-normalised mean-pooled vector per item and L2-normalised per-token vectors.
``encode`` is the user-facing loop: validate -> tokenise -> sort by length -> batch by a token budget
-> forward -> unsort -> convert (packed calls of several batches tokenise the first batch's items, run them,
and tokenise the rest meanwhile).
"""

from __future__ import annotations

import base64
import functools
import inspect
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, Qwen2_5_VLModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

from .adapters_nova_embeddings_v1 import (
    BASE, AdapterManager, can_stack, lora_layers, module_index, repository_adapter_folders, rows_routed,
)
from .configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config
from .graphs_nova_embeddings_v1 import SmallCallGraphs, StaticBatch, graph_sized_limits
from .processing_nova_embeddings_v1 import TASK_ADAPTER, EmbeddingItem, NovaEmbeddingsV1Processor, TokenizedItem
from .vision_nova_embeddings_v1 import align_vision_mlps, attention_implementation, fast_vision_tower

OUTPUT_FORMATS = ("torch", "numpy", "list", "base64")
# transformers routes attention through its AttentionInterface registry; the name contains "flash" so that the
# vision tower hands over its cu_seqlens (one call per layer instead of one per window).
PACKED_ATTENTION = "nova_flash_varlen"
PREFETCH_BATCHES = 3  # batches collated ahead by worker threads
# Pictures per batch. Preprocessing a page takes ~19 ms of CPU (transformers' image processor, measured on the
# H200 machine) and the model ~17 ms of GPU: small picture batches let the GPU start after the first few pages
# and keep worker threads preprocessing the next batches while it runs (41 pages in one batch kept the GPU idle
# for their whole preprocessing). Eight pages still fill the GPU (the vision tower: 100 pages/s in batches of 8,
# 106 in one of 64). Measured with 64 pages, batches of 4, 8 and 16 pictures and 2 to 6 batches prepared ahead
# all gave 34-37 pages/s: the CPU's preprocessing, not the batching, is what is left.
PICTURES_PER_BATCH = 8
# Packed rows of equal-length items at least this long run cuDNN's dense attention instead of the varlen flash
# kernel. Measured on the H200 (torch 2.11, cuDNN 9.19; 16 query / 2 KV heads of 128, causal), cuDNN over varlen:
# 0.84x at 64 x 512 tokens, 0.92x at 32 x 1k, 1.05x at 16 x 2k, 1.30x at 8 x 4k, 1.50x at 4 x 8k; the vision
# tower's full attention (16 heads of 80, 8 pages of 3,072 patches): 1.68x.
DENSE_ATTENTION = True
DENSE_MIN_LENGTH = 2048
CHARS_PER_TOKEN = 4  # about what a BPE tokenizer gives on English text; sizes encode's first tokenised items


@dataclass
class _RunPart:
    """Batches of one part of an ``encode`` call, run and not yet collected: ``outputs`` hold (indices into
    ``tokenized``, vectors, output mask) per batch; ``offset`` is the part's first item in the call. On CUDA the
    vectors are pinned host tensors whose copies are queued behind the part's GPU work; ``ready`` fires when they
    have landed."""

    offset: int
    tokenized: Sequence[TokenizedItem]
    outputs: list[tuple[list[int], torch.Tensor, torch.Tensor]]
    ready: "torch.cuda.Event | None" = None


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


@dataclass
class PreparedItems:
    """Items validated, tokenised and routed by ``prepare_items``, ready for ``encode``.

    tokenized: one ``TokenizedItem`` per item, in input order. adapters: each item's adapter (``"__base__"`` for
    none). limits: the (min, max) pixel limits the images were checked against. ``a + b`` joins two preparations
    made with the same pixel limits (a server joins several requests into one call).
    """

    tokenized: list[TokenizedItem]
    adapters: list[str]
    limits: tuple[int, int]

    def __len__(self) -> int:
        return len(self.tokenized)

    def __add__(self, other: "PreparedItems") -> "PreparedItems":
        if not isinstance(other, PreparedItems):
            return NotImplemented
        if tuple(other.limits) != tuple(self.limits):
            raise ValueError(f"cannot join items prepared with pixel limits {self.limits} and {other.limits}")
        return PreparedItems(self.tokenized + other.tokenized, self.adapters + other.adapters, self.limits)


class NovaEmbeddingsV1Model(Qwen2_5_VLPreTrainedModel):
    config_class = NovaEmbeddingsV1Config
    config: NovaEmbeddingsV1Config
    base_model_prefix = ""
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: NovaEmbeddingsV1Config):
        super().__init__(config)
        self.model = Qwen2_5_VLModel(config)
        align_vision_mlps(self.model.visual)
        self.multi_vector_projector = nn.Linear(config.text_config.hidden_size, config.multi_vector_projector_dim)
        self._processor: NovaEmbeddingsV1Processor | None = None
        self._first_use_lock = threading.Lock()  # several threads' first calls load one processor, compile once
        self._adapter_lock = threading.RLock()  # no batch ever runs while adapters are being loaded or removed
        # held only while the set of adapters changes: prepare_items reads the names under it, so preparing the
        # next items never waits for a running encode call (which holds _adapter_lock throughout)
        self._adapter_names_lock = threading.RLock()
        self.adapter_manager = AdapterManager(self)  # reads PEFT's state; keeps none of its own
        self.adapter_batching = "group"  # "group": one adapter per batch; "mixed": batches mix adapters (stacked LoRA)
        self.attention_packing = "auto"  # "auto": packed variable-length attention on CUDA in half precision; "on"; "off"
        self._dropout_pinned = False  # True while encode holds every module in eval mode
        self.compile_blocks = "auto"  # "auto": torch.compile the blocks on CUDA in half precision; "on"; "off"
        self._compiled = False
        # inductor rounds to bf16/fp16 where eager rounds, so compiled blocks keep eager's numerics (without it,
        # fused kernels skip roundings and per-token vectors drift from the reference path: cosine 0.9988)
        self.compile_options: dict[str, Any] = {"emulate_precision_casts": True}
        self.cuda_graphs = "auto"  # "auto": small text calls replay CUDA graphs when packed on CUDA; "on"; "off"
        self._graphs: SmallCallGraphs | None = None
        self._graphs_lock = threading.Lock()
        self.fast_vision = True  # vision tower through FastVisionTower (same result, cached grid tables); False: stock
        self.gpu_image_preprocessing = "auto"  # "auto": encode resizes/normalises pictures on the model's GPU; "off"
        self._image_streams: dict[torch.device, torch.cuda.Stream] = {}  # side stream per device for that work
        self._image_streams_lock = threading.Lock()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_task_adapters: bool = True, **kwargs):
        """Load the backbone, then the adapters saved under ``adapters/<name>/`` of the same repository.

        The model comes back in eval mode, adapters included (PEFT creates its layers in training mode).
        """
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if load_task_adapters:
            model.load_task_adapters(pretrained_model_name_or_path)
        return model.eval()

    # ------------------------------------------------------------------ processor
    @property
    def processor(self) -> NovaEmbeddingsV1Processor:
        """The processor saved beside the weights, loaded once on first use, whichever thread uses it first.

        Two threads loading it at once would parse the remote code with ``ast`` concurrently, which CPython 3.11
        does not survive (python/cpython#106905), so the load runs under a lock.
        """
        if self._processor is None:
            with self._first_use_lock:
                if self._processor is None:
                    self._processor = NovaEmbeddingsV1Processor.from_pretrained(
                        self.config._name_or_path, trust_remote_code=True)
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
        attention_mask: torch.Tensor | None = None,
        pooling_mask: torch.Tensor | None = None,
        output_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_is_precomputed: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        return_multivector: bool = True,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> NovaEmbeddingsV1Output:
        """Embed a batch built by the processor: padded (``collate``) or packed (``collate_packed``).

        Padded: (batch, seq) tensors with an ``attention_mask``. Packed: one (1, tokens) row holding every
        item back to back, ``cu_seqlens`` marking where each starts; attention stays inside each item.
        Without ``pooling_mask`` every token is pooled; without ``output_mask`` every token is kept as a
        multi vector. ``adapter_names`` (one per row, or per packed item; ``"__base__"`` for none) routes rows to LoRA
        adapters (``rows_routed``: one stacked pass at inference, else PEFT's mixed-batch forward); without it the
        adapter selected with ``set_adapter`` (PEFT's or ours) applies, and none after ``from_pretrained``: the bare
        backbone.
        Dropout follows the root module: only ``model.train()`` trains; in eval mode no submodule applies dropout,
        whatever mode it was left in. Single vectors are (items, hidden); multi vectors keep the input layout, zero
        outside output_mask.
        """
        kwargs.pop("mm_token_type_ids", None)
        if attention_mask is None and cu_seqlens is None:
            attention_mask = torch.ones_like(input_ids)
        modes_are_right = self.training or self._dropout_pinned
        # the lock (reentrant: encode holds it already) keeps another thread's encode or adapter load from changing
        # the LoRA layers' routing or the modules' modes halfway through this pass (sentence-transformers calls here)
        with self._adapter_lock, (nullcontext() if modes_are_right else self.dropout_disabled()), \
                rows_routed(self, adapter_names, cu_seqlens, input_ids.numel()):
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw, image_embeds, image_is_precomputed)
            if cu_seqlens is not None:
                hidden = self._language_model_packed(inputs_embeds, input_ids, cu_seqlens, max_seqlen, image_grid_thw,
                                                     position_ids, **kwargs)
            else:
                if position_ids is None:
                    position_ids = self.rope_position_ids(input_ids, attention_mask, image_grid_thw)
                hidden = self.model.language_model(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, **kwargs,
                ).last_hidden_state  # (batch, seq, hidden), after the final RMSNorm
            default_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            pooling_mask = default_mask if pooling_mask is None else pooling_mask.bool()
            output_mask = default_mask if output_mask is None else output_mask.bool()
            if cu_seqlens is not None:
                single = self.pool_packed(hidden[0], pooling_mask[0], cu_seqlens.to(hidden.device))
            else:
                single = self.pool_single_vector(hidden, pooling_mask)
            multi = self.project_multi_vector(hidden, output_mask) if return_multivector else None
        return NovaEmbeddingsV1Output(last_hidden_state=hidden, single_vector=single, multi_vector=multi)

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, image_embeds=None, image_is_precomputed=None):
        """Token embeddings with every image placeholder replaced by its vision feature."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_grid_thw is None:
            return inputs_embeds
        features = self.image_features(pixel_values, image_grid_thw, image_embeds, image_is_precomputed)
        image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features")
        return inputs_embeds.masked_scatter(image_mask, features.to(inputs_embeds.dtype))

    def _language_model_packed(self, inputs_embeds, input_ids, cu_seqlens, max_seqlen, image_grid_thw, position_ids,
                               **kwargs) -> torch.Tensor:
        """The language model over packed items: no padding, no mask tensor, positions restart per item."""
        if position_ids is None:
            position_ids = self.packed_position_ids(input_ids, cu_seqlens, image_grid_thw)
        cu = cu_seqlens.to(inputs_embeds.device, torch.int32)
        max_seqlen = int(max_seqlen if max_seqlen is not None else (cu[1:] - cu[:-1]).max())
        no_mask = {layer_type: None for layer_type in set(self.model.language_model.config.layer_types)}
        with attention_implementation(self.model.language_model, PACKED_ATTENTION):
            return self.model.language_model(
                inputs_embeds=inputs_embeds, attention_mask=no_mask, position_ids=position_ids, use_cache=False,
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen, **kwargs,
            ).last_hidden_state  # (1, tokens, hidden)

    def packed_position_ids(self, input_ids: torch.LongTensor, cu_seqlens: torch.Tensor,
                            image_grid_thw: torch.LongTensor | None) -> torch.LongTensor:
        """3D rope positions of packed items, each counted from 0 as if it were alone: (3, 1, tokens)."""
        if image_grid_thw is None and input_ids.device.type == "cpu":
            return _packed_text_positions(cu_seqlens, input_ids.shape[1])
        bounds = cu_seqlens.tolist()
        lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=input_ids.device)
        starts = torch.repeat_interleave(torch.tensor(bounds[:-1], device=input_ids.device), lengths)
        positions = (torch.arange(input_ids.shape[1], device=input_ids.device) - starts).expand(3, -1).clone()
        if image_grid_thw is not None:
            ids = input_ids[0]
            is_image = ids == self.config.image_token_id
            image_starts = (is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])).nonzero().flatten().tolist()
            grids = iter(image_grid_thw)
            for start, end in zip(bounds[:-1], bounds[1:]):
                n_images = sum(start <= i < end for i in image_starts)
                if n_images:
                    grid = torch.stack([next(grids) for _ in range(n_images)])
                    segment = ids[start:end].unsqueeze(0)
                    positions[:, start:end] = self.rope_position_ids(segment, torch.ones_like(segment), grid)[:, 0]
        return positions.unsqueeze(1)

    @staticmethod
    def pool_packed(hidden: torch.Tensor, pooling_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Per-item mean over pooled tokens of a packed row, in float32, L2-normalised: (items, hidden)."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                          output_size=hidden.shape[0])  # known size: no wait for the GPU
        weights = pooling_mask.to(torch.float32)
        sums = torch.zeros(len(lengths), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
        sums.index_add_(0, segment, hidden.to(torch.float32) * weights.unsqueeze(-1))
        counts = torch.zeros(len(lengths), device=hidden.device, dtype=torch.float32).index_add_(0, segment, weights)
        return F.normalize(sums / counts.clamp(min=1.0).unsqueeze(-1), dim=-1)

    def compile_layers(self, vision: bool = True, **compile_kwargs: Any) -> None:
        """Compile each decoder block with ``torch.compile`` (regional compilation: one graph shared by all
        blocks, dynamic sequence length, so new lengths do not recompile). Fuses the norms, rotary and activation
        kernels that eager mode runs one by one; the first calls pay the compilation (see ``warmup``).
        ``encode`` calls it by default on CUDA in half precision (``model.compile_blocks``). Each adapter state of the
        blocks (no adapter, each adapter unmerged or merged, a stacked pass) compiles its own variant of a block, more
        than dynamo's default limit of 8: see ``_allow_block_variants``.
        """
        compile_kwargs.setdefault("dynamic", True)
        _allow_block_variants()
        if compile_kwargs.get("backend", "inductor") == "inductor" and "mode" not in compile_kwargs:
            compile_kwargs.setdefault("options", dict(self.compile_options))
        blocks = list(self.model.language_model.layers) + (list(self.model.visual.blocks) if vision else [])
        for block in blocks:
            block.compile(**compile_kwargs)
        self._compiled = True

    def _compile_before_first_batch(self) -> None:
        """``compile_layers`` when ``should_compile`` and not done yet: once, whichever thread's call comes first."""
        if self._compiled or not self.should_compile():
            return
        with self._first_use_lock:
            if not self._compiled:
                self.compile_layers()

    def should_compile(self) -> bool:
        """Whether ``encode`` compiles the blocks: ``compile_blocks`` "on", or "auto" on CUDA in half precision."""
        if self.compile_blocks not in ("auto", "on", "off"):
            raise ValueError(f"compile_blocks must be 'auto', 'on' or 'off', got {self.compile_blocks!r}")
        if self.compile_blocks == "auto":
            return self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        return self.compile_blocks == "on"

    def warmup(self, text_lengths: Sequence[int] | None = None, images: int = 1) -> float:
        """Run ``encode`` on dummy texts (and a dummy page) so that compilation, kernel selection and the CUDA-graph
        capture of every token bucket happen now, not in a user's first request; returns the seconds it took. The
        server calls it at start-up.

        One call per text length (words), by default one per token bucket: the most words that fit it under the
        task's prompt; with graphs, once per task adapter, since graphs are captured per adapter, and with
        ``adapter_batching="mixed"`` once more per bucket with one text per task adapter (the stacked graphs of
        batches that mix adapters). Then one mixed call of those texts and ``images`` pages (the vision tower's
        kernels).
        """
        import functools
        import time

        from PIL import Image

        from .graphs_nova_embeddings_v1 import bucket_filling_lengths

        start = time.perf_counter()
        words = lambda n: " ".join(["warm"] * n)  # noqa: E731
        tasks = self._one_task_per_adapter() if self.graphs_enabled() else [self.config.default_task]
        for task in tasks:
            tokens_of = functools.cache(lambda n: len(self.prepare_items([words(n)], task=task).tokenized[0]))
            lengths = text_lengths if text_lengths is not None else bucket_filling_lengths(tokens_of)
            for n in lengths:  # single-text calls: one per token bucket
                self.encode([words(n)], task=task)
        if self.graphs_enabled() and self.adapter_batching == "mixed" and len(tasks) > 1:
            mixed = lambda n: [{"text": words(n), "task": task} for task in tasks]  # noqa: E731
            tokens_of = functools.cache(lambda n: sum(len(t) for t in self.prepare_items(mixed(n)).tokenized))
            for n in bucket_filling_lengths(tokens_of) if text_lengths is None else text_lengths:
                self.encode(mixed(n))
        pages = [{"image": Image.new("RGB", (448, 448), "white")} for _ in range(images)]
        self.encode([words(n) for n in lengths] + pages)  # a mixed batch: the vision tower's kernels
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _one_task_per_adapter(self) -> list[str]:
        """A task for each distinct adapter that tasks route to (retrieval.query and retrieval.passage share one)."""
        by_adapter: dict[str, str] = {}
        for task in self.config.task_prompts:
            by_adapter.setdefault(self.config.adapter_task(task), task)
        return list(by_adapter.values())

    @property
    def execution_device(self) -> torch.device:
        """Where inputs go: the weights' device, or, when accelerate offloaded every weight (they wait on the meta
        device until its hooks load them for each pass), the device those hooks run the model on."""
        device = self.device
        if device.type != "meta":
            return device
        hook = getattr(self.get_input_embeddings(), "_hf_hook", None) or getattr(self, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        return torch.device(execution) if execution is not None else torch.device("cpu")

    def small_call_graphs(self) -> SmallCallGraphs | None:
        """The CUDA graphs small packed text calls replay (``cuda_graphs``): captured on CUDA; "on" elsewhere runs
        the same padded static-buffer body eagerly (for tests); None when off."""
        if not self.graphs_enabled():
            return None
        capture = self.device.type == "cuda"
        with self._graphs_lock:  # two threads' first calls build one set of graphs
            if self._graphs is None or self._graphs.capture != capture:
                self._graphs = SmallCallGraphs(self, capture=capture)
            return self._graphs

    def graphs_enabled(self) -> bool:
        """Whether small packed text batches go through ``SmallCallGraphs`` (``cuda_graphs``, the device)."""
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be 'auto', 'on' or 'off', got {self.cuda_graphs!r}")
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and self.device.type == "cuda")

    def use_packed_attention(self) -> bool:
        """Whether encode packs batches: ``attention_packing`` "on", or "auto" on CUDA in half precision."""
        if self.attention_packing == "on":
            return True
        if self.attention_packing == "off":
            return False
        return self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16) and _varlen_kernel() is not None

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
        tower = fast_vision_tower(visual) if self.fast_vision else visual
        if self.use_packed_attention():  # one varlen call per layer instead of one attention call per window
            with attention_implementation(visual, PACKED_ATTENTION):
                merged = tower(pixel_values.to(visual.dtype), grid_thw=image_grid_thw).pooler_output
        else:
            merged = tower(pixel_values.to(visual.dtype), grid_thw=image_grid_thw).pooler_output
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

    # ------------------------------------------------------------------ adapters (PEFT LoRA; adapters_nova_embeddings_v1)
    def load_task_adapters(self, repo: str | os.PathLike) -> None:
        """Load every adapter saved under ``adapters/<name>/`` of the repository: task adapters, then custom ones."""
        folders = repository_adapter_folders(repo, self.config.adapters_dir, self.config.task_names)
        for name, folder in folders.items():
            self.load_adapter(folder, adapter_name=name, as_task_adapter=name in self.config.task_names)
        missing = [task for task in self.config.task_names if task not in folders]
        if missing and len(missing) == len(self.config.task_names):
            warnings.warn(f"no task adapter weights under {repo}/{self.config.adapters_dir}/: every task runs on the "
                          "bare backbone (run `nova-embeddings convert` to bring jina's adapters)", stacklevel=3)
        elif missing:
            warnings.warn(f"task adapters without weights: {missing}; items of these tasks will be refused "
                          "unless they pass adapter=None", stacklevel=3)

    def load_adapter(self, peft_model_id: str | os.PathLike, adapter_name: str | None = None, *,
                     as_task_adapter: bool = False, **kwargs: Any) -> None:
        """Load a standard PEFT LoRA adapter (a local folder, a Hub repo id, or its adapter_model.safetensors).

        All or nothing: a failed load (bad path, wrong targets, rank or shapes, NaN weights, name clash) raises and
        leaves the loaded adapters exactly as they were. A task's name (e.g. "retrieval") is refused unless
        ``as_task_adapter=True``: items of that task would then route to this adapter. Loading never changes
        which adapter a plain ``forward`` uses.
        """
        with self._adapters_changing():
            self.adapter_manager.load(peft_model_id, adapter_name or "default", as_task_adapter=as_task_adapter, **kwargs)

    def unload_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. After removing a task adapter, items of its task are refused while other task
        adapters remain (pass adapter=None for the bare backbone), and run on the bare backbone once none remain."""
        with self._adapters_changing():
            self.adapter_manager.unload(adapter_name)

    @contextmanager
    def _adapters_changing(self):
        """Both locks: no encode batch runs and no item is routed while adapters are added or removed."""
        with self._adapter_lock, self._adapter_names_lock:
            yield

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters (task adapters first), read from PEFT's LoRA layers."""
        return self.adapter_manager.names()

    def custom_adapters(self) -> list[str]:
        """Loaded adapters that are not a task's adapter."""
        return self.adapter_manager.custom_adapters()

    def resolve_adapter(self, item: EmbeddingItem, call_adapter: str | None = TASK_ADAPTER) -> str:
        """The adapter an item runs with: its own ``adapter``, else the call's, else its task's (``"__base__"``: none)."""
        return self.adapter_manager.resolve(item, call_adapter)

    @property
    def adapter_merging(self) -> str:
        """"auto": a single-adapter group of 4096+ tokens runs on merged weights on CUDA (restored exactly); "on"; "off"."""
        return self.adapter_manager.merging

    @adapter_merging.setter
    def adapter_merging(self, value: str) -> None:
        if value not in ("auto", "on", "off"):
            raise ValueError(f"adapter_merging must be 'auto', 'on' or 'off', got {value!r}")
        self.adapter_manager.merging = value

    # transformers' adapter API (PeftAdapterMixin), answered from PEFT's state so that it works with every PEFT
    # version we support (transformers' own implementation asks for a newer PEFT than exists for 5.2x).
    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        """Add a new, freshly initialised LoRA adapter (e.g. to train it), as transformers' ``add_adapter``."""
        with self._adapters_changing():
            name = adapter_name or "default"
            self.adapter_manager.check_new_name(name, as_task_adapter=False)
            self.adapter_manager.add(adapter_config, name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Select the adapter(s) a plain ``forward`` uses (``encode`` routes per item regardless)."""
        from peft.functional import set_adapter

        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.list_adapters()]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {self.list_adapters()}")
        with self._adapter_lock:
            set_adapter(self, names)
            self.enable_adapters()

    def active_adapters(self) -> list[str]:
        """Adapters a plain ``forward`` uses ([] when adapters are disabled or none is selected)."""
        layers = lora_layers(self)
        if not layers or layers[0].disable_adapters:
            return []
        return list(layers[0].active_adapters)

    def disable_adapters(self) -> None:
        """A plain ``forward`` runs the bare backbone (``encode`` is unaffected: it routes per item)."""
        for layer in lora_layers(self):
            layer.enable_adapters(False)

    def enable_adapters(self) -> None:
        for layer in lora_layers(self):
            layer.enable_adapters(True)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """transformers' name for ``unload_adapter``."""
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.unload_adapter(name)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """One adapter's LoRA tensors under PEFT's key names (transformers' ``get_adapter_state_dict``)."""
        from peft import get_peft_model_state_dict

        names = self.list_adapters()
        name = adapter_name or (self.active_adapters() or names or [None])[0]
        if name not in names:
            raise ValueError(f"no adapter named {name!r}; loaded adapters: {names}")
        return get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name)

    # ------------------------------------------------------------------ save
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Write the repository layout ``from_pretrained`` reads: base weights under their original names, every
        adapter as a standard PEFT folder under ``adapters/<name>/``, config, processor (tokenizer, image processor,
        chat template) and the remote-code modules. ``push_to_hub`` goes through here too."""
        if kwargs.get("state_dict") is not None:
            raise ValueError("save_pretrained writes the model's own weights; state_dict= is not supported")
        with self._adapter_lock:
            kwargs["state_dict"] = self.adapter_manager.base_state_dict()
            kwargs.setdefault("save_original_format", False)  # our key names are the 5.x ones from_pretrained reads
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                self.adapter_manager.save(save_directory)
                self.processor.save_pretrained(save_directory)
                self.save_integration_files(save_directory)

    # ------------------------------------------------------------------ encode
    def prepare_items(
        self,
        items: Sequence[str | dict] | str | dict,
        *,
        task: str | None = None,
        instructions: str | None = None,
        truncate: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        adapter: str | None = TASK_ADAPTER,
    ) -> PreparedItems:
        """The CPU half of ``encode``: validate, format, tokenise (images resized and checked) and pick each
        item's adapter. Returns what ``encode`` accepts in place of raw items, so that a server or a corpus
        pipeline can prepare the next items in another thread while the GPU runs the current ones, and
        tokenise each item exactly once. Arguments as in ``encode``."""
        normalized, adapters, limits = self._route_items(items, task=task, instructions=instructions, truncate=truncate,
                                                         min_pixels=min_pixels, max_pixels=max_pixels, adapter=adapter)
        return PreparedItems(self._tokenize_items(normalized, limits, truncate), adapters, limits)

    def _route_items(self, items, *, task, instructions, truncate, min_pixels, max_pixels,
                     adapter) -> tuple[list[EmbeddingItem], list[str], tuple[int, int]]:
        """First step of ``prepare_items``: validate every item and pick its adapter (a bad item fails here, before
        any tokenisation or GPU work); returns the items, their adapters and the call's pixel limits."""
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be True or False, got {truncate!r}")
        if adapter is not TASK_ADAPTER and adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"adapter must be a loaded adapter's name or None, got {type(adapter).__name__} {adapter!r}")
        processor, config = self.processor, self.config
        limits = processor.pixel_limits(config, min_pixels, max_pixels)
        if isinstance(items, (list, tuple)) and not items:
            return [], [], limits
        normalized = processor.normalize_items(items, task=task, instructions=instructions, config=config)
        with self._adapter_names_lock:  # one consistent view of the adapters; _run_batches checks it again
            names = self.list_adapters()
            adapters = [self.adapter_manager.resolve(item, adapter, names) for item in normalized]
        return normalized, adapters, limits

    def _tokenize_items(self, normalized: Sequence[EmbeddingItem], limits: tuple[int, int],
                        truncate: bool) -> list[TokenizedItem]:
        """Second step of ``prepare_items``: render and tokenise validated items (any slice of a call's items: errors
        and warnings name each item by its index in the call)."""
        return self.processor.tokenize_items(normalized, config=self.config, min_pixels=limits[0], max_pixels=limits[1],
                                             truncate=truncate)

    @torch.inference_mode()
    def encode(
        self,
        items: Sequence[str | dict] | str | dict | PreparedItems,
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
        adapter: str | None = TASK_ADAPTER,
    ):
        """Embed mixed items (text, image, text+image), each with its own task and instructions.

        Args:
            items: a str, a dict, or a list of them. A dict has ``text``, ``image`` (PIL image, path, URL,
                base64 string, data URI or bytes) or ``image_embeds`` (from ``get_image_embeddings``), and
                optional ``task``, ``instructions`` and ``adapter``, which override the call's arguments.
                Or the result of ``prepare_items`` (then the formatting arguments below were given there).
            task: default task: retrieval[.query|.passage], text-matching, code[.query|.passage].
            instructions: a system turn the item attends to; never pooled.
            return_multivector: per-token 128-d vectors instead of one pooled vector per item.
            dimensions: Matryoshka size of single vectors (one of ``config.matryoshka_dims``).
            batch_size / max_batch_tokens: at most this many items and padded tokens per forward pass.
            output: "torch" (float32 on CPU), "numpy", "list" or "base64" (little-endian float32).
            truncate: cut over-long texts (with a warning) instead of raising.
            min_pixels / max_pixels: image resize limits for this call (default: the config's).
            adapter: adapter for items that do not name one: a loaded adapter's name, or None for the bare
                backbone; by default each item uses its task's adapter.

        Returns single vectors as one (N, D) tensor/array (a list for "list"/"base64"), multi vectors as a
        list of (tokens_i, dim) tensors/arrays, in input order.
        """
        self._check_encode_args(return_multivector, dimensions, batch_size, max_batch_tokens, output, truncate)
        if isinstance(items, PreparedItems):
            given = {name: value for name, value in (("task", task), ("instructions", instructions), ("truncate", truncate),
                     ("min_pixels", min_pixels), ("max_pixels", max_pixels)) if value not in (None, False)}
            if adapter is not TASK_ADAPTER:
                given["adapter"] = adapter
            if given:
                raise ValueError(f"{sorted(given)} apply when items are prepared: pass them to prepare_items instead")
            normalized, tokenized, adapters, limits = None, items.tokenized, items.adapters, items.limits
        else:
            normalized, adapters, limits = self._route_items(items, task=task, instructions=instructions,
                                                             truncate=truncate, min_pixels=min_pixels,
                                                             max_pixels=max_pixels, adapter=adapter)
        if not adapters:
            return self._empty_result(return_multivector, dimensions, output)
        packed = self.use_packed_attention()
        lead = self._pipeline_lead(normalized, packed, batch_size, max_batch_tokens, limits)
        order = None
        if lead is not None and len(set(adapters)) > 1 and self._batches_per_adapter(adapters, packed):
            normalized, adapters, order = _grouped_by_adapter(normalized, adapters)
        run = functools.partial(self._run_items, adapters=adapters, limits=limits, packed=packed, batch_size=batch_size,
                                max_batch_tokens=max_batch_tokens, return_multivector=return_multivector)
        if lead is not None:
            show = len(adapters) >= 256 if show_progress_bar is None else show_progress_bar
            parts = self._run_pipelined(run, normalized, lead, limits, truncate, show_progress_bar=show)
        else:
            if normalized is not None:
                tokenized = self._tokenize_items(normalized, limits, truncate)
            parts = [run(tokenized, show_progress_bar=show_progress_bar)]
        results = self._gather(parts, len(adapters), return_multivector, packed, order)
        return _convert(self._finish(results, return_multivector, dimensions), return_multivector, output)

    def _pipeline_lead(self, normalized: list[EmbeddingItem] | None, packed: bool, batch_size: int,
                       max_batch_tokens: int, limits: tuple[int, int]) -> int | None:
        """How many items ``encode`` tokenises before the GPU starts (about one batch), or None to tokenise the whole
        call first: prepared items, padded batches (sorted longest-first over the whole call to limit padding), or
        a call of less than two such leads (too little left to hide)."""
        if normalized is None or not packed:
            return None
        lead = _lead_items(normalized, batch_size, max_batch_tokens, self._image_token_bound(limits))
        return lead if len(normalized) >= 2 * lead else None

    def _run_pipelined(self, run, normalized: list[EmbeddingItem], lead: int, limits: tuple[int, int], truncate: bool,
                       show_progress_bar: bool) -> list["_RunPart"]:
        """Tokenise the first ``lead`` items and run them while a worker thread tokenises the rest (the Rust
        tokenizer releases the GIL), then run the rest: the GPU starts after one batch's tokenisation instead of the
        whole call's. An error from the rest's tokenisation (too long, bad image size) is re-raised unchanged. The
        adapter lock is held across both parts, so no adapter is loaded or removed between them."""
        head = self._tokenize_items(normalized[:lead], limits, truncate)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-tokenize") as pool, self._adapter_lock:
            rest = pool.submit(self._tokenize_items, normalized[lead:], limits, truncate)
            first = run(head, show_progress_bar=False)  # queued on the GPU, not waited for
            return [first, run(rest.result(), offset=lead, show_progress_bar=show_progress_bar)]

    def _run_items(self, tokenized: Sequence[TokenizedItem], *, adapters: Sequence[str], limits: tuple[int, int],
                   packed: bool, batch_size: int, max_batch_tokens: int, return_multivector: bool,
                   show_progress_bar: bool | None, offset: int = 0) -> "_RunPart":
        """Plan ``tokenized`` (the call's items from ``offset`` on) into batches and run them; the outputs stay on the
        device (``_gather`` collects them), so a next part's batches queue behind these without a sync."""
        adapters = adapters[offset:offset + len(tokenized)]
        groups = adapters if self._batches_per_adapter(adapters, packed) else None
        if packed and self.graphs_enabled() and not self._merges_a_group(tokenized, groups) \
                and all(t.image_grid_thw is None for t in tokenized):  # text only (graphs take no images)
            batch_size, max_batch_tokens = graph_sized_limits([len(t) for t in tokenized], batch_size, max_batch_tokens)
        batches = self.plan_batches(tokenized, batch_size, max_batch_tokens, groups=groups, padded=not packed)
        outputs, ready = self._run_batches(tokenized, batches, adapters, limits, return_multivector, packed,
                                           show_progress_bar)
        return _RunPart(offset, tokenized, outputs, ready)

    def _merges_a_group(self, tokenized: Sequence[TokenizedItem], groups: Sequence[str] | None) -> bool:
        """Whether an adapter group of this part will run on merged weights (which graphs cannot replay)."""
        if groups is None:
            return False
        tokens: dict[str, int] = {}
        for item, group in zip(tokenized, groups):
            tokens[group] = tokens.get(group, 0) + len(item)
        return any(group != BASE and self.adapter_manager.should_merge(count) for group, count in tokens.items())

    def _batches_per_adapter(self, adapters: Sequence[str], packed: bool) -> bool:
        """Whether batches hold one adapter each: ``adapter_batching`` "group", or packed items whose adapters cannot
        share a pass (``can_stack``: PEFT's mixed forward needs padded rows)."""
        if self.adapter_batching == "group":
            return True
        return packed and not can_stack(self, sorted(set(adapters) - {BASE}), dropout_disabled=True)

    def _gather(self, parts: Sequence["_RunPart"], count: int, return_multivector: bool, packed: bool,
                order: list[int] | None = None) -> list[torch.Tensor]:
        """Every item's vectors on the CPU, at its index in the call (``order``: each position's index in the call,
        when ``_grouped_by_adapter`` re-sorted the items)."""
        results: list[torch.Tensor | None] = [None] * count
        for part in parts:
            if part.ready is not None:
                part.ready.synchronize()  # (without the interpreter lock)
            for batch, vectors, masks in part.outputs:
                lengths = [len(part.tokenized[i]) for i in batch]
                for index, vector in zip(batch, self._split_vectors(vectors, masks, lengths, return_multivector, packed)):
                    position = part.offset + index
                    results[position if order is None else order[position]] = vector
        return results

    def _image_token_bound(self, limits: tuple[int, int]) -> int:
        """The most tokens an image can take under these pixel limits (one token per merged patch)."""
        image_processor = self.processor.image_processor
        return limits[1] // (image_processor.patch_size * image_processor.merge_size) ** 2

    def encode_query(self, items, **kwargs):
        """``encode`` with the retrieval query prompt (the task can still be given per item)."""
        return self.encode(items, task=kwargs.pop("task", "retrieval.query"), **kwargs)

    def encode_document(self, items, **kwargs):
        """``encode`` with the retrieval passage prompt (the task can still be given per item)."""
        return self.encode(items, task=kwargs.pop("task", "retrieval.passage"), **kwargs)

    def save_integration_files(self, save_directory: str | os.PathLike) -> list[str]:
        """Copy the files that let sentence-transformers and transformers' ``pipeline`` load this model (modules.json,
        config_sentence_transformers.json and their modules) from the repository it was loaded from; returns the names
        copied. ``save_pretrained`` calls it, so a saved model loads in those libraries as it is."""
        import shutil

        from transformers.utils import cached_file

        names = ("modules.json", "config_sentence_transformers.json", "sentence_transformers_nova_embeddings_v1.py",
                 "pipeline_nova_embeddings_v1.py")
        copied, missing = [], []
        for name in names:
            source = cached_file(self.config._name_or_path, name, _raise_exceptions_for_missing_entries=False,
                                 _raise_exceptions_for_connection_errors=False) if self.config._name_or_path else None
            if source is None:
                missing.append(name)
                continue
            target = os.path.join(save_directory, name)
            if not (os.path.exists(target) and os.path.samefile(source, target)):
                shutil.copyfile(source, target)
            copied.append(name)
        if missing:
            warnings.warn(f"{self.config._name_or_path or 'the source repository'} has no {missing}: the saved model "
                          "will not load in sentence-transformers / pipeline() without them", stacklevel=2)
        return copied

    def _check_encode_args(self, return_multivector, dimensions, batch_size, max_batch_tokens, output, truncate) -> None:
        if not isinstance(output, str) or output not in OUTPUT_FORMATS:
            raise ValueError(f"output must be one of {OUTPUT_FORMATS}, got {output!r}")
        for name, value in (("return_multivector", return_multivector), ("truncate", truncate)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if dimensions is not None:
            if return_multivector:
                raise ValueError("dimensions applies to single vectors only (return_multivector=False)")
            if not _is_int(dimensions) or dimensions not in self.config.matryoshka_dims:
                raise ValueError(f"dimensions={dimensions!r} is not allowed; choose one of {self.config.matryoshka_dims}")
        _require_positive_int("batch_size", batch_size)
        _require_positive_int("max_batch_tokens", max_batch_tokens)

    def _empty_result(self, return_multivector: bool, dimensions: int | None, output: str):
        """What ``encode([])`` returns: no vectors, in the requested type and width (as sentence-transformers)."""
        if return_multivector:
            return []
        width = dimensions or self.config.embedding_dim
        return _convert(torch.zeros(0, width), False, output)

    @contextmanager
    def dropout_disabled(self):
        """Every submodule in eval mode for a while, then each back in its own mode.

        PEFT creates LoRA layers (dropout 0.1 in jina's adapters) in training mode, and users may call
        ``get_peft_model`` or ``train()`` on parts of the model: inference must not depend on any of that.
        """
        training = [module for module in module_index(self).modules if module.training]
        for module in training:
            module.training = False
        pinned, self._dropout_pinned = self._dropout_pinned, True
        try:
            yield
        finally:
            self._dropout_pinned = pinned
            for module in training:
                module.training = True

    @staticmethod
    def plan_batches(
        tokenized: Sequence[TokenizedItem], batch_size: int, max_batch_tokens: int, groups: Sequence[str] | None = None,
        padded: bool = True,
    ) -> list[list[int]]:
        """Longest first, cut when the batch's size would pass the token budget or it would hold more than
        ``PICTURES_PER_BATCH`` pictures (their preprocessing then pipelines with the GPU).

        The size is items x longest when batches are padded, the sum of lengths when they are packed.
        With ``groups`` (one key per item, e.g. its adapter), a batch never mixes groups.
        An item longer than the budget runs alone.
        """
        group_of = (lambda i: groups[i]) if groups is not None else (lambda i: "")
        order = sorted(range(len(tokenized)), key=lambda i: (group_of(i), -len(tokenized[i])))
        batches: list[list[int]] = []
        current: list[int] = []
        total = pictures = 0
        for index in order:
            longest = len(tokenized[current[0]]) if current else len(tokenized[index])
            size = (len(current) + 1) * longest if padded else total + len(tokenized[index])
            new_group = current and group_of(current[0]) != group_of(index)
            picture = tokenized[index].item.image is not None
            if current and (new_group or len(current) >= batch_size or size > max_batch_tokens
                            or pictures + picture > PICTURES_PER_BATCH):
                batches.append(current)
                current, total, pictures = [], 0, 0
            current.append(index)
            total += len(tokenized[index])
            pictures += picture
        if current:
            batches.append(current)
        return batches

    def _run_batches(self, tokenized, batches, adapters, limits, return_multivector, packed, show_progress_bar):
        """Run every batch on the model, in order; returns (indices, vectors, output mask) per batch, and on CUDA the
        event after which the vectors, copied to pinned host memory, can be read.

        Worker threads collate (and, for images, preprocess) the next batches while the GPU runs the current
        one; outputs stay on the device until every batch is queued so the GPU queue never waits on a copy. Their
        copies to the host are queued before the adapter lock is let go, so a call from another thread (a server's
        next batch) queues its GPU work behind them, not ahead, while this one waits for them. The adapter lock
        is held throughout: no batch runs while adapters are loaded, unloaded, merged or restored.
        """
        group_tokens = {}
        for batch in batches:
            group_tokens[adapters[batch[0]]] = group_tokens.get(adapters[batch[0]], 0) + sum(len(tokenized[i]) for i in batch)
        device_outputs = []
        self._compile_before_first_batch()
        graphs = self.small_call_graphs() if packed else None
        prepare = functools.partial(self._prepare_batch, stage_for=graphs)
        with self._adapter_lock, _Prefetcher(prepare, tokenized, batches, limits, packed) as prepared, \
                self.dropout_disabled(), self.adapter_manager.call_scope() as router:
            missing = sorted(set(adapters) - set(self.list_adapters()) - {BASE})
            if missing:
                raise ValueError(f"adapter(s) {missing} were unloaded while the call was being prepared")
            for batch, (inputs, staged, pictures_ready) in _progress(prepared, show_progress_bar, len(tokenized),
                                                                     total=len(batches)):
                self._await_pictures(inputs, pictures_ready)
                names = [adapters[i] for i in batch]
                row_names = router.enter(names, group_tokens.get(names[0], 0))
                output_mask = inputs["output_mask"]  # BatchFeature.to moves in place: keep the CPU mask
                route = graphs.route(names) if graphs is not None and router.merged is None and \
                    graphs.accepts(inputs) else None
                if route is not None:
                    vectors = graphs.run(inputs, names, route, return_multivector, staged)
                else:
                    out = self(**inputs.to(self.execution_device, non_blocking=True), return_multivector=return_multivector,
                               adapter_names=row_names)
                    vectors = out.multi_vector if return_multivector else out.single_vector
                device_outputs.append((batch, vectors, output_mask))
            return self._start_download(device_outputs)

    def _start_download(self, outputs: list[tuple[list[int], torch.Tensor, torch.Tensor]]):
        """On CUDA, queue each batch's vectors' copy to pinned host memory and an event after them; elsewhere the
        outputs as they are."""
        if self.execution_device.type != "cuda":
            return outputs, None
        outputs = [(batch, vectors.to("cpu", non_blocking=True), mask) for batch, vectors, mask in outputs]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.execution_device))
        return outputs, ready

    def _prepare_batch(self, batch_items: list[TokenizedItem], limits: tuple[int, int], packed: bool,
                       stage_for: SmallCallGraphs | None = None) -> tuple[Any, StaticBatch | None, Any]:
        """CPU side of a batch (runs in a worker thread): collate, rope positions, pinned memory; for a batch the
        call's graphs (``stage_for``) accept, its inputs already padded into the graph's layout
        (``StaticBatch.staged``), so that the thread issuing the GPU work only queues copies (in a busy server each
        small host op there can wait for the interpreter lock).

        Pictures are resized and normalised on the GPU when ``image_preprocessing_device`` says so, on a side
        stream (the thread then never waits for the model's queued work); the third element is the CUDA event
        after which their pixel values are ready (``_await_pictures``), else None."""
        image_device = self.image_preprocessing_device() if any(t.item.image is not None for t in batch_items) else None
        with nullcontext() if image_device is None else torch.cuda.stream(self._image_stream(image_device)):
            if packed:
                inputs = self.processor.collate_packed(batch_items, min_pixels=limits[0], max_pixels=limits[1],
                                                       image_device=image_device)
                inputs["position_ids"] = self.packed_position_ids(
                    inputs["input_ids"], inputs["cu_seqlens"], inputs.get("image_grid_thw"))
            else:
                inputs = self.processor.collate(batch_items, min_pixels=limits[0], max_pixels=limits[1],
                                                image_device=image_device)
                inputs["position_ids"] = self.rope_position_ids(
                    inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"))
            if stage_for is not None and stage_for.accepts(inputs):
                return inputs, StaticBatch.staged(inputs, self.execution_device), None
            if "pixel_values" in inputs:  # the tower casts them to its dtype anyway: cast here, half the bytes to move
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.visual.dtype)
            pictures_ready = None
            if image_device is not None:
                pictures_ready = torch.cuda.Event()
                pictures_ready.record()
        if self.execution_device.type == "cuda":
            for key, value in inputs.items():
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    inputs[key] = value.pin_memory()
        return inputs, None, pictures_ready

    def image_preprocessing_device(self) -> torch.device | None:
        """Where ``encode`` resizes and normalises pictures: the model's GPU (``gpu_image_preprocessing`` "auto", on
        CUDA, with transformers' torchvision image processor), else None: the CPU. On the H200 machine a batch of 8
        pages took 97 ms of CPU work, 27 ms this way; vectors differ from the CPU's by the resize's rounding."""
        if self.gpu_image_preprocessing not in ("auto", "off"):
            raise ValueError(f"gpu_image_preprocessing must be 'auto' or 'off', got {self.gpu_image_preprocessing!r}")
        device = self.execution_device
        if self.gpu_image_preprocessing == "off" or device.type != "cuda" or not self.processor.preprocesses_on_device:
            return None
        return device

    def _image_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream pictures are preprocessed on (one per device, shared by the collate workers)."""
        with self._image_streams_lock:
            if device not in self._image_streams:
                self._image_streams[device] = torch.cuda.Stream(device)
            return self._image_streams[device]

    @staticmethod
    def _await_pictures(inputs: dict[str, Any], pictures_ready: Any) -> None:
        """Make the current stream wait for pixel values preprocessed on the side stream, and tell the caching
        allocator they are used here (else it could hand their memory to the next batch's preprocessing while
        this batch's kernels are still queued)."""
        if pictures_ready is None:
            return
        pixels = inputs["pixel_values"]
        stream = torch.cuda.current_stream(pixels.device)
        stream.wait_event(pictures_ready)
        pixels.record_stream(stream)

    @staticmethod
    def _split_vectors(vectors, masks, lengths, return_multivector, packed) -> list[torch.Tensor]:
        vectors = vectors.cpu()
        if not return_multivector:
            return list(vectors)
        if packed:
            rows, row_masks = torch.split(vectors[0], lengths), torch.split(masks[0], lengths)
            return [row[mask] for row, mask in zip(rows, row_masks)]
        return [vectors[row][masks[row]] for row in range(len(lengths))]

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
        self, images: Sequence[Any] | Any, *, min_pixels: int | None = None, max_pixels: int | None = None,
        batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Vision-tower output per image, to reuse across tasks, instructions and adapters.

        Each entry is ``{"image_embeds": (image_tokens, hidden), "image_grid_thw": (3,)}`` and can be given
        to ``encode`` as an item's ``image_embeds`` (the dict itself, or its two fields). One image given alone
        (not in a list or tuple) is one image: a path or bytes is never read as a sequence of images.
        """
        _require_positive_int("batch_size", batch_size)  # as encode: range() would skip every image, or fail raw
        if not isinstance(images, (list, tuple)):
            images = [images]
        processor = self.processor
        low, high = processor.pixel_limits(self.config, min_pixels, max_pixels)
        items = processor.normalize_items([{"image": image} for image in images], config=self.config)
        for item in items:  # an image that cannot be resized is named before any batch runs, as in encode
            processor.image_grid(item, (low, high))
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels = processor.process_pictures([item.image for item in chunk], min_pixels=low, max_pixels=high,
                                                device=self.image_preprocessing_device())
            grid = pixels["image_grid_thw"].to(self.execution_device)
            with self._adapter_lock, self.dropout_disabled():  # one GPU user at a time, as encode
                features = self.vision_tower(pixels["pixel_values"].to(self.execution_device), grid)
            for embeds, thw in zip(features, grid.cpu()):  # copies: a view would keep (and save) the whole batch
                results.append({"image_embeds": embeds.to("cpu", copy=True), "image_grid_thw": thw.clone()})
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
        if not queries or not documents:  # e.g. encode([]) of an empty corpus chunk: nothing to pad or score
            return torch.zeros(len(queries), len(documents))
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


# ---------------------------------------------------------------------- packed (variable-length) attention
def _find_varlen_kernel():
    """torch's variable-length flash attention (torch >= 2.10 on CUDA) and its extra keyword arguments, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    extra = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    return functools.partial(varlen_attn, **extra)


_VARLEN_KERNEL = _find_varlen_kernel()  # found once at import: a plain global, which compiled blocks read as a constant


def _varlen_kernel():
    return _VARLEN_KERNEL


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over sequences packed into one row: (1, heads, tokens, dim) -> (1, tokens, heads, dim).

    On CUDA in half precision it is one ``varlen_attn`` call (causal through ``window_size``); elsewhere each
    sequence runs through SDPA on its own, the plain path CPU tests compare against.
    """
    if cu_seq_lens_q is None:
        raise ValueError("packed attention needs cu_seq_lens_q (the model passes it in packed mode)")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if _may_run_dense(query, max_length_q):
        return _long_packed_attention(query, key, value, cu_seq_lens_q, int(max_length_q), causal, scaling), None
    return _varlen_attention(query, key, value, cu_seq_lens_q, max_length_q, causal, scaling), None


def _varlen_attention(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, causal: bool,
                      scaling: float | None) -> torch.Tensor:
    """One ``varlen_attn`` call on CUDA in half precision, per-sequence SDPA elsewhere: (1, tokens, heads, dim)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    kernel = _varlen_kernel()
    if kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
        out = kernel(q, k, v, cu, cu, int(max_length), int(max_length), scale=scaling,
                     window_size=(-1, 0) if causal else (-1, -1))
    else:
        out = _attention_per_sequence(q, k, v, cu_seq_lens.tolist(), causal, scaling)
    return out.unsqueeze(0)


def _may_run_dense(query: torch.Tensor, max_length: int | None) -> bool:
    """Rows whose longest item is long enough for cuDNN's dense attention to pay, on CUDA in half precision, at
    inference. Only the longest length is tested here (inside compiled blocks: one guard, two variants)."""
    return (DENSE_ATTENTION and max_length is not None and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled()
            and int(max_length) >= DENSE_MIN_LENGTH)


@torch.compiler.disable
def _long_packed_attention(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, causal: bool,
                           scaling: float | None) -> torch.Tensor:
    """Attention of a row of long items: dense cuDNN when they all have one length, else varlen flash.

    Runs outside compiled blocks (a graph break, negligible next to attention over thousands of tokens), so the
    choice, made on host numbers at every call, never adds a guard that a new item count would recompile."""
    items = cu_seq_lens.shape[0] - 1
    if items * max_length == query.shape[2]:
        return dense_attention(query, key, value, items, causal, scaling, _cudnn_attention)
    return _varlen_attention(query, key, value, cu_seq_lens, max_length, causal, scaling)


def dense_attention(query, key, value, items: int, causal: bool, scaling: float | None, kernel) -> torch.Tensor:
    """Attention of a packed row of ``items`` equal-length sequences as one dense batch.

    (1, heads, tokens, dim) inputs are viewed as (items, heads, length, dim); grouped KV heads are repeated to
    the query heads; returns (1, tokens, heads, dim) like the varlen path. ``kernel(q, k, v, causal, scaling)``
    is cuDNN's attention on CUDA (tests pass SDPA's)."""
    def batched(t: torch.Tensor) -> torch.Tensor:
        heads, tokens, dim = t.shape[1:]
        return t[0].view(heads, items, tokens // items, dim).transpose(0, 1)  # a view: (items, heads, length, dim)

    q, k, v = batched(query), batched(key), batched(value)
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = kernel(q, k, v, causal, scaling).transpose(1, 2)  # (items, length, heads, dim)
    return out.reshape(1, -1, *out.shape[-2:])


def _cudnn_attention(q, k, v, causal: bool, scaling: float | None) -> torch.Tensor:
    """cuDNN's fused attention, called directly (SDPA's dispatcher ranks it below flash attention)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False, scale=scaling)[0]


def _attention_per_sequence(q, k, v, bounds: list[int], causal: bool, scaling: float | None) -> torch.Tensor:
    repeat = q.shape[1] // k.shape[1]  # grouped KV heads: each KV head serves `repeat` query heads
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:  # a zero-length sequence (CUDA-graph padding): nothing to attend
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        ks, vs = ks.repeat_interleave(repeat, dim=0), vs.repeat_interleave(repeat, dim=0)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scaling)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


# ---------------------------------------------------------------------- helpers
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _grouped_by_adapter(items: list[EmbeddingItem], adapters: list[str]) -> tuple[list, list, list[int]]:
    """The call's items and adapters sorted by adapter (stably), and where each came from. A pipelined call whose
    batches hold one adapter each then starts the GPU on one adapter's items: in call order, its first part (about
    one batch) spread over every adapter and ran as that many small batches (and merges), then the rest as many
    again. Items keep their ``index``, so errors still name each item by its place in the call."""
    order = sorted(range(len(adapters)), key=adapters.__getitem__)
    return [items[i] for i in order], [adapters[i] for i in order], order


def _lead_items(items: Sequence[EmbeddingItem], batch_size: int, max_batch_tokens: int, image_tokens: int) -> int:
    """How many items to tokenise before the GPU starts: about one batch (``batch_size`` items, or about
    ``max_batch_tokens`` tokens, counted before tokenisation as characters / CHARS_PER_TOKEN and images at their
    most tokens); at least one item."""
    count, tokens = 0, 0
    for item in items[:batch_size]:
        text = len(item.text or "") + len(item.instructions or "")
        image = item.image_embeds.shape[0] if item.image_embeds is not None else image_tokens if item.has_image else 0
        tokens += text // CHARS_PER_TOKEN + image
        if count and tokens > max_batch_tokens:
            break
        count += 1
    return max(count, 1)


def _progress(batches: Iterable, show: bool | None, n_items: int, total: int) -> Iterable:
    """A tqdm bar over batches: shown when asked, or by default for long inputs (256+ items)."""
    if show is None:
        show = n_items >= 256 and total > 1
    if not show:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="encode", unit="batch", total=total)


BLOCK_VARIANTS = 64  # compiled variants allowed per block code object (dynamo's default recompile_limit is 8)


def _allow_block_variants() -> None:
    """Raise dynamo's per-function recompile limit to ``BLOCK_VARIANTS`` (never lower it).

    PEFT's LoRA forward branches on the layer's adapter state (active adapter, merged or not, disabled), so dynamo
    guards on it and compiles one variant of a block per state a call puts the blocks in: with three task adapters,
    a custom one, merged groups and stacked passes, more than 8. Past the limit dynamo runs every new state eagerly
    for the rest of the process; measured on the H200, workload 4 (four adapters in one call) hit it, and some of
    its adapter groups ran uncompiled. The setting is process-wide (dynamo has no per-function one)."""
    import torch._dynamo

    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, BLOCK_VARIANTS)


class _Prefetcher:
    """Iterate (batch, prepared inputs) in order while worker threads prepare the next batches."""

    def __init__(self, prepare, tokenized, batches, limits, packed, ahead: int = PREFETCH_BATCHES):
        self._prepare, self._tokenized, self._batches = prepare, tokenized, batches
        self._limits, self._packed, self._ahead = limits, packed, ahead
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self):
        if len(self._batches) > 1:  # one batch: nothing to overlap, no threads
            self._pool = ThreadPoolExecutor(max_workers=self._ahead, thread_name_prefix="nova-collate")
        return self

    def __exit__(self, *exc_info):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, batch):
        return self._pool.submit(self._prepare, [self._tokenized[i] for i in batch], self._limits, self._packed)

    def __iter__(self):
        if self._pool is None:
            for batch in self._batches:
                yield batch, self._prepare([self._tokenized[i] for i in batch], self._limits, self._packed)
            return
        pending = deque(self._submit(batch) for batch in self._batches[: self._ahead])
        for position, batch in enumerate(self._batches):
            inputs = pending.popleft().result()  # re-raises a worker's error (e.g. an unreadable image) here
            if position + self._ahead < len(self._batches):
                pending.append(self._submit(self._batches[position + self._ahead]))
            yield batch, inputs


def _packed_text_positions(cu_seqlens: torch.Tensor, tokens: int) -> torch.LongTensor:
    """``packed_position_ids`` of a text-only batch on the host, in numpy: a collate worker of a busy server runs
    it, where each torch call lets go of the interpreter lock and may wait to get it back."""
    cu = cu_seqlens.numpy().astype(np.int64)
    positions = np.arange(tokens, dtype=np.int64) - np.repeat(cu[:-1], np.diff(cu))
    return torch.from_numpy(np.repeat(positions[None, None, :], 3, axis=0))


def _convert(vectors, multi: bool, output: str):
    """torch (float32, CPU) -> the requested output format."""
    if output == "torch":
        return vectors
    if output == "numpy":
        return [v.numpy() for v in vectors] if multi else vectors.numpy()
    if output == "list":
        return [v.tolist() for v in vectors]
    return [base64.b64encode(np.ascontiguousarray(v.numpy(), dtype="<f4").tobytes()).decode("ascii") for v in vectors]


__all__ = ["NovaEmbeddingsV1Model", "NovaEmbeddingsV1Output", "PreparedItems"]
