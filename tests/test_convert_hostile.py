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
from safetensors.torch import load_file

from scripts import convert_jina_v4 as conv


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
