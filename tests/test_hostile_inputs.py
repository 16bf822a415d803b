"""Hostile and odd inputs: every one gets a clear error naming the item, or a documented, correct result.

Covers high-bit-depth and alpha images (scaled and composited, never clipped to white), chat markup inside
user text (plain text, never a crash of the whole call), malformed items and call arguments, bare PIL images
as items, empty input, and the image formats the loader accepts.
"""

from __future__ import annotations

import io
import re
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from helpers import make_image, png_bytes  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    """Loaded as the README shows, task adapters (dropout 0.1) included."""
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def item_error_type(model) -> type:
    """ItemError of the module copy the model was loaded from (remote code loads its own copy)."""
    return sys.modules[type(model.processor).__module__].ItemError


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def assert_different(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-4


def random_uint16(seed: int, width: int = 90, height: int = 60) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 65536, size=(height, width)).astype(np.uint16)


def encoded(image_bytes_or_image, fmt: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    image_bytes_or_image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is a few bytes: a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------- 1. bit depth, alpha, palettes
def test_16_bit_images_are_scaled_not_clipped_to_white(model):
    a, b = random_uint16(1), random_uint16(2)
    vectors = model.encode([{"image": Image.fromarray(a)}, {"image": Image.fromarray(b)}])
    assert Image.fromarray(a).mode == "I;16"
    assert_different(vectors[0], vectors[1])
    eight_bit = Image.fromarray((a >> 8).astype(np.uint8))  # mode L: the correct 8-bit version
    for sixteen in (Image.fromarray(a), Image.fromarray(a.astype(">u2")), Image.fromarray(a.astype(np.int32)),
                    Image.open(io.BytesIO(encoded(Image.fromarray(a), "PNG")))):
        assert_same(model.encode([{"image": sixteen}])[0], model.encode([{"image": eight_bit}])[0])


def test_float_images_in_unit_range_are_scaled_and_others_refused(model):
    eight = make_image(3).convert("L")
    as_float = Image.fromarray((np.asarray(eight) / 255).astype(np.float32))
    assert as_float.mode == "F"
    assert_same(model.encode([{"image": as_float}])[0], model.encode([{"image": eight}])[0])
    item_error = item_error_type(model)
    out_of_range = Image.fromarray(np.full((40, 40), 300.0, dtype=np.float32))
    with pytest.raises(item_error, match=r"item 1: .*float image .*\[0, 1\]"):
        model.encode(["ok", {"image": out_of_range}])
    not_finite = Image.fromarray(np.full((40, 40), np.nan, dtype=np.float32))
    with pytest.raises(item_error, match="item 0: .*not finite"):
        model.encode([{"image": not_finite}])
    wide = Image.fromarray(np.full((40, 40), 70000, dtype=np.int32))
    with pytest.raises(item_error, match=r"item 0: .*32-bit integer image .*0\.\.65535"):
        model.encode([{"image": wide}])


def test_transparency_is_composited_on_white(model):
    pixels = np.asarray(make_image(4))
    white = Image.new("RGB", (90, 60), (255, 255, 255))
    transparent = Image.fromarray(np.dstack([pixels, np.zeros((60, 90), np.uint8)]), "RGBA")
    half = np.dstack([pixels, np.full((60, 90), 128, np.uint8)])
    on_white = Image.new("RGBA", (90, 60), (255, 255, 255, 255))
    expected_half = Image.alpha_composite(on_white, Image.fromarray(half, "RGBA"))
    gray_alpha = Image.fromarray(np.dstack([pixels[..., 0], np.zeros((60, 90), np.uint8)]), "LA")
    palette = make_image(5).quantize(16)
    palette.info["transparency"] = 0
    palette_expected = Image.alpha_composite(Image.new("RGBA", (90, 60), (255,) * 4), palette.convert("RGBA"))
    vectors = model.encode([{"image": im} for im in (transparent, white, Image.fromarray(half, "RGBA"),
                                                     expected_half.convert("RGB"), gray_alpha, palette,
                                                     palette_expected.convert("RGB"))])
    assert_same(vectors[0], vectors[1])
    assert_same(vectors[2], vectors[3])
    assert_same(vectors[4], vectors[1])
    assert_same(vectors[5], vectors[6])


def test_premultiplied_gray_alpha_is_composited_like_its_plain_form(model):
    """``La`` (alpha premultiplied, which ``to_rgb`` promises to composite) cannot go to RGBA in PIL directly."""
    pixels = np.asarray(make_image(4))
    gray_alpha = Image.fromarray(np.dstack([pixels[..., 0], np.full((60, 90), 128, np.uint8)]), "LA")
    premultiplied = gray_alpha.convert("La")
    transparent = Image.fromarray(np.dstack([pixels[..., 0], np.zeros((60, 90), np.uint8)]), "LA").convert("La")
    vectors = model.encode([{"image": im} for im in (premultiplied, premultiplied.convert("LA"), transparent,
                                                     Image.new("RGB", (90, 60), (255, 255, 255)))])
    assert_same(vectors[0], vectors[1])
    assert_same(vectors[2], vectors[3])


def test_cmyk_and_one_bit_images_convert_as_pil_does(model):
    cmyk = make_image(6).convert("CMYK")
    one_bit = make_image(7).convert("1")
    vectors = model.encode([{"image": im} for im in (cmyk, cmyk.convert("RGB"), one_bit, one_bit.convert("RGB"))])
    assert_same(vectors[0], vectors[1])
    assert_same(vectors[2], vectors[3])


# ---------------------------------------------------------------------- 2. chat markup in user text
MARKUP = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"]


@pytest.mark.parametrize("markup", MARKUP)
def test_chat_markup_in_text_is_plain_text_next_to_images(model, markup):
    text = f"see {markup} here"
    items = [{"text": text}, {"image": make_image(8)}, {"text": "x", "instructions": f"a {markup} b"},
             {"image": make_image(9), "text": text}]
    together = model.encode(items)
    for row, item in enumerate(items):
        assert_same(together[row], model.encode([item])[0])
    assert_different(together[0], model.encode([{"text": "see here"}])[0])


def test_markup_tokens_are_the_plain_characters(model):
    processor, config = model.processor, model.config
    special_ids = set(processor.tokenizer.all_special_ids)
    (item,) = processor.normalize_items([{"text": "a <|im_end|><|image_pad|> b", "instructions": "<|im_start|>x"}],
                                        config=config)
    (tokenized,) = processor.tokenize_items([item], config=config)
    rendered, _, _ = processor.render_item(item, config)
    assert processor.tokenizer.decode(tokenized.input_ids) == rendered
    template_specials = [t for t in tokenized.input_ids if t in special_ids]
    assert processor.tokenizer.convert_ids_to_tokens(template_specials) == ["<|im_start|>", "<|im_end|>"] * 2
    pooled = processor.tokenizer.decode([t for t, p in zip(tokenized.input_ids, tokenized.pooling_mask) if p])
    assert pooled == "Query: a <|im_end|><|image_pad|> b"


def test_text_without_markup_tokenises_as_before(model):
    processor, config = model.processor, model.config
    items = processor.normalize_items(["a <|im_end b", {"text": "plain", "instructions": "<| not a token |>"}],
                                      config=config)
    for item, tokenized in zip(items, processor.tokenize_items(items, config=config)):
        rendered, _, _ = processor.render_item(item, config)
        assert tokenized.input_ids == processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------- 3. clear errors naming the item
def hostile_items(tmp_path) -> list[tuple[str, object, str]]:
    """(name, item placed at index 1 after a good one, message regex)."""
    png = png_bytes(make_image(10))
    (tmp_path / "page.png").write_bytes(png)
    with Image.open(tmp_path / "page.png") as closed:  # opened lazily; its file closes before encode() reads it
        pass
    return [
        ("closed_pil_image", closed, r"unreadable image: its file was closed before it was loaded"),
        ("none_item", None, r"expected a str or a dict \(or a PIL image\), got NoneType"),
        ("int_item", 7, r"expected a str or a dict \(or a PIL image\), got int"),
        ("bytes_item", b"text?", r"expected a str or a dict \(or a PIL image\), got bytes"),
        ("nested_list", ["a"], r"expected a str or a dict \(or a PIL image\), got list"),
        ("empty_dict", {}, "empty item"),
        ("only_task", {"task": "retrieval"}, "empty item"),
        ("mixed_keys", {1: "x", "txt": "y"}, r"unknown key\(s\) \[1, 'txt'\]"),
        ("directory", {"image": str(tmp_path)}, "is a directory"),
        ("directory_path", {"image": tmp_path}, "is a directory"),
        ("missing_path", {"image": tmp_path / "missing.png"}, "no such file"),
        ("empty_image_string", {"image": ""}, "'image' is an empty string"),
        ("empty_image_bytes", {"image": b""}, "'image' is empty"),
        ("empty_data_uri", {"image": "data:image/png;base64,"}, "'image' is empty"),
        ("data_uri_not_base64", {"image": "data:image/png,%89PNG"}, "'image' data URI must be base64"),
        ("data_uri_bad_payload", {"image": "data:image/png;base64,@@@"}, "data URI: its payload is not valid base64"),
        ("upper_case_data_uri", {"image": "DATA:image/png;BASE64,@@@"}, "data URI: its payload is not valid base64"),
        ("nul_in_image_string", {"image": "a\0b"}, "'image' string is neither"),
        ("surrogate_image_string", {"image": "a\ud800b"}, "'image' string is neither"),
        ("numpy_image", {"image": np.zeros((8, 8, 3), np.uint8)}, "'image' must be a PIL image, path, URL"),
        ("none_text_only", {"text": None}, "empty item"),
        ("bool_embeds", {"image_embeds": torch.zeros(4, 64, dtype=torch.bool), "image_grid_thw": [1, 4, 4]},
         "'image_embeds' must be a tensor of numbers"),
        ("list_adapter", {"text": "x", "adapter": ["a"]}, "'adapter' must be a name or None"),
        ("not_an_image", {"image": b"\x00\x01 definitely not"}, "not an image in a supported format"),
        ("truncated_png", {"image": png[: len(png) // 2]}, "unreadable image"),
        ("bomb_header", {"image": png_with_header_size(100_000, 100_000)},
         r"image is over the limit of \d+ pixels \(Image size \(10000000000 pixels\)"),
        ("big_header", {"image": png_with_header_size(8_000, 8_000)}, "8000x8000 px is over the limit"),
        ("zero_image", {"image": Image.new("RGB", (0, 0))}, "image has no pixels"),
        ("tall_image", {"image": Image.new("RGB", (2, 900))}, "cannot be resized"),
        ("list_task", {"text": "x", "task": ["retrieval"]}, "'task' must be a str, got list"),
        ("list_image", {"image": [make_image(1)]}, "'image' must be a PIL image"),
        ("float_image", {"image": 1.5}, "'image' must be a PIL image"),
        ("surrogate_text", {"text": "a\ud800b"}, r"'text' holds a lone surrogate"),
        ("surrogate_instructions", {"text": "a", "instructions": "x\udfffy"}, "instructions holds a lone surrogate"),
        ("list_instructions", {"text": "a", "instructions": ["x"]}, "instructions must be a str or None, got list"),
        ("string_embeds", {"image_embeds": "abc", "image_grid_thw": [1, 4, 4]}, "'image_embeds' must be a tensor of"),
        ("none_embeds_dict", {"image_embeds": {"image_grid_thw": [1, 4, 4]}}, "'image_embeds' must be a tensor of"),
        ("nan_embeds", {"image_embeds": torch.full((4, 64), float("nan")), "image_grid_thw": [1, 4, 4]},
         "'image_embeds' holds non-finite values"),
        ("inf_embeds", {"image_embeds": torch.full((4, 64), float("inf")), "image_grid_thw": [1, 4, 4]},
         "'image_embeds' holds non-finite values"),
        ("string_grid", {"image_embeds": torch.zeros(4, 64), "image_grid_thw": "1 4 4"}, "'image_grid_thw' must be"),
        ("short_grid", {"image_embeds": torch.zeros(4, 64), "image_grid_thw": [4, 4]}, "'image_grid_thw' must be"),
        ("zero_grid", {"image_embeds": torch.zeros(4, 64), "image_grid_thw": [0, 4, 4]}, "'image_grid_thw' must be"),
        ("fractional_grid", {"image_embeds": torch.zeros(4, 64), "image_grid_thw": [1, 4.5, 4]}, "'image_grid_thw' must be"),
        ("grid_alone", {"text": "x", "image_grid_thw": [1, 4, 4]}, "'image_grid_thw' only goes with 'image_embeds'"),
        ("both_images", {"image": make_image(1), "image_embeds": torch.zeros(4, 64)}, "not both"),
        ("eps", {"image": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"},
         r"not an image in a supported format \(PNG, JPEG, WebP, GIF, BMP, TIFF\)"),
        ("ico", {"image": encoded(make_image(11, 32, 32), "ICO")}, "not an image in a supported format"),
    ]


def test_hostile_items_get_a_clear_error_naming_the_item(model, tmp_path):
    item_error = item_error_type(model)
    failures = []
    for name, item, message in hostile_items(tmp_path):
        try:
            model.encode(["fine", item])
            failures.append(f"{name}: no error")
        except item_error as error:
            if error.index != 1 or not re.search(message, str(error)):
                failures.append(f"{name}: {error}")
        except Exception as error:  # noqa: BLE001 (collect every raw exception for one readable failure)
            failures.append(f"{name}: raw {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"task": ["retrieval"]}, "task must be a str, got list"),
        ({"instructions": 5}, "instructions must be a str or None, got int"),
        ({"instructions": "a\ud800"}, "instructions holds a lone surrogate"),
        ({"min_pixels": "abc"}, "min_pixels must be a positive int, got 'abc'"),
        ({"max_pixels": 1.5}, "max_pixels must be a positive int, got 1.5"),
        ({"max_pixels": 0}, "max_pixels must be a positive int, got 0"),
        ({"min_pixels": True}, "min_pixels must be a positive int, got True"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "need min_pixels <= max_pixels"),
    ],
)
def test_bad_call_arguments_are_named(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.encode(["ok"], **kwargs)


def test_items_of_the_wrong_type_name_what_is_accepted(model):
    with pytest.raises(TypeError, match="items must be a list of str, dict or PIL image, got NoneType"):
        model.processor.normalize_items(None, config=model.config)


# ---------------------------------------------------------------------- 4. bare PIL images; 5. empty input
def test_a_bare_pil_image_is_an_image_item(model):
    image = make_image(12)
    mixed = model.encode([image, "text", {"image": image, "text": "fused"}])
    assert_same(mixed[0], model.encode([{"image": image}])[0])
    assert_same(model.encode(image)[0], mixed[0])


def test_no_items_normalise_to_nothing(model):
    processor = model.processor
    assert processor.normalize_items([], config=model.config) == []
    assert processor.normalize_items((), config=model.config) == []
    assert processor.tokenize_items([], config=model.config) == []
    padded = processor.collate([], min_pixels=model.config.min_pixels, max_pixels=model.config.max_pixels)
    assert padded["input_ids"].shape == padded["attention_mask"].shape == (0, 0)
    packed = processor.collate_packed([], min_pixels=model.config.min_pixels, max_pixels=model.config.max_pixels)
    assert packed["input_ids"].shape == (1, 0) and packed["cu_seqlens"].tolist() == [0]


# ---------------------------------------------------------------------- 6. formats
@pytest.mark.parametrize("fmt,save", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}),
                                      ("GIF", {}), ("BMP", {}), ("TIFF", {})])
def test_supported_formats_decode_like_pil(model, fmt, save):
    data = encoded(make_image(13), fmt, **save)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    assert_same(model.encode([{"image": data}])[0], model.encode([{"image": expected}])[0])


def test_animated_gif_gives_its_first_frame(model):
    frames = [make_image(14).convert("P"), make_image(15).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    first = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert_same(model.encode([{"image": buffer.getvalue()}])[0], model.encode([{"image": first}])[0])


def test_whole_number_image_embeds_are_taken_as_floats(model):
    grid = [1, 4, 4]
    as_ints = model.encode([{"image_embeds": torch.ones(4, 64, dtype=torch.long), "image_grid_thw": grid}])
    as_floats = model.encode([{"image_embeds": torch.ones(4, 64), "image_grid_thw": grid}])
    assert_same(as_ints[0], as_floats[0])


@pytest.mark.parametrize("field, value", [("max_pixels", "50000"), ("min_pixels", 0), ("max_image_pixels", 1.5),
                                          ("max_length", True)])
def test_a_config_with_a_bad_size_field_fails_at_load_naming_it(tiny_nova_dir, tmp_path, field, value):
    """A hand-edited config.json (a quoted number, a zero) is refused when the model loads, naming the field, rather
    than failing later inside image resizing with a bare TypeError."""
    import json
    import shutil

    copy = tmp_path / "nova"
    shutil.copytree(tiny_nova_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.{field} must be a positive int, got {value!r}"):
        AutoModel.from_pretrained(copy, trust_remote_code=True)
