"""FastVisionTower (vision_nova_embeddings_v1.py) computes what transformers' stock Qwen2.5-VL vision tower computes.

Compared against ``visual(pixel_values, grid_thw=...)`` itself on the same module, in float32, for the tiny
checkpoint's tower and a deeper random one whose windows are bigger (several windows per image, ragged edges,
t > 1 grids). Also: the Linear patch embedding is the Conv3d one, the grid tables are built once and cached,
each layer makes one attention call for all images, a block compiles without graph breaks, and ``encode`` of
images gives the same vectors with the fast tower on and off.

The processor makes t = 1 grids only (an image is repeated over the temporal patch), so t > 1 is tested on
pixel values made directly for such a grid.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModel, Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from helpers import make_image  # noqa: E402

ATOL = 1e-5
ONE_IMAGE = [(1, 10, 14)]  # 5x7 merged tokens: ragged windows at the right and bottom edges
MIXED_SIZES = [(1, 10, 14), (1, 4, 4), (1, 16, 6), (1, 2, 2)]
WITH_FRAMES = [(2, 6, 8), (1, 8, 8), (3, 4, 6)]  # t > 1: one attention segment per frame
GRID_SETS = {"one image": ONE_IMAGE, "mixed sizes": MIXED_SIZES, "t>1": WITH_FRAMES}
ATTENTIONS = ("eager", "sdpa", "nova_flash_varlen")  # the last: our packed interface (per-sequence SDPA on CPU)
# Deeper and wider-windowed than the tiny checkpoint: 4x4 merged tokens (8x8 patches) per window, two full layers.
WIDE_VISION = dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0, 3],
                   in_chans=3, hidden_act="silu")


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    """Without the task adapters: they never touch the vision tower (they wrap language-model projections only)."""
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)


@pytest.fixture(scope="module")
def vision(model):
    """The vision module as the model imported it (same copy, same tower registry)."""
    return importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".vision_nova_embeddings_v1")


@pytest.fixture(scope="module")
def wide_visual(model):
    """A random vision tower with several windows per image (the model fixture registers our attention)."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=WIDE_VISION).vision_config
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config)


@pytest.fixture(params=["tiny checkpoint", "wide random"])
def visual(request, model, wide_visual):
    return model.model.visual if request.param == "tiny checkpoint" else wide_visual


def random_pixels(visual, grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel rows as the processor lays them out: (patches, channels*time*patch*patch), and the grid tensor."""
    config = visual.config
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    grid_thw = torch.tensor(grids)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid_thw.prod(-1).sum()), width, generator=generator), grid_thw


# ---------------------------------------------------------------------- equivalence
def test_linear_patch_embedding_equals_conv3d(vision, wide_visual):
    tower = vision.FastVisionTower(wide_visual)
    pixels, _ = random_pixels(wide_visual, MIXED_SIZES)
    with torch.no_grad():
        torch.testing.assert_close(tower.embed_patches(pixels), wide_visual.patch_embed(pixels), atol=ATOL, rtol=0)


def test_linear_patch_embedding_reads_the_live_weight(vision):
    """A view, not a copy: changing the Conv3d weight in place changes the fast embedding too."""
    torch.manual_seed(1)
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLConfig(vision_config=WIDE_VISION).vision_config)
    tower = vision.FastVisionTower(visual)
    pixels, _ = random_pixels(visual, ONE_IMAGE)
    with torch.no_grad():
        before = tower.embed_patches(pixels)
        visual.patch_embed.proj.weight.mul_(-2.0)
        after = tower.embed_patches(pixels)
        torch.testing.assert_close(after, visual.patch_embed(pixels), atol=ATOL, rtol=0)
    torch.testing.assert_close(after, -2.0 * before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("grids", GRID_SETS.values(), ids=GRID_SETS.keys())
def test_fast_tower_equals_stock(vision, visual, attn, grids):
    pixels, grid_thw = random_pixels(visual, grids)
    with torch.no_grad():
        with vision.attention_implementation(visual, "eager"):  # the plainest stock path: the reference for all
            expected = visual(pixels, grid_thw=grid_thw)
        with vision.attention_implementation(visual, attn):
            got = vision.FastVisionTower(visual)(pixels, grid_thw=grid_thw)
    assert got.pooler_output.shape == expected.pooler_output.shape
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)


def test_pixel_rows_must_match_the_grids(vision, wide_visual):
    pixels, grid_thw = random_pixels(wide_visual, MIXED_SIZES)
    with pytest.raises(ValueError, match=f"{pixels.shape[0] + 4} patch rows but grid_thw .* describes {pixels.shape[0]}"):
        vision.FastVisionTower(wide_visual)(torch.cat([pixels, pixels[:4]]), grid_thw=grid_thw)


def test_windows_matter_in_these_tests(vision, visual):
    """The grids above span several windows per image, so a wrong window order could not pass unnoticed."""
    tables = vision.FastVisionTower(visual).tables(torch.tensor(MIXED_SIZES), torch.device("cpu"))
    windows, images = len(tables.cu_window_seqlens) - 1, len(tables.cu_seqlens) - 1
    assert windows > images
    assert tables.max_window_seqlen < tables.max_seqlen


# ---------------------------------------------------------------------- tables, attention calls, compilation
def test_tables_cached_under_inference_mode_serve_training(vision):
    """encode fills the cache under inference mode; a later forward with gradients must still work."""
    torch.manual_seed(2)
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLConfig(vision_config=WIDE_VISION).vision_config)
    tower = vision.FastVisionTower(visual)
    pixels, grid_thw = random_pixels(visual, MIXED_SIZES)
    with torch.inference_mode():
        tower(pixels, grid_thw=grid_thw)
    tower(pixels, grid_thw=grid_thw).pooler_output.square().sum().backward()
    assert visual.patch_embed.proj.weight.grad is not None
    assert tower.cached_grids() == [tuple(MIXED_SIZES)]


def test_tables_are_built_once_per_grid_tuple(vision, wide_visual, monkeypatch):
    tower = vision.FastVisionTower(wide_visual, cache_size=2)
    builds = []
    build = tower.build_tables
    monkeypatch.setattr(tower, "build_tables", lambda grids, device: builds.append(grids) or build(grids, device))
    pixels, grid_thw = random_pixels(wide_visual, MIXED_SIZES)
    with torch.no_grad():
        first = tower(pixels, grid_thw=grid_thw).pooler_output
        second = tower(pixels, grid_thw=grid_thw).pooler_output
    assert builds == [tuple(MIXED_SIZES)]
    assert tower.cached_grids() == [tuple(MIXED_SIZES)]
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    for grids in (ONE_IMAGE, WITH_FRAMES):  # a bounded LRU: the oldest tuple goes
        tower.tables(torch.tensor(grids), torch.device("cpu"))
    assert tower.cached_grids() == [tuple(ONE_IMAGE), tuple(WITH_FRAMES)]


def test_one_attention_call_per_layer_for_all_images(vision, wide_visual, model):
    """Through a flash-style interface every layer makes one call with the whole batch: the window boundaries
    in windowed layers, the image boundaries in full layers, and a Python int as the longest length."""
    packed = sys.modules[type(model).__module__].packed_attention_forward
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((kwargs["cu_seq_lens_q"], kwargs["max_length_q"]))
        return packed(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_flash", recording)
    tower = vision.FastVisionTower(wide_visual)
    pixels, grid_thw = random_pixels(wide_visual, MIXED_SIZES)
    with torch.no_grad(), vision.attention_implementation(wide_visual, "recording_flash"):
        tower(pixels, grid_thw=grid_thw)
    tables = tower.tables(grid_thw, pixels.device)
    assert len(calls) == WIDE_VISION["depth"]
    for layer, (cu_seqlens, max_length) in enumerate(calls):
        full = layer in WIDE_VISION["fullatt_block_indexes"]
        assert cu_seqlens is (tables.cu_seqlens if full else tables.cu_window_seqlens)
        assert type(max_length) is int and max_length == (tables.max_seqlen if full else tables.max_window_seqlen)


def block_diagonal_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Varlen attention without any host read (a dense block-diagonal mask), as a stand-in for the CUDA kernel:
    what is compiled around it is the block itself. (1, heads, tokens, dim) -> (1, tokens, heads, dim)."""
    positions = torch.arange(query.shape[2], device=query.device)
    segment = torch.searchsorted(cu_seq_lens_q[1:].contiguous(), positions, right=True)
    mask = segment[:, None] == segment[None, :]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling).transpose(1, 2), None


def test_blocks_compile_without_graph_breaks(vision, wide_visual):
    AttentionInterface.register("block_diagonal_flash", block_diagonal_attention)
    tower = vision.FastVisionTower(wide_visual)
    pixels, grid_thw = random_pixels(wide_visual, MIXED_SIZES)
    tables = tower.tables(grid_thw, pixels.device)
    block = wide_visual.blocks[1]  # a windowed layer
    compiled = torch.compile(block, fullgraph=True, backend="eager")  # fullgraph: any graph break is an error
    with torch.no_grad(), vision.attention_implementation(wide_visual, "block_diagonal_flash"):
        hidden = tower.embed_patches(pixels)[tables.patch_order]
        arguments = dict(cu_seqlens=tables.cu_window_seqlens, max_seqlen=tables.max_window_seqlen,
                         position_embeddings=(tables.cos, tables.sin))
        torch.testing.assert_close(compiled(hidden, **arguments), block(hidden, **arguments), atol=ATOL, rtol=0)
        # and the stand-in is right: it equals the stock per-window path
        with vision.attention_implementation(wide_visual, "eager"):
            stock = block(hidden, cu_seqlens=tables.cu_window_seqlens, position_embeddings=(tables.cos, tables.sin))
        torch.testing.assert_close(block(hidden, **arguments), stock, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- the model uses it
def test_without_transformers_grid_helpers_the_stock_tower_is_used(vision, wide_visual, monkeypatch):
    monkeypatch.setattr(vision, "FAST_VISION_AVAILABLE", False)
    with pytest.warns(UserWarning, match="stock vision tower"):
        assert vision.fast_vision_tower(wide_visual) is wide_visual


@pytest.mark.parametrize("packing", ["off", "on"])
def test_encode_of_images_is_unchanged(model, vision, packing):
    images = [{"image": make_image(11)}, {"image": make_image(12, width=200, height=50)},
              {"image": make_image(13, width=120, height=160), "text": "a page"}]
    previous = model.attention_packing
    model.attention_packing = packing
    try:
        model.fast_vision = False
        stock = model.encode(images)
        stock_features = model.get_image_embeddings([item["image"] for item in images])
        model.fast_vision = True
        fast = model.encode(images)
        fast_features = model.get_image_embeddings([item["image"] for item in images])
    finally:
        model.attention_packing = previous
        model.fast_vision = True
    assert vision.fast_vision_tower(model.model.visual).cached_grids(), "encode did not go through the fast tower"
    torch.testing.assert_close(fast, stock, atol=ATOL, rtol=0)
    for got, expected in zip(fast_features, stock_features):
        torch.testing.assert_close(got["image_embeds"], expected["image_embeds"], atol=ATOL, rtol=0)
        assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])


def test_benchmark_vision_runs_and_agrees(model):
    """nova_embeddings/bench/vision.py's function on the tiny model (no timing asserted: the GPU run is what it is for)."""
    from nova_embeddings.bench.vision import acceptable, benchmark_vision

    rows = benchmark_vision(model, 3, "56x84,112x56", warmup=1, repeats=1)
    assert [row["attention"] for row in rows] == ["packed", "sdpa"]
    assert all(acceptable(row) and row["stock_ms"] > 0 and row["fast_ms"] > 0 for row in rows), rows


# ---------------------------------------------------------------------- aligned vision MLP
def test_vision_blocks_use_the_aligned_mlp_with_the_same_weight_keys(model, vision, tiny_nova_dir):
    """The model's vision blocks hold ``AlignedVisionMLP``; its weights load from the checkpoint's stock keys."""
    from safetensors.torch import load_file

    blocks = model.model.visual.blocks
    assert all(type(block.mlp) is vision.AlignedVisionMLP for block in blocks)
    saved = {}
    for path in tiny_nova_dir.glob("*.safetensors"):
        saved.update(load_file(path))
    for name in ("gate_proj", "up_proj", "down_proj"):
        key = next(k for k in saved if k.endswith(f"blocks.0.mlp.{name}.weight"))
        assert torch.equal(getattr(blocks[0].mlp, name).weight.detach().cpu(), saved[key].to(torch.float32))


@pytest.mark.parametrize("pad", [1, 4, 13])
def test_padded_mlp_equals_the_stock_mlp(vision, pad):
    """Zero rows/columns added to the intermediate width change nothing (gate, up and bias padded, SiLU(0)*0=0)."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=WIDE_VISION).vision_config
    mlp = vision.AlignedVisionMLP(config, bias=True)
    for parameter in mlp.parameters():  # biases too: nn.Linear's init is fine, make them clearly non-zero
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(37, config.hidden_size)
    stock = super(vision.AlignedVisionMLP, mlp).forward(x)
    assert torch.allclose(mlp.padded_forward(x, pad), stock, atol=ATOL, rtol=1e-5)
    assert mlp.padding(x) == 0  # on the CPU the stock path runs


def test_aligned_width(vision):
    """Qwen2.5-VL's 3,420-wide vision MLP: +4 columns in half precision (16-byte rows), none in float32."""
    assert vision.aligned_width(3420, 2, 16) == 3424
    assert vision.aligned_width(3420, 4, 16) == 3420
    assert vision.aligned_width(3424, 2, 16) == 3424
    assert vision.aligned_width(1, 2, 16) == 8
