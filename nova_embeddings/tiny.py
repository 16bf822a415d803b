"""Write a tiny random-weight checkpoint in jina-embeddings-v4's repository layout.

Why: the converter, processor and model must be tested on jina's real file formats (config with flat
and nested Qwen fields, 4.x key names, sharded safetensors with an index, a multi-task PEFT adapter
directory, a Qwen2 byte-level BPE tokenizer with Qwen's special tokens) without downloading 7.5 GB.
Every size is tiny, but every name, format and structural rule (M-RoPE sections, window attention,
tied embeddings, LoRA scaling alpha/r != 1) is the real one, so format bugs show up here.

Usage:
    nova-embeddings tiny --out DIR [--layout 4x|5x] [--seed N]
        [--dtype float32|bfloat16] [--no-adapters]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# --------------------------------------------------------------------------------------------------
# Constants: the parts of jina's / Qwen2.5-VL's formats that the tiny checkpoint reproduces.

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2 / Qwen2.5 / Qwen2.5-VL).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens in id order (151643...151664 in the real vocabulary), with their "special" flag.
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
# Qwen2.5's tokenizer_config "additional_special_tokens" (the special ones after <|endoftext|>).
QWEN_ADDITIONAL_SPECIAL_TOKENS: list[str] = [tok for tok, special in QWEN_ADDED_TOKENS[1:] if special]

# Qwen2-VL / Qwen2.5-VL chat template (tokenizer_config.json and chat_template.json of Qwen2.5-VL).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

TASK_NAMES: list[str] = ["retrieval", "text-matching", "code"]
NUM_MERGES = 320  # 256 byte tokens + 320 merges = 576 base tokens, + 22 added = 598 -> vocab 600
VOCAB_MULTIPLE = 8
INIT_STD = 0.02  # weights and biases
NORM_NOISE_STD = 0.05  # norm weights are 1 + noise, so a wrong norm placement changes outputs
LORA_A_STD = 0.05
LORA_B_STD = 0.02  # non-zero B: each task adapter visibly (but mildly) changes the outputs
LORA_R = 4
LORA_ALPHA = 8  # scaling alpha/r = 2, so a converter or loader that drops the scaling is caught
MULTI_VECTOR_DIM = 16
MIN_PIXELS = 56 * 56  # 4 merged image tokens
MAX_PIXELS = 28 * 28 * 16  # 16 merged image tokens
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Small built-in English text the BPE merges are learned from (no downloads).
TINY_CORPUS = """\
Query: what is a text embedding? Passage: A text embedding is a list of numbers that stands for the
meaning of a piece of text. Texts with similar meanings get vectors that point in similar directions,
so a search engine can compare a question with many documents by measuring the angle between them.
Query: how are images searched? Passage: An image is cut into small square patches. Each patch becomes
a vector, nearby patches are merged, and the language model reads them together with the words around
them. The model then returns one vector for the whole page or one vector for every token.
Retrieval means finding the passages that answer a query. Text matching means finding texts that say
the same thing in other words. Code search means finding the function that does what the question asks.
The quick brown fox jumps over the lazy dog. The weather today is sunny with a light wind from the west,
and the forecast says that it will rain tomorrow in the morning and clear up in the afternoon.
Hello world! This is a small example of English text, written only to learn a few hundred merges for a
tiny tokenizer that is used in tests. It has numbers like 12, 345 and 2025, punctuation such as commas,
full stops, question marks and quotes, and common words: the, of, and, to, in, is, that, for, with, on.
def add(a, b):
    return a + b
class Document:
    def __init__(self, title, text):
        self.title = title
        self.text = text
Describe the image. The picture shows a chart with three bars, a table of results, and a short caption
under the figure. A scanned report, a slide from a talk, or a screenshot of a web page are all documents
that people want to find again later, and reading them as images keeps their layout and their figures.
"""

# --------------------------------------------------------------------------------------------------
# Tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in GPT-2/Qwen vocabulary order (ids 0..255).

    Printable Latin-1 bytes map to themselves and come first; the other bytes map to chr(256 + n).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's pre-tokenizer: regex split (isolated), then byte-level mapping without its own regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges from TINY_CORPUS, deterministically (same text -> same merges)."""
    trainer_tok = Tokenizer(BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = _qwen2_pre_tokenizer()
    alphabet = _bytes_to_unicode()
    trainer = BpeTrainer(
        vocab_size=len(alphabet) + num_merges, initial_alphabet=alphabet, show_progress=False, min_frequency=1
    )
    trainer_tok.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    if len(merges) < num_merges:
        raise ValueError(f"TINY_CORPUS yields only {len(merges)} merges, {num_merges} requested")
    return merges[:num_merges]


def build_tiny_tokenizer(num_merges: int = NUM_MERGES) -> Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer: 256 byte tokens (GPT-2 order), learned merges, Qwen's added tokens.

    Ids follow Qwen's layout: byte tokens, then one token per merge in merge order, then the 22 added
    tokens (``<|endoftext|>`` first), so the special ids sit right after the base vocabulary as in Qwen.
    """
    merges = _learn_merges(num_merges)
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    for left, right in merges:
        merged = left + right
        if merged in vocab:
            raise ValueError(f"merge {left!r} + {right!r} gives an existing token")
        vocab[merged] = len(vocab)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens(
        [AddedToken(t, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for t, special in QWEN_ADDED_TOKENS]
    )
    return tok


def tiny_special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Config token ids (names as in jina's config.json) looked up in the tokenizer."""
    ids = {
        "bos_token_id": "<|endoftext|>",
        "pad_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
    }
    out = {}
    for name, token in ids.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer lacks {token}")
        out[name] = token_id
    return out


def tiny_tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json as Qwen2.5-VL / jina ship it (transformers 4.x format), for the tiny vocabulary."""
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for tok, special in QWEN_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "processor_class": "JinaEmbeddingsV4Processor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(tokenizer: Tokenizer, out: Path) -> None:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    model = json.loads(tokenizer.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tiny_tokenizer_config(tokenizer))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {
        "additional_special_tokens": list(QWEN_ADDITIONAL_SPECIAL_TOKENS),
        "eos_token": {"content": "<|im_end|>", **flags},
        "pad_token": {"content": "<|endoftext|>", **flags},
    }
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})


# --------------------------------------------------------------------------------------------------
# Configs


def _round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple (Qwen pads its vocabulary the same way)."""
    return int(math.ceil(n / multiple) * multiple)


def tiny_jina_config(tokenizer: Tokenizer | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json shaped like jina-embeddings-v4's (flat Qwen text fields + text_config + vision_config + jina fields).

    Sizes are tiny but consistent: head_dim 16 with mrope_section [2, 3, 3] (sum = head_dim / 2),
    vision window 56 px = 2x2 merged tokens, vision heads of 16 dims.
    """
    tokenizer = tokenizer or build_tiny_tokenizer()
    ids = tiny_special_token_ids(tokenizer)
    rope_scaling = {"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"}
    text = {
        "vocab_size": _round_up(tokenizer.get_vocab_size(with_added_tokens=True), VOCAB_MULTIPLE),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "max_window_layers": 70,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": rope_scaling,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
    }
    text_config = dict(
        text,
        model_type="qwen2_5_vl_text",
        rope_scaling=dict(rope_scaling),
        sliding_window=None,
        image_token_id=None,
        video_token_id=None,
        torch_dtype=dtype,
    )
    vision_config = {
        "model_type": "qwen2_5_vl",  # what jina's (4.52-era) checkpoint says; 5.x rewrites it
        "depth": 2,
        "hidden_size": 32,
        "hidden_act": "silu",
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "in_chans": 3,
        "out_hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "initializer_range": 0.02,
        "torch_dtype": dtype,
    }
    return {
        "_attn_implementation": "flash_attention_2",
        "_name_or_path": "jinaai/jina-embeddings-v4",
        "architectures": ["JinaEmbeddingsV4Model"],
        "auto_map": {
            "AutoConfig": "configuration_jina_embeddings_v4.JinaEmbeddingsV4Config",
            "AutoModel": "modeling_jina_embeddings_v4.JinaEmbeddingsV4Model",
        },
        "model_type": "qwen2_5_vl",
        **text,
        "image_token_id": ids["image_token_id"],
        "video_token_id": ids["video_token_id"],
        "vision_start_token_id": ids["vision_start_token_id"],
        "vision_end_token_id": ids["vision_end_token_id"],
        "vision_token_id": ids["vision_token_id"],
        "pad_token_id": ids["pad_token_id"],
        "text_config": text_config,
        "vision_config": vision_config,
        "single_vector_pool_strategy": "mean",
        "multi_vector_projector_dim": MULTI_VECTOR_DIM,
        "task_names": list(TASK_NAMES),
        "matryoshka_dims": [16, 32, 64],
        "truncate_dim": None,
        "torch_dtype": dtype,
        "transformers_version": "4.52.0",
    }


def tiny_preprocessor_config() -> dict[str, Any]:
    """preprocessor_config.json like jina's, with pixel limits of 4 to 16 merged image tokens."""
    return {
        "auto_map": {"AutoProcessor": "modeling_jina_embeddings_v4.JinaEmbeddingsV4Processor"},
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": list(CLIP_STD),
        "max_pixels": MAX_PIXELS,
        "merge_size": 2,
        "min_pixels": MIN_PIXELS,
        "patch_size": 14,
        "processor_class": "JinaEmbeddingsV4Processor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
        "temporal_patch_size": 2,
    }


def tiny_adapter_config() -> dict[str, Any]:
    """adapters/adapter_config.json as jina ships it (one adapter dir for all tasks), with r=4, alpha=8."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "jinaai/jina-embeddings-v4",
        "bias": "none",
        "exclude_modules": ".*visual.*",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": "gaussian",
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": LORA_ALPHA,
        "lora_bias": False,
        "lora_dropout": 0.1,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": LORA_R,
        "rank_pattern": {},
        "revision": None,
        "target_modules": (
            "(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
            "|.*(single_vector_projector|multi_vector_projector).*$)"
        ),
        "task_type": "FEATURE_EXTRACTION",
        "use_dora": False,
        "use_rslora": False,
    }


# --------------------------------------------------------------------------------------------------
# Weights


def qwen_state_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of transformers' Qwen2_5_VLModel (5.x names: language_model.*, visual.*).

    Built on the meta device, so it costs no memory even for the full-size config; taking the names
    from transformers itself (not a hand-written list) keeps the tiny checkpoint in step with it.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    if isinstance(config, dict):
        config = Qwen2_5_VLConfig.from_dict(_loadable_config_dict(config))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _loadable_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """jina's config minus the keys that would stop a plain transformers build (flash-attn request, jina's classes)."""
    drop = {"_attn_implementation", "auto_map", "architectures"}
    return {k: v for k, v in config.items() if k not in drop}


def to_layout(name: str, layout: str) -> str:
    """Map a 5.x in-memory Qwen2_5_VLModel name (``language_model.x`` / ``visual.x``) to a checkpoint key."""
    if layout == "5x":
        return "model." + name
    if layout == "4x":
        if name.startswith("language_model."):
            return "model." + name[len("language_model."):]
        if name.startswith("visual."):
            return name
        raise ValueError(f"unexpected Qwen2_5_VLModel parameter {name!r}")
    raise ValueError(f"layout must be '4x' or '5x', not {layout!r}")


def _is_norm(name: str) -> bool:
    """RMSNorm weights (text and vision): initialised near 1 instead of near 0."""
    return name.endswith(".weight") and ("norm" in name.split(".")[-2] or name.split(".")[-2] == "ln_q")


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Seeded float32 init: norms 1 + small noise, everything else N(0, INIT_STD)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if _is_norm(name):
        return 1.0 + NORM_NOISE_STD * noise
    return INIT_STD * noise


def tiny_weights(
    config: dict[str, Any], layout: str = "4x", seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights for every Qwen2.5-VL tensor (no lm_head: tied) plus multi_vector_projector, in ``layout`` keys."""
    gen = torch.Generator().manual_seed(seed)
    shapes = qwen_state_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):  # sorted: the same seed gives the same tensors whatever the module order
        tensors[to_layout(name, layout)] = _random_tensor(name, shapes[name], gen).to(dtype)
    hidden = config["text_config"]["hidden_size"]
    dim = config["multi_vector_projector_dim"]
    for name, shape in (("multi_vector_projector.weight", (dim, hidden)), ("multi_vector_projector.bias", (dim,))):
        tensors[name] = _random_tensor(name, shape, gen).to(dtype)
    return tensors


LORA_TARGET_SUFFIXES = tuple(
    f"{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)


def _lora_targets(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Adapter module paths (as in jina's adapter file) -> (in_features, out_features).

    Targets are every decoder projection of the language model (from transformers' own parameter
    shapes) plus multi_vector_projector; never the vision tower.
    """
    targets = {}
    for name, shape in qwen_state_shapes(config).items():
        if name.startswith("language_model.layers.") and name.endswith(LORA_TARGET_SUFFIXES):
            module = name[: -len(".weight")]
            targets[f"base_model.model.model.{module}"] = (shape[1], shape[0])
    targets["base_model.model.multi_vector_projector"] = (
        config["text_config"]["hidden_size"],
        config["multi_vector_projector_dim"],
    )
    return targets


def tiny_adapter_weights(
    config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32, r: int = LORA_R
) -> dict[str, torch.Tensor]:
    """jina's multi-task LoRA tensors: ``<module>.lora_{A,B}.<task>.weight``, A [r, in], B [out, r], both non-zero."""
    gen = torch.Generator().manual_seed(seed + 1)
    tensors: dict[str, torch.Tensor] = {}
    for module, (fan_in, fan_out) in _lora_targets(config).items():
        for task in config["task_names"]:
            a = LORA_A_STD * torch.randn((r, fan_in), generator=gen)
            b = LORA_B_STD * torch.randn((fan_out, r), generator=gen)
            tensors[f"{module}.lora_A.{task}.weight"] = a.to(dtype)
            tensors[f"{module}.lora_B.{task}.weight"] = b.to(dtype)
    return tensors


# --------------------------------------------------------------------------------------------------
# Writing


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON the way Hugging Face files are written (indent 2, sorted keys, trailing newline)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _jina_shard_order(keys: list[str]) -> list[str]:
    """Order of keys over jina's two shards: vision, embeddings, layers by number, final norm, projector."""

    def rank(key: str) -> tuple:
        if key.startswith("visual."):
            return (0, key)
        if key == "model.embed_tokens.weight":
            return (1, key)
        if key.startswith("model.layers."):
            layer = int(key.split(".")[2])
            return (2, layer, key)
        if key == "model.norm.weight":
            return (3, key)
        return (4, key)

    return sorted(keys, key=rank)


def write_weights(tensors: dict[str, torch.Tensor], out: Path, layout: str) -> list[str]:
    """4x: two shards + model.safetensors.index.json (like jina, a layer split across shards); 5x: one file."""
    meta = {"format": "pt"}
    if layout == "5x":
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    keys = _jina_shard_order(list(tensors))
    half = len(keys) // 2 + 3  # not on a layer boundary, as jina's shards split layer 19
    shards = [keys[:half], keys[half:]]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard_keys in zip(names, shards):
        save_file({k: tensors[k].contiguous() for k in shard_keys}, str(out / name), metadata=meta)
        for k in shard_keys:
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def write_adapters(config: dict[str, Any], out: Path, seed: int, dtype: torch.dtype) -> None:
    """adapters/adapter_config.json + adapters/adapter_model.safetensors, in jina's multi-task format."""
    adapter_dir = out / "adapters"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    _write_json(adapter_dir / "adapter_config.json", tiny_adapter_config())
    save_file(tiny_adapter_weights(config, seed=seed, dtype=dtype), str(adapter_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_tiny_checkpoint(
    out: str | Path, layout: str = "4x", seed: int = 0, dtype: str = "float32", adapters: bool = True
) -> Path:
    """Write a complete tiny jina-embeddings-v4 repository into ``out`` and return its path.

    Writes config.json, preprocessor_config.json, tokenizer files, chat_template.json, weights in the
    chosen key layout and (unless ``adapters`` is False) jina's multi-task adapters/ directory.
    """
    if layout not in ("4x", "5x"):
        raise ValueError(f"layout must be '4x' or '5x', not {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_jina_config(tokenizer, dtype=dtype)
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", tiny_preprocessor_config())
    write_tokenizer_files(tokenizer, out)
    write_weights(tiny_weights(config, layout=layout, seed=seed, dtype=DTYPES[dtype]), out, layout)
    if adapters:
        write_adapters(config, out, seed=seed, dtype=DTYPES[dtype])
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory to write (created if missing)")
    parser.add_argument("--layout", choices=["4x", "5x"], default="4x",
                        help="weight key names: 4x = jina's on-disk names (default), 5x = transformers 5 names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-adapters", action="store_true", help="do not write adapters/")
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: --out {args.out} is not an empty folder: its files would be replaced or mixed with the "
              "checkpoint's; choose a new folder", file=sys.stderr)
        return 1
    out = make_tiny_checkpoint(args.out, layout=args.layout, seed=args.seed, dtype=args.dtype,
                               adapters=not args.no_adapters)
    print(f"wrote tiny jina-embeddings-v4 checkpoint ({args.layout} layout, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
