"""nova_embeddings/train.py (`nova-embeddings train`) on the tiny checkpoint.

A few steps on a small synthetic set (texts, one image, a hard negative, instructions) lower the loss; the
saved adapter is stock PEFT layout, loads with ``model.load_adapter`` and with ``PeftModel.from_pretrained``,
and reproduces the trained model's vectors; bad training data is refused with an error naming the line.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from accelerate.state import AcceleratorState
from transformers import AutoModel

from configuration_nova_embeddings_v1 import DEFAULT_TASK_PROMPTS
from nova_embeddings.data import DataError
from nova_embeddings.train import (
    DEFAULT_TARGET_MODULES,
    DataSettings,
    contrastive_loss,
    load_examples,
    main,
    maxsim_scores,
    parse_args,
    parse_example,
    train,
)

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TOPICS = ["apples are a red fruit", "the ocean is deep and blue", "python code runs on an interpreter",
          "mountains keep snow on their peaks", "cats sleep most of the day", "trains run on steel rails",
          "bread is baked in hot ovens", "stars shine at night"]
QUERIES = [f"tell me about {topic.split()[0]} {topic.split()[-1]}" for topic in TOPICS]
FAST = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--learning-rate", "5e-3",
        "--no-progress", "--log-every", "0"]


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are objects (dumped as JSON) or raw strings (written as they are, for broken lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def write_png(path: Path, seed: int) -> None:
    pixels = (np.random.RandomState(seed).rand(60, 90, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; runs with another mixed precision need it reset."""
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train_data")
    (folder / "images").mkdir()
    write_png(folder / "images" / "page.png", seed=1)
    rows = [{"query": query, "positive": topic} for query, topic in zip(QUERIES, TOPICS)]
    rows[0]["negative"] = "a sentence about nothing in particular"
    rows[1]["positive"] = {"text": TOPICS[1], "image": "images/page.png"}  # relative to the JSONL file
    rows[2]["instructions"] = "Find facts about programming"
    rows[3]["negative"] = [{"image": "images/page.png"}, "snow melts in spring"]
    return write_jsonl(folder / "train.jsonl", rows)


@pytest.fixture(scope="module")
def trained(tiny_nova_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    args = parse_args(["--model", str(tiny_nova_dir), "--train-file", str(train_file), "--output-dir", str(out),
                       "--max-steps", "15", "--batch-size", "8", *FAST])
    return train(args)


@pytest.fixture(scope="module")
def bare_model(tiny_nova_dir):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)


def expected_adapted_modules(n_layers: int) -> set[str]:
    names = {f"model.language_model.layers.{i}.{proj}" for i in range(n_layers) for proj in PROJECTIONS}
    return names | {"multi_vector_projector"}


# ---------------------------------------------------------------------- training
def test_a_few_steps_lower_the_loss(trained):
    losses = [record["loss"] for record in trained.history]
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_checkpointing_covers_the_language_model_not_the_frozen_vision_tower(trained, train_file):
    model = trained.peft_model.get_base_model()
    assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    assert not any(getattr(block, "gradient_checkpointing", False) for block in model.model.visual.blocks)
    model.train()
    batch = model.processor.process_items([{"image": str(train_file.parent / "images" / "page.png")}], config=model.config)
    batch = batch.to(model.device)
    features = model.image_features(batch["pixel_values"], batch["image_grid_thw"])
    assert not features.requires_grad  # no graph (and no recomputation) through the vision tower
    model.eval()


def test_saved_adapter_is_standard_peft_layout(trained, bare_model):
    folder = trained.output_dir
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    n_layers = bare_model.config.text_config.num_hidden_layers
    expected = {f"base_model.model.{name}.lora_{ab}.weight" for name in expected_adapted_modules(n_layers) for ab in "AB"}
    assert keys == expected

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == DEFAULT_TARGET_MODULES
    matched = {name for name, _ in bare_model.named_modules() if re.fullmatch(config["target_modules"], name)}
    assert matched == expected_adapted_modules(n_layers)  # every projection + projector; nothing of the vision tower


def test_projector_lora_untouched_without_multi_vector_loss(trained):
    weights = load_file(str(trained.output_dir / "adapter_model.safetensors"))
    assert torch.count_nonzero(weights["base_model.model.multi_vector_projector.lora_B.weight"]) == 0
    assert torch.count_nonzero(weights["base_model.model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"]) > 0


def test_stock_peft_loads_it_with_no_missing_or_unexpected_keys(trained, tiny_nova_dir):
    fresh = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    peft_model = PeftModel.from_pretrained(fresh, str(trained.output_dir))
    result = peft_model.load_adapter(str(trained.output_dir), adapter_name="again")
    assert [k for k in result.missing_keys if "lora_" in k] == [] and result.unexpected_keys == []
    saved = load_file(str(trained.output_dir / "adapter_model.safetensors"))
    loaded = peft_model.get_base_model().model.language_model.layers[1].mlp.down_proj.lora_B["default"].weight
    torch.testing.assert_close(loaded, saved["base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight"])


def test_load_adapter_reproduces_the_trained_model_and_changes_embeddings(trained, tiny_nova_dir, train_file):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    model.load_adapter(str(trained.output_dir), adapter_name="mine")
    assert "mine" in model.list_adapters()
    items = QUERIES[:3] + [{"image": str(train_file.parent / "images" / "page.png")}]
    with_adapter = model.encode(items, task="retrieval.query", adapter="mine")
    bare = model.encode(items, task="retrieval.query", adapter=None)
    assert (with_adapter - bare).abs().max() > 1e-3
    per_item = model.encode([{"text": text, "adapter": "mine"} for text in items[:3]], task="retrieval.query")
    torch.testing.assert_close(per_item, with_adapter[:3])

    trained_model = trained.peft_model.get_base_model().eval()  # bare backbone + the new LoRA, as trained
    batch = trained_model.processor.process_items(items, task="retrieval.query", config=trained_model.config)
    with torch.no_grad():
        expected = trained_model(**batch.to(trained_model.device), return_multivector=False).single_vector.cpu()
    torch.testing.assert_close(with_adapter, expected, atol=1e-5, rtol=1e-4)


def test_multi_vector_loss_accumulation_and_bf16_run(tiny_nova_dir, train_file, tmp_path):
    args = parse_args(["--model", str(tiny_nova_dir), "--train-file", str(train_file), "--output-dir", str(tmp_path),
                       "--max-steps", "2", "--batch-size", "4", "--gradient-accumulation-steps", "2",
                       "--multi-vector-weight", "0.5", "--mixed-precision", "bf16", "--no-gradient-checkpointing", *FAST])
    result = train(args)
    assert [r["step"] for r in result.history] == [1, 2]
    assert all(np.isfinite(r["multi_loss"]) and r["loss"] > r["single_loss"] for r in result.history)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.count_nonzero(weights["base_model.model.multi_vector_projector.lora_B.weight"]) > 0


def test_init_from_task_starts_from_the_task_adapters_weights(tiny_nova_dir, train_file, tmp_path):
    repo = shutil.copytree(tiny_nova_dir, tmp_path / "repo")
    shutil.rmtree(repo / "adapters", ignore_errors=True)
    torch.manual_seed(3)
    base = AutoModel.from_pretrained(repo, trust_remote_code=True, load_task_adapters=False)
    task = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES, init_lora_weights=False))
    task.save_pretrained(str(repo / "adapters" / "retrieval"))
    out = tmp_path / "out"
    args = parse_args(["--model", str(repo), "--train-file", str(train_file), "--output-dir", str(out), "--init-from-task",
                       "retrieval", "--max-steps", "1", "--learning-rate", "0", "--lora-dropout", "0", "--no-progress"])
    train(args)
    task_weights = load_file(str(repo / "adapters" / "retrieval" / "adapter_model.safetensors"))
    new_weights = load_file(str(out / "adapter_model.safetensors"))
    assert new_weights.keys() == task_weights.keys()
    for key in task_weights:  # learning rate 0: the saved adapter is still the task adapter it started from
        torch.testing.assert_close(new_weights[key], task_weights[key])


# ---------------------------------------------------------------------- loss pieces
def test_contrastive_loss_known_value():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = float(np.log1p(np.exp(-1.0)))  # -log(e / (e + 1)) for each row at temperature 1
    assert contrastive_loss(scores, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_loss(scores, temperature=0.1).item() < contrastive_loss(scores, temperature=1.0).item()


def test_maxsim_scores_equal_the_models_maxsim_per_query_token(bare_model):
    generator = torch.Generator().manual_seed(0)
    lengths_q, lengths_d = [3, 5], [4, 2, 6]
    queries = [torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=-1) for n in lengths_q]
    documents = [torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=-1) for n in lengths_d]

    def pad(vectors):
        padded = torch.nn.utils.rnn.pad_sequence(vectors, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(v), dtype=torch.bool) for v in vectors], batch_first=True)
        return padded.requires_grad_(), mask

    (q, q_mask), (d, d_mask) = pad(queries), pad(documents)
    scores = maxsim_scores(q, q_mask, d, d_mask)
    reference = type(bare_model).score_multi_vector(queries, documents) / torch.tensor(lengths_q, dtype=torch.float32)[:, None]
    torch.testing.assert_close(scores, reference)
    scores.sum().backward()
    assert q.grad is not None and torch.count_nonzero(q.grad) > 0


# ---------------------------------------------------------------------- data
def test_sides_get_tasks_instructions_and_resolved_images(tmp_path):
    write_png(tmp_path / "a.png", seed=2)
    settings = DataSettings()
    raw = {"query": "q", "positive": {"image": "a.png"}, "negative": "n", "instructions": "Find it"}
    example = parse_example(raw, "f, line 1", tmp_path, settings, DEFAULT_TASK_PROMPTS)
    assert example.query == {"text": "q", "task": "retrieval.query", "instructions": "Find it"}
    assert example.documents == [{"image": str(tmp_path / "a.png"), "task": "retrieval.passage"},
                                 {"text": "n", "task": "retrieval.passage"}]
    both = parse_example(raw, "f, line 1", tmp_path, DataSettings(instructions_side="both"), DEFAULT_TASK_PROMPTS)
    assert all(doc["instructions"] == "Find it" for doc in both.documents)
    code = parse_example({"query": "q", "positive": "p", "task": "code"}, "f", tmp_path, settings, DEFAULT_TASK_PROMPTS)
    assert (code.query["task"], code.documents[0]["task"]) == ("code.query", "code.passage")
    matching = parse_example({"query": "q", "positive": {"text": "p", "task": "retrieval.passage"}, "task": "text-matching"},
                             "f", tmp_path, settings, DEFAULT_TASK_PROMPTS)
    assert (matching.query["task"], matching.documents[0]["task"]) == ("text-matching", "retrieval.passage")


GOOD = json.dumps({"query": "a question", "positive": "an answer"})
BAD_DATA = [
    ([GOOD, '{"query": "a", "positive": '], "line 2: invalid JSON"),
    ([GOOD, GOOD, {"query": "a"}], "line 3: missing 'positive'"),
    ([{"query": "a", "positive": "   "}], "line 1: positive: 'text' is empty"),
    ([GOOD, "", {"query": "a", "positive": "b", "task": "summarize"}], "line 3: query: unknown task 'summarize'"),
    ([{"query": {"text": "a", "task": "bogus"}, "positive": "b"}], "line 1: query: unknown task 'bogus'"),
    ([GOOD, {"query": "a", "positive": {"image": "missing.png"}}], "line 2: positive: 'image' string is neither"),
    ([GOOD, {"query": "a", "positive": {"image": "not_an_image.png"}}], "line 2: positive: unreadable image"),
    ([{"query": "a", "positive": "b", "label": 1}], "line 1: unknown key(s) ['label']"),
    ([{"query": "a", "positive": "b", "negative": ["c", ""]}], "line 1: negative[1]: 'text' is empty"),
    ([{"query": "a", "positive": "b", "negative": []}], "line 1: 'negative' is an empty list"),
    ([GOOD, '["a", "b"]'], "line 2: expected a JSON object"),
    ([{"query": "a", "positive": "b", "instructions": 3}], "line 1: query: instructions must be a str"),
    ([{"query": {"text": "a", "adapter": "x"}, "positive": "b"}], "line 1: query: 'adapter' is not a training-data key"),
    ([{"query": 42, "positive": "b"}], "line 1: query: expected a str or a dict"),
]


@pytest.mark.parametrize("rows,message", BAD_DATA, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_DATA])
def test_bad_training_data_names_the_line(bare_model, tmp_path, rows, message):
    (tmp_path / "not_an_image.png").write_text("this is text, not a picture")
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_examples(path, bare_model.processor, bare_model.config, DataSettings())
    assert f"{path}, {message}" in str(caught.value)


def test_too_long_items_are_truncated_or_refused(bare_model, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"query": "a", "positive": "word " * 200}])
    examples, truncated = load_examples(path, bare_model.processor, bare_model.config, DataSettings(max_length=32))
    assert len(examples) == 2 and truncated == 1
    with pytest.raises(DataError, match="line 2: positive: .*over the maximum of 32"):
        load_examples(path, bare_model.processor, bare_model.config, DataSettings(max_length=32, truncate=False))


def test_command_line_reports_bad_data_without_a_traceback(tiny_nova_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"query": "a"}])
    code = main(["--model", str(tiny_nova_dir), "--train-file", str(path), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert f"error: {path}, line 2: missing 'positive'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def output_dir_cases(tmp_path: Path) -> list[tuple[Path, list[str], str]]:
    """(--output-dir, extra flags, expected error) for outputs that can never be saved, or would be clobbered."""
    (tmp_path / "a_file").write_text("x")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("mine")
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "adapter_config.json").write_text("{}")
    return [
        (tmp_path / "a_file", [], "is a file; give a folder path"),
        (tmp_path / "a_file" / "adapter", [], "a_file is not a folder"),
        (notes, [], "is not empty and holds no adapter (adapter_config.json)"),
        (notes, ["--overwrite"], "is not empty and holds no adapter (adapter_config.json)"),
        (previous, [], "already holds an adapter: pass --overwrite to replace it"),
    ]


def test_output_dir_is_checked_before_the_model_is_loaded(tiny_nova_dir, train_file, tmp_path, capsys, monkeypatch):
    import nova_embeddings.train as train_adapter

    monkeypatch.setattr(train_adapter, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    for output_dir, extra, message in output_dir_cases(tmp_path):
        code = main(["--model", str(tiny_nova_dir), "--train-file", str(train_file), "--output-dir", str(output_dir), *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith("error: ") and f"--output-dir {output_dir}" in err and message in err, err
        assert err.count("\n") == 1, err
    assert (tmp_path / "a_file").read_text() == "x" and (tmp_path / "notes" / "README.md").read_text() == "mine"


def test_overwrite_replaces_a_previous_adapter(trained, tiny_nova_dir, train_file, tmp_path):
    previous = shutil.copytree(trained.output_dir, tmp_path / "previous")
    (previous / "checkpoint-3").mkdir()  # from the earlier run: kept, and the warning says so
    old = load_file(str(previous / "adapter_model.safetensors"))
    args = parse_args(["--model", str(tiny_nova_dir), "--train-file", str(train_file), "--output-dir", str(previous),
                       "--overwrite", "--max-steps", "1", "--seed", "7", *FAST])
    with pytest.warns(UserWarning, match=r"keeps files of an earlier run that this run does not rewrite: \['checkpoint-3'\]"):
        train(args)
    new = load_file(str(previous / "adapter_model.safetensors"))
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)
    assert json.loads((previous / "training_args.json").read_text())["max_steps"] == 1


def test_fewer_examples_than_a_batch_is_an_error(tiny_nova_dir, train_file, tmp_path):
    args = parse_args(["--model", str(tiny_nova_dir), "--train-file", str(train_file), "--output-dir", str(tmp_path),
                       "--batch-size", "16", "--no-progress"])
    with pytest.raises(DataError, match="8 examples, fewer than one batch of 16"):
        train(args)


def test_config_file_gives_defaults_and_flags_override_it(tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": "m", "train-file": "t.jsonl", "output_dir": "out", "max_steps": 3, "lora_r": 4}))
    args = parse_args(["--config", str(config), "--lora-r", "8"])
    assert (args.model, args.train_file, args.output_dir, args.max_steps, args.lora_r) == ("m", Path("t.jsonl"), Path("out"), 3, 8)
    config.write_text(json.dumps({"model": "m", "learning_rat": 1e-4}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
    with pytest.raises(SystemExit):
        parse_args(["--model", "m"])  # --train-file and --output-dir missing
