"""The wire format: OpenAI's embeddings request, the model card's extensions, and the response body.

Parsing is strict (unknown fields, wrong types and empty input are 400s naming the field) because a
silently ignored field (a misspelt ``adapter``) would return plausible but wrong vectors.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from .errors import ApiError, item_error

TOKEN_IDS_REFUSED = ("token-id input is not supported (the ids of another tokenizer would embed the wrong "
                     "text); send the text. LangChain's OpenAIEmbeddings sends tiktoken ids by default: create it "
                     "with check_embedding_ctx_length=False")
MAX_JSON_DEPTH = 32  # the deepest valid body (image_embeds in an item in input) is 5 levels
ITEM_STRING_KEYS = ("text", "task")  # must be strings when present
ITEM_NULLABLE_KEYS = ("instructions", "adapter")  # strings, or null (adapter: null = the bare backbone)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")  # a surrogate in UTF-8 JSON: escaped, or raw bytes


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's fields plus the model card's (request-level defaults for the items)."""

    model_config = ConfigDict(extra="forbid")

    input: Any
    model: StrictStr | None = None
    dimensions: StrictInt | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None
    task: StrictStr | None = None
    instructions: StrictStr | None = None
    adapter: StrictStr | None = None
    return_multivector: StrictBool | None = None
    truncate: StrictBool = False

    @property
    def adapter_given(self) -> bool:
        """``"adapter": null`` (bare backbone for every item) differs from no ``adapter`` at all."""
        return "adapter" in self.model_fields_set


class LoraLoadRequest(BaseModel):
    """``POST /v1/internal/lora/load``: vLLM's field names."""

    model_config = ConfigDict(extra="forbid")

    lora_name: StrictStr
    lora_path: StrictStr


class LoraUnloadRequest(BaseModel):
    """``POST /v1/internal/lora/unload``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: StrictStr


def parse_body(body: bytes, schema: type[BaseModel]) -> Any:
    """JSON bytes -> ``schema``; the first validation problem becomes a 400 naming its field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"request body is nested too deeply (over {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    if may_need_string_check(body):
        check_json_strings(data)
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None


def may_need_string_check(body: bytes) -> bool:
    """Whether ``check_json_strings`` can find anything in this body. Nesting past ``MAX_JSON_DEPTH`` needs more
    brackets than that; in UTF-8, a surrogate needs a ``\\uD800``-``\\uDFFF`` escape or its raw bytes (``json.loads``
    decodes with ``surrogatepass``); UTF-16 and UTF-32 bodies are always walked. Most bodies need none of it."""
    return body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH or json.detect_encoding(body) != "utf-8" or \
        _SURROGATE.search(body) is not None


def check_json_strings(data: dict) -> None:
    """Walk the parsed body once, without recursion: refuse nesting past ``MAX_JSON_DEPTH`` and strings (keys
    too) holding a lone UTF-16 surrogate, which JSON's ``\\ud800`` escapes allow but no tokenizer or UTF-8
    encoder takes."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested too deeply (over {MAX_JSON_DEPTH} levels)", code="invalid_json")
        if isinstance(value, str):
            _check_unicode(value, path, data)
        elif isinstance(value, dict):
            for key, child in value.items():
                _check_unicode(key, path + (key,), data)
                stack.append((child, path + (key,)))
        elif isinstance(value, list):
            stack.extend((child, path + (index,)) for index, child in enumerate(value))


def _check_unicode(text: str, path: tuple, data: dict) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".") or "body"
        message = (f"{where.encode('ascii', 'backslashreplace').decode()}: contains a lone surrogate "
                   f"({text[error.start]!a} at character {error.start}); text must be valid Unicode")
        raise ApiError(400, message, param=_param_of(path, data), code="invalid_unicode") from None


def _param_of(path: tuple, data: dict) -> str | None:
    """The ``param`` of a problem at ``path``: the item (``input`` / ``input[i]``) or the top-level field."""
    if not path or not isinstance(path[0], str) or not path[0].isascii():
        return None
    if path[0] == "input" and isinstance(data.get("input"), list) and len(path) > 1:
        return f"input[{path[1]}]"
    if path[0] == "input" and isinstance(data.get("input"), dict):
        return "input[0]"
    return path[0]


def request_items(request: EmbeddingRequest, max_items: int) -> tuple[list[Any], bool]:
    """The request's items as a list (a lone string or object is one item), and whether input was a lone string."""
    raw = request.input
    single = isinstance(raw, str)
    if isinstance(raw, list) and raw and all(type(v) is int for v in raw):
        raise ApiError(400, f"input: {TOKEN_IDS_REFUSED}", param="input", code="invalid_input")
    items = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(items, list):
        raise ApiError(400, "input must be a string, an object, or a list of them", param="input", code="invalid_value")
    if not items:
        raise ApiError(400, "input is empty: give at least one item", param="input", code="invalid_value")
    if len(items) > max_items:
        raise ApiError(400, f"input has {len(items)} items, over the limit of {max_items} per request", param="input",
                       code="too_many_items")
    for index, item in enumerate(items):
        check_item_types(index, item, single)
    return items, single


def check_item_types(index: int, item: Any, single: bool) -> None:
    """JSON types the processor cannot be handed (token ids, numbers, lists as task names...)."""
    if isinstance(item, list) and all(isinstance(v, int) for v in item):
        raise item_error(index, TOKEN_IDS_REFUSED, single)
    if not isinstance(item, (str, dict)):
        raise item_error(index, f"expected a string or an object, got {_json_type(item)}", single)
    if isinstance(item, str):
        return
    for key in ITEM_STRING_KEYS:
        if key in item and not isinstance(item[key], str):
            raise item_error(index, f"'{key}' must be a string, got {_json_type(item[key])}", single)
    for key in ITEM_NULLABLE_KEYS:
        if item.get(key) is not None and not isinstance(item[key], str):
            raise item_error(index, f"'{key}' must be a string or null, got {_json_type(item[key])}", single)
    if "image" in item and not isinstance(item["image"], str):
        raise item_error(index, f"'image' must be a string (data URI, base64 or URL), got {_json_type(item['image'])}",
                         single)


def _json_type(value: Any) -> str:
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def image_embeds_tensor(index: int, item: dict, single: bool) -> tuple[torch.Tensor, list[int]]:
    """An item's JSON ``image_embeds`` ([tokens, hidden] numbers) and ``image_grid_thw`` ([t, h, w]) as tensors."""
    grid = item.get("image_grid_thw")
    if not (isinstance(grid, list) and len(grid) == 3 and all(type(v) is int for v in grid)):
        raise item_error(index, "'image_embeds' needs 'image_grid_thw': a list of 3 integers (t, h, w)", single)
    try:
        embeds = torch.tensor(item["image_embeds"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise item_error(index, "'image_embeds' must be a [tokens, hidden] array of numbers", single) from None
    if embeds.dim() != 2:
        raise item_error(index, f"'image_embeds' must be 2-D [tokens, hidden], got shape {list(embeds.shape)}", single)
    finite = torch.isfinite(embeds)
    if not finite.all():
        row, column = (int(v) for v in (~finite).nonzero()[0])
        raise item_error(index, f"'image_embeds' is not finite at [{row}][{column}] ({embeds[row, column].item()}); "
                                "NaN, Infinity and numbers beyond float32's range are refused", single)
    return embeds, grid


# ---------------------------------------------------------------------- responses
@dataclass(frozen=True)
class OutputOptions:
    """What a request wants done to its vectors after encode(): per request, so requests can share a batch."""

    return_multivector: bool
    dimensions: int | None
    encoding_format: str


def finish_vectors(vectors: np.ndarray | list[np.ndarray], options: OutputOptions) -> list[np.ndarray]:
    """Matryoshka truncation exactly as ``encode(dimensions=...)`` does it: cut, then re-normalise (with torch's
    ``F.normalize``, as ``encode()``, so the values are the same to the last bit)."""
    if options.return_multivector:
        return list(vectors)
    if options.dimensions is not None and options.dimensions < vectors.shape[-1]:
        vectors = F.normalize(torch.from_numpy(vectors[:, : options.dimensions]), dim=-1).numpy()
    return list(vectors)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list | str:
    """float: nested JSON lists; base64: little-endian float32 bytes, row-major (multi vectors: reshape to the
    entry's ``shape``)."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embedding_entry(index: int, vector: np.ndarray, options: OutputOptions) -> dict:
    """OpenAI's embedding object; a multi vector also carries its ``shape`` [tokens, dim], to reshape base64 bytes."""
    entry = {"object": "embedding", "index": index, "embedding": encode_vector(vector, options.encoding_format)}
    if options.return_multivector:
        entry["shape"] = list(vector.shape)
    return entry


def embedding_response(
    vectors: np.ndarray | list[np.ndarray], options: OutputOptions, model_name: str, prompt_tokens: int
) -> bytes:
    """The OpenAI response body, serialised (done off the event loop: large float lists are slow to write)."""
    data = [embedding_entry(index, vector, options) for index, vector in enumerate(finish_vectors(vectors, options))]
    body = {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass
class CheckedVectors:
    """One ``encode()`` call's vectors as numpy arrays and, per item, whether all its values are finite; sliced per
    request.

    Everything that touches torch runs once per batch, in the encode thread (``encode()``'s own numpy output). A torch op on the event loop hands the
    interpreter lock away and may wait up to a switch interval to get it back, which under load stalls every
    connection: on the H200 a per-request finiteness check was a third of the event loop's time, and on a 2-core CPU
    a per-request ``unbind`` (iterating a tensor) took ~0.17 ms. numpy slicing and iteration keep the lock."""

    vectors: np.ndarray | list[np.ndarray]
    finite: list[bool]

    @classmethod
    def of(cls, vectors: np.ndarray | list[np.ndarray]) -> "CheckedVectors":
        """``encode(..., output="numpy")``'s vectors (converted there, once for the batch), checked."""
        if isinstance(vectors, np.ndarray):  # single vectors: one op for the whole batch
            return cls(vectors, np.isfinite(vectors).all(axis=-1).tolist())
        return cls(vectors, [bool(np.isfinite(vector).all()) for vector in vectors])

    def __len__(self) -> int:
        return len(self.finite)

    def __getitem__(self, items: slice) -> "CheckedVectors":
        return CheckedVectors(self.vectors[items], self.finite[items])

    @property
    def floats(self) -> int:
        return self.vectors.size if isinstance(self.vectors, np.ndarray) else sum(v.size for v in self.vectors)

    def first_non_finite(self) -> int | None:
        """Index of the first vector holding NaN or infinity (never sent: JSON has no such numbers), else None."""
        return next((index for index, finite in enumerate(self.finite) if not finite), None)
