"""nova-embeddings-v1: Qwen2.5-VL as a multimodal, instruction-aware embedding model.

The model holds transformers' ``Qwen2_5_VLModel`` (vision tower + language model, no LM head) and a
``multi_vector_projector``. ``forward`` maps a padded batch from the processor to the final-norm hidden
states, one L2-normalised mean-pooled vector per item and L2-normalised per-token vectors.
``encode`` is the user-facing loop: validate -> tokenise -> sort by length -> batch by a token budget
-> forward -> unsort -> convert.
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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, Qwen2_5_VLModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

from .configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config
from .processing_nova_embeddings_v1 import TASK_ADAPTER, EmbeddingItem, ItemError, NovaEmbeddingsV1Processor, TokenizedItem
from .vision_nova_embeddings_v1 import fast_vision_tower

OUTPUT_FORMATS = ("torch", "numpy", "list", "base64")
# transformers routes attention through its AttentionInterface registry; the name contains "flash" so that the
# vision tower hands over its cu_seqlens (one call per layer instead of one per window).
PACKED_ATTENTION = "nova_flash_varlen"
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_MIN_TOKENS = 4096  # below this, merging (two weight copies of ~5.5 GB at full size) costs more than unmerged LoRA
PREFETCH_BATCHES = 3  # batches collated ahead by worker threads


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
        self._adapter_lock = threading.RLock()  # no batch ever runs while adapters are being loaded or removed
        self._adapters: dict[str, str] = {}  # adapter name -> where it was loaded from
        self.adapter_batching = "group"  # "group": one adapter per batch; "mixed": PEFT mixed-adapter batches
        self.attention_packing = "auto"  # "auto": packed variable-length attention on CUDA in half precision; "on"; "off"
        self.adapter_merging = "auto"  # "auto": merge a batch group's adapter into the weights on CUDA when it pays; "on"; "off"
        self.fast_vision = True  # vision tower through FastVisionTower (same result, cached grid tables); False: stock
        self._route: tuple | None = None  # current LoRA layer state: ("base",), ("active", name), ("merged", name), ("mixed",)
        self._merge_backup: dict = {}
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_task_adapters: bool = True, **kwargs):
        """Load the backbone, then the task adapters found under ``adapters/<task>/`` of the same repository."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if load_task_adapters:
            model.load_task_adapters(pretrained_model_name_or_path)
        return model

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
        multi vector. ``adapter_names`` (one per row, ``"__base__"`` for none) routes rows to LoRA adapters
        through PEFT's mixed-batch forward; without it PEFT's active adapter applies.
        Single vectors are (items, hidden); multi vectors keep the input layout, zero outside output_mask.
        """
        kwargs.pop("mm_token_type_ids", None)
        if attention_mask is None and cu_seqlens is None:
            attention_mask = torch.ones_like(input_ids)
        with self._route_rows(adapter_names):
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
        with self._attention_implementation(self.model.language_model, PACKED_ATTENTION):
            return self.model.language_model(
                inputs_embeds=inputs_embeds, attention_mask=no_mask, position_ids=position_ids, use_cache=False,
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen, **kwargs,
            ).last_hidden_state  # (1, tokens, hidden)

    def packed_position_ids(self, input_ids: torch.LongTensor, cu_seqlens: torch.Tensor,
                            image_grid_thw: torch.LongTensor | None) -> torch.LongTensor:
        """3D rope positions of packed items, each counted from 0 as if it were alone: (3, 1, tokens)."""
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
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        weights = pooling_mask.to(torch.float32)
        sums = torch.zeros(len(lengths), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
        sums.index_add_(0, segment, hidden.to(torch.float32) * weights.unsqueeze(-1))
        counts = torch.zeros(len(lengths), device=hidden.device, dtype=torch.float32).index_add_(0, segment, weights)
        return F.normalize(sums / counts.clamp(min=1.0).unsqueeze(-1), dim=-1)

    @contextmanager
    def _attention_implementation(self, module: nn.Module, name: str):
        """Run ``module``'s attention through ``name`` for a while: transformers reads it at every call."""
        config = module.config
        previous = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = previous

    def compile_layers(self, vision: bool = True, **compile_kwargs: Any) -> None:
        """Compile each decoder block with ``torch.compile`` (regional compilation: one graph shared by all
        blocks, dynamic sequence length). Fuses the norms, rotary and activation kernels that eager mode runs
        one by one; the first calls pay the compilation. Opt-in: ``model.compile_layers()``.
        """
        compile_kwargs.setdefault("dynamic", True)
        blocks = list(self.model.language_model.layers) + (list(self.model.visual.blocks) if vision else [])
        for block in blocks:
            block.compile(**compile_kwargs)

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
            with self._attention_implementation(visual, PACKED_ATTENTION):
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

    # ------------------------------------------------------------------ adapters (PEFT LoRA)
    def load_task_adapters(self, repo: str | os.PathLike) -> None:
        """Load ``adapters/<task>/`` for every task of the config; warn about the ones without weights."""
        missing = []
        for task in self.config.task_names:
            folder = _resolve_adapter_folder(str(repo), f"{self.config.adapters_dir}/{task}")
            if folder is None:
                missing.append(task)
                continue
            self.load_adapter(folder, adapter_name=task)
        if missing and len(missing) == len(self.config.task_names):
            warnings.warn(f"no task adapter weights under {repo}/{self.config.adapters_dir}/: every task runs on the "
                          "bare backbone (run scripts/convert_jina_v4.py to bring jina's adapters)", stacklevel=3)
        elif missing:
            warnings.warn(f"task adapters without weights: {missing}; items of these tasks will be refused "
                          "unless they pass adapter=None", stacklevel=3)

    def load_adapter(self, peft_model_id: str | os.PathLike, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Load a standard PEFT LoRA adapter (a local folder, a Hub repo id, or its adapter_model.safetensors).

        All or nothing: a failed load (bad path, wrong targets, rank or shapes, name clash) raises and leaves the
        loaded adapters exactly as they were.
        """
        from peft import LoraConfig, PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        name = adapter_name or "default"
        folder = _adapter_folder(peft_model_id, **kwargs)
        with self._adapter_lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded (from {self._adapters[name]}); unload it first")
            if not name or "." in name or name in (BASE, TASK_ADAPTER):
                raise ValueError(f"invalid adapter name {name!r}")
            config = PeftConfig.from_pretrained(folder)
            if not isinstance(config, LoraConfig):
                raise ValueError(f"{folder}: only LoRA adapters are supported, got {type(config).__name__}")
            config.inference_mode = True
            state = {_strip_peft_prefix(k): v for k, v in load_file(os.path.join(folder, ADAPTER_WEIGHTS)).items()}
            try:
                inject_adapter_in_model(config, self, adapter_name=name)
                result = set_peft_model_state_dict(self, state, adapter_name=name)
                self._check_adapter_fully_loaded(name, state, result)
            except Exception as error:
                self._remove_adapter_layers(name)
                self._forget_route()
                raise ValueError(f"could not load adapter {name!r} from {folder}: {error}") from error
            self.peft_config[name] = config
            self._adapters[name] = str(peft_model_id)
            self._forget_route()
            self.to(self.device)  # new LoRA weights follow the model (dtype is kept per PEFT: fp32 LoRA on bf16 is fine)

    def _check_adapter_fully_loaded(self, name: str, state: dict, result) -> None:
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if unexpected or missing:
            raise ValueError(f"{len(missing)} missing LoRA tensors (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected ones (e.g. {unexpected[:3]})")
        if not state:
            raise ValueError("the adapter file holds no tensors")

    def unload_adapter(self, adapter_name: str) -> None:
        """Remove a custom adapter. Task adapters are refused: items of their task route to them."""
        with self._adapter_lock:
            if adapter_name not in self._adapters:
                raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {self.list_adapters()}")
            if adapter_name in self.config.task_names:
                raise ValueError(f"{adapter_name!r} is a task adapter: items of task {adapter_name!r} route to it, "
                                 "so it cannot be unloaded")
            self._remove_adapter_layers(adapter_name)
            del self._adapters[adapter_name]
            self._forget_route()

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters (task adapters first)."""
        tasks = [t for t in self.config.task_names if t in self._adapters]
        return tasks + sorted(n for n in self._adapters if n not in tasks)

    def _remove_adapter_layers(self, name: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        with warnings.catch_warnings():  # PEFT notes which adapter becomes "active": routing never uses that
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            for module in self.modules():
                if isinstance(module, BaseTunerLayer) and name in module.lora_A:
                    module.delete_adapter(name)
        getattr(self, "peft_config", {}).pop(name, None)

    def resolve_adapter(self, item: EmbeddingItem, call_adapter: str | None = TASK_ADAPTER) -> str:
        """The adapter an item runs with: its own ``adapter``, else the call's, else its task's."""
        chosen = item.adapter if item.adapter != TASK_ADAPTER else call_adapter
        if chosen is None:
            return BASE
        if chosen != TASK_ADAPTER:
            if chosen not in self._adapters:
                raise ItemError(item.index, f"unknown adapter {chosen!r}; loaded adapters: {self.list_adapters()}")
            return chosen
        task_adapter = self.config.adapter_task(item.task)
        if task_adapter in self._adapters:
            return task_adapter
        if not self._adapters:
            return BASE  # a model without any adapter weights (warned about at load time)
        raise ItemError(item.index, f"task {item.task!r} routes to adapter {task_adapter!r}, which is not loaded; "
                                    f"loaded adapters: {self.list_adapters()} (pass adapter=None for the bare backbone)")

    @contextmanager
    def _route_rows(self, adapter_names: list[str] | None):
        """Route each row to its adapter with PEFT's own mixed-batch pre-forward hook on every LoRA layer."""
        if adapter_names is None or not self._adapters:
            yield
            return
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook

        hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.modules() if isinstance(m, LoraLayer)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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
        adapter: str | None = TASK_ADAPTER,
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
            adapter: adapter for items that do not name one: a loaded adapter's name, or None for the bare
                backbone; by default each item uses its task's adapter.

        Returns single vectors as one (N, D) tensor/array (a list for "list"/"base64"), multi vectors as a
        list of (tokens_i, dim) tensors/arrays, in input order.
        """
        self._check_encode_args(return_multivector, dimensions, batch_size, max_batch_tokens, output)
        processor, config = self.processor, self.config
        limits = processor.pixel_limits(config, min_pixels, max_pixels)
        normalized = processor.normalize_items(items, task=task, instructions=instructions, config=config)
        adapters = [self.resolve_adapter(item, adapter) for item in normalized]
        tokenized = processor.tokenize_items(
            normalized, config=config, min_pixels=limits[0], max_pixels=limits[1], truncate=truncate
        )
        packed = self.use_packed_attention()
        groups = adapters if (packed or self.adapter_batching == "group") else None  # a packed row has one adapter
        batches = self.plan_batches(tokenized, batch_size, max_batch_tokens, groups=groups, padded=not packed)
        was_training = self.training
        if was_training:
            self.eval()
        try:
            outputs = self._run_batches(tokenized, batches, adapters, limits, return_multivector, packed, show_progress_bar)
        finally:
            if was_training:
                self.train()
        results: list[torch.Tensor | None] = [None] * len(tokenized)
        for batch, vectors in outputs:
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

    @staticmethod
    def plan_batches(
        tokenized: Sequence[TokenizedItem], batch_size: int, max_batch_tokens: int, groups: Sequence[str] | None = None,
        padded: bool = True,
    ) -> list[list[int]]:
        """Longest first, cut when the batch's size would pass the token budget.

        The size is items x longest when batches are padded, the sum of lengths when they are packed.
        With ``groups`` (one key per item, e.g. its adapter), a batch never mixes groups.
        An item longer than the budget runs alone.
        """
        group_of = (lambda i: groups[i]) if groups is not None else (lambda i: "")
        order = sorted(range(len(tokenized)), key=lambda i: (group_of(i), -len(tokenized[i])))
        batches: list[list[int]] = []
        current: list[int] = []
        total = 0
        for index in order:
            longest = len(tokenized[current[0]]) if current else len(tokenized[index])
            size = (len(current) + 1) * longest if padded else total + len(tokenized[index])
            new_group = current and group_of(current[0]) != group_of(index)
            if current and (new_group or len(current) >= batch_size or size > max_batch_tokens):
                batches.append(current)
                current, total = [], 0
            current.append(index)
            total += len(tokenized[index])
        if current:
            batches.append(current)
        return batches

    def _run_batches(self, tokenized, batches, adapters, limits, return_multivector, packed, show_progress_bar):
        """Run every batch on the model, in order; returns (indices, per-item vectors on the CPU) per batch.

        Worker threads collate (and, for images, preprocess) the next batches while the GPU runs the current
        one; outputs stay on the device until the end so the GPU queue never waits on a copy. The adapter lock
        is held throughout: no batch runs while adapters are loaded, unloaded, merged or restored.
        """
        group_tokens = {}
        for batch in batches:
            group_tokens[adapters[batch[0]]] = group_tokens.get(adapters[batch[0]], 0) + sum(len(tokenized[i]) for i in batch)
        device_outputs = []
        with self._adapter_lock, _Prefetcher(self._prepare_batch, tokenized, batches, limits, packed) as prepared:
            for name in set(adapters):
                if name != BASE and name not in self._adapters:
                    raise ValueError(f"adapter {name!r} was unloaded while the call ran")
            try:
                for batch, inputs in _progress(prepared, show_progress_bar, len(tokenized), total=len(batches)):
                    names = [adapters[i] for i in batch]
                    row_names = self._enter_adapter(names, group_tokens.get(names[0], 0))
                    output_mask = inputs["output_mask"]  # BatchFeature.to moves in place: keep the CPU mask
                    out = self(**inputs.to(self.device, non_blocking=True), return_multivector=return_multivector,
                               adapter_names=row_names)
                    vectors = out.multi_vector if return_multivector else out.single_vector
                    device_outputs.append((batch, vectors, output_mask))
            finally:
                self._set_route(("active", self._route[1]) if self._route and self._route[0] == "merged" else self._route)
        return [(batch, self._split_vectors(vectors, masks, [len(tokenized[i]) for i in batch], return_multivector, packed))
                for batch, vectors, masks in device_outputs]

    def _prepare_batch(self, batch_items: list[TokenizedItem], limits: tuple[int, int], packed: bool):
        """CPU side of a batch (runs in a worker thread): collate, rope positions, pinned memory."""
        if packed:
            inputs = self.processor.collate_packed(batch_items, min_pixels=limits[0], max_pixels=limits[1])
            inputs["position_ids"] = self.packed_position_ids(
                inputs["input_ids"], inputs["cu_seqlens"], inputs.get("image_grid_thw"))
        else:
            inputs = self.processor.collate(batch_items, min_pixels=limits[0], max_pixels=limits[1])
            inputs["position_ids"] = self.rope_position_ids(
                inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"))
        if self.device.type == "cuda":
            for key, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    inputs[key] = value.pin_memory()
        return inputs

    @staticmethod
    def _split_vectors(vectors, masks, lengths, return_multivector, packed) -> list[torch.Tensor]:
        vectors = vectors.cpu()
        if not return_multivector:
            return list(vectors)
        if packed:
            rows, row_masks = torch.split(vectors[0], lengths), torch.split(masks[0], lengths)
            return [row[mask] for row, mask in zip(rows, row_masks)]
        return [vectors[row][masks[row]] for row in range(len(lengths))]

    def _enter_adapter(self, names: list[str], group_tokens: int) -> list[str] | None:
        """Make the model compute with this batch's adapter(s); returns per-row names when rows differ.

        One adapter per batch: merged into the weights when the call has enough of its tokens (PEFT's merge,
        the originals kept to restore exactly), else made PEFT's active adapter; the bare backbone disables
        the LoRA layers. Rows with different adapters go through PEFT's mixed-batch forward.
        """
        name = names[0]
        if len(set(names)) > 1:
            self._set_route(("mixed",))
            return names
        if not self._adapters:
            return None
        if name != BASE and self._should_merge(group_tokens):
            self._set_route(("merged", name))
        else:
            self._set_route(("base",) if name == BASE else ("active", name))
        return None

    def _set_route(self, route: tuple) -> None:
        """Switch the LoRA layers' state (only when it changes: it touches every layer)."""
        if route == self._route:
            return
        from peft.tuners.lora.layer import LoraLayer

        self._restore_merged_adapter()
        layers = [m for m in self.modules() if isinstance(m, LoraLayer)]
        kind = route[0]
        for layer in layers:  # PEFT's own switches, called only where the state differs (each walks every adapter)
            if layer.disable_adapters != (kind == "base"):
                layer.enable_adapters(kind != "base")
            if kind in ("active", "merged") and route[1] in layer.lora_A and layer.active_adapters != [route[1]]:
                layer.set_adapter(route[1], inference_mode=True)
        if kind == "merged":
            self._merge_adapter(route[1], layers)
        self._route = route

    def _forget_route(self) -> None:
        """Adapters changed: the cached layer state no longer holds."""
        self._restore_merged_adapter()
        self._route = None

    def _should_merge(self, group_tokens: int) -> bool:
        if self.adapter_merging == "on":
            return True
        if self.adapter_merging == "off":
            return False
        return self.device.type == "cuda" and group_tokens >= MERGE_MIN_TOKENS

    def _merge_adapter(self, name: str, layers: list) -> None:
        for module in layers:
            if name in module.lora_A:
                self._merge_backup[module] = module.get_base_layer().weight.detach().clone()
                module.merge(adapter_names=[name])

    def _restore_merged_adapter(self) -> None:
        """Put the exact original weights back (subtracting the delta again would drift in bf16)."""
        for module, weight in self._merge_backup.items():
            module.get_base_layer().weight.data.copy_(weight)
            module.merged_adapters.clear()
        self._merge_backup = {}
        if self._route and self._route[0] == "merged":
            self._route = None

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
            with self._adapter_lock:  # one GPU user at a time, as encode
                features = self.vision_tower(pixels["pixel_values"].to(self.device), grid)
            for embeds, thw in zip(features, grid.cpu()):
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


# ---------------------------------------------------------------------- packed (variable-length) attention
@functools.lru_cache(maxsize=None)
def _varlen_kernel():
    """torch's variable-length flash attention (torch >= 2.10 on CUDA) and its extra keyword arguments, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    extra = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    return functools.partial(varlen_attn, **extra)


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
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    kernel = _varlen_kernel()
    if kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        out = kernel(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling,
                     window_size=(-1, 0) if causal else (-1, -1))
    else:
        out = _attention_per_sequence(q, k, v, cu_seq_lens_q.tolist(), causal, scaling)
    return out.unsqueeze(0), None


def _attention_per_sequence(q, k, v, bounds: list[int], causal: bool, scaling: float | None) -> torch.Tensor:
    repeat = q.shape[1] // k.shape[1]  # grouped KV heads: each KV head serves `repeat` query heads
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        ks, vs = ks.repeat_interleave(repeat, dim=0), vs.repeat_interleave(repeat, dim=0)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scaling)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)


# ---------------------------------------------------------------------- helpers
def _strip_peft_prefix(key: str) -> str:
    return key.removeprefix("base_model.model.")


def _adapter_folder(source: str | os.PathLike, **kwargs: Any) -> str:
    """A local folder holding adapter_config.json and the weights, from a folder, a weights file or a Hub id."""
    source = str(source)
    if os.path.isfile(source) and os.path.basename(source) == ADAPTER_WEIGHTS:
        source = os.path.dirname(source) or "."
    if os.path.isdir(source):
        for needed in ("adapter_config.json", ADAPTER_WEIGHTS):
            if not os.path.isfile(os.path.join(source, needed)):
                raise ValueError(f"{source}: not a PEFT adapter folder (missing {needed})")
        return source
    if os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        raise ValueError(f"{source}: no such adapter folder or {ADAPTER_WEIGHTS} file")
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=["adapter_config.json", ADAPTER_WEIGHTS], **kwargs)


def _resolve_adapter_folder(repo: str, subfolder: str) -> str | None:
    """``repo/subfolder`` if it holds adapter weights (local folder or Hub repo), else None."""
    local = os.path.join(repo, subfolder)
    if os.path.isdir(repo):
        return local if os.path.isfile(os.path.join(local, ADAPTER_WEIGHTS)) else None
    from huggingface_hub import snapshot_download

    root = snapshot_download(repo, allow_patterns=[f"{subfolder}/*"])
    folder = os.path.join(root, subfolder)
    return folder if os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)) else None


def _progress(batches: Iterable, show: bool | None, n_items: int, total: int) -> Iterable:
    """A tqdm bar over batches: shown when asked, or by default for long inputs (256+ items)."""
    if show is None:
        show = n_items >= 256 and total > 1
    if not show:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="encode", unit="batch", total=total)


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
