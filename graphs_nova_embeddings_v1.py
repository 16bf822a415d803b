"""CUDA graphs for small encode calls (a short query, a handful of texts, a server batch of short texts planned
into graph-sized batches: up to 2048 tokens and 64 items each).

A short call is launch-bound: the language model's ~36 blocks x (7 LoRA-wrapped projections, norms, rotary,
attention) issue thousands of kernels, and Python issuing them (~17 ms per forward pass, compiled blocks
included, measured on an H200) takes longer than the GPU running them. A CUDA graph records those launches
once and replays them with one call.

Every input of a replay lives in a static buffer that the graph reads, refilled with ``copy_`` (never rebound; on
CUDA asynchronously, from pinned host buffers written in the collate worker):
the packed token ids padded to a token bucket, their rope positions, ``cu_seqlens`` padded with zero-length
sequences to a fixed item count, and a pooling matrix (one row per item: its pooled tokens' weights, 1/count), so
padding tokens are never pooled. Python numbers that a capture freezes are bucket constants (``max_seqlen`` is
the bucket size, an upper bound the varlen kernel accepts). Outputs are cloned before the next replay.

A graph records the kernels of the adapter state it was captured under (which adapter, its scaling) and the
addresses of every weight, so each graph is keyed by bucket, route and output kind, and all graphs are dropped
when the module tree, a weight's storage, or a LoRA scaling changes (adapters loaded, unloaded, ``model.to``).
Weights changed in place (training steps, ``load_state_dict``) are read by the next replay as they are.

A batch of one adapter replays that adapter's graph. A batch that mixes adapters (``adapter_batching="mixed"``,
a server's batch of several tasks) replays the bucket's one stacked graph: every stackable adapter's LoRA in one
pass, each token's adapter read from one more static buffer (``adapters_nova_embeddings_v1.stacked_routing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .modeling_nova_embeddings_v1 import NovaEmbeddingsV1Model

# A call of n packed tokens replays the smallest bucket >= n, padded to it. History, measured on the H200 with the
# load test (64 clients x 4 short texts, three task adapters): buckets of 32..512 tokens and 16 items left the
# server's batches (~120 texts, three adapter groups of ~40 texts / ~800 tokens) eager, ~20 ms of launches for ~8 ms
# of GPU work (the server at 0.55x of encode()'s throughput); coarse buckets up to 4096 tokens / 64 items (steps of
# 1.5-2x) raised the server ~20% (1,195-1,279 -> 1,452-1,495 items/s) but encode() in calls of 256 short texts fell
# ~20% (2,078-2,155 -> 1,686 items/s): its GPU-bound adapter groups of ~1.7-2.5k tokens were padded up to 60%.
# Hence: doubling up to 256 tokens (at most ~3 ms of GPU work under ~20 ms of launches: padding is free there), then
# steps of 128 up to 1024 and of 256 up to 2048, so that from 512 tokens on, where the GPU work starts to count, a
# call pays at most 25% padding (bucket / (previous bucket + 1)) and ~12% on average. Capped at 2048: at ~10 us of GPU
# work per token, ~2k tokens run GPU-bound even eagerly, so a replay there saves no time and its padding would cost.
# Each bucket is one capture per adapter and output kind (``warmup`` captures them all for the task adapters).
TOKEN_BUCKETS = (32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)
MAX_ITEMS = 64  # items per replay (encode's default batch_size); cu_seqlens holds MAX_ITEMS + 2 entries
WARMUP_RUNS = 2  # eager runs on a side stream before capture (kernel selection, lazy initialisation)


# A packed text call of at most this many tokens is planned into batches that each fit a graph (balanced, at most
# MAX_ITEMS items and TOKEN_BUCKETS[-1] tokens) rather than into one eager pass: a server's batch of ~120 short texts
# (~4.6k tokens over three adapters) then replays 3 graphs. Eagerly, Python issues each kernel, and in a busy server it
# shares the interpreter with the request handlers (measured on the H200: the encode thread took 120 ms per such
# batch, encode() alone 117 ms per 256 items; planned into graph-sized batches, the server went from 970 to 1,569
# items/s). Larger calls keep large batches, whose GPU work dwarfs the launches: workload 1 (256 texts of 32-512
# tokens in eager passes of ~17k tokens) fell from 95,582 to 83,450 tokens/s when planned into graph-sized batches.
SPLIT_MAX_TOKENS = 4 * TOKEN_BUCKETS[-1]
# ... unless the caller's limits would cut it into small eager passes anyway (short texts, passes capped by
# batch_size): a call of 256 prepared 40-token texts in encode()'s default passes of 64 items (~2.5k tokens each)
# took 200 ms eagerly, where 112 such texts planned into graphs took 47.7 ms (H200, run D).
SMALL_EAGER_PASS_TOKENS = 2 * TOKEN_BUCKETS[-1]


def graph_sized_limits(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> tuple[int, int]:
    """``encode``'s (batch_size, max_batch_tokens) for a packed text call of items of ``lengths`` tokens: as few
    graph-sized batches as the tokens need, of about equal size; unchanged above ``SPLIT_MAX_TOKENS`` unless the
    eager passes would hold ``SMALL_EAGER_PASS_TOKENS`` or fewer on average."""
    total = sum(lengths)
    if not lengths:
        return batch_size, max_batch_tokens
    eager_pass = min(max_batch_tokens, batch_size * total / len(lengths))
    if total > SPLIT_MAX_TOKENS and eager_pass > SMALL_EAGER_PASS_TOKENS:
        return batch_size, max_batch_tokens
    batches = -(-total // TOKEN_BUCKETS[-1])
    per_batch = min(TOKEN_BUCKETS[-1], -(-total // batches) + max(lengths))  # slack: greedy packing is not exact
    return min(batch_size, MAX_ITEMS), min(max_batch_tokens, per_batch)


def token_bucket(tokens: int) -> int | None:
    """The smallest bucket that holds ``tokens`` packed tokens, or None if the call is too big for graphs."""
    return next((bucket for bucket in TOKEN_BUCKETS if tokens <= bucket), None)


def bucket_filling_lengths(tokens_of: Callable[[int], int]) -> list[int]:
    """For ``warmup``: per token bucket, the most words whose text still fits it, so that one call per length
    captures every bucket once. ``tokens_of(n)``: the packed length of an n-word text (its prompt included), which
    grows with n. A bucket no text lands in (a prompt longer than it, words of more tokens than its step) is left
    out."""
    lengths: list[int] = []
    previous, low = 0, 1
    for bucket in TOKEN_BUCKETS:
        if tokens_of(low) <= bucket:
            high = bucket  # a word is at least one token
            while low < high:  # the most words that fit the bucket
                middle = (low + high + 1) // 2
                low, high = (middle, high) if tokens_of(middle) <= bucket else (low, middle - 1)
            if tokens_of(low) > previous:
                lengths.append(low)
        previous = bucket
    return lengths


INPUT_NAMES = ("input_ids", "position_ids", "cu_seqlens", "pooling", "token_adapters")  # the buffers a replay refills
STACKED = "__stacked__"  # the route of batches that mix adapters: one graph per bucket for every stackable adapter


@dataclass
class StaticBatch:
    """The buffers one graph reads and writes; a replay refills the inputs in place.

    A batch's inputs are first written, padded to the bucket, into host buffers of their own (``staged``: pinned on
    CUDA, in the collate worker thread, so the thread that issues replays only queues copies); ``load`` then copies
    them in, asynchronously on CUDA. A copy from pageable memory would wait for all the GPU work queued before it, and
    a pinned buffer shared between replays would have to wait for its last copy; PyTorch's pinned-memory cache keeps
    each batch's buffers alive until their copies have run.
    """

    input_ids: torch.Tensor  # (1, bucket) long
    position_ids: torch.Tensor  # (3, 1, bucket) long
    cu_seqlens: torch.Tensor  # (MAX_ITEMS + 2,) int32: the items', then the padding run's end, then empty tails
    pooling: torch.Tensor  # (MAX_ITEMS, bucket) float32: row i = item i's pooled tokens, each 1 / count
    token_adapters: torch.Tensor  # (1, bucket) long: each token's adapter in the stacked graph's list, -1: none
    output: torch.Tensor | None = None  # (MAX_ITEMS, hidden) single vectors or (bucket, dim) multi vectors
    recorded: tuple = ()  # objects whose tensors the captured kernels read (a stacked graph's rank tables)

    @classmethod
    def allocate(cls, bucket: int, device: torch.device, pin_memory: bool = False) -> "StaticBatch":
        full = lambda shape, value, dtype: torch.full(shape, value, dtype=dtype, device=device,  # noqa: E731
                                                      pin_memory=pin_memory)
        return cls(
            input_ids=full((1, bucket), 0, torch.long),
            position_ids=full((3, 1, bucket), 0, torch.long),
            cu_seqlens=full((MAX_ITEMS + 2,), bucket, torch.int32),
            pooling=full((MAX_ITEMS, bucket), 0.0, torch.float32),
            token_adapters=full((1, bucket), -1, torch.long),
        )

    @classmethod
    def staged(cls, inputs: dict[str, torch.Tensor], device: torch.device) -> "StaticBatch":
        """One packed text batch (CPU tensors from ``collate_packed``) written into host buffers of its bucket, pinned
        when it will be copied to a CUDA ``device``."""
        batch = cls.allocate(token_bucket(inputs["input_ids"].shape[1]), torch.device("cpu"),
                             pin_memory=device.type == "cuda")
        batch.write(inputs)
        return batch

    def load(self, staged: "StaticBatch", token_adapters: torch.Tensor | None = None) -> None:
        """Copy a staged batch (and, for a stacked graph, each token's adapter index) into the buffers the graph
        reads."""
        if token_adapters is not None:
            staged.token_adapters[:, : token_adapters.shape[-1]] = token_adapters
        for name in INPUT_NAMES:
            getattr(self, name).copy_(getattr(staged, name), non_blocking=True)

    def write(self, inputs: dict[str, torch.Tensor]) -> None:
        """Overwrite every input buffer in place (on the host) with the batch, padding the rest. In numpy, on views of
        the buffers: a busy server's collate worker runs this, where each torch call lets go of the interpreter
        lock and may wait to get it back."""
        ids, positions = inputs["input_ids"].numpy(), inputs["position_ids"].numpy()
        cu = inputs["cu_seqlens"].numpy().astype(np.int32)
        input_ids, position_ids, cu_seqlens, pooling = (
            tensor.numpy() for tensor in (self.input_ids, self.position_ids, self.cu_seqlens, self.pooling))
        tokens, items, bucket = ids.shape[1], len(cu) - 1, input_ids.shape[1]
        input_ids[:, :tokens] = ids
        input_ids[:, tokens:] = 0
        position_ids[:, :, :tokens] = positions
        position_ids[:, :, tokens:] = np.arange(bucket - tokens)  # the padding run, as one more sequence
        cu_seqlens[: items + 1] = cu
        cu_seqlens[items + 1 :] = bucket  # the padding run ends the row; the tails are empty sequences
        segment = np.repeat(np.arange(items), np.diff(cu))
        pooling.fill(0.0)
        pooling[segment, np.arange(tokens)] = inputs["pooling_mask"].numpy()[0]
        pooling[:items] /= np.maximum(pooling[:items].sum(-1, keepdims=True), 1.0)  # counts: exact in float32
        self.token_adapters.numpy().fill(-1)  # padding tokens: no adapter (their rows are never pooled anyway)


class SmallCallGraphs:
    """Captured forward passes of the language model and the heads, per (bucket, route, output kind); a route is
    one adapter's name (or the bare backbone's) or ``STACKED``.

    ``run`` replays on CUDA; ``capture=False`` runs the same padded, static-buffer body eagerly (what the CPU
    tests check: bucket padding, zero-length sequences and the pooling matrix give the unpadded result).
    """

    def __init__(self, model: "NovaEmbeddingsV1Model", capture: bool = True):
        self.model = model
        self.capture = capture
        self.graphs: dict[tuple[int, str, bool], tuple[Any, StaticBatch]] = {}
        self.fingerprint: tuple | None = None
        self.pool = None
        self.stacked_names: list[str] = []  # the stacked graphs' adapters, read when the fingerprint changes

    @staticmethod
    def accepts(inputs: dict[str, Any]) -> bool:
        """Text-only packed batches small enough for a bucket (the vision tower syncs with the host)."""
        if "cu_seqlens" not in inputs or "pixel_values" in inputs or "image_grid_thw" in inputs:
            return False
        return len(inputs["cu_seqlens"]) - 1 <= MAX_ITEMS and token_bucket(inputs["input_ids"].shape[1]) is not None

    def route(self, adapters: Sequence[str]) -> str | None:
        """Which graph computes a batch whose items have these adapters: the adapter's own when there is one (the
        caller has set the layers to it), ``STACKED`` when they differ and all stack, None when no graph can."""
        self._drop_if_stale()
        distinct = set(adapters)
        if len(distinct) == 1:
            return adapters[0]
        from .adapters_nova_embeddings_v1 import BASE

        return STACKED if distinct - {BASE} <= set(self.stacked_names) else None

    def run(self, inputs: dict[str, torch.Tensor], adapters: Sequence[str], route: str, return_multivector: bool,
            staged: StaticBatch) -> torch.Tensor:
        """Single vectors (items, hidden) or multi vectors (1, tokens, dim) of one packed text batch whose items have
        ``adapters``, on the graph of ``route`` (from ``route``); ``staged``: its inputs from ``StaticBatch.staged``
        (written ahead, in the collate worker)."""
        tokens, items = inputs["input_ids"].shape[1], len(inputs["cu_seqlens"]) - 1
        key = (token_bucket(tokens), route, return_multivector)
        if key not in self.graphs:
            self.graphs[key] = self._build(key[0], return_multivector, stacked=route == STACKED)
        graph, static = self.graphs[key]
        static.load(staged, self._token_adapters(adapters, inputs["cu_seqlens"]) if route == STACKED else None)
        graph()
        return static.output[:tokens].unsqueeze(0).clone() if return_multivector else static.output[:items].clone()

    def _token_adapters(self, adapters: Sequence[str], cu_seqlens: torch.Tensor) -> torch.Tensor:
        from .adapters_nova_embeddings_v1 import _token_adapters

        return _token_adapters(adapters, self.stacked_names, cu_seqlens)

    def _build(self, bucket: int, return_multivector: bool, stacked: bool) -> tuple[Callable[[], None], StaticBatch]:
        static = StaticBatch.allocate(bucket, self.model.device)
        body = lambda: self._body(static, return_multivector)  # noqa: E731
        if stacked:
            body = self._stacked(body, static)
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

    def _stacked(self, body: Callable[[], None], static: StaticBatch) -> Callable[[], None]:
        """``body`` with every stackable adapter routed per token from ``static.token_adapters``."""
        from .adapters_nova_embeddings_v1 import lora_layers, stacked_routing

        def run_stacked() -> None:
            with stacked_routing(lora_layers(self.model), self.stacked_names, static.token_adapters) as passes:
                body()
            static.recorded = tuple(passes)

        return run_stacked

    def _body(self, static: StaticBatch, return_multivector: bool) -> None:
        """Embed, language model over the padded packed row, then the head, writing ``static.output``."""
        model = self.model
        bucket = static.input_ids.shape[1]
        embeds = model.embed_inputs(static.input_ids)
        hidden = model._language_model_packed(embeds, static.input_ids, static.cu_seqlens, bucket, None,
                                              static.position_ids)[0]  # (bucket, hidden)
        if return_multivector:
            projected = model.multi_vector_projector(hidden.unsqueeze(0))[0]  # (1, tokens, .): a stacked pass's layout
            static.output = F.normalize(projected.to(torch.float32), dim=-1)
        else:
            static.output = F.normalize(static.pooling @ hidden.to(torch.float32), dim=-1)

    def _drop_if_stale(self) -> None:
        """Forget every graph when what they recorded no longer holds (see the module docstring)."""
        fingerprint = self._fingerprint()
        if fingerprint != self.fingerprint:
            from .adapters_nova_embeddings_v1 import stackable_adapters

            self.graphs.clear()
            self.pool = None
            version, storages, scalings = fingerprint
            self.fingerprint = (version, storages, [dict(scaling) for scaling in scalings])  # copies: the live dicts change
            self.stacked_names = stackable_adapters(self.model, dropout_disabled=True)  # (encode runs without dropout)

    def _fingerprint(self) -> tuple:
        from .adapters_nova_embeddings_v1 import module_index

        index = module_index(self.model)  # (checked before every batch: a DoRA merge rebinds a weight mid-call)
        storages = tuple(map(torch.Tensor.data_ptr, index.parameters))  # model.to() swaps .data without registering
        scalings = [layer.scaling for layer in index.lora_layers]  # live dicts: compared by value, in no order
        return index.version, storages, scalings
