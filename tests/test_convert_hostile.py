"""The converter on hostile input: nothing half-written, ever, and one clear line per problem.

Each test copies the session's tiny jina checkpoint (never rebuilds it), breaks the copy, and checks that
``convert`` raises a ConversionError (a ValueError) with one line naming the item and the problem, that the
command line prints the same line as ``error: ...`` with status 1, and that neither the target folder nor a
temporary folder is left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nova_embeddings import convert as conv


def copy_source(tiny_jina_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_jina_dir, tmp_path / "src"))


def leftovers(tmp_path: Path, *keep: str) -> list[str]:
    """Entries of tmp_path other than the source copy and ``keep``: a failed conversion must leave none."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("src", *keep))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def refused(source: Path, out: Path, capsys, *extra: str) -> str:
    """Convert through the function and the command line; both must refuse with the same one-line message."""
    with pytest.raises(conv.ConversionError) as caught:
        conv.convert(source, out, overwrite="--overwrite" in extra)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message, message
    capsys.readouterr()
    assert conv.main(["--jina-dir", str(source), "--out", str(out), *extra]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    return message


# ------------------------------------------------------------------------------------------ atomic writes

# Inputs that used to fail only after weights, config and code had been written into the target.
FAILS_LATE = {
    "no tokenizer": lambda src: [(src / name).unlink() for name in ("tokenizer.json", "vocab.json", "merges.txt")],
    "image_token_id disagrees": lambda src: edit_json(src / "config.json", lambda c: c.update(image_token_id=587)),
    "tokenizer.json garbage": lambda src: (src / "tokenizer.json").write_text("not json", encoding="utf-8"),
}


@pytest.mark.parametrize("case", list(FAILS_LATE))
def test_failure_leaves_nothing_and_a_rerun_after_the_fix_succeeds(case, tiny_jina_dir, tmp_path):
    source = copy_source(tiny_jina_dir, tmp_path)
    FAILS_LATE[case](source)
    out = tmp_path / "deeper" / "out"
    with pytest.raises(conv.ConversionError):
        conv.convert(source, out)
    assert leftovers(tmp_path) == []  # no target, no temporary folder, not even the parent it would have made
    shutil.rmtree(source)
    copy_source(tiny_jina_dir, tmp_path)  # the fix: a good copy again
    conv.convert(source, out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == ["deeper"] and [p.name for p in out.parent.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_failure_while_writing_leaves_nothing(error, tiny_jina_dir, tmp_path, monkeypatch):
    source = copy_source(tiny_jina_dir, tmp_path)
    real_write = conv.write_weights

    def write_then_fail(*args, **kwargs):
        real_write(*args, **kwargs)  # half the repository is on disk when the failure comes
        raise error

    monkeypatch.setattr(conv, "write_weights", write_then_fail)
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else conv.ConversionError
    with pytest.raises(expected) as caught:
        conv.convert(source, tmp_path / "out")
    if expected is conv.ConversionError:
        assert "No space left on device" in str(caught.value) and "nothing was written" in str(caught.value)
    assert leftovers(tmp_path) == []


def test_an_existing_empty_folder_is_filled(tiny_jina_dir, tmp_path):
    source = copy_source(tiny_jina_dir, tmp_path)
    (tmp_path / "out").mkdir()
    conv.convert(source, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and leftovers(tmp_path) == ["out"]


def test_a_non_empty_target_is_refused_unless_overwrite(tiny_jina_dir, tiny_nova_dir, tmp_path, capsys):
    source = copy_source(tiny_jina_dir, tmp_path)
    out = Path(shutil.copytree(tiny_nova_dir, tmp_path / "out"))  # a previous conversion, plus a stale file
    (out / "stale.txt").write_text("old", encoding="utf-8")
    before = sorted(p.name for p in out.iterdir())
    message = refused(source, out, capsys)
    assert "is not empty" in message and "--overwrite" in message
    assert sorted(p.name for p in out.iterdir()) == before

    assert conv.main(["--jina-dir", str(source), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == ["out"]


def test_overwrite_keeps_the_old_conversion_when_the_new_one_fails(tiny_jina_dir, tiny_nova_dir, tmp_path):
    source = copy_source(tiny_jina_dir, tmp_path)
    out = Path(shutil.copytree(tiny_nova_dir, tmp_path / "out"))
    (out / "stale.txt").write_text("old", encoding="utf-8")
    FAILS_LATE["image_token_id disagrees"](source)
    with pytest.raises(conv.ConversionError, match="image_token_id"):
        conv.convert(source, out, overwrite=True)
    assert (out / "stale.txt").read_text(encoding="utf-8") == "old"
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(tiny_nova_dir / "model.safetensors")).keys()
    assert leftovers(tmp_path) == ["out"]


def test_overwrite_replaces_only_a_previous_conversion(tiny_jina_dir, tmp_path, capsys):
    source = copy_source(tiny_jina_dir, tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("precious", encoding="utf-8")
    message = refused(source, other, capsys, "--overwrite")
    assert "not a nova-embeddings-v1 repository" in message
    assert (other / "thesis.txt").read_text(encoding="utf-8") == "precious"

    message = refused(source, tmp_path, capsys, "--overwrite")  # the folder holding the source
    assert "holds --jina-dir" in message and (source / "config.json").is_file()


def test_a_file_or_a_file_in_the_path_is_refused(tiny_jina_dir, tmp_path, capsys):
    source = copy_source(tiny_jina_dir, tmp_path)
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    assert "is a file" in refused(source, tmp_path / "afile", capsys, "--overwrite")
    assert "is not a folder" in refused(source, tmp_path / "afile" / "out", capsys)
    assert leftovers(tmp_path) == ["afile"]


# ------------------------------------------------------------------------------------------ corrupt inputs

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_FILE = "adapters/adapter_model.safetensors"
ADAPTER_CONFIG = "adapters/adapter_config.json"


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def poison(tensors: dict, key: str, value: float) -> None:
    """Put one NaN or Inf into a tensor."""
    tensor = tensors[key].clone()
    tensor.view(-1)[3] = value
    tensors[key] = tensor


def cut(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def to_bin(source: Path) -> None:
    torch.save(load_file(str(source / ADAPTER_FILE)), str(source / "adapters" / "adapter_model.bin"))
    (source / ADAPTER_FILE).unlink()


def jsonfix(name: str, edit):
    return lambda src: edit_json(src / name, edit)


def both_levels(**values):
    """Set config fields at the top level and in text_config (jina's config repeats the text fields)."""
    return jsonfix("config.json", lambda c: (c.update(values), c["text_config"].update(values)))


Q_A = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A"
HOSTILE = [  # (case, how to break the copy, what the one-line message must say)
    # weights
    ("shard header cut", lambda s: cut(s / SHARD_1, lambda n: 1000), f"{SHARD_1} is not a readable safetensors file"),
    ("shard data cut", lambda s: cut(s / SHARD_2, lambda n: n - 100), f"{SHARD_2} is not a readable safetensors file"),
    ("shard garbage", lambda s: (s / SHARD_1).write_bytes(bytes(range(256)) * 20), f"{SHARD_1} is not a readable"),
    ("shard empty", lambda s: (s / SHARD_1).write_bytes(b""), f"{SHARD_1} is not a readable safetensors file"),
    ("shard missing", lambda s: (s / SHARD_1).unlink(), f"{INDEX} names shard(s) that are not in"),
    ("index not JSON", lambda s: (s / INDEX).write_text("{oops"), f"{INDEX} is not valid JSON"),
    ("index a list", lambda s: (s / INDEX).write_text("[1]"), f"{INDEX} must hold a JSON object, not list"),
    ("index file name a path", jsonfix(INDEX, lambda c: c["weight_map"].update({"model.norm.weight": "../x.safetensors"})),
     "weight_map must name files beside it, not '../x.safetensors'"),
    ("index disagrees with shards", jsonfix(INDEX, lambda c: c["weight_map"].update({"model.norm.weight": SHARD_1})),
     f"{INDEX} disagrees with the shards (1 entries): model.norm.weight listed in {SHARD_1}, found in {SHARD_2}"),
    ("NaN in a weight", lambda s: edit_tensors(s / SHARD_1, lambda t: poison(t, "model.embed_tokens.weight", float("nan"))),
     f"tensor model.embed_tokens.weight in {SHARD_1} holds 1 NaN and 0 infinite values"),
    ("Inf in a weight", lambda s: edit_tensors(s / SHARD_2, lambda t: poison(t, "multi_vector_projector.weight", float("inf"))),
     f"tensor multi_vector_projector.weight in {SHARD_2} holds 0 NaN and 1 infinite values"),
    ("integer weight", lambda s: edit_tensors(s / SHARD_2, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].int()})),
     f"tensor model.norm.weight in {SHARD_2} has dtype int32; weights must be floating point"),
    # config
    ("config missing", lambda s: (s / "config.json").unlink(), "config.json not found"),
    ("config a list", lambda s: (s / "config.json").write_text("[1, 2]"), "config.json must hold a JSON object, not list"),
    ("config binary", lambda s: (s / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "config.json is not valid JSON"),
    ("text_config a string", jsonfix("config.json", lambda c: c.update(text_config="big")),
     "text_config must be a JSON object, not str"),
    ("hidden_size a string", jsonfix("config.json", lambda c: c["text_config"].update(hidden_size="64")),
     "hidden_size must be a positive int, got '64'"),
    ("vocabulary too small for the ids", both_levels(vocab_size=580),
     "config.image_token_id 588 is outside the vocabulary (vocab_size 580)"),
    ("vocabulary smaller than the tokenizer", both_levels(vocab_size=590),
     "has 598 tokens, more than the model's vocab_size 590"),
    ("image_token_id disagrees", jsonfix("config.json", lambda c: c.update(image_token_id=587)),
     "gives <|image_pad|> id 588, but config.image_token_id is 587"),
    ("image_token_id a string", jsonfix("config.json", lambda c: c.update(image_token_id="588")),
     "image_token_id"),
    ("eos_token_id list outside the vocabulary", both_levels(eos_token_id=[578, 9999]),
     "config.eos_token_id [578, 9999] is outside the vocabulary (vocab_size 600)"),
    ("eos_token_id disagrees", both_levels(eos_token_id=577), "has eos_token <|im_end|> (id 578), but config.eos_token_id is 577"),
    ("task_names repeated", jsonfix("config.json", lambda c: c.update(task_names=["retrieval", "retrieval", "code"])),
     "task_names must be distinct"),
    ("task_names a path", jsonfix("config.json", lambda c: c.update(task_names=["../evil", "text-matching", "code"])),
     "task name '../evil' must be letters, digits, '-' or '_'"),
    ("projector dim a string", jsonfix("config.json", lambda c: c.update(multi_vector_projector_dim="16")),
     "multi_vector_projector_dim must be a positive int, got '16'"),
    ("preprocessor missing", lambda s: (s / "preprocessor_config.json").unlink(), "preprocessor_config.json not found"),
    ("min_pixels a word", jsonfix("preprocessor_config.json", lambda c: c.update(min_pixels="lots")),
     "min_pixels must be a positive int, got 'lots'"),
    ("min_pixels above max_pixels", jsonfix("preprocessor_config.json", lambda c: c.update(min_pixels=10**6, max_pixels=10)),
     "min_pixels (1000000) must not exceed max_pixels (10)"),
    # tokenizer
    ("no tokenizer", FAILS_LATE["no tokenizer"], "no tokenizer in"),
    ("tokenizer.json garbage", FAILS_LATE["tokenizer.json garbage"], "cannot be loaded"),
    ("tokenizer_config not JSON", lambda s: (s / "tokenizer_config.json").write_text("{"), "cannot be loaded"),
    # adapters
    ("adapters a file", lambda s: (shutil.rmtree(s / "adapters"), (s / "adapters").write_text("x")),
     "adapters is not a folder"),
    ("adapters empty", lambda s: [p.unlink() for p in (s / "adapters").iterdir()], "adapters has no adapter_config.json"),
    ("adapter config not JSON", lambda s: (s / ADAPTER_CONFIG).write_text("{"), "adapter_config.json is not valid JSON"),
    ("adapter r missing", jsonfix(ADAPTER_CONFIG, lambda c: c.pop("r")), "adapter_config.json: 'r' is missing"),
    ("adapter r 0", jsonfix(ADAPTER_CONFIG, lambda c: c.update(r=0)), "adapter_config.json: 'r' must be a positive int, got 0"),
    ("adapter r a word", jsonfix(ADAPTER_CONFIG, lambda c: c.update(r="four")), "'r' must be a positive int, got 'four'"),
    ("adapter r true", jsonfix(ADAPTER_CONFIG, lambda c: c.update(r=True)), "'r' must be a positive int, got True"),
    ("adapter lora_alpha a word", jsonfix(ADAPTER_CONFIG, lambda c: c.update(lora_alpha="big")),
     "'lora_alpha' must be a positive number, got 'big'"),
    ("adapter lora_alpha missing", jsonfix(ADAPTER_CONFIG, lambda c: c.pop("lora_alpha")), "'lora_alpha' is missing"),
    ("adapter dropout negative", jsonfix(ADAPTER_CONFIG, lambda c: c.update(lora_dropout=-0.1)),
     "'lora_dropout' must be a number in [0, 1), got -0.1"),
    ("adapter dropout 1.5", jsonfix(ADAPTER_CONFIG, lambda c: c.update(lora_dropout=1.5)),
     "'lora_dropout' must be a number in [0, 1)"),
    ("adapter use_dora", jsonfix(ADAPTER_CONFIG, lambda c: c.update(use_dora=True)),
     "'use_dora' is True, which the converter does not support"),
    ("adapter rank_pattern", jsonfix(ADAPTER_CONFIG, lambda c: c.update(rank_pattern={"q_proj": 8})),
     "'rank_pattern' is {'q_proj': 8}, which the converter does not support"),
    ("adapter bias all", jsonfix(ADAPTER_CONFIG, lambda c: c.update(bias="all")),
     "'bias' is 'all', which the converter does not support"),
    ("adapter peft_type IA3", jsonfix(ADAPTER_CONFIG, lambda c: c.update(peft_type="IA3")),
     "expected a LoRA adapter, got peft_type 'IA3'"),
    ("adapter file missing", lambda s: (s / ADAPTER_FILE).unlink(), "adapters has no adapter_model.safetensors"),
    ("adapter file garbage", lambda s: (s / ADAPTER_FILE).write_bytes(b"\0" * 100),
     "adapter_model.safetensors is not a readable safetensors file"),
    ("adapter only .bin", to_bin, "adapter_model.bin is a pickle file, which the converter does not load"),
    ("NaN in an adapter", lambda s: edit_tensors(s / ADAPTER_FILE, lambda t: poison(t, f"{Q_A}.code.weight", float("nan"))),
     f"tensor {Q_A}.code.weight in adapter_model.safetensors holds 1 NaN and 0 infinite values"),
    ("integer adapter tensor",
     lambda s: edit_tensors(s / ADAPTER_FILE, lambda t: t.update({f"{Q_A}.code.weight": t[f"{Q_A}.code.weight"].long()})),
     f"tensor {Q_A}.code.weight in adapter_model.safetensors has dtype int64; weights must be floating point"),
]


@pytest.mark.parametrize("damage,expected", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_corrupt_input_is_refused_with_one_clear_line(damage, expected, tiny_jina_dir, tmp_path, capsys):
    source = copy_source(tiny_jina_dir, tmp_path)
    damage(source)
    message = refused(source, tmp_path / "out", capsys)
    assert expected in message
    assert leftovers(tmp_path) == []


def test_a_mixed_dtype_checkpoint_is_kept_with_a_note(tiny_jina_dir, tmp_path, capsys):
    source = copy_source(tiny_jina_dir, tmp_path)
    edit_tensors(source / SHARD_2, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}))
    conv.convert(source, tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.language_model.norm.weight"].dtype == torch.float16
    assert "note: 1 tensor(s) are not float32, e.g. model.norm.weight (float16): kept as they are" in capsys.readouterr().out
