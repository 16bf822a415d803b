"""Processor of nova-embeddings-v1: turns embedding items into model inputs.

An *item* is a string (text), a PIL image, or a dict with ``text``, ``image`` or ``image_embeds`` (text and image
may be fused), plus optional ``task``, ``instructions`` and ``adapter``. Each item is rendered on its own through
the chat template (``chat_template.json``), tokenised, and its image tokens expanded; the processor also
returns, per token, which tokens are pooled into the single vector (the item's own content, marked by the
template's ``{% generation %}`` blocks) and which are kept as multi vectors (everything but the
instruction's system turn). Rendering items one by one and padding only at collation time is what makes
an item's vectors independent of its batch neighbours.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import itertools
import numbers
import os
import re
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.utils.chat_template_utils import render_jinja_template

from .configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config

ITEM_KEYS = frozenset({"text", "image", "image_embeds", "image_grid_thw", "task", "instructions", "adapter"})
# "Use the item's task adapter": a plain string rather than an object() sentinel, so that it still compares equal
# when the processor and the model come from different copies of these modules (remote code loads each copy).
TASK_ADAPTER = "__task__"
URL_TIMEOUT_S = 20.0
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# Decoders an item's image may use: the formats users send (PIL's JPEG opener also reads MPO, the JPEG variant
# many cameras write). EPS, PSD, ICO and Pillow's other plugins are not reachable from untrusted input.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
SUPPORTED_FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF"


class ItemError(ValueError):
    """A bad embedding item; the message names the item's index and what is wrong with it."""

    def __init__(self, index: int, problem: str):
        self.index = index
        self.problem = problem
        super().__init__(f"item {index}: {problem}")


@dataclass
class EmbeddingItem:
    """One validated item: content, task and the settings that apply to it."""

    index: int
    task: str
    text: str | None = None
    image: Image.Image | None = None
    image_embeds: torch.Tensor | None = None  # (image_tokens, hidden): the vision tower's merged output
    image_grid_thw: tuple[int, int, int] | None = None
    instructions: str | None = None
    adapter: str | None = TASK_ADAPTER  # a name, None (bare backbone), or TASK_ADAPTER

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_embeds is not None


@dataclass
class TokenizedItem:
    """An item as token ids with its masks; images keep their source until a batch needs pixels."""

    item: EmbeddingItem
    input_ids: list[int]
    pooling_mask: list[bool]  # tokens averaged into the single vector
    output_mask: list[bool]  # tokens returned as multi vectors
    image_grid_thw: tuple[int, int, int] | None = None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class NovaEmbeddingsV1Processor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor that renders embedding items through the chat template.

    The embedding settings (task prompts, image prompt, pixel and length limits) come from a
    ``NovaEmbeddingsV1Config`` passed as ``config``; without one, the defaults (jina-embeddings-v4's) apply.
    Per-call overrides never mutate the processor, so one processor can serve several threads.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # No video processor: embeddings take text and images (and transformers' video processor needs torchvision).
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # ------------------------------------------------------------------ items -> validated items
    def normalize_items(
        self,
        items: Sequence[str | dict | Image.Image] | str | dict | Image.Image,
        *,
        task: str | None = None,
        instructions: str | None = None,
        config: NovaEmbeddingsV1Config | None = None,
        max_image_pixels: int | None = None,
    ) -> list[EmbeddingItem]:
        """Validate items and resolve each one's task and instructions (item keys override the call's).

        No items give an empty list (the caller returns an empty result); a bad item raises ``ItemError``.
        """
        config = _ConfigView.of(config or _default_config())
        if isinstance(items, (str, dict, Image.Image)):
            items = [items]
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"items must be a list of str, dict or PIL image, got {type(items).__name__}")
        call_task = config.default_task if task is None else task
        _check_task(call_task, config, where="task")
        _check_instructions(instructions, where="instructions")
        max_image_pixels = config.max_image_pixels if max_image_pixels is None else max_image_pixels
        return [
            self._normalize_item(index, raw, call_task, instructions, config, max_image_pixels)
            for index, raw in enumerate(items)
        ]

    def _normalize_item(
        self, index: int, raw: Any, task: str, instructions: str | None, config, max_image_pixels: int
    ) -> EmbeddingItem:
        if isinstance(raw, str):
            raw = {"text": raw}
        elif isinstance(raw, Image.Image):
            raw = {"image": raw}
        if not isinstance(raw, dict):
            raise ItemError(index, f"expected a str or a dict (or a PIL image), got {type(raw).__name__}")
        unknown = set(raw) - ITEM_KEYS
        if unknown:
            raise ItemError(index, f"unknown key(s) {sorted(unknown, key=str)}; valid keys: {sorted(ITEM_KEYS)}")
        item_task = raw.get("task", task)
        item_instructions = raw.get("instructions", instructions)
        text = raw.get("text")
        try:
            _check_task(item_task, config, where="'task'")
            _check_instructions(item_instructions, where="instructions")
            if text is not None:
                _check_text(text, where="'text'")
        except ValueError as error:
            raise ItemError(index, str(error)) from None
        if "image" in raw and "image_embeds" in raw:
            raise ItemError(index, "give 'image' or 'image_embeds', not both")
        adapter = raw.get("adapter", TASK_ADAPTER)
        if adapter is not None and not isinstance(adapter, str):
            raise ItemError(index, f"'adapter' must be a name or None, got {type(adapter).__name__}")
        item = EmbeddingItem(index=index, task=item_task, text=text, instructions=item_instructions, adapter=adapter)
        if raw.get("image") is not None:
            item.image = load_image(raw["image"], index, max_image_pixels)
        elif raw.get("image_embeds") is not None:
            item.image_embeds, item.image_grid_thw = self._check_image_embeds(index, raw, config)
        elif "image_grid_thw" in raw:
            raise ItemError(index, "'image_grid_thw' only goes with 'image_embeds'")
        if text is None and not item.has_image:
            raise ItemError(index, "empty item: give 'text', 'image' or 'image_embeds'")
        return item

    def _check_image_embeds(self, index: int, raw: dict, config) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Precomputed vision-tower output must come with its grid, and their sizes must agree."""
        embeds = raw["image_embeds"]
        grid = raw.get("image_grid_thw")
        if isinstance(embeds, dict):  # what NovaEmbeddingsV1Model.get_image_embeddings returns per image
            embeds, own_grid = embeds.get("image_embeds"), embeds.get("image_grid_thw")
            if own_grid is not None and grid is not None:
                given, own = (list(_grid(g, self.image_processor.merge_size, index)) for g in (grid, own_grid))
                if given != own:
                    raise ItemError(index, f"'image_grid_thw' {given} differs from the grid in 'image_embeds' {own}: "
                                           "give one of them")
            grid = own_grid if own_grid is not None else grid
        if grid is None:
            raise ItemError(index, "'image_embeds' needs its 'image_grid_thw' (as returned by get_image_embeddings)")
        embeds = _float_tensor(embeds, index)
        merge = self.image_processor.merge_size
        grid = _grid(grid, merge, index)
        expected = (grid[0] * grid[1] * grid[2] // merge**2, config.text_config.hidden_size)
        if tuple(embeds.shape) != expected:
            raise ItemError(index, f"'image_embeds' has shape {tuple(embeds.shape)}, expected {expected} for grid {grid}")
        if not torch.isfinite(embeds).all():
            raise ItemError(index, "'image_embeds' holds non-finite values (NaN or inf)")
        return embeds, grid

    # ------------------------------------------------------------------ validated items -> tokens
    def tokenize_items(
        self,
        items: Sequence[EmbeddingItem],
        *,
        config: NovaEmbeddingsV1Config | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        truncate: bool = False,
        max_length: int | None = None,
    ) -> list[TokenizedItem]:
        """Render, tokenise and expand each item; errors (too long, bad image size) name the item."""
        config = _ConfigView.of(config or _default_config())
        limits = self.pixel_limits(config, min_pixels, max_pixels)
        max_length = config.max_length if max_length is None else max_length
        rendered = [self.render_item(item, config) for item in items]
        encodings = self._tokenize_all(items, config, [text for text, _, _ in rendered])
        return [self._tokenized_item(item, config, limits, truncate, max_length, text, spans, system_chars, *encoding)
                for item, (text, spans, system_chars), encoding in zip(items, rendered, encodings)]

    def _tokenize_all(self, items: Sequence[EmbeddingItem], config,
                      rendered: list[str]) -> list[tuple[list[int], np.ndarray]]:
        """Token ids and (tokens, 2) character offsets of every rendered item: one batched backend call (parallel in
        the Rust tokenizer) for the items without user-written markup, the markup-aware path for the others."""
        markup = self._special_markup()
        has_markup = [any(markup.search(text) for text in (item.text, item.instructions) if text) for item in items]
        plain = [i for i, flagged in enumerate(has_markup) if not flagged]
        results: list[tuple[list[int], np.ndarray] | None] = [None] * len(items)
        for i, encoding in zip(plain, self._encode_batch([rendered[i] for i in plain]) if plain else []):
            results[i] = (encoding.ids, _offset_array(encoding.offsets))
        for i, flagged in enumerate(has_markup):
            if flagged:
                input_ids, offsets = self._tokenize_rendered(items[i], config, rendered[i])
                results[i] = (input_ids, _offset_array(offsets))
        return results

    def _encode_batch(self, texts: list[str]) -> list:
        """The backend tokenizer's ``Encoding`` of each text, no special tokens added.

        Called on the backend directly: transformers' ``__call__`` converts every encoding into Python dicts of
        lists, which cost a third of the Rust tokenisation on long calls. That call also first switches off any
        truncation or padding set on the backend and matches special tokens unless ``split_special_tokens``; when
        the backend is not already in that state, the call goes through transformers, which sets it.
        """
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None and \
                backend.encode_special_tokens == bool(self.tokenizer.split_special_tokens):
            return backend.encode_batch(texts, add_special_tokens=False)
        return self.tokenizer(texts, add_special_tokens=False).encodings

    def pixel_limits(self, config, min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
        """Per-call (min, max) pixels, falling back to the config's defaults; validated.

        The image processor's own ``min_pixels``/``max_pixels`` attributes (how jina's code sets limits) are refused
        rather than ignored or half-applied: the token count of every item is computed from these limits."""
        overridden = sorted(name for name in ("min_pixels", "max_pixels")
                            if vars(self.image_processor).get(name) is not None)
        if overridden:
            raise ValueError(f"processor.image_processor.{overridden[0]} is set; nova-embeddings-v1 takes pixel limits "
                             f"from model.config.min_pixels / max_pixels or per call (encode(..., max_pixels=N)): set "
                             f"them there and delete the image processor's attribute(s) {overridden}")
        low = config.min_pixels if min_pixels is None else _positive_int(min_pixels, "min_pixels")
        high = config.max_pixels if max_pixels is None else _positive_int(max_pixels, "max_pixels")
        if high < low:
            raise ValueError(f"need min_pixels <= max_pixels, got min_pixels={low}, max_pixels={high}")
        return low, high

    def _tokenized_item(self, item: EmbeddingItem, config, limits, truncate: bool, max_length: int, rendered: str,
                        spans: list[tuple[int, int]], system_chars: int, input_ids: list[int],
                        bounds: np.ndarray) -> TokenizedItem:
        """Masks from character offsets (a token is pooled when it overlaps a pooled span), then images, length.

        rendered: the item through the template; bounds: (tokens, 2) each token's [start, end) characters in it."""
        starts, ends = bounds[:, 0], bounds[:, 1]
        pooled = np.zeros(len(bounds), dtype=bool)
        for span_start, span_end in spans:
            pooled |= (starts < span_end) & (ends > span_start)
        in_system = ends <= system_chars
        keep_system = bool(config.pool_instruction_tokens)
        pooling_mask = (pooled | (in_system & keep_system)).tolist()
        output_mask = (~in_system | keep_system).tolist()
        tokenized = TokenizedItem(item, input_ids, pooling_mask, output_mask)
        if item.has_image:
            tokenized.image_grid_thw = item.image_grid_thw or self.image_grid(item, limits)
            self._expand_image_tokens(tokenized)
        if len(tokenized) > max_length:
            self._truncate_or_fail(tokenized, max_length, truncate, _text_token_count(item.text, rendered, spans, bounds))
        return tokenized

    def render_item(self, item: EmbeddingItem, config) -> tuple[str, list[tuple[int, int]], int]:
        """Render one item through the chat template.

        Returns the text, the character spans to pool, and the length of the system turn (0 without
        instructions), found by rendering the system turn alone: the template stays the only format.
        """
        rendered, spans = self._render_with_layout(item, config) or _render(
            self._template(), self._messages(item, config), config.image_prompt)
        system_chars = _system_turn_length(self._template(), item.instructions, config.image_prompt) if item.instructions else 0
        if not rendered.startswith(rendered[:system_chars]) or any(start < system_chars for start, _ in spans):
            raise ValueError("the chat template must render the system turn before the item")
        return rendered, spans, system_chars

    def _render_with_layout(self, item: EmbeddingItem, config) -> tuple[str, list[tuple[int, int]]] | None:
        """The template's rendering of a text item without running the template: the text put into the layout that
        the template gives items of the same kind (task, image or not, instructions), rendered once. None when
        the template does not insert the text verbatim (then the caller renders the item itself)."""
        if item.text is None:
            return None
        layout = _text_layout(self._template(), config.task_prompts[item.task], item.has_image, item.instructions,
                              config.image_prompt)
        if layout is None:
            return None
        before, after, spans = layout
        text_end = len(before) + len(item.text)
        place = lambda edge: text_end + edge[0] if edge[1] else edge[0]  # noqa: E731
        return before + item.text + after, [(place(start), place(end)) for start, end in spans]

    @staticmethod
    def _messages(item: EmbeddingItem, config, user_string=lambda text: text) -> list[dict]:
        """The item as a conversation for the template; ``user_string`` maps the strings the user wrote."""
        text = user_string(item.text) if item.text is not None else None
        instructions = user_string(item.instructions) if item.instructions is not None else None
        return _conversation(config.task_prompts[item.task], item.has_image, text, instructions)

    def _tokenize_rendered(self, item: EmbeddingItem, config, rendered: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of a rendered item; special-token markup the user wrote is plain text.

        The template's own markup stays special. Markup inside the item's text or instructions (``<|image_pad|>``,
        ``<|im_end|>``...) is tokenised as the characters it is made of (as transformers' ``apply_chat_template(...,
        sanitize_control_tokens=True)`` does), so a user string can never add an image placeholder, end a turn or
        shift an image's rope positions. Without such markup the ids are the tokenizer's own (jina's).
        """
        markup = self._special_markup()
        if not any(markup.search(text) for text in (item.text, item.instructions) if text):
            encoding = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoding["input_ids"]), list(encoding["offset_mapping"])
        input_ids, offsets, position = [], [], 0
        for start, end in [*self._user_markup(item, config, rendered, markup), (len(rendered), len(rendered))]:
            if start > position:  # template text and markup-free user text: tokenised normally
                piece = rendered[position:start]
                encoding = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                input_ids += encoding["input_ids"]
                offsets += [(a + position, b + position) for a, b in encoding["offset_mapping"]]
            plain = self._plain_token_ids(rendered[start:end])
            input_ids += plain
            offsets += [(start, end)] * len(plain)
            position = end
        return input_ids, offsets

    def _special_markup(self) -> re.Pattern:
        """Pattern of the tokenizer's special tokens, built once per tokenizer (its added-token table is slow)."""
        cached = self.__dict__.get("_special_markup_cache")
        if cached is None or cached[0] != id(self.tokenizer):
            specials = tuple(t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special)
            cached = (id(self.tokenizer), _markup_pattern(specials))
            self.__dict__["_special_markup_cache"] = cached
        return cached[1]

    def _user_markup(self, item: EmbeddingItem, config, rendered: str, markup: re.Pattern) -> list[tuple[int, int]]:
        """Character spans, in ``rendered``, of the special-token markup that came from the user's strings.

        Found by rendering again with that markup wrapped in two lone surrogates, which validated user
        strings never hold (``_check_unicode``), so they mark exactly what the user wrote.
        """
        wrap = lambda text: markup.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", text)
        marked, _ = _render(self._template(), self._messages(item, config, wrap), config.image_prompt)
        if marked.replace(_MARK_START, "").replace(_MARK_END, "") != rendered:
            raise ValueError("the chat template must render the item's text and instructions unchanged")
        spans = []
        for count, match in enumerate(re.finditer(f"{_MARK_START}([^{_MARK_END}]*){_MARK_END}", marked)):
            start = match.start() - 2 * count  # the markers before this one take two characters each
            spans.append((start, start + len(match.group(1))))
        return spans

    def _plain_token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` with no added token matched: the backend's normaliser, pre-tokeniser and BPE model.

        Called on the backend's components rather than with ``split_special_tokens=True``, which flips a flag on
        the shared backend tokenizer and would race with other threads' tokenisation.
        """
        backend = self.tokenizer.backend_tokenizer
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = [text]
        if backend.pre_tokenizer is not None:
            pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for piece in pieces for token in backend.model.tokenize(piece)]

    def _template(self) -> str:
        if self.chat_template is None:
            raise ValueError("this processor has no chat template: load it from a nova-embeddings-v1 repository")
        return self.chat_template

    def image_grid(self, item: EmbeddingItem, limits: tuple[int, int]) -> tuple[int, int, int]:
        """(t, h, w) patch grid the image processor will produce, computed from the size alone."""
        width, height = item.image.size
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        try:
            resized_h, resized_w = smart_resize(height, width, factor=factor, min_pixels=limits[0], max_pixels=limits[1])
        except ValueError as error:
            raise ItemError(item.index, f"image of {width}x{height} px cannot be resized: {error}") from None
        patch = self.image_processor.patch_size
        return 1, resized_h // patch, resized_w // patch

    def _expand_image_tokens(self, tokenized: TokenizedItem) -> None:
        """Repeat the single image placeholder once per merged patch (masks repeated with it)."""
        t, h, w = tokenized.image_grid_thw
        count = t * h * w // self.image_processor.merge_size**2
        ids, pool, out = [], [], []
        for token, p, o in zip(tokenized.input_ids, tokenized.pooling_mask, tokenized.output_mask):
            repeat = count if token == self.image_token_id else 1
            ids += [token] * repeat
            pool += [p] * repeat
            out += [o] * repeat
        if ids.count(self.image_token_id) != count:
            raise ItemError(tokenized.item.index, "the rendered item must hold exactly one image placeholder")
        tokenized.input_ids, tokenized.pooling_mask, tokenized.output_mask = ids, pool, out

    def _truncate_or_fail(self, tokenized: TokenizedItem, max_length: int, truncate: bool,
                          text_tokens: int | None = None) -> None:
        """Cut the end of the item's text, keeping the template's closing tokens; or refuse when that would leave
        none of its text. text_tokens: the tokens that hold the text (None: every pooled token of its span, prefix
        included)."""
        item, excess = tokenized.item, len(tokenized) - max_length
        if item.text is None:  # an image alone: truncate=True cannot help, fewer pixels (or shorter instructions) can
            remedy = "give its image fewer pixels (max_pixels)" + (" or shorten its instructions" if item.instructions else "")
            raise ItemError(item.index, f"{len(tokenized)} tokens, over the maximum of {max_length}, and it has no text "
                                        f"to cut: {remedy}")
        if not truncate:
            raise ItemError(item.index, f"{len(tokenized)} tokens, over the maximum of {max_length} (pass truncate=True to cut the text)")
        text_end = max(i for i, pooled in enumerate(tokenized.pooling_mask) if pooled) + 1
        text_start = text_end
        while text_start > 0 and tokenized.pooling_mask[text_start - 1] and tokenized.input_ids[text_start - 1] != self.vision_end_id:
            text_start -= 1
        cuttable = text_end - text_start if text_tokens is None else min(text_tokens, text_end - text_start)
        if cuttable <= excess:
            raise ItemError(item.index, f"{len(tokenized)} tokens, over the maximum of {max_length}, and its text is too short to cut")
        cut = slice(text_end - excess, text_end)
        for name in ("input_ids", "pooling_mask", "output_mask"):
            values = getattr(tokenized, name)
            del values[cut]
        tokenized.truncated = True
        warnings.warn(f"item {item.index}: truncated from {max_length + excess} to {max_length} tokens", stacklevel=4)

    @property
    def vision_end_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|vision_end|>")

    # ------------------------------------------------------------------ tokens -> batch tensors
    def collate(
        self, tokenized: Sequence[TokenizedItem], *, min_pixels: int, max_pixels: int,
        image_device: torch.device | None = None,
    ) -> BatchFeature:
        """Right-pad a batch and process its images (on ``image_device``, see ``process_pictures``).

        Returns input_ids, attention_mask, pooling_mask, output_mask, mm_token_type_ids, and for images
        image_grid_thw (every image, in order), pixel_values (images given as pictures) and image_embeds
        (images given precomputed) with image_is_precomputed telling which is which.
        """
        length = max((len(t) for t in tokenized), default=0)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(tokenized), length), pad_id, dtype=torch.long)
        masks = {name: torch.zeros((len(tokenized), length), dtype=torch.bool) for name in ("attention_mask", "pooling_mask", "output_mask")}
        for row, item in enumerate(tokenized):
            n = len(item)
            ids[row, :n] = torch.tensor(item.input_ids)
            masks["attention_mask"][row, :n] = True
            masks["pooling_mask"][row, :n] = torch.tensor(item.pooling_mask)
            masks["output_mask"][row, :n] = torch.tensor(item.output_mask)
        batch = {"input_ids": ids, **{k: v.long() if k == "attention_mask" else v for k, v in masks.items()}}
        batch["mm_token_type_ids"] = (ids == self.image_token_id).int()
        batch.update(self.process_batch_images(tokenized, min_pixels=min_pixels, max_pixels=max_pixels,
                                               image_device=image_device))
        return BatchFeature(batch)

    def collate_packed(self, tokenized: Sequence[TokenizedItem], *, min_pixels: int, max_pixels: int,
                       image_device: torch.device | None = None) -> BatchFeature:
        """Concatenate a batch into one row with no padding, for variable-length (packed) attention.

        Returns input_ids, pooling_mask, output_mask of shape (1, total_tokens), cu_seqlens (items + 1,
        int32: where each item starts and ends), max_seqlen, and the image tensors as ``collate``.
        """
        lengths = np.fromiter((len(t) for t in tokenized), dtype=np.int32, count=len(tokenized))
        cu_seqlens = np.zeros(len(tokenized) + 1, dtype=np.int32)  # numpy: torch calls wait for the interpreter lock
        np.cumsum(lengths, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        flat = lambda name: torch.from_numpy(np.fromiter(  # 4x faster than torch.tensor of one long list
            itertools.chain.from_iterable(getattr(t, name) for t in tokenized), dtype=_DTYPES[name], count=total
        )).unsqueeze(0)
        batch = {
            "input_ids": flat("input_ids"),
            "pooling_mask": flat("pooling_mask"),
            "output_mask": flat("output_mask"),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(lengths.max()) if len(lengths) else 0,
        }
        batch.update(self.process_batch_images(tokenized, min_pixels=min_pixels, max_pixels=max_pixels,
                                               image_device=image_device))
        return BatchFeature(batch)

    def process_batch_images(self, tokenized: Sequence[TokenizedItem], *, min_pixels: int, max_pixels: int,
                             image_device: torch.device | None = None) -> dict:
        """Pixel values for the batch's pictures (on ``image_device`` when given), precomputed embeddings for the
        rest, grids for all (on the CPU)."""
        with_image = [t for t in tokenized if t.item.has_image]
        if not with_image:
            return {}
        pictures = [t for t in with_image if t.item.image is not None]
        out = {
            "image_grid_thw": torch.tensor([t.image_grid_thw for t in with_image], dtype=torch.long),
            "image_is_precomputed": torch.tensor([t.item.image is None for t in with_image]),
        }
        if pictures:
            pixels = self.process_pictures([t.item.image for t in pictures], min_pixels=min_pixels,
                                           max_pixels=max_pixels, device=image_device)
            for t, grid in zip(pictures, pixels["image_grid_thw"].tolist()):
                if tuple(grid) != tuple(t.image_grid_thw):
                    raise ItemError(t.item.index, f"image processor gave grid {grid}, expected {t.image_grid_thw}")
            out["pixel_values"] = pixels["pixel_values"]
        precomputed = [t.item.image_embeds for t in with_image if t.item.image is None]
        if precomputed:
            out["image_embeds"] = torch.cat(precomputed)
        return out

    @property
    def preprocesses_on_device(self) -> bool:
        """Whether the image processor can resize and normalise on a GPU: transformers' torchvision backend takes a
        ``device`` (the PIL backend works on the CPU only)."""
        try:
            from transformers.image_processing_backends import TorchvisionBackend
        except ImportError:  # transformers before the backends module
            return False
        return isinstance(self.image_processor, TorchvisionBackend)

    def process_pictures(self, images: Sequence[Image.Image], *, min_pixels: int, max_pixels: int,
                         device: torch.device | None = None) -> BatchFeature:
        """The image processor on some pictures: pixel_values (on ``device`` when given: only the pictures' bytes
        are copied there, resizing and normalising run on it) and image_grid_thw (on the CPU).

        On the H200 machine, 8 pages of 1050x1400 px took 97 ms on its 16 CPU cores and 27 ms with ``device``
        set to the GPU (half of it the pictures' conversion to arrays); the pixels differ by rounding (mean
        absolute difference 4e-5 after normalisation)."""
        if device is not None and not self.preprocesses_on_device:
            raise ValueError(f"{type(self.image_processor).__name__} processes images on the CPU only")
        on_device = {} if device is None else {"device": device}
        return self.image_processor(images=list(images), size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    return_tensors="pt", **on_device)

    # ------------------------------------------------------------------ one call
    def process_items(
        self,
        items: Sequence[str | dict] | str | dict,
        *,
        task: str | None = None,
        instructions: str | None = None,
        config: NovaEmbeddingsV1Config | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        truncate: bool = False,
    ) -> BatchFeature:
        """Items -> one padded batch of model inputs (the model's ``forward`` takes it as is)."""
        config = config or _default_config()
        low, high = self.pixel_limits(config, min_pixels, max_pixels)
        normalized = self.normalize_items(items, task=task, instructions=instructions, config=config)
        tokenized = self.tokenize_items(normalized, config=config, min_pixels=low, max_pixels=high, truncate=truncate)
        return self.collate(tokenized, min_pixels=low, max_pixels=high)


# ---------------------------------------------------------------------- helpers
_DTYPES = {"input_ids": np.int64, "pooling_mask": np.bool_, "output_mask": np.bool_}  # collate_packed's columns
_DEFAULT_CONFIG: NovaEmbeddingsV1Config | None = None


class _ConfigView:
    """A config as one call sees it: each attribute read from the config once, then a plain lookup.

    transformers' config attribute access runs two ``__getattribute__`` layers (~1.4 us a read), and the processor
    read five attributes per item (27 reads for 4 texts, now 16: ``prepare_items`` 331 -> 313 us on a 2-core CPU).
    Every item of a call sees the value each attribute had when the call first read it."""

    def __init__(self, config: NovaEmbeddingsV1Config):
        self._config = config

    @classmethod
    def of(cls, config: Any) -> Any:
        return config if isinstance(config, cls) else cls(config)

    def __getattr__(self, name: str) -> Any:  # only for names not read yet: it caches them in the view
        value = getattr(self._config, name)
        setattr(self, name, value)
        return value


def _default_config() -> NovaEmbeddingsV1Config:
    global _DEFAULT_CONFIG
    if _DEFAULT_CONFIG is None:
        _DEFAULT_CONFIG = NovaEmbeddingsV1Config()
    return _DEFAULT_CONFIG


def _offset_array(offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Token offsets as a (tokens, 2) int64 array; read through one flat iterator, several times faster than
    ``np.asarray`` on a list of tuples."""
    flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    return flat.reshape(-1, 2)


# Markers around user-written special-token markup while locating it (lone surrogates: never in validated text).
_MARK_START, _MARK_END = "\ud800", "\udbff"


@functools.lru_cache(maxsize=8)
def _markup_pattern(special_tokens: tuple[str, ...]) -> re.Pattern:
    """Matches any special token's text, longest first (a token wins over the tokens it contains)."""
    return re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)) or "(?!)")


_RENDER_LOCK = threading.Lock()  # transformers' {% generation %} tracker is shared and not re-entrant


def _render(template: str, messages: list[dict], image_prompt: str) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; also return the character spans of its {% generation %} blocks."""
    with _RENDER_LOCK:
        texts, indices = render_jinja_template(
            [messages], chat_template=template, return_assistant_tokens_mask=True, image_prompt=image_prompt
        )
    return texts[0], list(indices[0])


def _conversation(prefix: str, has_image: bool, text: str | None, instructions: str | None) -> list[dict]:
    """One item as the template's conversation: the instructions as a system turn, then the user turn (task prefix,
    image part, text part)."""
    content = ([{"type": "image"}] if has_image else []) + ([{"type": "text", "text": text}] if text is not None else [])
    messages = [{"role": "user", "prefix": prefix, "content": content}]
    if instructions is not None:
        messages.insert(0, {"role": "system", "content": instructions})
    return messages


# Stand-ins for an item's text while finding where the template puts it: private-use characters, surrounding spaces
# (a template that strips or rewrites text shows it) and two lengths (spans must shift by the text's length).
_TEXT_SLOTS = ("\ue000a\ue001", " \ue000bb \ue001 ")


@functools.lru_cache(maxsize=1024)
def _text_layout(template: str, prefix: str, has_image: bool, instructions: str | None,
                 image_prompt: str) -> tuple[str, str, list[tuple[int, int]]] | None:
    """What the template renders around an item's text, for one kind of text item: (before, after, pooled spans),
    or None unless the text lands verbatim, once, with every span edge outside it. A span edge is (offset, False)
    from the start of the rendering when it lies before the text, (offset, True) from the text's end after it.
    Rendering a long call's items one by one through Jinja cost more than tokenising them."""
    found = []
    for slot in _TEXT_SLOTS:
        rendered, spans = _render(template, _conversation(prefix, has_image, slot, instructions), image_prompt)
        if rendered.count(slot) != 1:
            return None
        start = rendered.index(slot)
        if any(start < edge < start + len(slot) for span in spans for edge in span):
            return None
        unslot = lambda edge: (edge, False) if edge <= start else (edge - start - len(slot), True)  # noqa: E731, B023
        found.append((rendered[:start], rendered[start + len(slot):], [(unslot(a), unslot(b)) for a, b in spans]))
    return found[0] if found[0] == found[1] else None


@functools.lru_cache(maxsize=4096)
def _system_turn_length(template: str, instructions: str, image_prompt: str) -> int:
    """Characters taken by the instructions' system turn, found by rendering it alone."""
    return len(_render(template, [{"role": "system", "content": instructions}], image_prompt)[0])


def _text_token_count(text: str | None, rendered: str, spans: list[tuple[int, int]], bounds: np.ndarray) -> int | None:
    """Tokens overlapping the item's text, which the template renders at the end of its last pooled span
    (``{prefix}{text}``); None when the text is not found there. Truncation may cut these tokens and no others."""
    if text is None or not spans:
        return None
    end = spans[-1][1]
    start = end - len(text)
    if start < 0 or rendered[start:end] != text:
        return None
    return int(((bounds[:, 0] < end) & (bounds[:, 1] > start)).sum())


def _check_task(task: Any, config, where: str) -> None:
    if not isinstance(task, str):
        raise ValueError(f"{where} must be a str, got {type(task).__name__}")
    if task not in config.task_prompts:
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted(config.task_prompts)}")


def _check_instructions(instructions: Any, where: str) -> None:
    if instructions is None:
        return
    if not isinstance(instructions, str):
        raise ValueError(f"{where} must be a str or None, got {type(instructions).__name__}")
    if not instructions.strip():
        raise ValueError(f"{where} is empty (use None for no instructions)")
    _check_unicode(instructions, where)


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where} is empty")
    _check_unicode(text, where)


def _check_unicode(text: str, where: str) -> None:
    """Refuse lone surrogates (e.g. from a bad JSON escape): they are not text and cannot be encoded as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} holds a lone surrogate {text[error.start]!r} at position {error.start}: not valid Unicode text"
        ) from None


def _float_tensor(embeds: Any, index: int) -> torch.Tensor:
    """An item's ``image_embeds`` as a floating-point tensor (a tensor, array or nested list of numbers)."""
    if isinstance(embeds, (torch.Tensor, np.ndarray, list, tuple)):
        try:
            tensor = torch.as_tensor(embeds)
        except (TypeError, ValueError, RuntimeError):
            tensor = None
        if tensor is not None and tensor.is_floating_point():
            return tensor
        if tensor is not None and tensor.dtype != torch.bool and not tensor.is_complex():
            return tensor.float()  # whole numbers (e.g. JSON 0 rather than 0.0) are exact as floats
    kind = f"{type(embeds).__name__} of {embeds.dtype}" if hasattr(embeds, "dtype") else type(embeds).__name__
    raise ItemError(index, f"'image_embeds' must be a tensor of numbers (image_tokens, hidden), got {kind}")


def _grid(grid: Any, merge: int, index: int) -> tuple[int, int, int]:
    """An item's ``image_grid_thw``: 3 positive integers (t, h, w), h and w multiples of the merge size."""
    try:
        values = torch.as_tensor(grid).flatten().tolist() if not isinstance(grid, (str, bytes)) else None
    except (TypeError, ValueError, RuntimeError):
        values = None
    integral = values is not None and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in values
    )
    if not integral or len(values) != 3 or min(values) <= 0 or values[1] % merge or values[2] % merge:
        raise ItemError(
            index, f"'image_grid_thw' must be 3 positive ints (t, h, w), h and w multiples of {merge}; got {grid!r}"
        )
    return tuple(int(v) for v in values)


def _positive_int(value: Any, name: str) -> int:
    """An int > 0 (bools and floats are refused rather than silently truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def load_image(source: Any, index: int, max_image_pixels: int) -> Image.Image:
    """Open an image from a PIL image, local path, http(s) URL, data URI, base64 string or raw bytes, as 8-bit RGB.

    Files are decoded only as PNG, JPEG, WebP, GIF (first frame), BMP or TIFF (first page); ``to_rgb`` says
    how other pixel modes become RGB. Every failure is an ``ItemError`` naming the item.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open_image(_image_bytes(source, index), index, max_image_pixels)
    width, height = image.size
    if width == 0 or height == 0:
        raise ItemError(index, f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ItemError(index, f"image of {width}x{height} px is over the limit of {max_image_pixels} pixels")
    try:
        image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, EOFError, struct/zlib errors... for damaged data
        raise ItemError(index, f"unreadable image: {_load_failure(error, image)}") from None
    try:
        return to_rgb(image)
    except ValueError as error:
        raise ItemError(index, str(error)) from None


def _load_failure(error: Exception, image: Image.Image) -> str:
    """Why decoding failed. A PIL image opened in a ``with`` block and used after it has no file left (PIL then
    fails with a bare assertion): say so, and how to keep its pixels."""
    if getattr(image, "fp", "") is None and not str(error):
        return "its file was closed before it was loaded (call image.load() inside the `with Image.open(...)` block)"
    return str(error) or type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, keeping what it shows (PIL's plain ``convert("RGB")`` clips deep images to white).

    - 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): the top 8 bits (``value >> 8``).
    - 32-bit integer (``I``): read as 16-bit data (what 16-bit PNG/TIFF files hold), so ``value >> 8``;
      values outside 0..65535 are refused: scale such an image to 8 or 16 bits first.
    - float (``F``): values in [0, 1] times 255, rounded; values outside [0, 1], NaN or inf are refused.
    - transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, or a transparent palette/colour key): composited
      on white, as transformers' ``convert_to_rgb`` does (jina-embeddings-v4's processor sees the same pixels).
    - any other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): PIL's ``convert("RGB")``.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_deep_pixels_to_uint8(image))
    if image.mode == "La":  # PIL converts premultiplied gray+alpha only to LA (un-premultiplied), never to RGBA
        image = image.convert("LA")
    if any(band in ("A", "a") for band in image.getbands()) or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _deep_pixels_to_uint8(image: Image.Image) -> np.ndarray:
    """Grayscale pixels of a 16-bit, 32-bit integer or float image scaled to 0..255 (see ``to_rgb``)."""
    pixels = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(pixels).all():
            raise ValueError("float image (mode F) holds values that are not finite (NaN or inf)")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"float image (mode F) values must lie in [0, 1], got {pixels.min():g}..{pixels.max():g}; "
                             "scale it to 8 bits first")
        return np.round(pixels * 255).astype(np.uint8)
    if image.mode == "I" and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(f"32-bit integer image (mode I) values must lie in 0..65535 (16-bit data), got "
                         f"{pixels.min()}..{pixels.max()}; scale it to 8 or 16 bits first")
    return (pixels.astype(np.uint32) >> 8).astype(np.uint8)


def _open_image(data: bytes, index: int, max_image_pixels: int) -> Image.Image:
    """Open (not yet decode) an image file in one of the supported formats."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ItemError(
            index, f"unreadable image: not an image in a supported format ({SUPPORTED_FORMATS_TEXT})"
        ) from None
    except Image.DecompressionBombError as error:
        raise ItemError(index, f"image is over the limit of {max_image_pixels} pixels ({error})") from None
    except Exception as error:  # a header PIL recognises but cannot parse
        raise ItemError(index, f"unreadable image: {error}") from None


def _image_bytes(source: Any, index: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.exists(source)):
        data = _read_file(source, index)
    elif isinstance(source, str) and not source.strip():
        raise ItemError(index, "'image' is an empty string")
    elif isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):  # schemes ignore case
        data = _fetch_url(source, index)
    elif isinstance(source, str) and source[:5].lower() == "data:":  # schemes ignore case
        data = _decode_data_uri(source, index)
    elif isinstance(source, str):
        data = _decode_base64(source, index)
    else:
        raise ItemError(index, f"'image' must be a PIL image, path, URL, base64 string or bytes, got {type(source).__name__}")
    if not data:
        raise ItemError(index, "'image' is empty (no bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ItemError(index, f"image file is over {MAX_IMAGE_BYTES} bytes")
    return data


def _read_file(path: str | os.PathLike, index: int) -> bytes:
    if os.path.isdir(path):
        raise ItemError(index, f"'image' path {os.fspath(path)!r} is a directory, not an image file")
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        raise ItemError(index, f"'image' path {os.fspath(path)!r}: no such file") from None
    except (OSError, ValueError) as error:
        raise ItemError(index, f"could not read image file {os.fspath(path)!r}: {error}") from None


def _fetch_url(url: str, index: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (http/https checked above)
            return response.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        raise ItemError(index, f"could not fetch image URL {url!r}: {error}") from None


def _decode_data_uri(uri: str, index: int) -> bytes:
    """The bytes of a ``data:[<mime>];base64,<payload>`` URI; other data URIs are refused with what to send."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ItemError(index, f"'image' data URI must be base64 ('data:image/png;base64,...'), got one starting "
                               f"{uri[:40]!r}")
    return _decode_base64(payload, index, invalid="'image' data URI: its payload is not valid base64")


def _decode_base64(text: str, index: int,
                   invalid: str = "'image' string is neither an existing path, an http(s) URL, nor valid base64") -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks of MIME base64 are allowed
    except (binascii.Error, ValueError):
        raise ItemError(index, invalid) from None


__all__ = [
    "NovaEmbeddingsV1Processor", "EmbeddingItem", "TokenizedItem", "ItemError", "TASK_ADAPTER", "load_image", "to_rgb",
]
