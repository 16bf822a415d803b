"""Train a PEFT LoRA adapter for nova-embeddings-v1 with a contrastive (InfoNCE) loss.

Training data is a JSONL file, one example per line:
    {"query": ..., "positive": ..., "negative": ... (optional: one side or a list), "instructions": ..., "task": ...}
Each side is a string (text) or an object with "text" and/or "image" (a path relative to the JSONL file, a URL
or base64) and optional "task" / "instructions" of its own. The whole file is validated (with the processor's
own item validation) before training starts; an error names the line, the side and the problem.

The loss is InfoNCE over in-batch and hard negatives on the single vectors (cosine / temperature), optionally
plus the same loss on multi-vector MaxSim scores. The adapter starts from the bare backbone (or from a task
adapter's weights with --init-from-task) and is saved as a standard PEFT adapter directory that
``model.load_adapter(dir, adapter_name=...)`` and ``peft.PeftModel.from_pretrained`` load.

Usage:
    nova-embeddings train --model DIR_OR_ID --train-file train.jsonl --output-dir my-adapter [options]
    accelerate launch -m nova_embeddings train ...          (several GPUs, mixed precision)
    nova-embeddings train --config train.json     (any option as a JSON key; flags override it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cli import DefaultsHelpFormatter
from .data import DataError, exit_status, item_problem, iter_jsonl, load_model, resolve_item_images

# Every q/k/v/o/gate/up/down projection of the language model and the multi-vector projector; never the
# vision tower (its module names hold "visual", not "language_model"). Same targets as jina's task adapters.
DEFAULT_TARGET_MODULES = (
    r"(.*language_model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|.*multi_vector_projector$)"
)
LORA_DEFAULTS = {"lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": DEFAULT_TARGET_MODULES}
EXAMPLE_KEYS = ("query", "positive", "negative", "instructions", "task")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What a run writes into --output-dir (PEFT's save_pretrained writes README.md too); --overwrite replaces these.
RUN_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "training_args.json", "training_log.jsonl")


# ---------------------------------------------------------------------- data
@dataclass
class DataSettings:
    """How raw examples become items: default tasks, where instructions go, length and image limits."""

    query_task: str = "retrieval.query"
    document_task: str = "retrieval.passage"
    instructions_side: str = "query"  # "query" or "both"
    max_length: int | None = 1024
    truncate: bool = True
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass
class Example:
    """One validated training example: the query item, then the positive and the hard negatives."""

    where: str  # "file, line N", for messages
    query: dict
    documents: list[dict]  # positive first, then negatives
    sides: list[str] = field(default_factory=list)  # name of each item, query first, for messages

    @property
    def items(self) -> list[dict]:
        return [self.query, *self.documents]


def side_tasks(task: Any, settings: DataSettings, task_prompts: dict[str, str]) -> tuple[Any, Any]:
    """(query task, document task) for an example: its ``task`` family, else the run's defaults.

    A family with .query/.passage variants (retrieval, code) splits into them; any other task (text-matching,
    or an explicit variant) applies to both sides. Unknown tasks are left for the processor to refuse.
    """
    if task is None:
        return settings.query_task, settings.document_task
    if isinstance(task, str) and f"{task}.query" in task_prompts and f"{task}.passage" in task_prompts:
        return f"{task}.query", f"{task}.passage"
    return task, task


def side_item(value: Any, task: Any, instructions: Any, base_dir: Path, where: str, side: str) -> Any:
    """One side as a processor item: the example's task/instructions unless the side sets its own."""
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        return value  # the processor names the wrong type
    if "adapter" in value:
        raise DataError(f"{where}: {side}: 'adapter' is not a training-data key (the run trains one adapter)")
    defaults = {"task": task} if instructions is None else {"task": task, "instructions": instructions}
    return resolve_item_images({**defaults, **value}, base_dir)


def parse_example(raw: Any, where: str, base_dir: Path, settings: DataSettings, task_prompts: dict[str, str]) -> Example:
    """Check an example's own structure (keys, sides) and give each side its task and instructions."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with 'query' and 'positive', got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(EXAMPLE_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; valid keys: {list(EXAMPLE_KEYS)}")
    for key in ("query", "positive"):
        if key not in raw:
            raise DataError(f"{where}: missing {key!r}")
    negatives = raw.get("negative")
    negative_sides = ["negative"]
    if negatives is None:
        negatives, negative_sides = [], []
    elif isinstance(negatives, list):
        if not negatives:
            raise DataError(f"{where}: 'negative' is an empty list (leave it out for no hard negative)")
        negative_sides = [f"negative[{i}]" for i in range(len(negatives))]
    else:
        negatives = [negatives]
    query_task, document_task = side_tasks(raw.get("task"), settings, task_prompts)
    instructions = raw.get("instructions")
    document_instructions = instructions if settings.instructions_side == "both" else None
    sides = ["query", "positive", *negative_sides]
    query = side_item(raw["query"], query_task, instructions, base_dir, where, "query")
    documents = [
        side_item(value, document_task, document_instructions, base_dir, where, side)
        for value, side in zip([raw["positive"], *negatives], sides[1:])
    ]
    return Example(where=where, query=query, documents=documents, sides=sides)


def validate_example(example: Example, processor, config, settings: DataSettings, base_dir: Path) -> int:
    """Run the processor's validation and tokenisation on the example; return how many items it truncated."""
    limits = processor.pixel_limits(config, settings.min_pixels, settings.max_pixels)
    try:
        normalized = processor.normalize_items(example.items, config=config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncations are counted and reported once, not per item
            tokenized = processor.tokenize_items(
                normalized, config=config, min_pixels=limits[0], max_pixels=limits[1],
                truncate=settings.truncate, max_length=settings.max_length,
            )
    except ValueError as error:
        index, problem = item_problem(error, base_dir)
        side = example.sides[index] if index is not None and index < len(example.sides) else "example"
        raise DataError(f"{example.where}: {side}: {problem}") from None
    return sum(t.truncated for t in tokenized)


def load_examples(path: Path, processor, config, settings: DataSettings) -> tuple[list[Example], int]:
    """Read and validate the whole file before any training; return the examples and the truncation count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such training file")
    examples, truncated = [], 0
    for line, raw in iter_jsonl(path):
        example = parse_example(raw, f"{path}, line {line}", path.parent, settings, config.task_prompts)
        truncated += validate_example(example, processor, config, settings, path.parent)
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples, truncated


class BatchBuilder:
    """DataLoader collate function: examples -> one padded batch (queries, then positives, then negatives).

    One batch for both sides means one forward per step (what DDP expects), and the processor renders each
    item on its own, so an item's vector does not depend on its neighbours.
    """

    def __init__(self, processor, config, settings: DataSettings):
        self.processor, self.config, self.settings = processor, config, settings
        self.limits = processor.pixel_limits(config, settings.min_pixels, settings.max_pixels)

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        positives = [example.documents[0] for example in examples]
        negatives = [item for example in examples for item in example.documents[1:]]
        items = [example.query for example in examples] + positives + negatives
        processor, low, high = self.processor, *self.limits
        normalized = processor.normalize_items(items, config=self.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once at validation
            tokenized = processor.tokenize_items(
                normalized, config=self.config, min_pixels=low, max_pixels=high,
                truncate=self.settings.truncate, max_length=self.settings.max_length,
            )
        return {"inputs": processor.collate(tokenized, min_pixels=low, max_pixels=high), "n_queries": len(examples)}


# ---------------------------------------------------------------------- loss
def contrastive_loss(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: scores (queries, documents) where document i is query i's positive; the rest are negatives."""
    labels = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores.float() / temperature, labels)


def maxsim_scores(
    queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor, document_mask: torch.Tensor
) -> torch.Tensor:
    """Differentiable MaxSim, averaged over each query's tokens: (queries, documents).

    The average (not jina's sum) keeps scores in [-1, 1] so one temperature serves both losses; dividing a
    query's scores by its own token count does not change how it ranks documents.
    queries (nq, tq, dim), documents (nd, td, dim): normalised, zero outside their masks.
    """
    sims = torch.einsum("qid,njd->qnij", queries, documents)  # (nq, nd, tq, td)
    sims = sims.masked_fill(~document_mask.bool()[None, :, None, :], torch.finfo(sims.dtype).min)
    best = sims.max(dim=-1).values * query_mask[:, None, :].to(sims.dtype)  # (nq, nd, tq)
    return best.sum(dim=-1) / query_mask.sum(dim=-1, keepdim=True).clamp(min=1).to(sims.dtype)


class ContrastiveModel(nn.Module):
    """The embedding model plus its loss, as one module: accelerate/DDP wrap it and call it once per step."""

    def __init__(self, model: nn.Module, temperature: float, multi_vector_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.multi_vector_weight = multi_vector_weight

    def forward(self, inputs: dict, n_queries: int) -> dict[str, torch.Tensor]:
        use_multi = self.multi_vector_weight > 0
        out = self.model(**inputs, return_multivector=use_multi)
        single = out.single_vector  # (items, hidden), L2-normalised
        losses = {"single_loss": contrastive_loss(single[:n_queries] @ single[n_queries:].T, self.temperature)}
        total = losses["single_loss"]
        if use_multi:
            multi, mask = out.multi_vector, inputs["output_mask"]
            scores = maxsim_scores(multi[:n_queries], mask[:n_queries], multi[n_queries:], mask[n_queries:])
            losses["multi_loss"] = contrastive_loss(scores, self.temperature)
            total = total + self.multi_vector_weight * losses["multi_loss"]
        losses["loss"] = total
        return losses


# ---------------------------------------------------------------------- adapter
def task_adapter_folder(model_name: str, config, task: str) -> Path:
    """``<model>/adapters/<task>/`` (local folder or Hub repository) holding a task adapter's weights."""
    if task not in config.task_names:
        raise ValueError(f"--init-from-task {task!r} is not a task adapter; choose one of {config.task_names}")
    subfolder = f"{config.adapters_dir}/{task}"
    if Path(model_name).is_dir():
        folder = Path(model_name) / subfolder
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_name, allow_patterns=[f"{subfolder}/*"])) / subfolder
    for needed in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / needed).is_file():
            raise ValueError(f"--init-from-task {task}: {folder / needed} not found (no task adapter weights)")
    return folder


def lora_config(args: argparse.Namespace, init_folder: Path | None):
    """The new adapter's LoraConfig: from the flags, or from the task adapter it starts from."""
    from peft import LoraConfig

    if init_folder is None:
        values = {key: LORA_DEFAULTS[key] if getattr(args, key) is None else getattr(args, key) for key in LORA_DEFAULTS}
        return LoraConfig(
            r=values["lora_r"], lora_alpha=values["lora_alpha"], lora_dropout=values["lora_dropout"],
            target_modules=values["target_modules"], bias="none",
        )
    config = LoraConfig.from_pretrained(str(init_folder))
    given = [key for key in ("lora_r", "lora_alpha", "target_modules") if getattr(args, key) is not None]
    ignored = [f"--{key.replace('_', '-')}" for key in given]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} ignored: --init-from-task keeps the task adapter's rank, alpha and targets")
    config.inference_mode = False
    if args.lora_dropout is not None:
        config.lora_dropout = args.lora_dropout
    return config


def attach_adapter(model: nn.Module, args: argparse.Namespace):
    """Wrap the model with a fresh trainable LoRA adapter (PEFT's "default"), optionally a task adapter's copy."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    init_folder = task_adapter_folder(args.model, model.config, args.init_from_task) if args.init_from_task else None
    peft_model = get_peft_model(model, lora_config(args, init_folder))
    if init_folder is not None:
        result = set_peft_model_state_dict(peft_model, load_file(str(init_folder / ADAPTER_WEIGHTS)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{init_folder}: task adapter does not fit the model: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    vision = [name for name in adapted if "visual" in name.split(".")]
    if vision:
        raise ValueError(f"the LoRA targets must not include the vision tower; they matched {vision[:3]}")
    return peft_model


def freeze_unreached(model: nn.Module, multi_vector_weight: float) -> list[str]:
    """Freeze the projector's LoRA when no loss reaches it (single-vector loss only).

    Why: DDP refuses parameters that get no gradient, and AdamW's weight decay would move them for nothing.
    Frozen, they stay at PEFT's initial B = 0: the projector itself is unchanged (the language model's LoRA
    still changes the multi vectors).
    """
    if multi_vector_weight > 0:
        return []
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "multi_vector_projector" in n]
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the language model's decoder layers only.

    Only the language model: enabling it on the whole model also makes transformers hook the vision tower's
    patch embedding (``enable_input_require_grads`` visits every sub-model), so the frozen vision tower would
    build a graph and be recomputed for nothing (and on CUDA with bf16 weights its recomputation does not
    match its forward). Non-reentrant checkpointing needs no input that requires grad. transformers 5.23
    renamed the method (the old name warns there); 5.17 only has the old one.
    """
    language_model = model.model.language_model
    enable = getattr(language_model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before the model is even loaded, an --output-dir the adapter cannot be saved into or would clobber.

    Why: the adapter is saved only after training; a bad path used to fail there and lose the run. The
    script does not resume runs, so a folder holding files is refused unless it holds a previous adapter
    and --overwrite says to replace it (never an unrelated folder: PEFT writes README.md there too).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; give a folder path")
    if not output_dir.exists():
        ancestor = _first_existing(output_dir.parent)
        if not ancestor.is_dir():
            raise ValueError(f"cannot create --output-dir {output_dir}: {ancestor} is not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"cannot create --output-dir {output_dir}: {ancestor} is not writable")
        return
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {output_dir} is not writable")
    entries = sorted(p.name for p in output_dir.iterdir())
    if not entries:
        return
    if ADAPTER_CONFIG not in entries:
        raise ValueError(f"--output-dir {output_dir} is not empty and holds no adapter ({ADAPTER_CONFIG}): "
                         "choose a new or empty folder")
    if not overwrite:
        raise ValueError(f"--output-dir {output_dir} already holds an adapter: pass --overwrite to replace it, "
                         "or choose a new folder")
    kept = [name for name in entries if name not in RUN_FILES]
    if kept:
        warnings.warn(f"--overwrite: {output_dir} keeps files of an earlier run that this run does not rewrite: {kept}")


def save_adapter(peft_model, output_dir: Path, args: argparse.Namespace, history: list[dict]) -> None:
    """Standard PEFT files (adapter_config.json, adapter_model.safetensors) plus the run's arguments and log."""
    output_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(output_dir))
    arguments = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2) + "\n", encoding="utf-8")
    with open(output_dir / "training_log.jsonl", "w", encoding="utf-8") as handle:
        for record in history:
            handle.write(json.dumps(record) + "\n")
    check_saved_adapter(output_dir)


def check_saved_adapter(folder: Path) -> None:
    """The saved file must be stock PEFT layout for our model, with no vision-tower tensors."""
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = list(handle.keys())
    bad = [k for k in keys if not k.startswith("base_model.model.") or ".visual." in k]
    if not keys or bad:
        raise RuntimeError(f"{folder / ADAPTER_WEIGHTS}: unexpected adapter layout ({len(keys)} tensors; e.g. {bad[:3]})")


# ---------------------------------------------------------------------- training loop
@dataclass
class TrainResult:
    """What a run produced: where the adapter is, the per-step log, and the trained PEFT model."""

    output_dir: Path
    history: list[dict]
    peft_model: Any
    truncated_items: int = 0


def optimizer_steps(batches_per_epoch: int, args: argparse.Namespace) -> int:
    """Optimizer steps of the run: --max-steps if given, else --epochs full passes."""
    if args.max_steps:
        return args.max_steps
    return args.epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)


def train(args: argparse.Namespace) -> TrainResult:
    """Load, validate the data, attach LoRA, run the accumulate/backward/step loop, save on the main process."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    check_output_dir(Path(args.output_dir), args.overwrite)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    set_seed(args.seed)
    model = load_model(args.model, dtype=args.dtype, device="cpu", load_task_adapters=False)
    settings = data_settings(args)
    examples, truncated = load_examples(Path(args.train_file), model.processor, model.config, settings)
    check_batch_size(examples, args.batch_size * accelerator.num_processes)
    peft_model = attach_adapter(model, args)
    frozen = freeze_unreached(model, args.multi_vector_weight)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()

    loader = torch.utils.data.DataLoader(
        examples, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
        collate_fn=BatchBuilder(model.processor, model.config, settings), generator=torch.Generator().manual_seed(args.seed),
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    step_module = ContrastiveModel(model, args.temperature, args.multi_vector_weight)
    step_module, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)
    total = optimizer_steps(len(loader), args)
    # A prepared scheduler steps once per process per optimizer step (accelerate's convention).
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=total * accelerator.num_processes,
    ))
    log = _Logger(accelerator, total, args.progress)
    log.info(f"{len(examples)} examples, {total} optimizer steps, {sum(p.numel() for p in parameters):,} trainable parameters"
             + (f"; {truncated} items truncated to {settings.max_length} tokens" if truncated else "")
             + (f"; projector LoRA frozen (--multi-vector-weight 0): {len(frozen)} tensors" if frozen else ""))
    history = run_steps(accelerator, step_module, optimizer, scheduler, loader, parameters, args, total, log,
                        lambda step: save_checkpoint(accelerator, peft_model, args, step))
    log.close()

    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(peft_model, output_dir, args, history)
        log.info(f"saved adapter to {output_dir}")
    accelerator.wait_for_everyone()
    model.eval()
    return TrainResult(output_dir, history, peft_model, truncated)


def run_steps(
    accelerator, step_module, optimizer, scheduler, loader, parameters, args, total: int, log, checkpoint
) -> list[dict]:
    """The loop: accumulate micro-batches, clip, step; one history record per optimizer step."""
    history: list[dict] = []
    pending: list[dict[str, torch.Tensor]] = []
    while len(history) < total:
        for batch in loader:
            with accelerator.accumulate(step_module):
                losses = step_module(batch["inputs"], batch["n_queries"])
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            pending.append({name: value.detach() for name, value in losses.items()})
            if not accelerator.sync_gradients:
                continue
            record = step_record(accelerator, len(history) + 1, pending, lr)
            pending = []
            history.append(record)
            log.step(record, args.log_every)
            if args.save_every and record["step"] % args.save_every == 0 and record["step"] < total:
                checkpoint(record["step"])
            if len(history) >= total:
                break
    return history


def step_record(accelerator, step: int, losses: list[dict[str, torch.Tensor]], lr: float) -> dict:
    """Mean of the step's micro-batch losses, averaged over processes."""
    record: dict[str, Any] = {"step": step}
    for name in losses[0]:
        value = torch.stack([loss[name] for loss in losses]).mean()
        record[name] = float(accelerator.reduce(value, reduction="mean"))
    record["lr"] = lr
    return record


def save_checkpoint(accelerator, peft_model, args: argparse.Namespace, step: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        peft_model.save_pretrained(str(Path(args.output_dir) / f"checkpoint-{step}"))
    accelerator.wait_for_everyone()


class _Logger:
    """A tqdm bar over optimizer steps and a loss line every N steps, on the main process only."""

    def __init__(self, accelerator, total: int, progress: bool):
        from tqdm.auto import tqdm

        self.main = accelerator.is_local_main_process
        self.bar = tqdm(total=total, desc="train", unit="step", disable=not (progress and self.main))
        self.window: list[float] = []

    def info(self, message: str) -> None:
        if not self.main:
            return
        if self.bar.disable:
            print(message, flush=True)
        else:
            self.bar.write(message)  # keeps the bar intact

    def step(self, record: dict, every: int) -> None:
        self.window.append(record["loss"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if every and (record["step"] % every == 0 or record["step"] == self.bar.total):
            mean = sum(self.window) / len(self.window)
            self.info(f"step {record['step']}/{self.bar.total}  loss {mean:.4f}  lr {record['lr']:.2e}")
            self.window = []

    def close(self) -> None:
        self.bar.close()


def check_batch_size(examples: list[Example], global_batch: int) -> None:
    """In-batch negatives need batches; the loader drops the last partial batch, so one full batch is needed."""
    if len(examples) < global_batch:
        raise DataError(f"{len(examples)} examples, fewer than one batch of {global_batch} (batch size x processes)")
    if global_batch < 2 and not any(len(e.documents) > 1 for e in examples):
        warnings.warn("batch size 1 and no hard negatives: the loss is constant (nothing to contrast against)")


def data_settings(args: argparse.Namespace) -> DataSettings:
    return DataSettings(
        query_task=args.query_task, document_task=args.document_task, instructions_side=args.instructions_side,
        max_length=args.max_length, truncate=args.truncate, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
    )


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="JSON file of option values (keys as below, - or _); flags override it")
    io = parser.add_argument_group("data and output")
    io.add_argument("--model", help="nova-embeddings-v1 folder or Hub id (required)")
    io.add_argument("--train-file", type=Path, help="JSONL training examples (required)")
    io.add_argument("--output-dir", type=Path, help="where the adapter is saved (required): a new or empty folder, "
                    "or with --overwrite one holding an earlier adapter")
    io.add_argument("--overwrite", action="store_true",
                    help="replace the adapter already in --output-dir (other files there are kept)")
    io.add_argument("--query-task", default="retrieval.query", help="task of query sides that set none")
    io.add_argument("--document-task", default="retrieval.passage", help="task of positive/negative sides that set none")
    io.add_argument("--instructions-side", choices=("query", "both"), default="query",
                    help="which sides an example's 'instructions' apply to")
    io.add_argument("--max-length", type=int, default=1024, help="longest item in tokens")
    io.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True, help="cut longer texts (else: error)")
    io.add_argument("--min-pixels", type=int, help="image resize lower limit (default: the model config's)")
    io.add_argument("--max-pixels", type=int, help="image resize upper limit (default: the model config's)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, help=f"rank (default {LORA_DEFAULTS['lora_r']})")
    lora.add_argument("--lora-alpha", type=float, help=f"alpha (default {LORA_DEFAULTS['lora_alpha']})")
    lora.add_argument("--lora-dropout", type=float, help=f"dropout (default {LORA_DEFAULTS['lora_dropout']})")
    lora.add_argument("--target-modules", help="regex of module names to adapt (default: every language-model "
                      "q/k/v/o/gate/up/down projection and multi_vector_projector)")
    lora.add_argument("--init-from-task", help="start from this task adapter's weights and config "
                      "(retrieval, text-matching, code)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    loss.add_argument("--multi-vector-weight", type=float, default=0.0, help="weight of the MaxSim InfoNCE term (0: off)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=8, help="examples per device per micro-batch")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=1)
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    opt.add_argument("--learning-rate", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name")
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    opt.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    opt.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="base weights' dtype")
    opt.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    opt.add_argument("--seed", type=int, default=42)
    opt.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    run = parser.add_argument_group("logging")
    run.add_argument("--log-every", type=int, default=10, help="print the mean loss every N steps (0: never)")
    run.add_argument("--save-every", type=int, default=0, help="also save output-dir/checkpoint-N every N steps (0: never)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return parser


REQUIRED = ("model", "train_file", "output_dir")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults taken from --config's JSON when given."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    config_path = pre.parse_known_args(argv)[0].config
    if config_path is not None:
        parser.set_defaults(**config_defaults(parser, config_path))
    args = parser.parse_args(argv)
    missing = [f"--{name.replace('_', '-')}" for name in REQUIRED if getattr(args, name) in (None, "")]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.temperature <= 0 or args.batch_size < 1 or args.gradient_accumulation_steps < 1 or args.multi_vector_weight < 0:
        parser.error("need --temperature > 0, --batch-size >= 1, --gradient-accumulation-steps >= 1, "
                     "--multi-vector-weight >= 0")
    for name in ("train_file", "output_dir"):  # values from --config arrive as strings
        setattr(args, name, Path(getattr(args, name)))
    return args


def config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Option values from a JSON object; unknown keys are an error listing the valid ones."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"--config {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a JSON object")
    valid = {action.dest for action in parser._actions if action.dest not in ("help", "config")}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - valid)
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {unknown}; valid: {sorted(valid)}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
