"""sentence-transformers module of nova-embeddings-v1: ``SentenceTransformer(repo, trust_remote_code=True)``.

The repository's ``modules.json`` lists this one module; it wraps the model that ``AutoModel`` loads and maps
sentence-transformers' conventions onto the model's own items, so that ST gives what ``model.encode`` gives:

- inputs: a text, a PIL image (or an image path/URL, as everywhere in ST), a dict with ``text`` and/or ``image``
  (plus the model's item keys ``task``, ``instructions``, ``adapter``), or chat messages (system turn = instructions);
- prompts: ``encode_query`` / ``encode_document`` select ``retrieval.query`` / ``retrieval.passage``; a prompt equal to
  a task prefix ("Query: ", "Passage: ") selects that task; any other prompt is the instructions;
- keyword arguments (ST's ``forward_kwargs``): ``task``, ``instructions``, ``adapter``, ``dimensions``;
- outputs: ``sentence_embedding`` (pooled, L2-normalised; Matryoshka ``dimensions`` or the model's ``truncate_dim``
  renormalised), ``token_embeddings`` (the 128-d multi vectors) and ``attention_mask`` (the tokens that are multi
  vectors: never the instructions' system turn).

Preprocessing is the model's processor (item validation, chat template, tokenisation, padding) and each row's adapter
is the model's ``resolve_adapter``; ``forward`` is the model's own forward pass with PEFT's per-row adapter routing.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL.Image import Image as PILImage
from sentence_transformers.base.modality import is_image_url_or_path, is_message_dict
from sentence_transformers.base.modules import InputModule
from transformers import AutoModel

# ST's encode_query / encode_document pass task="query" / "document"
ST_TASKS = {"query": "retrieval.query", "document": "retrieval.passage"}
ST_CONFIG_FILE = "config_sentence_transformers.json"
MESSAGE_PART_TYPES = {"text", "image"}  # the content parts of a chat message that become the item


class NovaEmbeddingsV1Module(InputModule):
    """The whole nova-embeddings-v1 model as one sentence-transformers input module."""

    save_in_root = True
    forward_kwargs = {"task", "instructions", "adapter", "dimensions"}

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._owner: weakref.ReferenceType | None = None  # the SentenceTransformer, for its truncate_dim
        self._max_seq_length: int | None = None  # set through ST's max_seq_length: longer inputs are cut to it

    # ------------------------------------------------------------------ what ST asks of an input module
    @property
    def modalities(self) -> list[str]:
        # "message": a batch may mix texts, images and text+image items
        return ["text", "image", "message"]

    @property
    def tokenizer(self):
        return self.model.processor.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.model.config.max_length if self._max_seq_length is None else self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """sentence-transformers' knob: longer inputs are cut to ``value`` tokens (``encode``'s truncation, which
        warns per item); until it is set, an input over the model's ``max_length`` is refused, as in ``encode``.
        It lives on this module: not saved with the model."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_seq_length must be a positive integer, got {value!r}")
        if value > self.model.config.max_length:
            raise ValueError(f"max_seq_length {value} is over the model's max_length {self.model.config.max_length}")
        self._max_seq_length = value

    def get_embedding_dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    def on_model_ready(self, model: torch.nn.Module) -> None:
        self._owner = weakref.ref(model)  # a weak reference: the module must not register its parent as a child

    # ------------------------------------------------------------------ inputs -> model batch
    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """ST inputs -> the model's padded batch, plus each row's adapter (``adapter_names``)."""
        model, config = self.model, self.model.config
        task, instructions = self.task_and_instructions(kwargs.get("task"), prompt, kwargs.get("instructions"))
        items = [to_item(sample, index) for index, sample in enumerate(inputs)]
        processor = model.processor
        low, high = processor.pixel_limits(config)
        normalized = processor.normalize_items(items, task=task, instructions=instructions, config=config)
        call_adapter = {"call_adapter": kwargs["adapter"]} if "adapter" in kwargs else {}
        adapter_names = [model.resolve_adapter(item, **call_adapter) for item in normalized]
        tokenized = processor.tokenize_items(normalized, config=config, min_pixels=low, max_pixels=high,
                                             max_length=self.max_seq_length, truncate=self._max_seq_length is not None)
        batch = dict(processor.collate(tokenized, min_pixels=low, max_pixels=high))
        batch["adapter_names"] = adapter_names
        return batch

    def task_and_instructions(self, task: str | None, prompt: str | None,
                              instructions: str | None) -> tuple[str | None, str | None]:
        """The call's task and instructions from ST's ``task`` and ``prompt``.

        ``task`` "query"/"document" (encode_query/encode_document) mean retrieval.query/retrieval.passage; other
        values are the model's task names. A prompt equal to a task prefix picks that task (or must agree with the
        given one); any other prompt is the instructions.
        """
        config = self.model.config
        task = ST_TASKS.get(task, task)
        if not prompt:
            return task, instructions
        prompt_tasks = [name for name, prefix in config.task_prompts.items() if prefix == prompt]
        if not prompt_tasks:
            if instructions is not None:
                raise ValueError("got both a prompt and instructions=: pass the instructions one way only")
            return task, prompt
        if task is None:
            return preferred_task(prompt_tasks, config.default_task), instructions
        if task not in prompt_tasks:
            raise ValueError(f"prompt {prompt!r} is the prefix of tasks {prompt_tasks}, not of task {task!r}; "
                             "drop the prompt or pick one of those tasks")
        return task, instructions

    # ------------------------------------------------------------------ forward
    def forward(self, features: dict[str, Any], dimensions: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """The model's forward pass with each row routed to its adapter; adds ST's output keys."""
        inputs = {key: value for key, value in features.items() if key != "adapter_names"}
        out = self.model(**inputs, adapter_names=features["adapter_names"], return_multivector=True)
        single = out.single_vector  # (batch, hidden), L2-normalised
        dimensions = dimensions if dimensions is not None else self.owner_truncate_dim()
        if dimensions is not None:
            single = self.matryoshka(single, dimensions)
        features.update(sentence_embedding=single, token_embeddings=out.multi_vector,  # (batch, seq, 128)
                        attention_mask=features["output_mask"])
        return features

    def owner_truncate_dim(self) -> int | None:
        """The SentenceTransformer's ``truncate_dim``, applied here so that the cut vector is renormalised."""
        owner = self._owner() if self._owner is not None else None
        return getattr(owner, "truncate_dim", None)

    def matryoshka(self, vectors: torch.Tensor, dimensions: int) -> torch.Tensor:
        allowed = self.model.config.matryoshka_dims
        if dimensions not in allowed:
            raise ValueError(f"dimensions={dimensions} is not allowed; choose one of {allowed}")
        if dimensions >= vectors.shape[-1]:
            return vectors
        return F.normalize(vectors[:, :dimensions], dim=-1)

    # ------------------------------------------------------------------ save / load
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """The model's own save_pretrained; the SentenceTransformer's config file (its prompts) is kept as ST wrote it."""
        st_config = os.path.join(output_path, ST_CONFIG_FILE)
        kept = open(st_config, "rb").read() if os.path.exists(st_config) else None
        self.model.save_pretrained(output_path)
        if kept is not None:
            with open(st_config, "wb") as file:
                file.write(kept)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             trust_remote_code: bool = False, model_kwargs: dict[str, Any] | None = None, backend: str = "torch",
             **kwargs: Any) -> "NovaEmbeddingsV1Module":
        """Load the model with ``AutoModel`` (``model_kwargs`` such as ``dtype`` or ``device_map`` pass through)."""
        if backend != "torch":
            raise ValueError(f"nova-embeddings-v1 runs on the torch backend only, got backend={backend!r}")
        where = {"subfolder": subfolder} if subfolder else {}
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, token=token,
                                          cache_dir=cache_folder, revision=revision, local_files_only=local_files_only,
                                          **where, **(model_kwargs or {}))
        return cls(model)


def preferred_task(tasks: list[str], default_task: str) -> str:
    """Of the tasks sharing a prefix, the default task's own side first ("Query: " -> retrieval)."""
    for name in (default_task, f"{default_task}.query", f"{default_task}.passage"):
        if name in tasks:
            return name
    return sorted(tasks)[0]


def to_item(sample: Any, index: int) -> Any:
    """One ST input as the model's item; anything else goes on as it is, for the processor to name the problem."""
    if isinstance(sample, PILImage):
        return {"image": sample}
    if isinstance(sample, str):
        return {"image": sample} if is_image_url_or_path(sample) else sample
    if is_message_dict(sample) or (isinstance(sample, list) and sample and is_message_dict(sample[0])):
        return messages_to_item([sample] if isinstance(sample, dict) else sample, index)
    if isinstance(sample, (tuple, list)):
        raise ValueError(f"item {index}: pairs are not supported: nova-embeddings-v1 embeds one item at a time")
    return sample


def messages_to_item(messages: list[dict], index: int) -> dict[str, Any]:
    """Chat messages -> an item: the system turn is the instructions, the user turn's text and image the content."""
    item: dict[str, Any] = {}
    for message in messages:
        role, parts = message.get("role"), message.get("content")
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else list(parts or [])
        unknown = sorted({str(part.get("type")) for part in parts} - MESSAGE_PART_TYPES)
        if unknown:  # never drop content silently: the vector would miss it
            raise ValueError(f"item {index}: message parts of type(s) {unknown} cannot be embedded; use "
                             f"{sorted(MESSAGE_PART_TYPES)} parts ({{'type': 'image', 'image': ...}} for an image)")
        texts = [part.get("text", "") for part in parts if part.get("type") == "text"]
        images = [part.get("image", part.get("url")) for part in parts if part.get("type") == "image"]
        if role == "system" and not images and "instructions" not in item:
            item["instructions"] = "\n".join(texts)
        elif role == "user" and len(images) <= 1 and "text" not in item and "image" not in item:
            if texts:
                item["text"] = "\n".join(texts)
            if images:
                item["image"] = images[0]
        else:
            raise ValueError(f"item {index}: messages must be an optional system turn (text) and one user turn "
                             f"with text and at most one image; got a {role!r} turn that does not fit")
    return item
