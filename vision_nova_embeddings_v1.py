"""A faster way through transformers' Qwen2.5-VL vision tower, computing exactly what the stock one computes.

Why: the stock ``Qwen2_5_VisionTransformerPretrainedModel.forward`` rebuilds its window index, sequence
boundaries and rotary tables on the host at every call (loops over ``grid_thw.tolist()``), its non-flash
attention path reads the boundaries back with ``.tolist()`` in every block (a device sync per block), and
its patch embedding is a Conv3d whose kernel equals its stride, which GPUs run far slower than the
equivalent matrix product.

``FastVisionTower(visual)`` is a drop-in callable over the same module: same weights, same blocks, merger
and norms (their own ``forward`` is called), same result. Only the orchestration is redone:
- the patch embedding is one ``F.linear`` over a view of the Conv3d weight (read at every call: nothing to
  go stale when weights are loaded, cast or moved);
- the tables that depend on the grids alone (window order and its inverse, window and image boundaries,
  their longest lengths as Python ints, the rotary cos/sin already in window order) are built once per
  distinct tuple of grids, with transformers' own helpers, and kept on the device in a small LRU cache;
- every block gets the boundaries the way its attention needs them: on the device for flash-style
  (varlen) attention, one call per layer for all images; on the host for the per-window SDPA/eager path,
  whose ``.tolist()`` then costs no device sync.
Nothing inside a block reads a tensor back to the host, so blocks compile without graph breaks.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

try:  # transformers' grid helpers (the ones the stock forward uses); absent from older releases
    from transformers.utils.generic import is_flash_attention_requested
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index
except ImportError:  # pragma: no cover - depends on the installed transformers
    get_vision_cu_seqlens = get_vision_position_ids = get_vision_window_index = None

FAST_VISION_AVAILABLE = get_vision_window_index is not None
TABLE_CACHE_SIZE = 64  # distinct tuples of grids kept per tower; each entry is a few MB at most for full pages

Grids = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class VisionTables:
    """Everything the tower needs that depends only on the grids, for one device.

    Patches run through the blocks in window order: each window's patches are contiguous.
    """

    patch_order: torch.Tensor  # (patches,) long: patch row (processor order) at each window-order position
    merged_restore: torch.Tensor  # (merged,) long: window-order merged row of each merged token, processor order
    cu_window_seqlens: torch.Tensor  # (windows + 1,) int32, device: window boundaries in window order
    cu_seqlens: torch.Tensor  # (frames + 1,) int32, device: image (frame) boundaries
    cu_window_seqlens_host: torch.Tensor  # the same on the CPU, for attention that splits by .tolist()
    cu_seqlens_host: torch.Tensor
    max_window_seqlen: int
    max_seqlen: int
    cos: torch.Tensor  # (patches, head_dim) rotary tables in window order, as the stock rotary module makes them
    sin: torch.Tensor


class FastVisionTower:
    """Drop-in replacement for calling the stock vision tower: ``tower(pixel_values, grid_thw=...)``.

    Not an ``nn.Module`` on purpose: it owns no weights (it reads ``visual``'s at every call), so it adds
    nothing to a state dict and cannot hold a stale copy.
    """

    def __init__(self, visual: nn.Module, cache_size: int = TABLE_CACHE_SIZE):
        if not FAST_VISION_AVAILABLE:
            raise RuntimeError("FastVisionTower needs transformers.vision_utils (transformers >= 5.x with grid helpers)")
        self.visual = visual
        self.cache_size = cache_size
        self._tables: OrderedDict[tuple, VisionTables] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ forward
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> BaseModelOutputWithPooling:
        """Same outputs as ``visual(pixel_values, grid_thw=grid_thw)``: last_hidden_state in window order (as
        stock), pooler_output the merged features in processor order: (merged_tokens, out_hidden)."""
        visual = self.visual
        tables = self.tables(grid_thw, pixel_values.device)
        if pixel_values.shape[0] != tables.patch_order.numel():
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but grid_thw "
                             f"{grid_thw.tolist()} describes {tables.patch_order.numel()}")
        hidden = self.embed_patches(pixel_values)[tables.patch_order]  # (patches, hidden), window order
        flash = is_flash_attention_requested(visual.config)
        windowed = (tables.cu_window_seqlens if flash else tables.cu_window_seqlens_host, tables.max_window_seqlen)
        full = (tables.cu_seqlens if flash else tables.cu_seqlens_host, tables.max_seqlen)
        position_embeddings = (tables.cos, tables.sin)
        for index, block in enumerate(visual.blocks):
            cu_seqlens, max_seqlen = full if index in visual.fullatt_block_indexes else windowed
            hidden = block(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=position_embeddings)
        merged = visual.merger(hidden)[tables.merged_restore]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The Conv3d patch embedding as a matrix product: kernel == stride, so each output is the dot product of
        one flattened patch (channel, time, row, column order, as the processor flattens it) with the flattened
        kernel. The weight is viewed, not copied: (embed, channels*time*patch*patch)."""
        weight = self.visual.patch_embed.proj.weight  # (embed, channels, time, patch, patch)
        flat_weight = weight.flatten(1)  # a view of the contiguous parameter
        return F.linear(pixel_values.reshape(-1, flat_weight.shape[1]).to(weight.dtype), flat_weight)

    # ------------------------------------------------------------------ tables
    def tables(self, grid_thw: torch.Tensor, device: torch.device) -> VisionTables:
        """The grid-only tables for this call, from the LRU cache or built once (the only host read per call is
        ``grid_thw.tolist()``)."""
        grids: Grids = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
        rotary = self.visual.rotary_pos_emb
        key = (grids, torch.device(device), rotary.inv_freq.dtype)  # a dtype cast of the model changes the tables
        with self._lock:
            tables = self._tables.get(key)
            if tables is not None:
                self._tables.move_to_end(key)
                return tables
        with torch.inference_mode(False):  # ordinary tensors: a cache filled under inference mode serves autograd too
            tables = self.build_tables(grids, torch.device(device))
        with self._lock:
            self._tables[key] = tables
            while len(self._tables) > self.cache_size:
                self._tables.popitem(last=False)
        return tables

    def cached_grids(self) -> list[Grids]:
        """The tuples of grids whose tables are cached, oldest first."""
        with self._lock:
            return [key[0] for key in self._tables]

    def build_tables(self, grids: Grids, device: torch.device) -> VisionTables:
        """Build the tables with transformers' own helpers on the CPU (small index arithmetic, no device syncs),
        then move them to the device once; the rotary tables are made by the tower's rotary module itself."""
        visual = self.visual
        grid_cpu = torch.tensor(grids, dtype=torch.long)
        merge_unit = visual.spatial_merge_size**2
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_cpu, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        cu_seqlens = get_vision_cu_seqlens(grid_cpu)
        position_ids = get_vision_position_ids(grid_cpu, visual.spatial_merge_size)  # (patches, 2) processor order
        # merged token m covers patches m*unit .. m*unit+unit-1, so window order over patches follows from it
        patch_order = (window_index[:, None] * merge_unit + torch.arange(merge_unit)).flatten()
        position_ids = position_ids[patch_order].to(device)
        cos, sin = visual.rotary_pos_emb(position_ids, position_ids)  # x only tells the device
        return VisionTables(
            patch_order=patch_order.to(device),
            merged_restore=torch.argsort(window_index).to(device),
            cu_window_seqlens=cu_window_seqlens.to(device, torch.int32),
            cu_seqlens=cu_seqlens.to(device, torch.int32),
            cu_window_seqlens_host=cu_window_seqlens.to(torch.int32),
            cu_seqlens_host=cu_seqlens.to(torch.int32),
            max_window_seqlen=int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max()),
            max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            cos=cos,
            sin=sin,
        )


class AlignedVisionMLP(Qwen2_5_VLMLP):
    """The vision blocks' MLP, computed through an intermediate width padded to whole 16-byte rows on CUDA.

    Why: Qwen2.5-VL's vision MLP is 3,420 wide; in half precision its rows (6,840 bytes) are not 16-byte aligned,
    so cuBLAS falls back to slower unaligned kernels for its three products (a profile of pages on the H200 showed
    SM80 ``cutlass ... align2`` kernels there). Measured alone on the H200 (24,576 rows, bf16), the padded MLP runs
    2.5x faster eager and 1.12x faster compiled (inductor aligns most of it already). Zero rows appended to the gate and up weights (and zero biases) give zero
    columns, SiLU(0) * 0 = 0, and zero columns appended to the down weight add nothing: the same sums, through
    aligned kernels. The padded weights are made at each call (a few MB, microseconds), so the parameters, the
    state dict and anything that loads or changes them stay as transformers has them.
    """

    ALIGN_BYTES = 16

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        pad = self.padding(hidden_state)
        return self.padded_forward(hidden_state, pad) if pad else super().forward(hidden_state)

    def padded_forward(self, hidden_state: torch.Tensor, pad: int) -> torch.Tensor:
        """The MLP through an intermediate width ``pad`` columns wider (zeros), same result."""
        gate = F.linear(hidden_state, _pad_rows(self.gate_proj.weight, pad), _pad_rows(self.gate_proj.bias, pad))
        up = F.linear(hidden_state, _pad_rows(self.up_proj.weight, pad), _pad_rows(self.up_proj.bias, pad))
        return F.linear(self.act_fn(gate) * up, F.pad(self.down_proj.weight, (0, pad)), self.down_proj.bias)

    def padding(self, hidden_state: torch.Tensor) -> int:
        """Columns to add to the intermediate width: 0 off CUDA, when rows are aligned already, or when the
        projections are not plain linear layers (adapters, offloading hooks: their own forward must run)."""
        if not hidden_state.is_cuda or not all(_plain_linear(m) for m in (self.gate_proj, self.up_proj, self.down_proj)):
            return 0
        return aligned_width(self.intermediate_size, hidden_state.element_size(), self.ALIGN_BYTES) - self.intermediate_size


def aligned_width(width: int, element_size: int, align_bytes: int) -> int:
    """The smallest width >= ``width`` whose rows are a whole number of ``align_bytes``."""
    per_row = max(1, align_bytes // element_size)
    return -(-width // per_row) * per_row


def _plain_linear(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not hasattr(module, "_hf_hook"))


def _pad_rows(tensor: torch.Tensor | None, pad: int) -> torch.Tensor | None:
    """``tensor`` with ``pad`` zero rows appended (first dimension), or None."""
    if tensor is None:
        return None
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, pad))


def align_vision_mlps(visual: nn.Module) -> None:
    """Give every vision block an ``AlignedVisionMLP`` (same submodule names, so the same weight keys). Called
    while the model is built, before its weights are initialised or loaded."""
    for block in visual.blocks:
        if type(block.mlp) is Qwen2_5_VLMLP:
            block.mlp = AlignedVisionMLP(visual.config, bias=True)


_TOWERS: weakref.WeakKeyDictionary[nn.Module, FastVisionTower] = weakref.WeakKeyDictionary()
_TOWERS_LOCK = threading.Lock()


@contextmanager
def attention_implementation(module: nn.Module, name: str):
    """Run ``module``'s attention through ``name`` for a while: transformers reads it at every call.

    The model switches its language model and vision tower to packed attention with it; tests and the vision
    benchmark switch the stock tower's attention the same way.
    """
    config = module.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def fast_vision_tower(visual: nn.Module) -> FastVisionTower | nn.Module:
    """The ``FastVisionTower`` of this vision module (one per module, so its table cache is shared by every
    caller), or ``visual`` itself, with a warning, when the installed transformers lacks the grid helpers."""
    if not FAST_VISION_AVAILABLE:
        warnings.warn("transformers.vision_utils is missing: the stock vision tower is used", stacklevel=2)
        return visual
    with _TOWERS_LOCK:
        tower = _TOWERS.get(visual)
        if tower is None:
            tower = _TOWERS[visual] = FastVisionTower(visual)
        return tower
