"""Convert a local copy of jina-embeddings-v4's repository into a nova-embeddings-v1 repository.

Why a converter rather than loading jina's files directly: jina's repository runs a bundled copy of
Qwen2.5-VL that newer transformers cannot import, names its weights with pre-4.52 keys, asks for
flash-attention in config.json, and points auto_map at its own classes. The converted repository holds
our config (same backbone fields + our embedding fields), weights under transformers 5.x names,
our remote code, the tokenizer and our processor, so it loads with stock transformers.

Stages (each a small function below): plan_conversion checks everything it can without writing: read
jina's config + preprocessor config -> build our config; scan the weight files' headers -> rename keys ->
check names, shapes and dtypes against transformers' Qwen2_5_VLModel; load jina's tokenizer and check the
special token ids and vocabulary size; check the adapters. write_repository then writes config, code
files, tokenizer, processor, adapters and (last, the slow part) the weights into a temporary folder
beside the target, which is renamed into place only when all of it succeeded.
jina's multi-task adapters/ (one file, per-task LoRA matrices) are split into one standard PEFT adapter
per task under adapters/<task>/, with the same rank, alpha and targets.

Usage:
    nova-embeddings convert --jina-dir SRC --out DST [--dtype keep|float32|bfloat16] [--overwrite]

Nothing is ever half-written: the repository is written into a temporary folder beside DST and renamed
into place at the end; on any failure DST is left as it was.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo-root modules importable
    sys.path.insert(0, str(REPO_ROOT))

from configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config  # noqa: E402

MAX_SHARD_BYTES = 4 * 1024**3
DTYPES: dict[str, torch.dtype | None] = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
PROJECTOR_PREFIX = "multi_vector_projector."
EMBED_KEY = "model.language_model.embed_tokens.weight"

# jina's config fields that have no meaning for nova (its classes, its processor, its pooling switch).
JINA_ONLY_FIELDS = ("architectures", "auto_map", "processor_class", "single_vector_pool_strategy", "truncate_dim")
# Bookkeeping fields rewritten on save; _attn_implementation would force flash-attention on every user.
INTERNAL_FIELDS = (
    "_name_or_path", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
    "transformers_version", "model_type", "torch_dtype", "dtype",
)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
                   "vision_start_token_id", "vision_end_token_id")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Token ids stay at the top level too (besides text_config): processors and users read them there.
TOP_LEVEL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

NOVA_AUTO_MAP = {
    "AutoConfig": "configuration_nova_embeddings_v1.NovaEmbeddingsV1Config",
    "AutoModel": "modeling_nova_embeddings_v1.NovaEmbeddingsV1Model",
}
NOVA_ARCHITECTURES = ["NovaEmbeddingsV1Model"]
PROCESSOR_CLASS = "NovaEmbeddingsV1Processor"
PROCESSOR_REFERENCE = "processing_nova_embeddings_v1.NovaEmbeddingsV1Processor"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json",
)
CODE_GLOB = "*_nova_embeddings_v1*.py"
CHAT_TEMPLATE_FILE = "chat_template.json"
# sentence-transformers' description of the repository (its module is one of the code files)
INTEGRATION_FILES = ("modules.json", "config_sentence_transformers.json")
# pipeline("feature-extraction", model=repo, trust_remote_code=True) runs encode() (pipeline_nova_embeddings_v1.py)
NOVA_CUSTOM_PIPELINES = {
    "feature-extraction": {"impl": "pipeline_nova_embeddings_v1.NovaEmbeddingsPipeline", "pt": ["AutoModel"],
                           "tf": [], "type": "multimodal"},
}
INDEX_FILE = "model.safetensors.index.json"
STAGING_PREFIX = "_converting_"  # temporary folders beside --out while a conversion is written
SPECIAL_TOKENS = {  # config field -> the token it must be the id of
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
}
TOKENIZER_PROBE = "Query: hello world <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>"


class ConversionError(ValueError):
    """The jina repository cannot be converted as it is; the message says what is wrong and where."""


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor of the jina checkpoint lives, read from the safetensors header only."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------------
# Config


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, naming the file when it is missing or broken."""
    if not path.is_file():
        raise ConversionError(f"{path} not found: is this a copy of jina-embeddings-v4's repository?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _is_positive_int(value: Any) -> bool:
    """A JSON integer above zero (``true`` is not a number here, though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def pixel_limits(preprocessor: dict[str, Any]) -> tuple[int, int]:
    """(min_pixels, max_pixels) of jina's image processor: explicit keys, else size.shortest/longest_edge."""
    size = preprocessor.get("size") or {}
    if not isinstance(size, dict):
        raise ConversionError(f"preprocessor_config.json: size must be a JSON object, got {size!r}")
    low = preprocessor.get("min_pixels", size.get("shortest_edge"))
    high = preprocessor.get("max_pixels", size.get("longest_edge"))
    if low is None or high is None:
        raise ConversionError(
            "preprocessor_config.json gives no min_pixels/max_pixels (nor size.shortest_edge/longest_edge)"
        )
    for name, value in (("min_pixels", low), ("max_pixels", high)):
        if not _is_positive_int(value):
            raise ConversionError(f"preprocessor_config.json: {name} must be a positive int, got {value!r}")
    return low, high


def _text_field_names() -> set[str]:
    """Fields of Qwen2.5-VL's text config (beyond the generic config fields), plus the legacy rope keys."""
    from transformers import PreTrainedConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}  # configs are dataclasses in transformers 5
    return {f.name for f in dataclasses.fields(Qwen2_5_VLTextConfig)} - generic | {"rope_scaling", "rope_theta"}


def merge_flat_text_fields(config: dict[str, Any]) -> list[str]:
    """Move jina's flat copies of the text fields into text_config (which wins); return notes on disagreements.

    jina's config.json repeats the language-model fields at the top level (transformers 4.52 style).
    transformers builds the model from text_config only, so flat copies are redundant; a flat field that
    text_config lacks is moved into it so that nothing is lost.
    """
    text = config.get("text_config")
    if not isinstance(text, dict):
        return []  # only flat fields: Qwen2_5_VLConfig builds text_config from them
    notes = []
    for key in sorted(_text_field_names() & set(config)):
        value = config[key] if key in TOP_LEVEL_TOKEN_IDS else config.pop(key)
        if key not in text:
            text[key] = value
        elif text[key] != value:
            notes.append(f"{key}: top level {value!r}, text_config {text[key]!r} (text_config kept)")
    return notes


def normalise_rope(config: dict[str, Any]) -> None:
    """Drop the legacy rope ``type`` key where ``rope_type`` is given (4.x wrote ``type: mrope`` beside ``rope_type``).

    transformers treats ``mrope`` as the ``default`` rope with an ``mrope_section``; keeping both keys
    only leaves readers guessing which one counts.
    """
    for holder in (config, config.get("text_config") or {}):
        for key in ("rope_scaling", "rope_parameters"):
            rope = holder.get(key)
            if isinstance(rope, dict) and "type" in rope and "rope_type" in rope:
                if rope["type"] not in (rope["rope_type"], "mrope"):
                    raise ConversionError(f"{key} says type {rope['type']!r} but rope_type {rope['rope_type']!r}")
                del rope["type"]


def _check_embedding_fields(config: dict[str, Any], hidden: int) -> None:
    """The projector width and Matryoshka dims must fit the hidden size, task names must be a non-empty list."""
    dim = config.get("multi_vector_projector_dim")
    if not isinstance(dim, int) or dim <= 0:
        raise ConversionError(f"multi_vector_projector_dim must be a positive int, got {dim!r}")
    dims = config.get("matryoshka_dims")
    if dims is not None and (not dims or any(not isinstance(d, int) or not 0 < d <= hidden for d in dims)):
        raise ConversionError(f"matryoshka_dims must be ints in 1..{hidden} (hidden size), got {dims!r}")
    tasks = config.get("task_names")
    if tasks is None:
        return
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ConversionError(f"task_names must be a non-empty list of str, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ConversionError(f"task_names must be distinct, got {tasks!r}")
    for task in tasks:  # each names a folder adapters/<task>/ and a part of jina's adapter keys
        if not TASK_NAME.fullmatch(task):
            raise ConversionError(f"task name {task!r} must be letters, digits, '-' or '_' (it names a folder)")


def _check_token_ids(config: NovaEmbeddingsV1Config) -> None:
    """Every special token id of the config (top level and text_config) must lie inside the vocabulary."""
    vocab = config.text_config.vocab_size
    if not _is_positive_int(vocab):
        raise ConversionError(f"config.json: text_config.vocab_size must be a positive int, got {vocab!r}")
    for holder, name in ((config, "config"), (config.text_config, "config.text_config")):
        for field in TOKEN_ID_FIELDS:
            value = getattr(holder, field, None)
            ids = value if isinstance(value, list) else [] if value is None else [value]  # eos may be a list
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ConversionError(f"{name}.{field} must be an int token id, got {value!r}")
            if not all(0 <= i < vocab for i in ids):
                raise ConversionError(f"{name}.{field} {value} is outside the vocabulary (vocab_size {vocab})")


def build_config(
    jina_config: dict[str, Any], preprocessor: dict[str, Any], dtype: torch.dtype | None = None
) -> NovaEmbeddingsV1Config:
    """Our config from jina's config.json and preprocessor_config.json.

    Keeps every Qwen2.5-VL field; carries task_names, multi_vector_projector_dim, matryoshka_dims and
    the pixel limits; drops jina's class, pooling and bookkeeping fields; sets our auto_map.
    """
    config = copy.deepcopy(jina_config)
    for sub in ("text_config", "vision_config"):
        if sub in config and not isinstance(config[sub], dict):
            raise ConversionError(f"config.json: {sub} must be a JSON object, not {type(config[sub]).__name__}")
    strategy = config.get("single_vector_pool_strategy", "mean")
    if strategy != "mean":
        raise ConversionError(f"single_vector_pool_strategy is {strategy!r}; nova-embeddings-v1 implements only 'mean'")
    dtype_name = config.get("torch_dtype", config.get("dtype"))
    for key in JINA_ONLY_FIELDS + INTERNAL_FIELDS:
        config.pop(key, None)
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            for key in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "architectures"):
                config[sub].pop(key, None)
    normalise_rope(config)
    for note in merge_flat_text_fields(config):
        print(f"note: {note}")
    hidden = (config.get("text_config") or config).get("hidden_size")
    if hidden is None:
        raise ConversionError("config.json gives no hidden_size (neither in text_config nor at the top level)")
    if not _is_positive_int(hidden):
        raise ConversionError(f"config.json: hidden_size must be a positive int, got {hidden!r}")
    _check_embedding_fields(config, hidden)
    config["min_pixels"], config["max_pixels"] = pixel_limits(preprocessor)
    if dtype is not None:
        dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name is not None:
        config["dtype"] = dtype_name
        for sub in ("text_config", "vision_config"):
            if isinstance(config.get(sub), dict):
                config[sub]["dtype"] = dtype_name
    try:
        nova = NovaEmbeddingsV1Config(**config)
    except (TypeError, ValueError, StrictDataclassError) as error:
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ConversionError(f"jina's config does not make a valid NovaEmbeddingsV1Config: {reason}") from error
    _check_token_ids(nova)
    nova.auto_map = dict(NOVA_AUTO_MAP)
    nova.custom_pipelines = copy.deepcopy(NOVA_CUSTOM_PIPELINES)
    nova.architectures = list(NOVA_ARCHITECTURES)
    return nova


# --------------------------------------------------------------------------------------------------
# Weights: find, rename, check


def find_weight_files(jina_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those named by model.safetensors.index.json, else every top-level one."""
    index_path = jina_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = index_weight_map(index_path)
        files = [jina_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index_path.name} names shard(s) that are not in {jina_dir}: {missing}")
        return files
    files = sorted(jina_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no *.safetensors weight files in {jina_dir}")
    return files


def index_weight_map(index_path: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name beside the index), checked for shape."""
    weight_map = load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path} has no weight_map")
    for name in weight_map.values():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ConversionError(f"{index_path}: weight_map must name files beside it, not {name!r}")
    return weight_map


def check_index(jina_dir: Path, sources: dict[str, SourceTensor]) -> None:
    """The index must list exactly the tensors the shards hold, each in the file that holds it.

    transformers loads each tensor from the file the index names, so a stale index breaks loading
    of the source even when every shard is intact.
    """
    index_path = jina_dir / INDEX_FILE
    if not index_path.is_file():
        return
    listed = index_weight_map(index_path)
    held = {src.key: src.file.name for src in sources.values()}
    wrong = [f"{key} listed in {file}, found in {held[key]}" for key, file in listed.items()
             if key in held and file != held[key]]
    wrong += [f"{key} listed in {file}, found in no shard" for key, file in listed.items() if key not in held]
    wrong += [f"{key} in {file}, not listed" for key, file in held.items() if key not in listed]
    if wrong:
        raise ConversionError(f"{INDEX_FILE} disagrees with the shards ({len(wrong)} entries): "
                              + _listing(sorted(wrong), 3))


def rename_key(key: str) -> str:
    """jina's on-disk key -> our key: 4.x ``model.X`` -> ``model.language_model.X``, ``visual.X`` -> ``model.visual.X``.

    5.x keys (``model.language_model.*``, ``model.visual.*``) and ``multi_vector_projector.*`` stay as they
    are; anything else is returned unchanged and reported by the check as unexpected.
    """
    if key.startswith(("model.language_model.", "model.visual.")):
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key


def read_source_tensors(files: list[Path]) -> dict[str, SourceTensor]:
    """Headers of every file, keyed by our names; a tensor found twice (or renamed onto another) is an error."""
    found: dict[str, SourceTensor] = {}
    for path in files:
        with _open_safetensors(path) as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                dtype = _safetensors_dtype(piece.get_dtype(), key)
                tensor = SourceTensor(path, key, tuple(piece.get_shape()), dtype)
                name = rename_key(key)
                if name in found:
                    other = found[name]
                    raise ConversionError(
                        f"tensor {name!r} appears twice: {other.key!r} in {other.file.name} and {key!r} in {path.name}"
                    )
                found[name] = tensor
    return found


def _open_safetensors(path: Path):
    """safe_open, with a damaged file (truncated, garbage, empty) reported by name instead of a raw SafetensorError.

    safetensors checks the header and that the data exactly fills the file, so a cut download fails here.
    """
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path.name} is not a readable safetensors file ({_one_line(error)}): "
                              f"the copy in {path.parent} is damaged or incomplete; fetch it again") from error


def check_float_dtypes(tensors: dict[str, SourceTensor]) -> None:
    """Weights are floating point; an integer or bool tensor means a damaged or foreign checkpoint."""
    for src in tensors.values():
        if src.dtype not in FLOAT_DTYPES:
            name = str(src.dtype).removeprefix("torch.")
            raise ConversionError(f"tensor {src.key} in {src.file.name} has dtype {name}; weights must be floating point")


def check_finite(tensor: torch.Tensor, key: str, file_name: str) -> None:
    """Refuse NaN and infinite values: they would spread into every embedding the model computes."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        nans = int(torch.isnan(tensor).sum())
        infinite = int(torch.isinf(tensor).sum())
        raise ConversionError(f"tensor {key} in {file_name} holds {nans} NaN and {infinite} infinite values: "
                              "the checkpoint is damaged")


def _safetensors_dtype(name: str, key: str) -> torch.dtype:
    """safetensors dtype string (e.g. 'BF16') -> torch dtype."""
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise ConversionError(f"tensor {key!r} has unsupported dtype {name}")
    return table[name]


def expected_shapes(config: NovaEmbeddingsV1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the converted checkpoint must hold: transformers' Qwen2_5_VLModel under ``model.`` + the projector.

    The model is built on the meta device from a copy of the config: no memory, no side effects.
    """
    from transformers import Qwen2_5_VLModel

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        backbone = Qwen2_5_VLModel(config)
    shapes = {f"model.{name}": tuple(t.shape) for name, t in backbone.state_dict().items()}
    hidden = config.text_config.hidden_size
    shapes[PROJECTOR_PREFIX + "weight"] = (config.multi_vector_projector_dim, hidden)
    shapes[PROJECTOR_PREFIX + "bias"] = (config.multi_vector_projector_dim,)
    return shapes


def _listing(names: list[str], limit: int = 10) -> str:
    """First ``limit`` names, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def check_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Fail with one message listing missing, unexpected and wrong-shape tensors (first 10 of each, with counts)."""
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    wrong = [f"{k} (found {list(found[k])}, expected {list(expected[k])})"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        parts.append(f"wrong shape ({len(wrong)}): {_listing(wrong)}")
    raise ConversionError("jina checkpoint does not match Qwen2.5-VL + multi_vector_projector for its config.json: "
                          + "; ".join(parts))


def _read_tensor(source: SourceTensor) -> torch.Tensor:
    """Load one tensor from its file."""
    with safe_open(str(source.file), framework="pt") as handle:
        return handle.get_tensor(source.key)


def drop_tied_lm_head(sources: dict[str, SourceTensor]) -> bool:
    """Remove ``lm_head.weight`` if it equals the (tied) input embedding; a different one is an error."""
    head = sources.get("lm_head.weight")
    if head is None:
        return False
    embed = sources.get(EMBED_KEY)
    if embed is None or not torch.equal(_read_tensor(head), _read_tensor(embed)):
        raise ConversionError(
            "lm_head.weight differs from the input embedding: nova ties them (tie_word_embeddings), "
            "so this checkpoint's output head would be lost"
        )
    del sources["lm_head.weight"]
    return True


# --------------------------------------------------------------------------------------------------
# Weights: write


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Split keys (in order) into consecutive shards of at most ``max_bytes``; a larger tensor gets its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_weights(
    sources: dict[str, SourceTensor], order: list[str], out_dir: Path, dtype: torch.dtype | None, max_shard_bytes: int
) -> tuple[list[str], int]:
    """Write model.safetensors (or shards + index) with tensors in ``order``; ``dtype`` None keeps each one's dtype.

    Tensors are read shard by shard, so memory stays near one shard; each is checked for NaN/Inf as it is
    read (a damaged tensor fails the conversion, whose temporary folder is then removed). Returns the file
    names and total bytes.
    """
    sizes = {k: torch.Size(sources[k].shape).numel() * _itemsize(_target_dtype(sources[k], dtype)) for k in order}
    shards = plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            tensor = _read_tensor(sources[key])
            check_finite(tensor, sources[key].key, sources[key].file.name)  # here, to read each tensor once
            tensors[key] = tensor.to(_target_dtype(sources[key], dtype)).contiguous()
            weight_map[key] = name
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        del tensors
    total = sum(sizes.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names, total


def _target_dtype(source: SourceTensor, dtype: torch.dtype | None) -> torch.dtype:
    """Floating tensors take the requested dtype; integer ones (and all under ``keep``) stay as they are."""
    return dtype if dtype is not None and source.dtype.is_floating_point else source.dtype


def _itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


def resolve_dtype(sources: dict[str, SourceTensor], dtype: str) -> torch.dtype:
    """The output dtype: the requested one, or for ``keep`` the floating dtype holding most of the weights."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    by_bytes: Counter[torch.dtype] = Counter()
    for src in sources.values():
        if src.dtype.is_floating_point:
            by_bytes[src.dtype] += torch.Size(src.shape).numel() * _itemsize(src.dtype)
    if not by_bytes:
        raise ConversionError("the checkpoint holds no floating-point tensors")
    return by_bytes.most_common(1)[0][0]


# --------------------------------------------------------------------------------------------------
# Code, tokenizer, processor


def note_mixed_dtypes(sources: dict[str, SourceTensor], main_dtype: torch.dtype) -> None:
    """Say so when --dtype keep writes tensors of another dtype than the config's (a mixed checkpoint)."""
    other = [src for src in sources.values() if src.dtype != main_dtype]
    if other:
        name = str(main_dtype).removeprefix("torch.")
        remedy = f"--dtype {name}" if name in DTYPES else f"--dtype ({'|'.join(k for k in DTYPES if k != 'keep')})"
        print(f"note: {len(other)} tensor(s) are not {name}, e.g. {other[0].key} "
              f"({str(other[0].dtype).removeprefix('torch.')}): kept as they are; pass {remedy} to cast them")


def copy_code_files(out_dir: Path, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copy our remote-code modules (``*_nova_embeddings_v1*.py``), chat_template.json and the sentence-transformers
    files (modules.json, config_sentence_transformers.json) into the repository."""
    names = []
    for path in sorted(repo_root.glob(CODE_GLOB)) + [repo_root / name for name in (CHAT_TEMPLATE_FILE, *INTEGRATION_FILES)]:
        if not path.is_file():
            raise ConversionError(f"{path} not found: the converter copies it from the nova repository root")
        shutil.copy2(path, out_dir / path.name)
        names.append(path.name)
    return names


def load_chat_template(repo_root: Path = REPO_ROOT) -> str:
    """Our chat template (the ``chat_template`` string of the repository's chat_template.json)."""
    template = load_json(repo_root / CHAT_TEMPLATE_FILE).get("chat_template")
    if not isinstance(template, str) or not template:
        raise ConversionError(f"{repo_root / CHAT_TEMPLATE_FILE} has no 'chat_template' string")
    return template


def copy_tokenizer_files(jina_dir: Path, out_dir: Path) -> list[str]:
    """Copy jina's tokenizer files (the processor save then rewrites tokenizer.json/tokenizer_config.json)."""
    names = [name for name in TOKENIZER_FILES if (jina_dir / name).is_file()]
    if "tokenizer.json" not in names and "vocab.json" not in names:
        raise ConversionError(f"no tokenizer in {jina_dir} (neither tokenizer.json nor vocab.json)")
    for name in names:
        shutil.copy2(jina_dir / name, out_dir / name)
    return names


def load_processor_class(out_dir: Path) -> type:
    """Our processor class, loaded the way AutoProcessor(trust_remote_code=True) loads it: from the repository.

    The remote-code modules import each other relatively (``from .configuration_nova_embeddings_v1 import``),
    so a plain top-level import fails; transformers' dynamic-module loader handles that.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(PROCESSOR_REFERENCE, str(out_dir))


def write_processor(jina_dir: Path, out_dir: Path, chat_template: str) -> None:
    """Our processor built from jina's image processor + tokenizer, with our chat template, saved with auto_map."""
    processor_class = load_processor_class(out_dir)
    processor = processor_class.from_pretrained(str(jina_dir), trust_remote_code=False)  # never run jina's code
    processor.chat_template = chat_template
    processor.register_for_auto_class("AutoProcessor")
    processor.save_pretrained(str(out_dir))


def fix_processor_files(out_dir: Path) -> list[str]:
    """Point processor_class / auto_map.AutoProcessor at our processor in every processor file; return those changed.

    transformers 5.x's save_pretrained already writes both (processor_config.json, tokenizer_config.json);
    this makes the result independent of that and of jina's leftovers.
    """
    changed = []
    for name in PROCESSOR_FILES:
        path = out_dir / name
        if not path.is_file():
            continue
        data = load_json(path)
        before = json.dumps(data, sort_keys=True)
        if name != "tokenizer_config.json" or "processor_class" in data:
            data["processor_class"] = PROCESSOR_CLASS
        if name != "tokenizer_config.json":
            data.setdefault("auto_map", {})["AutoProcessor"] = PROCESSOR_REFERENCE
        if json.dumps(data, sort_keys=True) != before:
            path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(name)
    return changed


def drop_duplicate_template(out_dir: Path, chat_template: str) -> None:
    """Remove chat_template.jinja written by save_pretrained when it repeats chat_template.json (one source of truth).

    transformers reads chat_template.json first when both exist; a differing .jinja would be a silent conflict.
    """
    jinja = out_dir / "chat_template.jinja"
    if not jinja.is_file():
        return
    if jinja.read_text(encoding="utf-8") != chat_template:
        raise ConversionError(f"{jinja} differs from {CHAT_TEMPLATE_FILE}: the processor saved another template")
    jinja.unlink()


def _one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_source_tokenizer(jina_dir: Path):
    """jina's tokenizer, loaded without running any of jina's code; a missing or broken one is an error."""
    from transformers import AutoTokenizer

    if not any((jina_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ConversionError(f"no tokenizer in {jina_dir} (neither tokenizer.json nor vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(str(jina_dir), trust_remote_code=False)
    except Exception as error:  # tokenizers, json and transformers each raise their own types for a broken file
        raise ConversionError(f"the tokenizer in {jina_dir} cannot be loaded ({_one_line(error)})") from error


def check_token_ids(tokenizer, config: NovaEmbeddingsV1Config, where: str) -> None:
    """The config's special token ids must be the tokenizer's, and the vocabulary must hold every token."""
    for field, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None:
            raise ConversionError(f"{where} has no {token} token (config.{field} is {getattr(config, field)})")
        if token_id != getattr(config, field):
            raise ConversionError(f"{where} gives {token} id {token_id}, "
                                  f"but config.{field} is {getattr(config, field)}")
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, field)
        for holder, name in ((config, "config"), (config.text_config, "config.text_config")):
            value = getattr(holder, field, None)
            allowed = value if isinstance(value, list) else [value]  # eos may be a list
            if token_id is not None and value is not None and token_id not in allowed:
                token = tokenizer.convert_ids_to_tokens(token_id)
                raise ConversionError(f"{where} has {field.removesuffix('_id')} {token} (id {token_id}), "
                                      f"but {name}.{field} is {value}")
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ConversionError(f"{where} has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}")


def check_source_tokenizer(jina_dir: Path, config: NovaEmbeddingsV1Config) -> None:
    """Before writing: jina's tokenizer loads and agrees with the config (token ids, vocabulary size)."""
    check_token_ids(load_source_tokenizer(jina_dir), config, f"the tokenizer in {jina_dir}")


def check_tokenizer(jina_dir: Path, out_dir: Path, config: NovaEmbeddingsV1Config) -> None:
    """The converted tokenizer must tokenise like jina's and agree with the config's special token ids."""
    from transformers import AutoTokenizer

    # jina's code is never run (trust_remote_code=False); ours is what users load with trust_remote_code=True.
    source = load_source_tokenizer(jina_dir)
    converted = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=True)
    ids_src = source(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    ids_out = converted(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if ids_src != ids_out:
        raise ConversionError(f"converted tokenizer differs from jina's on {TOKENIZER_PROBE!r}: {ids_out} vs {ids_src}")
    check_token_ids(converted, config, "the converted tokenizer")


# --------------------------------------------------------------------------------------------------
# Driver


@dataclass
class ConversionSummary:
    """What convert() wrote."""

    out_dir: Path
    num_tensors: int
    dtype: torch.dtype
    total_bytes: int
    weight_files: list[str]
    adapters_skipped: bool

    def __str__(self) -> str:
        size = f"{self.total_bytes / 1e6:.1f} MB" if self.total_bytes < 1e9 else f"{self.total_bytes / 1e9:.2f} GB"
        return (f"converted {self.num_tensors} tensors ({str(self.dtype).removeprefix('torch.')}, {size}) "
                f"into {self.out_dir} ({', '.join(self.weight_files)})")


def _is_nova_repository(folder: Path) -> bool:
    """Whether ``folder`` holds a config.json of our model type (what a previous conversion wrote)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == NovaEmbeddingsV1Config.model_type


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_dirs(jina_dir: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, a target the conversion must not replace or cannot be published into.

    The target may be absent or an empty folder; a non-empty one only with ``overwrite``, and then only a
    previous conversion (never a folder holding the source, never some other folder: --overwrite deletes).
    """
    if not jina_dir.is_dir():
        raise ConversionError(f"--jina-dir {jina_dir} is not a directory")
    if out_dir.is_symlink():
        raise ConversionError(f"--out {out_dir} is a symbolic link; give the folder it points to")
    if not out_dir.exists():
        ancestor = _first_existing(out_dir.parent)
        if not ancestor.is_dir():
            raise ConversionError(f"cannot create --out {out_dir}: {ancestor} is not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConversionError(f"cannot create --out {out_dir}: {ancestor} is not writable")
        return
    if not out_dir.is_dir():
        raise ConversionError(f"--out {out_dir} is a file; give a folder path")
    source, target = jina_dir.resolve(), out_dir.resolve()
    if target == source or target in source.parents:
        raise ConversionError(f"--out {out_dir} holds --jina-dir {jina_dir} (or is it): choose another folder")
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write --out {out_dir}: its parent folder is not writable")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConversionError(f"--out {out_dir} is not empty: choose a new folder, "
                              "or pass --overwrite to replace a previous conversion there")
    if not _is_nova_repository(out_dir):
        raise ConversionError(
            f"--out {out_dir} is not empty and is not a nova-embeddings-v1 repository (no config.json with "
            f"model_type {NovaEmbeddingsV1Config.model_type!r}): --overwrite replaces only a previous conversion"
        )


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return missing[::-1]


def _remove_created(staging: Path, created: list[Path]) -> None:
    """Undo a failed conversion: the staging folder, then the parents made for it while they are empty."""
    shutil.rmtree(staging, ignore_errors=True)
    if staging.exists():
        print(f"warning: could not remove the temporary folder {staging}; delete it by hand", file=sys.stderr)
    for folder in reversed(created):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextmanager
def _staging_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` to write into, removed again if anything fails (even Ctrl-C).

    Beside the target means on the same filesystem, so publishing it is one atomic rename. Its name is a
    valid Python identifier because transformers imports the remote code from it while checking.
    """
    created = _make_parents(out_dir.parent)
    safe = re.sub(r"\W", "_", out_dir.name)
    staging = out_dir.parent / f"{STAGING_PREFIX}{safe}_{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        _remove_created(staging, created)
        raise


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished repository into place by renaming; a replaced previous conversion is deleted after."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.parent / f"{STAGING_PREFIX}replaced_{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        print(f"warning: could not remove the replaced conversion {old}; delete it by hand", file=sys.stderr)


@dataclass
class ConversionPlan:
    """Everything checked and decided before the first byte is written."""

    config: NovaEmbeddingsV1Config
    sources: dict[str, SourceTensor]
    expected: dict[str, tuple[int, ...]]
    out_dtype: torch.dtype
    write_dtype: torch.dtype | None  # None: every tensor keeps its dtype
    chat_template: str
    task_adapters: dict[str, TaskAdapter]


def plan_conversion(jina_dir: Path, dtype: str = "keep") -> ConversionPlan:
    """Read and check the whole source (weights' headers, config, tokenizer, adapters) without writing."""
    sources = read_source_tensors(find_weight_files(jina_dir))
    check_index(jina_dir, sources)
    check_float_dtypes(sources)
    drop_tied_lm_head(sources)
    out_dtype = resolve_dtype(sources, dtype)
    jina_config = load_json(jina_dir / "config.json")
    config = build_config(jina_config, load_json(jina_dir / "preprocessor_config.json"), out_dtype)
    check_source_tokenizer(jina_dir, config)  # before the shapes: a vocabulary mismatch is clearer said here
    expected = expected_shapes(config)
    check_tensors({k: s.shape for k, s in sources.items()}, expected)
    chat_template = load_chat_template()
    task_adapters = split_task_adapters(jina_dir / "adapters", config, expected)
    write_dtype = None if dtype == "keep" else out_dtype  # keep: every tensor as it is, even in a mixed checkpoint
    if write_dtype is None:
        note_mixed_dtypes(sources, out_dtype)
    return ConversionPlan(config, sources, expected, out_dtype, write_dtype, chat_template, task_adapters)


def write_repository(
    plan: ConversionPlan, jina_dir: Path, out_dir: Path, max_shard_bytes: int
) -> tuple[list[str], int]:
    """Write the converted repository into ``out_dir``: small files and their checks first, the weights last."""
    plan.config.save_pretrained(str(out_dir))
    copy_code_files(out_dir)
    copy_tokenizer_files(jina_dir, out_dir)
    write_processor(jina_dir, out_dir, plan.chat_template)
    fix_processor_files(out_dir)
    drop_duplicate_template(out_dir, plan.chat_template)
    check_tokenizer(jina_dir, out_dir, plan.config)
    write_task_adapters(plan.task_adapters, out_dir / plan.config.adapters_dir)
    return write_weights(plan.sources, list(plan.expected), out_dir, plan.write_dtype, max_shard_bytes)


def convert(
    jina_dir: str | Path, out_dir: str | Path, dtype: str = "keep", max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert jina-embeddings-v4 at ``jina_dir`` into a nova-embeddings-v1 repository at ``out_dir``.

    Everything that can be checked is checked before anything is written; the repository is then written
    into a temporary folder beside ``out_dir`` and renamed into place, so a failure at any point leaves
    ``out_dir`` as it was (absent, empty, or with ``overwrite`` the previous conversion).
    """
    jina_dir, out_dir = Path(jina_dir), Path(out_dir)
    _check_dirs(jina_dir, out_dir, overwrite)
    plan = plan_conversion(jina_dir, dtype)
    with _staging_folder(out_dir) as staging:
        try:
            files, total = write_repository(plan, jina_dir, staging, max_shard_bytes)
            _publish(staging, out_dir)
        except OSError as error:
            raise ConversionError(
                f"writing the repository failed: {error}; nothing was written to --out {out_dir}"
            ) from error
    adapters_skipped = not plan.task_adapters
    if adapters_skipped:
        print(f"note: {jina_dir} has no adapters/: the converted model will run every task on the bare backbone")
    return ConversionSummary(out_dir, len(plan.expected), plan.out_dtype, total, files, adapters_skipped)


# --------------------------------------------------------------------------------------------------
# Adapters: jina's one multi-task LoRA file -> one standard PEFT adapter per task

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json options whose values mean "plain LoRA", the first being the default; any other value
# changes the math (DoRA, bias terms, per-module rank/alpha, layer choices) or the file layout (modules_to_save).
PLAIN_LORA: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "modules_to_save": (None, []),
    "layers_to_transform": (None, []), "layer_replication": (None, []),
}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|.*multi_vector_projector$"
_JINA_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<task>[^.]+)\.weight")


@dataclass
class TaskAdapter:
    """One task's LoRA tensors under standard PEFT names, and its adapter_config.json."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def lora_target_shapes(expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Our modules that the adapters target (same rule as the adapter config's regex) -> weight shape."""
    pattern = re.compile(LORA_TARGETS)
    return {name[: -len(".weight")]: shape for name, shape in expected.items()
            if name.endswith(".weight") and pattern.fullmatch(name[: -len(".weight")])}


def split_task_adapters(adapter_dir: Path, config: NovaEmbeddingsV1Config,
                        expected: dict[str, tuple[int, ...]]) -> dict[str, TaskAdapter]:
    """Read jina's adapters/ and split it per task, checking config values, names, tasks, ranks and shapes first."""
    if not adapter_dir.exists():
        return {}
    if not adapter_dir.is_dir():
        raise ConversionError(f"{adapter_dir} is not a folder (jina's adapters/ holds adapter_config.json and "
                              "adapter_model.safetensors)")
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ConversionError(f"{adapter_dir} has no {ADAPTER_CONFIG} "
                              "(remove the folder to convert without task adapters)")
    jina_config = load_json(config_path)
    check_adapter_config(jina_config, config_path)
    rank = jina_config["r"]
    targets = lora_target_shapes(expected)
    per_task: dict[str, dict[str, torch.Tensor]] = {task: {} for task in config.task_names}
    problems = []
    for key, tensor in load_adapter_tensors(adapter_dir).items():
        match = _JINA_LORA_KEY.fullmatch(key)
        if match is None or match["module"] not in targets:
            problems.append(f"unexpected tensor {key}")
        elif match["task"] not in per_task:
            problems.append(f"{key}: task {match['task']!r} is not one of {config.task_names}")
        else:
            out_features, in_features = targets[match["module"]]
            want = (rank, in_features) if match["ab"] == "A" else (out_features, rank)
            if tuple(tensor.shape) != want:
                problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {want}")
            per_task[match["task"]][f"base_model.model.{match['module']}.lora_{match['ab']}.weight"] = tensor
    for task, tensors in per_task.items():
        missing = [f"{m}.lora_{ab}" for m in targets for ab in "AB" if f"base_model.model.{m}.lora_{ab}.weight" not in tensors]
        if missing:
            problems.append(f"task {task!r}: {len(missing)} LoRA tensors missing, e.g. {missing[:3]}")
    if problems:
        raise ConversionError(f"{adapter_dir}/adapter_model.safetensors: " + "; ".join(problems[:10])
                              + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
    return {task: TaskAdapter(task_adapter_config(jina_config), tensors) for task, tensors in per_task.items()}


def _is_number(value: Any) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(config: dict[str, Any], path: Path) -> None:
    """Values of jina's adapter_config.json that the split relies on: a plain LoRA with a valid rank, alpha, dropout.

    Options that change the LoRA math or the file layout (DoRA, bias terms, per-module ranks, ...) are refused
    rather than dropped: the converted adapters would compute something else than jina's.
    """
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{path.parent}: expected a LoRA adapter, got peft_type {config.get('peft_type')!r}")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ConversionError(f"{path}: {key!r} is missing")
    if not _is_positive_int(config["r"]):
        raise ConversionError(f"{path}: 'r' must be a positive int, got {config['r']!r}")
    if not _is_number(config["lora_alpha"]) or config["lora_alpha"] <= 0:
        raise ConversionError(f"{path}: 'lora_alpha' must be a positive number, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConversionError(f"{path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ConversionError(f"{path}: 'use_rslora' must be true or false, got {config['use_rslora']!r}")
    for key, plain in PLAIN_LORA.items():
        if key in config and config[key] not in plain:
            raise ConversionError(f"{path}: {key!r} is {config[key]!r}, which the converter does not support "
                                  f"(plain LoRA only: {key} {plain[0]!r})")


def load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """jina's adapter_model.safetensors, checked: readable, floating point, no NaN/Inf. Pickles are refused."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        pickle = adapter_dir / "adapter_model.bin"
        if pickle.is_file():
            raise ConversionError(
                f"{pickle} is a pickle file, which the converter does not load (unpickling can run code): convert it "
                f"to {ADAPTER_WEIGHTS} first, e.g. safetensors.torch.save_file(torch.load(path, weights_only=True), ...)"
            )
        raise ConversionError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    with _open_safetensors(path) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"tensor {key} in {path.name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                  "weights must be floating point")
        check_finite(tensor, key, path.name)
    return tensors


def task_adapter_config(jina_config: dict[str, Any]) -> dict[str, Any]:
    """A standard LoRA config with jina's rank, alpha and dropout, targeting the same modules by our names."""
    from peft import LoraConfig

    try:
        config = LoraConfig(
            r=jina_config["r"], lora_alpha=jina_config["lora_alpha"], lora_dropout=jina_config.get("lora_dropout", 0.0),
            target_modules=LORA_TARGETS, bias=jina_config.get("bias", "none"),
            use_rslora=jina_config.get("use_rslora", False),
            init_lora_weights=jina_config.get("init_lora_weights", True), inference_mode=True,
            base_model_name_or_path="nova-embeddings-v1",
        )
    except (TypeError, ValueError) as error:
        raise ConversionError(
            f"jina's adapter_config.json does not make a valid LoraConfig: {_one_line(error)}"
        ) from error
    return config.to_dict()


def write_task_adapters(adapters: dict[str, TaskAdapter], root: Path) -> None:
    for task, adapter in adapters.items():
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        _write_adapter_config(folder / "adapter_config.json", adapter.config)
        save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})


def _write_adapter_config(path: Path, config: dict[str, Any]) -> None:
    serialisable = {k: (sorted(v) if isinstance(v, set) else v.value if hasattr(v, "value") else v) for k, v in config.items()}
    path.write_text(json.dumps(serialisable, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; conversion problems exit with status 1 and the message, no traceback."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jina-dir", required=True, type=Path, help="local copy of jinaai/jina-embeddings-v4")
    parser.add_argument("--out", required=True, type=Path, help="new directory for the nova-embeddings-v1 repository")
    parser.add_argument("--dtype", choices=list(DTYPES), default="keep", help="weight dtype (default: keep jina's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds a previous conversion (default: refuse a non-empty --out)")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.jina_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
