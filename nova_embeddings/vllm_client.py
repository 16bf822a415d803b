"""Client side of a vLLM export (``nova-embeddings export-vllm``): prompts in, nova vectors out.

vLLM serves the export with ``token_embed`` pooling and ``normalize`` off: for each prompt it returns the
final-norm hidden state of every token. This module renders the prompts with the nova processor saved in the
export (``OUT/nova``; the same rendering, pooling masks and image grids as ``encode``) and pools vLLM's states
exactly as the model does: the single vector is the mean over the item's content tokens (the processor's
pooling mask: the text with its task prefix, or the vision span), L2-normalised; multi vectors are the
projector applied to each token, L2-normalised, without the instructions' system turn (the output mask).

vLLM itself does not run on the machines this project is developed on; the tests run the exported checkpoint
with stock transformers the way vLLM runs it.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from nova_embeddings.export_vllm import EXPORT_INFO_KEY, NOVA_SUBFOLDER, PROJECTOR_INFO

UNIT_NORM_TOLERANCE = 1e-3  # token states all of norm 1 mean vLLM normalised them (serve with normalize false)


@dataclass
class VllmPrompt:
    """One item as vLLM takes it, with what the client needs to pool vLLM's answer.

    prompt: the rendered item with one image placeholder per image (vLLM expands it per merged patch).
    input_ids / pooling_mask / output_mask: the expanded tokens and their masks, as ``encode`` builds them.
    """

    index: int
    prompt: str
    image: Image.Image | None
    image_token: str
    input_ids: list[int]
    pooling_mask: list[bool]
    output_mask: list[bool]

    def offline_prompt(self) -> dict:
        """For ``LLM.encode(..., pooling_task="token_embed")``."""
        request: dict[str, Any] = {"prompt": self.prompt}
        if self.image is not None:
            request["multi_modal_data"] = {"image": self.image}
        return request

    def messages(self) -> list[dict]:
        """The prompt as one chat message: its text around the image placeholder, the image as a data URL.

        The export's chat template writes text parts as they are and an image part as the placeholder, so vLLM
        renders exactly ``prompt``.
        """
        if self.image is None:
            return [{"role": "user", "content": [{"type": "text", "text": self.prompt}]}]
        content: list[dict] = []
        for position, text in enumerate(self.prompt.split(self.image_token)):
            if position:
                content.append({"type": "image_url", "image_url": {"url": _png_data_url(self.image)}})
            if text:
                content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def pooling_request(self, model: str) -> dict:
        """Body of a POST to vLLM's ``/pooling`` endpoint for this item.

        ``use_activation: false`` keeps the token states un-normalised (vLLM >= 0.11 removed ``normalize``; older
        versions ignore the field and take ``normalize: false`` from the server's pooler config instead).
        """
        return {"model": model, "task": "token_embed", "messages": self.messages(), "add_special_tokens": False,
                "use_activation": False, "encoding_format": "float"}


class NovaVllmClient:
    """Builds prompts for a vLLM export and turns vLLM's per-token states into nova's vectors."""

    def __init__(self, export_dir: str | Path):
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoProcessor

        export_dir = Path(export_dir)
        nova_dir = export_dir / NOVA_SUBFOLDER
        if not (nova_dir / "config.json").is_file():
            raise ValueError(f"{export_dir}: not a nova vLLM export (no {NOVA_SUBFOLDER}/config.json); "
                             "write one with `nova-embeddings export-vllm`")
        self.config = AutoConfig.from_pretrained(nova_dir, trust_remote_code=True)
        self.processor = AutoProcessor.from_pretrained(nova_dir, trust_remote_code=True)
        self.export = json.loads((nova_dir / "config.json").read_text())[EXPORT_INFO_KEY]
        info = json.loads((export_dir / PROJECTOR_INFO).read_text())
        weights = load_file(str(export_dir / info["weights"]))
        self.projector_weight, self.projector_bias = weights["weight"], weights.get("bias")

    # ------------------------------------------------------------------ prompts
    def build_prompts(
        self,
        items: Sequence[str | dict] | str | dict,
        *,
        task: str | None = None,
        instructions: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> list[VllmPrompt]:
        """Render items as ``encode`` does (same keys: text, image, task, instructions).

        The task defaults to the exported task adapter's; an item whose task routes to another adapter, or
        that names an adapter or precomputed image embeddings, is refused: the export holds one merged adapter.
        Images must use the export's pixel limits (the ones vLLM's image processor applies).
        """
        processor, config = self.processor, self.config
        if task is None and self.export["task"] is not None:
            task = self.export["task"]
        limits = processor.pixel_limits(config, min_pixels, max_pixels)
        if limits != (config.min_pixels, config.max_pixels):
            exported = (config.min_pixels, config.max_pixels)
            raise ValueError(f"pixel limits {limits} differ from the export's {exported}, "
                             "which vLLM's image processor applies; export again or pass mm_processor_kwargs to vLLM")
        normalized = processor.normalize_items(items, task=task, instructions=instructions, config=config)
        for item in normalized:
            self._check_item_fits_export(item)
        tokenized = processor.tokenize_items(normalized, config=config, min_pixels=limits[0], max_pixels=limits[1])
        return [self._prompt(t) for t in tokenized]

    def _check_item_fits_export(self, item) -> None:
        task_adapter = sys.modules[type(self.processor).__module__].TASK_ADAPTER  # "use the item's task adapter"
        if item.adapter != task_adapter:
            raise ValueError(f"item {item.index}: 'adapter' cannot be chosen per item: this export has the "
                             f"{self.export['adapter']!r} adapter merged in")
        if item.image_embeds is not None:
            raise ValueError(f"item {item.index}: precomputed 'image_embeds' are not supported; give the image")
        exported = self.export["task"]
        if exported is not None and self.config.adapter_task(item.task) != exported:
            serves = sorted(t for t in self.config.task_prompts if self.config.adapter_task(t) == exported)
            raise ValueError(f"item {item.index}: task {item.task!r} needs the {self.config.adapter_task(item.task)!r} "
                             f"adapter; this export serves {serves}")

    def _prompt(self, tokenized) -> VllmPrompt:
        rendered, _, _ = self.processor.render_item(tokenized.item, self.config)
        return VllmPrompt(index=tokenized.item.index, prompt=rendered, image=tokenized.item.image,
                          image_token=self.processor.image_token, input_ids=list(tokenized.input_ids),
                          pooling_mask=list(tokenized.pooling_mask), output_mask=list(tokenized.output_mask))

    # ------------------------------------------------------------------ pooling
    def single_vectors(self, prompts: Sequence[VllmPrompt], token_states: Sequence[Any],
                       token_ids: Sequence[Sequence[int]] | None = None, dimensions: int | None = None) -> torch.Tensor:
        """Mean over each item's pooling mask, in float32, L2-normalised: (items, hidden).

        ``token_ids`` (vLLM's ``prompt_token_ids``), when given, are checked against the expected tokens.
        ``dimensions`` truncates (Matryoshka) and normalises again.
        """
        if dimensions is not None and dimensions not in self.config.matryoshka_dims:
            raise ValueError(f"dimensions={dimensions} is not allowed; choose one of {self.config.matryoshka_dims}")
        vectors = []
        for prompt, states in self._checked(prompts, token_states, token_ids):
            mask = torch.tensor(prompt.pooling_mask)
            vectors.append(states[mask].mean(dim=0))
        pooled = F.normalize(torch.stack(vectors), dim=-1)
        if dimensions is not None and dimensions < pooled.shape[-1]:
            pooled = F.normalize(pooled[:, :dimensions], dim=-1)
        return pooled

    def multi_vectors(self, prompts: Sequence[VllmPrompt], token_states: Sequence[Any],
                      token_ids: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """The projector on each token of the output mask, L2-normalised: one (tokens, dim) tensor per item."""
        results = []
        for prompt, states in self._checked(prompts, token_states, token_ids):
            kept = states[torch.tensor(prompt.output_mask)]
            results.append(F.normalize(F.linear(kept, self.projector_weight, self.projector_bias), dim=-1))
        return results

    def _checked(self, prompts, token_states, token_ids):
        """Pair prompts with their states (float32), refusing anything that would pool the wrong tokens."""
        if len(prompts) != len(token_states) or (token_ids is not None and len(token_ids) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(token_states)} token state tensors"
                             + ("" if token_ids is None else f" and {len(token_ids)} token id lists"))
        for position, (prompt, states) in enumerate(zip(prompts, token_states)):
            states = torch.as_tensor(states).to(torch.float32)
            if states.ndim != 2 or states.shape[0] != len(prompt.input_ids):
                raise ValueError(f"item {prompt.index}: vLLM returned states of shape {tuple(states.shape)}, expected "
                                 f"({len(prompt.input_ids)}, hidden): a different prompt or image size (pixel limits)?")
            if token_ids is not None and list(token_ids[position]) != prompt.input_ids:
                raise ValueError(f"item {prompt.index}: vLLM's prompt tokens differ from the nova processor's")
            norms = states.norm(dim=-1)
            if len(norms) > 1 and bool(((norms - 1).abs() < UNIT_NORM_TOLERANCE).all()):
                raise ValueError(f"item {prompt.index}: every token state has norm 1: vLLM normalised them; "
                                 "serve with normalize false (see the export's README)")
            yield prompt, states


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = ["NovaVllmClient", "VllmPrompt"]
