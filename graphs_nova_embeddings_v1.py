"""CUDA graphs for small encode calls (one short query, a handful of texts).

A short call is launch-bound: the language model's ~36 blocks x (7 LoRA-wrapped projections, norms, rotary,
attention) issue thousands of kernels, and Python issuing them (~17 ms per forward pass, compiled blocks
included, measured on an H200) takes longer than the GPU running them. A CUDA graph records those launches
once and replays them with one call.

Every input of a replay lives in a static buffer that the graph reads, refilled with ``copy_`` (never rebound):
the packed token ids padded to a token bucket, their rope positions, ``cu_seqlens`` padded with zero-length
sequences to a fixed item count, and a pooling matrix (one row per item: its pooled tokens' weights, 1/count), so
padding tokens are never pooled. Python numbers that a capture freezes are bucket constants (``max_seqlen`` is
the bucket size, an upper bound the varlen kernel accepts). Outputs are cloned before the next replay.

A graph records the kernels of the adapter state it was captured under (which adapter, its scaling) and the
addresses of every weight, so each graph is keyed by bucket, adapter and output kind, and all graphs are dropped
when the module tree, a weight's storage, or a LoRA scaling changes (adapters loaded, unloaded, ``model.to``).
Weights changed in place (training steps, ``load_state_dict``) are read by the next replay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .modeling_nova_embeddings_v1 import NovaEmbeddingsV1Model

# A call of n packed tokens replays the smallest bucket >= n. Larger buckets (up to 4096 tokens and 64 items, in
# steps of 1.5-2x) were measured on the H200 with the load test: the server's batches (~120 short texts over three
# adapter groups) went from 1,195-1,279 to 1,452-1,495 items/s, but encode() in calls of 256 short texts fell from
# 2,078-2,155 to 1,686 items/s (at ~2.5k tokens per adapter group the bucket padding costs more GPU time than the
# replay saves in host time). Kept small until buckets are finer or chosen by cost.
TOKEN_BUCKETS = (32, 64, 128, 256, 512)
MAX_ITEMS = 16  # items per replay; cu_seqlens holds MAX_ITEMS + 2 entries (items, the padding run, empty tails)
WARMUP_RUNS = 2  # eager runs on a side stream before capture (kernel selection, lazy initialisation)


def token_bucket(tokens: int) -> int | None:
    """The smallest bucket that holds ``tokens`` packed tokens, or None if the call is too big for graphs."""
    return next((bucket for bucket in TOKEN_BUCKETS if tokens <= bucket), None)


@dataclass
class StaticBatch:
    """The buffers one graph reads and writes; a replay refills the inputs in place."""

    input_ids: torch.Tensor  # (1, bucket) long
    position_ids: torch.Tensor  # (3, 1, bucket) long
    cu_seqlens: torch.Tensor  # (MAX_ITEMS + 2,) int32
    pooling: torch.Tensor  # (MAX_ITEMS, bucket) float32: row i = item i's pooled tokens, each 1 / count
    output: torch.Tensor | None = None  # (MAX_ITEMS, hidden) single vectors or (bucket, dim) multi vectors

    @classmethod
    def empty(cls, bucket: int, device: torch.device) -> "StaticBatch":
        return cls(
            input_ids=torch.zeros(1, bucket, dtype=torch.long, device=device),
            position_ids=torch.zeros(3, 1, bucket, dtype=torch.long, device=device),
            cu_seqlens=torch.full((MAX_ITEMS + 2,), bucket, dtype=torch.int32, device=device),
            pooling=torch.zeros(MAX_ITEMS, bucket, dtype=torch.float32, device=device),
        )

    def fill(self, inputs: dict[str, torch.Tensor]) -> None:
        """Copy one packed text batch (CPU tensors from ``collate_packed``) into the buffers, padding the rest."""
        ids, positions, cu = inputs["input_ids"], inputs["position_ids"], inputs["cu_seqlens"].to(torch.int32)
        tokens, items, bucket = ids.shape[1], len(cu) - 1, self.input_ids.shape[1]
        host = StaticBatch.empty(bucket, torch.device("cpu"))
        host.input_ids[:, :tokens] = ids
        host.position_ids[:, :, :tokens] = positions
        host.position_ids[:, :, tokens:] = torch.arange(bucket - tokens)  # the padding run, as one more sequence
        host.cu_seqlens[: items + 1] = cu
        segment = torch.repeat_interleave(torch.arange(items), (cu[1:] - cu[:-1]).long())
        weights = inputs["pooling_mask"][0].to(torch.float32)
        host.pooling[segment, torch.arange(tokens)] = weights
        host.pooling[:items] /= host.pooling[:items].sum(-1, keepdim=True).clamp(min=1.0)
        for name in ("input_ids", "position_ids", "cu_seqlens", "pooling"):
            getattr(self, name).copy_(getattr(host, name), non_blocking=True)


class SmallCallGraphs:
    """Captured forward passes of the language model and the heads, per (bucket, adapter, output kind).

    ``run`` replays on CUDA; ``capture=False`` runs the same padded, static-buffer body eagerly (what the CPU
    tests check: bucket padding, zero-length sequences and the pooling matrix give the unpadded result).
    """

    def __init__(self, model: "NovaEmbeddingsV1Model", capture: bool = True):
        self.model = model
        self.capture = capture
        self.graphs: dict[tuple[int, str, bool], tuple[Any, StaticBatch]] = {}
        self.fingerprint: tuple | None = None
        self.pool = None

    @staticmethod
    def accepts(inputs: dict[str, Any]) -> bool:
        """Text-only packed batches small enough for a bucket (the vision tower syncs with the host)."""
        if "cu_seqlens" not in inputs or "pixel_values" in inputs or "image_grid_thw" in inputs:
            return False
        return len(inputs["cu_seqlens"]) - 1 <= MAX_ITEMS and token_bucket(inputs["input_ids"].shape[1]) is not None

    def run(self, inputs: dict[str, torch.Tensor], adapter: str, return_multivector: bool) -> torch.Tensor:
        """Single vectors (items, hidden) or multi vectors (1, tokens, dim) of one packed text batch."""
        self._drop_if_stale()
        tokens, items = inputs["input_ids"].shape[1], len(inputs["cu_seqlens"]) - 1
        key = (token_bucket(tokens), adapter, return_multivector)
        if key not in self.graphs:
            self.graphs[key] = self._build(key[0], return_multivector)
        graph, static = self.graphs[key]
        static.fill(inputs)
        graph()
        return static.output[:tokens].unsqueeze(0).clone() if return_multivector else static.output[:items].clone()

    def _build(self, bucket: int, return_multivector: bool) -> tuple[Callable[[], None], StaticBatch]:
        static = StaticBatch.empty(bucket, self.model.device)
        body = lambda: self._body(static, return_multivector)  # noqa: E731
        if not self.capture:
            return body, static
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                body()
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        return graph.replay, static

    def _body(self, static: StaticBatch, return_multivector: bool) -> None:
        """Embed, language model over the padded packed row, then the head, writing ``static.output``."""
        model = self.model
        bucket = static.input_ids.shape[1]
        embeds = model.embed_inputs(static.input_ids)
        hidden = model._language_model_packed(embeds, static.input_ids, static.cu_seqlens, bucket, None,
                                              static.position_ids)[0]  # (bucket, hidden)
        if return_multivector:
            static.output = F.normalize(model.multi_vector_projector(hidden).to(torch.float32), dim=-1)
        else:
            static.output = F.normalize(static.pooling @ hidden.to(torch.float32), dim=-1)

    def _drop_if_stale(self) -> None:
        """Forget every graph when what they recorded no longer holds (see the module docstring)."""
        fingerprint = self._fingerprint()
        if fingerprint != self.fingerprint:
            self.graphs.clear()
            self.pool = None
            self.fingerprint = fingerprint

    def _fingerprint(self) -> tuple:
        from .adapters_nova_embeddings_v1 import module_index

        index = module_index(self.model)
        storages = tuple(p.data_ptr() for p in index.parameters)  # model.to() swaps .data without registering
        scalings = tuple(tuple(sorted(layer.scaling.items())) for layer in index.lora_layers)
        return index.version, storages, scalings
