"""Export one adapter of a nova-embeddings-v1 repository as a checkpoint vLLM serves on stock Qwen2.5-VL.

vLLM serves jina-embeddings-v4 as per-task merged checkpoints (``jinaai/jina-embeddings-v4-vllm-<task>``):
the stock ``Qwen2_5_VLForConditionalGeneration`` with that task's LoRA merged into the weights, run with
``runner="pooling"`` and ``token_embed`` pooling, the per-token states pooled by the client. This module
writes the same kind of checkpoint for one task adapter (``--task``) or one custom PEFT LoRA adapter
(``--adapter FOLDER``) of a nova repository:

    OUT/config.json, model*.safetensors        stock Qwen2.5-VL (model_type qwen2_5_vl, no remote code,
                                               lm_head tied to the input embeddings as in the stock model)
    OUT/tokenizer*, preprocessor_config.json,   stock processor files; the image limits are the nova config's;
    OUT/processor_config.json, chat_template.jinja   the chat template only splices images into the client's
                                               already rendered prompt (see ``vllm_client``)
    OUT/multi_vector_projector.safetensors      the (LoRA-merged) multi-vector projector, float32, applied by
    OUT/multi_vector_projector.json             the client; the json says what it is
    OUT/nova/                                   the nova config and processor (remote code): the client renders
                                               prompts and pooling masks with them, exactly as ``encode`` does
    OUT/README.md                               the ``vllm serve`` command and the request format

The merge is PEFT's own (``PeftModel.from_pretrained`` then ``merge_and_unload``) on the model loaded in
float32 through ``AutoModel.from_pretrained(..., trust_remote_code=True)``; the weights are then cast to the
requested dtype (default: the source's). The output is written to a temporary folder beside OUT and renamed.

vLLM itself does not run on the machines this project is developed on: the tests check the exported
checkpoint with stock transformers run the way vLLM runs it (same prompt tokens, final-norm hidden states,
3D rope positions for images) and compare the pooled vectors with ``encode``.

Usage:
    nova-embeddings export-vllm SOURCE OUT (--task TASK | --adapter FOLDER) [--dtype auto|float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from .data import DTYPES

PROJECTOR_WEIGHTS = "multi_vector_projector.safetensors"
PROJECTOR_INFO = "multi_vector_projector.json"
NOVA_SUBFOLDER = "nova"
EXPORT_INFO_KEY = "nova_export"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# The chat template of the export: the client sends the prompt that the nova processor rendered, split around
# its image placeholders, as the text parts of one message; the template puts the parts back together and
# writes the image placeholder for each image part (vLLM then expands it to one token per merged patch).
PASSTHROUGH_CHAT_TEMPLATE = (
    "{#- nova-embeddings-v1 vLLM export: the prompt is rendered by the client (nova_embeddings.vllm_client);\n"
    "    text parts are written as they are, each image part as the image placeholder. -#}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
    "{%- else -%}{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}\n"
    "{%- elif part['type'] in ('image', 'image_url', 'image_pil') -%}{{- '<|image_pad|>' -}}\n"
    "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    "{%- endfor -%}"
)


class ExportError(ValueError):
    """Bad export input: the message names the problem and what to do."""


# ---------------------------------------------------------------------- validation
def check_source(source: str) -> None:
    """A local path must be a repository folder; anything else is taken as a Hub id."""
    looks_local = os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local and not os.path.isfile(os.path.join(source, "config.json")):
        raise ExportError(f"source {source}: not a nova-embeddings-v1 repository folder (no config.json)")


def check_output_dir(output: Path) -> None:
    """Refuse to write into an existing non-empty folder (or over a file)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"output {output} already exists and is not an empty folder; choose a new path")


def resolve_adapter(source: str, config, task: str | None, adapter: str | None) -> tuple[str, str]:
    """The PEFT adapter folder to merge and a short label for it: a task's ``adapters/<task>`` or a custom folder."""
    if (task is None) == (adapter is None):
        raise ExportError("give exactly one of task (a task adapter of the repository) or adapter (a PEFT LoRA folder)")
    if task is not None:
        if task not in config.task_names:
            raise ExportError(f"unknown task {task!r}; tasks of {source}: {list(config.task_names)}")
        folder = _task_adapter_folder(source, f"{config.adapters_dir}/{task}")
        if folder is None:
            raise ExportError(f"{source}: no weights for task adapter {task!r} under {config.adapters_dir}/{task}/")
        return folder, task
    folder = Path(adapter)
    if not folder.is_dir():
        raise ExportError(f"adapter {adapter}: no such folder (give a PEFT LoRA adapter folder)")
    if not (folder / "adapter_config.json").is_file() or not any((folder / f).is_file() for f in ADAPTER_FILES):
        raise ExportError(f"adapter {adapter}: not a PEFT adapter folder "
                          f"(needs adapter_config.json and {ADAPTER_FILES[0]})")
    return str(folder), folder.resolve().name


def _task_adapter_folder(source: str, subfolder: str) -> str | None:
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder)
    else:
        from huggingface_hub import snapshot_download

        folder = os.path.join(snapshot_download(source, allow_patterns=[f"{subfolder}/*"]), subfolder)
    return folder if any(os.path.isfile(os.path.join(folder, f)) for f in ADAPTER_FILES) else None


def resolve_dtype(name: str, config) -> torch.dtype:
    """``auto`` is the source checkpoint's dtype."""
    if name == "auto":
        name = str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch.")
    if name not in DTYPES:
        raise ExportError(f"unknown dtype {name!r}; choose one of {['auto', *DTYPES]}")
    return DTYPES[name]


# ---------------------------------------------------------------------- merge
def load_merged_model(source: str, adapter_folder: str):
    """The nova model in float32 with the adapter merged by PEFT; every LoRA tensor of the file must load."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source, trust_remote_code=True, load_task_adapters=False, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_folder, adapter_name="export")
    _check_adapter_loaded(peft_model, adapter_folder, get_peft_model_state_dict)
    return peft_model.merge_and_unload(safe_merge=True)


def _check_adapter_loaded(peft_model, adapter_folder: str, get_state) -> None:
    """PEFT only warns about adapter tensors it could not place; an export must not silently lose them."""
    loaded = set(get_state(peft_model, adapter_name="export", save_embedding_layers=False))
    in_file = set(_adapter_file_keys(adapter_folder))
    if not in_file:
        raise ExportError(f"adapter {adapter_folder}: the weights file holds no tensors")
    missing, unexpected = sorted(loaded - in_file), sorted(in_file - loaded)
    if missing or unexpected:
        raise ExportError(f"adapter {adapter_folder} does not fit the model: {len(missing)} LoRA tensors without "
                          f"weights (e.g. {missing[:2]}), {len(unexpected)} tensors that match no layer "
                          f"(e.g. {unexpected[:2]})")


def _adapter_file_keys(folder: str) -> list[str]:
    path = os.path.join(folder, ADAPTER_FILES[0])
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(os.path.join(folder, ADAPTER_FILES[1]), map_location="cpu", weights_only=True))


# ---------------------------------------------------------------------- stock checkpoint
def stock_config(nova_config, dtype: torch.dtype):
    """Qwen2.5-VL's own config with the same backbone fields and none of nova's (no auto_map, no remote code)."""
    from transformers import Qwen2_5_VLConfig

    nova_fields = set(type(nova_config).__annotations__)  # the fields nova's config class adds (not the inherited ones)
    dropped = nova_fields | {"auto_map", "model_type", "custom_pipelines"}
    values = {k: v for k, v in nova_config.to_dict().items() if k not in dropped}
    config = Qwen2_5_VLConfig.from_dict(values)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = dtype
    return config


def save_stock_model(merged, config, dtype: torch.dtype, folder: Path) -> None:
    """Put the merged backbone into a stock Qwen2_5_VLForConditionalGeneration and save it with transformers."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        stock = Qwen2_5_VLForConditionalGeneration(config)
    state = {f"model.{k}": v.to(dtype) for k, v in merged.model.state_dict().items()}
    result = stock.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"backbone does not fit stock Qwen2.5-VL: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    if not config.tie_word_embeddings:  # an untied stock model expects its own lm_head (unused for embeddings)
        stock.lm_head.weight = torch.nn.Parameter(stock.get_input_embeddings().weight.detach().clone())
    stock.tie_weights()
    stock.save_pretrained(folder)


def save_projector(merged, folder: Path, label: str) -> None:
    """The merged multi-vector projector, float32, with a json saying how the client applies it."""
    from safetensors.torch import save_file

    projector = merged.multi_vector_projector
    save_file({name: p.detach().to(torch.float32).contiguous() for name, p in projector.named_parameters()},
              str(folder / PROJECTOR_WEIGHTS))
    info = {
        "weights": PROJECTOR_WEIGHTS,
        "in_features": projector.in_features,
        "out_features": projector.out_features,
        "bias": projector.bias is not None,
        "adapter": label,
        "applies_to": "final-norm hidden state of each token (vLLM token_embed pooling, not normalised)",
        "then": "L2-normalise each token; keep the tokens of the nova processor's output_mask",
    }
    (folder / PROJECTOR_INFO).write_text(json.dumps(info, indent=2) + "\n")


def save_processor_files(nova_processor, nova_config, folder: Path) -> None:
    """Stock processor files for vLLM (image limits = nova's), and the nova processor (remote code) for the client.

    Written part by part (tokenizer, image processor, chat template) rather than through a stock
    Qwen2_5_VLProcessor, which would need a video processor (and torchvision) that embeddings never use.
    """
    nova_processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(PASSTHROUGH_CHAT_TEMPLATE)
    _write_preprocessor_config(nova_processor, nova_config, folder)
    _strip_remote_code(folder)
    nova_processor.save_pretrained(folder / NOVA_SUBFOLDER)
    nova_config.save_pretrained(folder / NOVA_SUBFOLDER)


def _write_preprocessor_config(nova_processor, nova_config, folder: Path) -> None:
    """Qwen2-VL's image processor with nova's pixel limits, as both transformers 4.x and 5.x read it."""
    values = {k: v for k, v in nova_processor.image_processor.to_dict().items() if k != "auto_map"}
    values.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
                  size={"shortest_edge": nova_config.min_pixels, "longest_edge": nova_config.max_pixels},
                  min_pixels=nova_config.min_pixels, max_pixels=nova_config.max_pixels)
    (folder / "preprocessor_config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _strip_remote_code(folder: Path) -> None:
    """Saved tokenizer/processor configs name the nova processor; the export's root must be stock only."""
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        cleaned = _without_remote_code(data)
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n")


def _without_remote_code(data: dict) -> dict:
    cleaned = {}
    for key, value in data.items():
        if key == "auto_map":
            continue
        if key == "processor_class":
            value = "Qwen2_5_VLProcessor"
        cleaned[key] = _without_remote_code(value) if isinstance(value, dict) else value
    return cleaned


# ---------------------------------------------------------------------- transformers 4.x readers
def add_transformers4_fields(folder: Path) -> None:
    """Let transformers 4.x (which vLLM requires at times: ``transformers<5``) read what 5.x wrote.

    4.x takes M-RoPE's sections from ``rope_scaling`` (5.x writes ``rope_parameters``; without them 4.x would
    silently run 1D rope) and the dtype from ``torch_dtype``; its tokenizer needs the special tokens as
    ``additional_special_tokens`` (it crashes on 5.x's ``extra_special_tokens`` list). 5.x accepts both forms.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config", {})):
        rope = section.get("rope_parameters") or config["text_config"].get("rope_parameters")
        if rope and "mrope_section" in rope:
            section["rope_scaling"] = {"type": "default", "rope_type": "default",
                                       "mrope_section": rope["mrope_section"]}
            section["rope_theta"] = rope["rope_theta"]
        if "dtype" in section:
            section["torch_dtype"] = section["dtype"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_path = folder / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_path.read_text())
    if isinstance(tokenizer.get("extra_special_tokens"), list):
        tokenizer["additional_special_tokens"] = tokenizer.pop("extra_special_tokens")
        tokenizer_path.write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------- README
def readme_text(name: str, label: str, nova_config, task: str | None) -> str:
    """The export's README: how to serve it and how to turn vLLM's output into nova vectors."""
    tasks = sorted(t for t in nova_config.task_prompts if task is None or nova_config.adapter_task(t) == task)
    return f"""# {name}: nova-embeddings-v1 ({label}) for vLLM

Stock Qwen2.5-VL with the `{label}` adapter merged (written by `nova-embeddings export-vllm`). vLLM returns the
final-norm hidden state of every prompt token; the client (`nova_embeddings.vllm_client`) renders the prompts
and pools them into nova's single vectors and multi vectors. Tasks served: {', '.join(tasks)}.

## Serve

```bash
vllm serve ./{name} --runner pooling --served-model-name {name} --chat-template-content-format openai \\
    --pooler-config '{{"tok_pooling_type": "ALL", "use_activation": false}}'
```

The token states must not be normalised: older vLLM takes
`--override-pooler-config '{{"pooling_type": "ALL", "normalize": false}}'` instead (the client refuses states that
all have norm 1). The image limits are in `preprocessor_config.json`; do not override them with
`mm_processor_kwargs`, or the tokens no longer match the client's masks (the client checks the count).

## Request (one per item; POST /pooling)

```python
import requests, torch
from nova_embeddings.vllm_client import NovaVllmClient

client = NovaVllmClient("./{name}")
prompts = client.build_prompts(["what is late interaction?", {{"image": "page.png"}}], task="{tasks[-1]}")
bodies = [p.pooling_request("{name}") for p in prompts]
# a body: {{"model": "{name}", "task": "token_embed", "use_activation": false, "add_special_tokens": false,
#   "messages": [{{"role": "user", "content": [{{"type": "text", "text": "<rendered prompt up to the image>"}},
#     {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}},
#     {{"type": "text", "text": "<rendered prompt after the image>"}}]}}]}}
answers = [requests.post("http://localhost:8000/pooling", json=body).json() for body in bodies]
states = [torch.tensor(answer["data"][0]["data"]) for answer in answers]
single = client.single_vectors(prompts, states)  # (items, {nova_config.text_config.hidden_size}), L2-normalised
multi = client.multi_vectors(prompts, states)    # per item: (tokens, {nova_config.multi_vector_projector_dim})
```

Offline: `llm = LLM(model="./{name}", runner="pooling", pooler_config=PoolerConfig(use_activation=False))`,
`outputs = llm.encode([p.offline_prompt() for p in prompts], pooling_task="token_embed")`, then the same two
methods on `[o.outputs.data for o in outputs]` (pass `token_ids=[o.prompt_token_ids for o in outputs]` to check
the tokens too).
"""


# ---------------------------------------------------------------------- entry points
def export_vllm(source: str | os.PathLike, output: str | os.PathLike, *, task: str | None = None,
                adapter: str | os.PathLike | None = None, dtype: str = "auto") -> Path:
    """Write the vLLM export of one adapter of ``source`` to ``output`` (a new or empty folder); returns it."""
    from transformers import AutoConfig, AutoProcessor

    source, output = str(source), Path(output)
    check_source(source)
    check_output_dir(output)
    nova_config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    adapter_folder, label = resolve_adapter(source, nova_config, task, None if adapter is None else str(adapter))
    target_dtype = resolve_dtype(dtype, nova_config)
    nova_processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    merged = load_merged_model(source, adapter_folder)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"  # same filesystem: rename is atomic
    staging.mkdir()
    try:
        config = stock_config(merged.config, target_dtype)
        save_stock_model(merged, config, target_dtype, staging)
        save_projector(merged, staging, label)
        save_processor_files(nova_processor, nova_config, staging)
        add_transformers4_fields(staging)
        _record_export(staging, source, label, task, target_dtype)
        (staging / "README.md").write_text(readme_text(output.name, label, nova_config, task))
        if output.exists():
            output.rmdir()  # empty (checked above)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _record_export(folder: Path, source: str, label: str, task: str | None, dtype: torch.dtype) -> None:
    """Note in the nova config what was merged, so the client can check items against it."""
    path = folder / NOVA_SUBFOLDER / "config.json"
    data = json.loads(path.read_text())
    data[EXPORT_INFO_KEY] = {"source": source, "adapter": label, "task": task,
                             "dtype": str(dtype).removeprefix("torch.")}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nova-embeddings export-vllm",
        description="Write a stock Qwen2.5-VL checkpoint with one adapter merged, for `vllm serve` "
                    "(token_embed pooling).",
    )
    parser.add_argument("source", help="nova-embeddings-v1 repository (local folder or Hub id)")
    parser.add_argument("output", help="new (or empty) folder to write")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="merge this task's adapter (adapters/<task>/ of the repository)")
    which.add_argument("--adapter", help="merge this custom PEFT LoRA adapter folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the written weights (auto: the source's); the merge itself runs in float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_vllm(args.source, args.output, task=args.task, adapter=args.adapter, dtype=args.dtype)
    except ExportError as error:
        print(f"export-vllm: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}; serve it with the command in {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
